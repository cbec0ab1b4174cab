"""archive-old-events with destination s3: a real PostgreSQL events table, a real moto S3.

Each test gets a table of its own and a key prefix of its own in the module's bucket. The table is
seeded like test_archive_old_events (smaller): old terminal rows (COMPLETED / FAILED, updated 100
days ago: ids 1-OLD not a multiple of 10), old rows still being worked on (PENDING / PROCESSING:
multiples of 10), one old CANCELLED row a run does not ask for, and new terminal rows (1 day old).
The objects are read back from S3, decompressed and compared with the rows as they were.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from prefect.settings import PREFECT_API_URL
from psycopg import sql

from blocks.backup_store import BackupStore
from blocks.event_store import EventStore
from blocks.postgres import PostgresDatabase
from deployments.catalog import PROJECT_ROOT
from flows.event_store.archive_old_events import (
    ArchiveParams,
    ArchiveSummary,
    archive_old_events,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.event_archive_s3 import MANIFESTS, archive_root, encode_rows, object_key
from tests.approvals import Approver
from tests.conftest import unique
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.pg_env import scratch_database
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

SCHEMA = "archive_s3"
SAFETY = SafetyParams(budget_max_actions=1000, approval_poll_s=1)
OLD = 3_000
NEW = 300
CANCELLED_ID = OLD + NEW + 1
BATCH = 400


def old_terminal_ids() -> set[int]:
    return {i for i in range(1, OLD + 1) if i % 10 != 0}


@dataclass
class Env:
    server: PostgresServer
    moto: MotoServer
    db: str
    role: str
    password: str
    admin: psycopg.Connection
    bucket: str
    store_block: str

    def table(self) -> str:
        name = unique("events").replace("-", "_")
        t = sql.Identifier(SCHEMA, name)
        self.admin.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, status text NOT NULL,"
                " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, payload jsonb)"
            ).format(t)
        )
        self.admin.execute(
            sql.SQL(
                "INSERT INTO {} SELECT i,"
                " CASE WHEN i <= %(old)s AND i %% 20 = 0 THEN 'PENDING'"
                "  WHEN i <= %(old)s AND i %% 10 = 0 THEN 'PROCESSING'"
                "  WHEN i %% 3 = 0 THEN 'FAILED' ELSE 'COMPLETED' END,"
                " now() - interval '120 days',"
                " now() - CASE WHEN i <= %(old)s THEN interval '100 days' ELSE interval '1 day' END,"
                " jsonb_build_object('n', i, 'note', 'événement ' || i)"
                " FROM generate_series(1, %(n)s) AS i"
            ).format(t),
            {"old": OLD, "n": OLD + NEW},
        )
        self.admin.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (%s, 'CANCELLED', now() - interval '120 days',"
                " now() - interval '100 days', '{{}}')"
            ).format(t),
            (CANCELLED_ID,),
        )
        self.admin.execute(
            sql.SQL("GRANT SELECT, UPDATE, DELETE ON {} TO {}").format(t, sql.Identifier(self.role))
        )
        return name

    def block(self, table: str) -> str:
        name = unique("archive-s3-events")
        database = PostgresDatabase(
            host=self.server.host,
            port=self.server.port,
            dbname=self.db,
            user=self.role,
            password=self.password,
            connect_timeout_s=5,
            statement_timeout_s=10,
        )
        EventStore(
            database=database,
            schema_name=SCHEMA,
            table=table,
            batch_size=BATCH,
            max_batch_size=BATCH,
        ).save(name, overwrite=True)
        return name

    def rows(self, table: str) -> dict[int, dict[str, Any]]:
        """The table's rows as row_to_json shows them (what the objects hold)."""
        cur = self.admin.execute(
            sql.SQL("SELECT id, row_to_json(x)::text FROM {} AS x").format(
                sql.Identifier(SCHEMA, table)
            )
        )
        return {i: json.loads(text) for i, text in cur.fetchall()}

    def source(self, table: str) -> str:
        (system_id,) = self.admin.execute(
            "SELECT system_identifier::text FROM pg_control_system()"
        ).fetchone()
        return f"{system_id}/{self.db}/{SCHEMA}.{table}"

    def put_batch(self, key: str, table: str, ids: list[int], source: str) -> bytes:
        """An archive object of these rows as the runbook writes it (the rows stay)."""
        lines = [
            text
            for (text,) in self.admin.execute(
                sql.SQL(
                    "SELECT row_to_json(x)::text FROM {} AS x WHERE id = ANY(%s) ORDER BY id"
                ).format(sql.Identifier(SCHEMA, table)),
                (ids,),
            ).fetchall()
        ]
        body, sha = encode_rows(lines)
        self.s3().put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body,
            Metadata={"rows": str(len(lines)), "sha256": sha, "source": source},
        )
        return body

    def s3(self) -> Any:
        return self.moto.client("s3")

    def keys(self, prefix: str) -> list[str]:
        listed = self.s3().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listed.get("Contents", []))

    def archived(self, root: str) -> list[dict[str, Any]]:
        """Every row in the archive objects below ``root``, in key order (duplicates kept)."""
        out = []
        for key in self.keys(root):
            if key.startswith(root + MANIFESTS):
                continue
            obj = self.s3().get_object(Bucket=self.bucket, Key=key)
            lines = gzip.decompress(obj["Body"].read()).decode().splitlines()
            assert obj["Metadata"]["rows"] == str(len(lines))
            out += [json.loads(line) for line in lines]
        return out


