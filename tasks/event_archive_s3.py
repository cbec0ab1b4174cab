"""Event store tasks: move old events in terminal states to S3 objects, in short batches.

Each batch is one database transaction: it locks the next old terminal rows by id (``FOR UPDATE
SKIP LOCKED``: a row a writer holds is skipped, never waited on), writes exactly those rows as one
gzip'd JSON-lines object (``<prefix>/<database>/<schema>.<table>/<first id>-<last id>.jsonl.gz``,
metadata: rows, sha256, first and last id, and the source: server system identifier, database,
table), checks that S3 holds it (HEAD: size, sha256 and rows), and only
then deletes those rows and commits. Nothing is deleted that is not verifiably in S3.

A crash between the upload and the commit leaves the object in S3 and its rows in the table (the
transaction rolls back). The next run first finishes such batches: an object whose rows are still
in the table is written again at the same key with those rows as they are now (byte for byte the
same when they did not change: gzip without a timestamp), verified, and its rows deleted. So every
row ends in S3 exactly once, and a re-run continues where the last one stopped. An object whose
rows are gone from the table is a finished batch: never written over (a new batch whose key would
collide gets its checksum in the key). Objects of another source (another server's table of
the same name under the same prefix) are never read as this table's, nor written over.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from pydantic import BaseModel, Field, computed_field

from blocks.backup_store import BackupStore
from blocks.event_store import EventStore
from runbooks.results import Change
from runbooks.retry import runbook_task_options
from tasks.event_archive import (
    MAX_PASSES,
    ArchiveResult,
    ArchiveSpec,
    ArchiveUnsuitable,
    _params,
    _sql,
)
from tasks.event_archive import _status_change as _table_status_change
from tasks.event_store import batch_bounds, next_batch_size
from tasks.postgres import is_transient
from tasks.s3_objects import list_objects, put_json

# --- pure decisions --------------------------------------------------------------------------

OBJECT_SUFFIX = ".jsonl.gz"
MANIFESTS = "_manifests/"
_KEY = re.compile(r"(-?\d+)-(-?\d+)(?:\.[0-9a-f]{12})?\.jsonl\.gz")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9!_.*'()=@+,;:$ -]+")


def archive_prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` is not acceptable as the archive's key prefix (None: it is). Path segments
    of safe characters; no leading slash, no empty, '.' or '..' segment."""
    if prefix == "":
        return None
    if len(prefix) > 512:
        return "prefix must be at most 512 characters"
    if prefix.startswith("/"):
        return f"prefix {prefix!r} must not start with '/'"
    parts = prefix.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"prefix {prefix!r} must not have empty, '.' or '..' segments"
    bad = [p for p in parts if not _PREFIX_SEGMENT.fullmatch(p)]
    if bad:
        return f"prefix segment {bad[0]!r} has characters other than letters, digits and !_.*'()=@+,;:$ -"
    return None


def archive_root(prefix: str, database: str, schema: str, table: str) -> str:
    """Where a table's archive objects go: ``<prefix>/<database>/<schema>.<table>/``."""
    prefix = prefix.strip("/")
    tail = f"{database}/{schema}.{table}/"
    return f"{prefix}/{tail}" if prefix else tail


def _id(value: int) -> str:
    return f"{value:020d}"  # zero-padded: keys list in id order


def object_key(root: str, first_id: int, last_id: int, digest: str | None = None) -> str:
    """The key of a batch's object: its first and last id (deterministic: a re-run of the same
    batch writes the same key); ``digest`` (the content's sha256) only when another batch already
    holds that key."""
    name = f"{_id(first_id)}-{_id(last_id)}"
    if digest:
        name += f".{digest[:12]}"
    return root + name + OBJECT_SUFFIX


def parse_object_key(name: str) -> tuple[int, int] | None:
    """(first id, last id) of an archive object's name relative to its root; None for anything
    else (the manifests, foreign objects)."""
    match = _KEY.fullmatch(name)
    if not match:
        return None
    first, last = int(match[1]), int(match[2])
    return (first, last) if first <= last else None


def encode_rows(lines: list[str]) -> tuple[bytes, str]:
    """A batch's object body (gzip'd JSON lines, no timestamp in the header: the same rows give
    the same bytes) and its sha256."""
    body = gzip.compress("".join(line + "\n" for line in lines).encode(), compresslevel=6, mtime=0)
    return body, hashlib.sha256(body).hexdigest()


def planned_batches(total: int, batch_size: int) -> int:
    """How many batches ``total`` rows take at the first batch size (batches grow or shrink to
    take about the block's batch_target_ms: an estimate)."""
    return math.ceil(total / batch_size) if total > 0 else 0