@pytest.fixture(scope="module")
def env(postgres: PostgresServer, moto: MotoServer) -> Iterator[Env]:
    bucket = f"event-archive-{uuid.uuid4().hex[:8]}"
    moto.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
    )
    store_block = unique("archive-s3")
    BackupStore(
        bucket=bucket,
        prefix="ops",
        endpoint_url=moto.endpoint_url,
        region=moto.region,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        timeout_s=10,
        max_attempts=2,
    ).save(store_block, overwrite=True)
    with scratch_database(postgres, "rbarchs3", ["rbarchs3"], SCHEMA) as scratch:
        (role,) = scratch.roles
        yield Env(
            postgres, moto, scratch.db, role, scratch.password, scratch.admin, bucket, store_block
        )


def run(env: Env, block: str, prefix: str, **overrides: Any) -> Any:
    params = ArchiveParams(
        **(
            {
                "event_store_block": block,
                "destination": "s3",
                "backup_store_block": env.store_block,
                "s3_prefix": prefix,
                "safety": SAFETY,
            }
            | overrides
        )
    )
    return archive_old_events(params=params, return_state=True)


def completed(state: Any) -> ArchiveSummary:
    assert state.is_completed(), state.message
    return state.result()


def test_moves_exactly_the_old_terminal_events_into_s3_objects(env: Env) -> None:
    table, prefix = env.table(), unique("arch")
    block = env.block(table)
    before = env.rows(table)
    root = archive_root(prefix, env.db, SCHEMA, table)

    summary = completed(run(env, block, prefix))

    assert summary.outcome is Outcome.RESOLVED, summary.report
    archived = env.archived(root)
    ids = [r["id"] for r in archived]
    assert len(ids) == len(set(ids))  # every row once
    assert set(ids) == old_terminal_ids()
    # the rows as they were, every column
    assert all(r == before[r["id"]] for r in archived)
    after = env.rows(table)
    assert set(after) == set(before) - old_terminal_ids()  # young, live and CANCELLED stay
    assert all(after[i] == before[i] for i in after)
    result = summary.archive
    assert result.moved == len(old_terminal_ids())
    assert Counter(r["status"] for r in archived) == Counter(result.moved_by_status)
    assert len(result.objects) == len(result.batch_sizes) > 3
    assert sum(o.rows for o in result.objects) == result.moved
    for o in result.objects:
        assert o.key.startswith(root) and o.key.endswith(".jsonl.gz") and not o.resumed
        head = env.s3().head_object(Bucket=env.bucket, Key=o.key)
        assert head["ContentLength"] == o.bytes and head["Metadata"]["sha256"] == o.sha256
    manifest = json.loads(
        env.s3().get_object(Bucket=env.bucket, Key=result.manifest_key)["Body"].read()
    )
    assert manifest["rows"] == result.moved
    assert [o["key"] for o in manifest["objects"]] == [o.key for o in result.objects]
    assert "S3 objects hold exactly the rows removed" in summary.report
    assert f"s3://{env.bucket}/{root}" in summary.report

    # a re-run finds nothing, writes nothing
    keys = env.keys(root)
    again = completed(run(env, block, prefix))
    assert again.outcome is Outcome.NO_ACTION_NEEDED
    assert env.keys(root) == keys and env.rows(table) == after