def head_matches(
    head: dict[str, Any] | None, size: int, sha256: str, rows: int, source: str
) -> bool:
    """Whether an object's HEAD shows exactly this body from this source: size, sha256, row
    count and source table."""
    if head is None:
        return False
    meta = head.get("Metadata", {})
    return (
        head.get("ContentLength") == size
        and meta.get("sha256") == sha256
        and meta.get("rows") == str(rows)
        and meta.get("source") == source
    )


# --- results ---------------------------------------------------------------------------------


class ArchivedObject(BaseModel):
    key: str
    rows: int
    bytes: int
    sha256: str
    first_id: int
    last_id: int
    resumed: bool = Field(
        False, description="Finished a batch an earlier run uploaded but did not commit."
    )


class S3ArchiveResult(ArchiveResult):
    """Events moved to S3 objects."""

    bucket: str
    root: str = Field(description="Key prefix of the table's objects.")
    batches_planned: int = 0
    objects: list[ArchivedObject] = Field(default_factory=list)
    manifest_key: str | None = None
    held_back: int = Field(
        0, description="Rows of unfinished earlier batches skipped: a transaction held them."
    )

    @computed_field
    @property
    def bytes_written(self) -> int:
        return sum(o.bytes for o in self.objects)

    @computed_field
    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.root}"


class S3ArchiveManifest(BaseModel):
    """What one run archived: written last, next to the objects."""

    table: str
    source: str = Field(description="Server system identifier / database / schema.table.")
    cutoff: datetime
    statuses: list[str]
    finished_at: datetime
    rows: int
    objects: list[ArchivedObject]


# --- acting ----------------------------------------------------------------------------------


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.OperationalError):
        return is_transient(exc)
    return isinstance(exc, BotoCoreError)


s3_archive_retries = runbook_task_options(psycopg.OperationalError, BotoCoreError, when=_transient)

_INTEGER_TYPES = {"smallint", "integer", "bigint"}
_ID_TYPE = (
    "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute AS a"
    " JOIN pg_class AS c ON c.oid = a.attrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND NOT a.attisdropped"
)


def _status_change(
    store: EventStore, spec: ArchiveSpec, root: str, bucket: str, status: str, rows: int
) -> Change:
    return _table_status_change(
        store,
        spec,
        status,
        rows,
        action="archive_events_to_s3",
        destination=f"s3://{bucket}/{root}",
    )


def _check_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchBucket"):
            raise ArchiveUnsuitable(f"S3 bucket {bucket} does not exist") from None
        if code in ("403", "AccessDenied"):
            raise ArchiveUnsuitable(
                f"S3 bucket {bucket}: access denied to these credentials"
            ) from None
        raise


def _head(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


class _Batches:
    """Writes and verifies one batch's object, deletes its rows; the caller's transaction commits."""

    def __init__(
        self,
        source: str,
        conn: psycopg.Connection,
        s3: Any,
        store: EventStore,
        spec: ArchiveSpec,
        bucket: str,
        root: str,
        result: S3ArchiveResult,
    ):
        self.source = source
        self.conn, self.s3, self.store, self.spec = conn, s3, store, spec
        self.bucket, self.root, self.result = bucket, root, result
        self.delete = _sql(
            store, spec, "DELETE FROM {table} WHERE {id} = ANY(%(ids)s) RETURNING {status}::text"
        )

    def write(self, rows: list[tuple[int, str, str]], key: str | None, resumed: bool) -> None:
        """``rows``: (id, status, row as JSON), locked by the open transaction, in id order.
        ``key``: the unfinished earlier batch's key these rows finish; None: a new batch."""
        body, sha = encode_rows([r[2] for r in rows])
        first, last = rows[0][0], rows[-1][0]
        if key is None:
            key = object_key(self.root, first, last)
            head = _head(self.s3, self.bucket, key)
            if head is not None and not head_matches(head, len(body), sha, len(rows), self.source):
                # a finished batch (or another source's) holds this key: never written over
                key = object_key(self.root, first, last, sha)
        self.s3.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType="application/x-ndjson",
            Metadata={
                "rows": str(len(rows)),
                "sha256": sha,
                "first-id": str(first),
                "last-id": str(last),
                "source": self.source,
            },
        )
        head = _head(self.s3, self.bucket, key)
        if not head_matches(head, len(body), sha, len(rows), self.source):
            raise RuntimeError(
                f"s3://{self.bucket}/{key} does not hold the {len(rows)} row(s) just written "
                f"({len(body)} bytes, sha256 {sha[:12]}): nothing deleted"
            )
        deleted = self.conn.execute(self.delete, {"ids": [r[0] for r in rows]}).fetchall()
        if len(deleted) != len(rows):
            raise RuntimeError(
                f"deleted {len(deleted)} row(s) of the {len(rows)} locked: rolled back"
            )
        res = self.result
        res.moved += len(rows)
        res.inserted += len(rows)
        res.batch_sizes.append(len(rows))
        for (status,) in deleted:
            res.moved_by_status[status] = res.moved_by_status.get(status, 0) + 1
        res.objects.append(
            ArchivedObject(
                key=key,
                rows=len(rows),
                bytes=len(body),
                sha256=sha,
                first_id=first,
                last_id=last,
                resumed=resumed,
            )
        )