def test_dry_run_plans_and_writes_nothing(env: Env) -> None:
    table, prefix = env.table(), unique("arch")
    block = env.block(table)
    before = env.rows(table)

    summary = completed(run(env, block, prefix, dry_run=True))

    assert summary.outcome is Outcome.PLANNED
    n = len(old_terminal_ids())
    assert summary.archive.batches_planned == -(-n // BATCH)
    assert summary.archive.moved == 0 and summary.archive.applied == []
    assert f"{n:,} event(s) older than" in summary.report
    assert f"s3://{env.bucket}/{archive_root(prefix, env.db, SCHEMA, table)}" in summary.report
    assert env.keys(prefix) == []
    assert env.rows(table) == before


def test_killed_between_upload_and_commit_the_next_run_finishes_without_duplicates(
    env: Env,
) -> None:
    table, prefix = env.table(), unique("arch")
    block = env.block(table)
    before = env.rows(table)
    root = archive_root(prefix, env.db, SCHEMA, table)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.event_archive_victim",
            block,
            env.moto.endpoint_url,
            env.bucket,
            prefix,
            "2",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=120,
        env={
            **os.environ,
            "PYTHONPATH": str(PROJECT_ROOT),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
        },
    )
    assert proc.returncode == -9, f"not killed: {proc.returncode} {proc.stderr[-2000:]!r}"
    # batch 1 committed; batch 2's object is in S3 and its rows are still in the table
    first, second = env.keys(root)
    in_second = {r["id"] for r in env.archived(root) if r["id"] in _ids(env, second)}
    left = set(env.rows(table))
    assert _ids(env, first).isdisjoint(left)
    assert in_second and in_second <= left
    # one of the unfinished batch's rows changes before the re-run
    changed = min(in_second)
    env.admin.execute(
        sql.SQL("UPDATE {} SET payload = payload || '{{\"fixed\": true}}' WHERE id = %s").format(
            sql.Identifier(SCHEMA, table)
        ),
        (changed,),
    )

    summary = completed(run(env, block, prefix))

    assert summary.outcome is Outcome.RESOLVED, summary.report
    archived = env.archived(root)
    ids = [r["id"] for r in archived]
    assert len(ids) == len(set(ids)) and set(ids) == old_terminal_ids()
    assert set(env.rows(table)) == set(before) - old_terminal_ids()
    (copy,) = [r for r in archived if r["id"] == changed]
    assert copy["payload"]["fixed"] is True  # the row as it was when deleted
    assert [o.key for o in summary.archive.objects if o.resumed] == [second]
    assert "finished a batch an interrupted run had uploaded" in summary.report


def _ids(env: Env, key: str) -> set[int]:
    body = env.s3().get_object(Bucket=env.bucket, Key=key)["Body"].read()
    return {json.loads(line)["id"] for line in gzip.decompress(body).decode().splitlines()}


def test_a_missing_bucket_is_a_clear_error_and_nothing_is_deleted(env: Env) -> None:
    table = env.table()
    block = env.block(table)
    before = env.rows(table)

    state = run(env, block, "arch", s3_bucket=f"no-such-bucket-{uuid.uuid4().hex[:8]}")

    assert state.is_failed()
    assert "does not exist" in state.message and "nothing was moved" in state.message
    assert env.rows(table) == before


def test_an_unfinished_batch_with_a_row_held_by_a_writer_is_finished_without_it(env: Env) -> None:
    """An object an earlier run uploaded but never committed (made here by hand), one of its rows
    locked by a live transaction: the run rewrites the object without that row and deletes the
    rest; the next run, the lock gone, archives that row once."""
    table, prefix = env.table(), unique("arch")
    block = env.block(table)
    before = env.rows(table)
    root = archive_root(prefix, env.db, SCHEMA, table)
    batch = sorted(old_terminal_ids())[:BATCH]
    key = object_key(root, batch[0], batch[-1])
    env.put_batch(key, table, batch, env.source(table))
    held = batch[5]
    with psycopg.connect(env.server.conninfo(dbname=env.db)) as writer:
        writer.execute(
            sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(
                sql.Identifier(SCHEMA, table)
            ),
            (held,),
        )
        summary = completed(run(env, block, prefix))
        writer.rollback()

    assert summary.outcome is Outcome.RESOLVED, summary.report
    (resumed,) = [o for o in summary.archive.objects if o.resumed]
    assert resumed.key == key and resumed.rows == BATCH - 1
    ids = [r["id"] for r in env.archived(root)]
    assert len(ids) == len(set(ids)) and set(ids) == old_terminal_ids() - {held}
    assert held in env.rows(table)
    assert "locked by live transactions" in summary.report

    rest = completed(run(env, block, prefix))

    assert rest.outcome is Outcome.RESOLVED and rest.archive.moved == 1
    archived = env.archived(root)
    ids = [r["id"] for r in archived]
    assert len(ids) == len(set(ids)) and set(ids) == old_terminal_ids()
    assert all(r == before[r["id"]] for r in archived)
    assert set(env.rows(table)) == set(before) - old_terminal_ids()


def test_more_than_approve_over_rejected_writes_and_deletes_nothing(env: Env) -> None:
    table, prefix = env.table(), unique("arch")
    block = env.block(table)
    before = env.rows(table)
    approver = Approver(
        "archive-old-events", {"approve": False, "approver": "carol", "reason": "not this month"}
    )
    approver.start()

    state = run(env, block, prefix, approve_over=100)

    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert f"{len(old_terminal_ids()):,} events would move" in approver.description
    assert state.is_failed() and "rejected by carol" in state.message
    assert env.keys(prefix) == [] and env.rows(table) == before


def test_an_object_of_another_server_under_the_same_key_is_never_read_nor_overwritten(
    env: Env,
) -> None:
    """Another server's table of the same name archived under the same prefix: its object at the
    key this table's first batch would take (ids that are in this table too) is left as it is,
    and this table's batch gets its checksum in its key."""
    table, prefix = env.table(), unique("arch")
    block = env.block(table)
    root = archive_root(prefix, env.db, SCHEMA, table)
    batch = sorted(old_terminal_ids())[:BATCH]
    foreign_key = object_key(root, batch[0], batch[-1])
    foreign = env.put_batch(foreign_key, table, batch[:10], "6999999999999999999/other/x.y")

    summary = completed(run(env, block, prefix))

    assert summary.outcome is Outcome.RESOLVED, summary.report
    assert env.s3().get_object(Bucket=env.bucket, Key=foreign_key)["Body"].read() == foreign
    ours = [o.key for o in summary.archive.objects]
    assert foreign_key not in ours and not any(o.resumed for o in summary.archive.objects)
    assert any(k.startswith(foreign_key[: -len(".jsonl.gz")] + ".") for k in ours)
    ids = [r["id"] for o in ours for r in _rows(env, o)]
    assert len(ids) == len(set(ids)) and set(ids) == old_terminal_ids()


def _rows(env: Env, key: str) -> list[dict[str, Any]]:
    body = env.s3().get_object(Bucket=env.bucket, Key=key)["Body"].read()
    return [json.loads(line) for line in gzip.decompress(body).decode().splitlines()]


def test_time_budget_stops_and_the_next_run_continues(env: Env) -> None:
    table, prefix = env.table(), unique("arch")
    block = env.block(table)
    root = archive_root(prefix, env.db, SCHEMA, table)

    state = run(env, block, prefix, time_budget_s=0.001)

    assert state.is_failed() and "time budget" in state.message
    first = {r["id"] for r in env.archived(root)}
    assert 0 < len(first) < len(old_terminal_ids())
    assert first.isdisjoint(env.rows(table))
    rest = completed(run(env, block, prefix))
    assert rest.outcome is Outcome.RESOLVED
    assert rest.archive.moved == len(old_terminal_ids()) - len(first)
    ids = [r["id"] for r in env.archived(root)]
    assert len(ids) == len(set(ids)) and set(ids) == old_terminal_ids()