_PICK = (
    "SELECT x.{id}, x.{status}::text, row_to_json(x)::text FROM {table} AS x"
    " WHERE {old}{where} ORDER BY x.{id} LIMIT %(batch_size)s FOR UPDATE SKIP LOCKED"
)


def _finish_unfinished(batches: _Batches, objects: dict[str, int]) -> set[int]:
    """Finish the batches earlier runs uploaded but did not commit; the ids still held back."""
    conn, store, spec, s3, bucket, root = (
        batches.conn,
        batches.store,
        batches.spec,
        batches.s3,
        batches.bucket,
        batches.root,
    )
    ranges = {name: parse_object_key(name) for name in objects}
    ranges = {name: r for name, r in ranges.items() if r is not None}
    if not ranges:
        return set()
    names = sorted(ranges)
    # a cheap first look: which objects' id ranges hold old terminal rows at all
    hits = conn.execute(
        _sql(
            store,
            spec,
            "SELECT r.i FROM unnest(%(lo)s::bigint[], %(hi)s::bigint[]) WITH ORDINALITY AS r(lo, hi, i)"
            " WHERE EXISTS (SELECT 1 FROM {table} WHERE {old} AND {id} BETWEEN r.lo AND r.hi)",
        ),
        _params(spec, lo=[ranges[n][0] for n in names], hi=[ranges[n][1] for n in names]),
    ).fetchall()
    held: set[int] = set()
    present = _sql(store, spec, "SELECT {id} FROM {table} WHERE {id} = ANY(%(ids)s)")
    pick = _sql(store, spec, _PICK.replace("{where}", " AND x.{id} = ANY(%(ids)s)"))
    for (i,) in hits:
        key = root + names[i - 1]
        obj = s3.get_object(Bucket=bucket, Key=key)
        if obj.get("Metadata", {}).get("source") != batches.source:
            continue  # another server's table of the same name: never read as ours
        raw = gzip.decompress(obj["Body"].read())
        ids = [json.loads(line)[store.id_column] for line in raw.decode().splitlines() if line]
        if not conn.execute(present, {"ids": ids}).fetchone():
            continue  # a finished batch: its rows are gone; the old rows in its range are others
        with conn.transaction():
            rows = conn.execute(pick, _params(spec, ids=ids, batch_size=len(ids))).fetchall()
            if rows:
                batches.write(rows, key, resumed=True)
        if not rows:
            # a live transaction holds them (or they are no longer old and terminal): the
            # object keeps its copy, and no new batch takes them this run
            held |= {r[0] for r in conn.execute(present, {"ids": ids}).fetchall()}
    return held


@task(**s3_archive_retries)
def archive_old_events_to_s3(
    store: EventStore,
    backup: BackupStore,
    spec: ArchiveSpec,
    bucket: str,
    prefix: str,
    dry_run: bool,
) -> S3ArchiveResult:
    """Move the old terminal events into gzip'd JSON-lines objects in S3, one object per batch,
    each batch's rows deleted in the transaction that locked them once S3 verifiably holds them.
    Batches are sized to take about the block's ``batch_target_ms``; none starts after
    ``spec.time_budget_s``. Idempotent and resumable: a re-run (or a retry) first finishes the
    batches an interrupted run uploaded, then continues with what is left."""
    db = store.database
    root = archive_root(prefix, db.dbname, store.schema_name, store.table)
    s3 = backup.get_s3_client()
    _check_bucket(s3, bucket)
    result = S3ArchiveResult(dry_run=dry_run, bucket=bucket, root=root)
    with store.database.connect(autocommit=True) as conn:
        row = conn.execute(_ID_TYPE, (store.schema_name, store.table, store.id_column)).fetchone()
        if row is None or row[0] not in _INTEGER_TYPES:
            raise ArchiveUnsuitable(
                f"the S3 archive keys objects by id: {store.schema_name}.{store.table}."
                f"{store.id_column} is {row[0] if row else 'missing'}, not an integer"
            )
        counts = dict(
            conn.execute(
                _sql(
                    store,
                    spec,
                    "SELECT {status}::text, count(*)::int FROM {table} WHERE {old} GROUP BY 1",
                ),
                _params(spec),
            ).fetchall()
        )
        if not counts:
            return result
        result.planned += [
            _status_change(store, spec, root, bucket, s, n) for s, n in sorted(counts.items())
        ]
        result.batches_planned = planned_batches(sum(counts.values()), batch_bounds(store)[0])
        if dry_run:
            return result
        (system_id,) = conn.execute(
            "SELECT system_identifier::text FROM pg_control_system()"
        ).fetchone()
        source = f"{system_id}/{db.dbname}/{store.schema_name}.{store.table}"
        batches = _Batches(source, conn, s3, store, spec, bucket, root, result)
        started = time.monotonic()
        held = _finish_unfinished(batches, list_objects(s3, bucket, root))
        result.held_back = len(held)
        _move_in_batches(batches, held, started)
        result.elapsed_s = time.monotonic() - started
    if result.objects:
        stamp = datetime.now(UTC)
        result.manifest_key = f"{root}{MANIFESTS}{stamp:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}.json"
        put_json(
            s3,
            bucket,
            result.manifest_key,
            S3ArchiveManifest(
                table=f"{store.schema_name}.{store.table}",
                source=batches.source,
                cutoff=spec.cutoff,
                statuses=spec.statuses,
                finished_at=stamp,
                rows=result.moved,
                objects=result.objects,
            ),
        )
    result.applied += [
        _status_change(store, spec, root, bucket, s, n)
        for s, n in sorted(result.moved_by_status.items())
    ]
    if held:
        result.notes.append(
            f"{len(held):,} row(s) of an unfinished earlier batch were held by live transactions: "
            "the next run finishes that batch"
        )
    if result.out_of_time:
        result.notes.append(
            f"time budget of {spec.time_budget_s:g}s ended after {result.moved:,} event(s): "
            "the next run continues"
        )
    return result


_ANY_LEFT = (
    "SELECT EXISTS (SELECT 1 FROM {table} AS x WHERE {old}{where} LIMIT 1 FOR UPDATE SKIP LOCKED)"
)


def _move_in_batches(batches: _Batches, held: set[int], started: float) -> None:
    store, spec, conn, result = batches.store, batches.spec, batches.conn, batches.result
    size, smallest, largest = batch_bounds(store)
    target_s = store.batch_target_ms / 1000
    deadline = started + spec.time_budget_s
    where = " AND NOT x.{id} = ANY(%(held)s)" if held else ""
    statements = {
        after: _sql(
            store,
            spec,
            _PICK.replace("{where}", where + (" AND x.{id} > %(after)s" if after else "")),
        )
        for after in (False, True)
    }
    any_left = _sql(store, spec, _ANY_LEFT.replace("{where}", where))
    for _pass in range(MAX_PASSES):
        # a second pass from the lowest id takes rows a writer held during the first
        if _pass and not conn.execute(any_left, _params(spec, held=list(held))).fetchone()[0]:
            break
        last: Any = None
        while True:
            # at least one batch a run: a budget the listing alone uses up still makes progress
            if result.objects and time.monotonic() >= deadline:
                result.out_of_time = True
                break
            t0 = time.perf_counter()
            with conn.transaction():
                rows = conn.execute(
                    statements[last is not None],
                    _params(spec, batch_size=size, after=last, held=list(held)),
                ).fetchall()
                if rows:
                    batches.write(rows, None, resumed=False)
            elapsed = time.perf_counter() - t0
            result.slowest_batch_s = max(result.slowest_batch_s, elapsed)
            # SKIP LOCKED rows do not count against the LIMIT: a short batch is the end
            if len(rows) < size:
                break
            last = rows[-1][0]
            size = next_batch_size(size, elapsed, target_s, smallest, largest)
        if result.out_of_time:
            break


@task(**s3_archive_retries)
def count_archived_rows(backup: BackupStore, bucket: str, keys: list[str]) -> int:
    """Rows the objects hold by their metadata, read back from S3 (HEAD of each)."""
    s3 = backup.get_s3_client()
    total = 0
    for key in keys:
        head = _head(s3, bucket, key)
        if head is None:
            raise FileNotFoundError(f"s3://{bucket}/{key} is missing")
        total += int(head.get("Metadata", {}).get("rows", 0))
    return total
