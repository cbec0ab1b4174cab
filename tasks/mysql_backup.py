"""MariaDB / MySQL backups: ``mariadb-dump`` of one database, gzip'd on the fly into S3 (multipart,
sha256, no local disk), a manifest written last (tasks.db_backup_format), and a restore drill into
a scratch database fed straight from S3.

Credentials reach the client programs through a temporary option file (``--defaults-extra-file``,
mode 0600, deleted after): never on a command line (``ps``) or in the environment.

Fingerprints: per table the row count and an order-independent checksum (the sum of the first 60
bits of MD5 over each row's QUOTE()d columns), read in a consistent snapshot (``START TRANSACTION
WITH CONSISTENT SNAPSHOT``) opened just before the dump starts its own. MariaDB cannot share a
snapshot with another session (PostgreSQL's ``pg_export_snapshot``): rows written between the two
snapshots make the drill report a difference. Take backups when writes are quiet, or read the
differences as "written during the backup".
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

import pymysql
from prefect import task

from blocks.backup_store import BackupStore
from blocks.mysql import MySQLDatabase
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.db_backup_format import (
    DUMP,
    MANIFEST,
    DumpManifest,
    TableFingerprint,
    backup_prefix,
    server_label,
)
from tasks.mysql import is_transient
from tasks.pg_backup import (
    BackupResult,
    RestoreResult,
    complete_backup,
    stderr_tail,
    tool_version,
)
from tasks.s3_objects import get_json
from tasks.s3_upload import MultipartUpload

ENGINE = "mysql"
FORMAT = "sql.gz"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,63}")
_DRILL_MARK = "_runbooks_drill"

mysql_backup_retries = runbook_task_options(pymysql.err.OperationalError, when=is_transient)


def quote_ident(name: str) -> str:
    """A backtick-quoted identifier, after a strict check (no backtick can be in it)."""
    if not _IDENT.fullmatch(name or ""):
        raise ValueError(f"{name!r} is not a plain MariaDB identifier")
    return f"`{name}`"


@contextmanager
def option_file(db: MySQLDatabase) -> Iterator[str]:
    """A [client] option file with the block's host, port, user and password (0600, deleted on
    exit), for ``--defaults-extra-file``."""

    def value(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    password = db.password.get_secret_value() if db.password else ""
    lines = [
        "[client]",
        f"host={value(db.host)}",
        f"port={db.port}",
        f"user={value(db.user)}",
        f"password={value(password)}",
        "protocol=TCP",
    ]
    if db.ssl_mode != "disabled":
        lines.append("ssl")
        if db.ssl_ca:
            lines.append(f"ssl-ca={value(db.ssl_ca)}")
        if db.ssl_mode in ("verify-ca", "verify-identity"):
            lines.append("ssl-verify-server-cert")
    fd, path = tempfile.mkstemp(prefix="runbooks-my-", suffix=".cnf")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        yield path
    finally:
        os.unlink(path)


class _Gzipped:
    """A readable stream of gzip bytes of another stream, compressed as it is read."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self.buf = bytearray()
        self.done = False

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.done:
            chunk = self.raw.read(1 << 20)
            if chunk:
                self.buf += self.z.compress(chunk)
            else:
                self.buf += self.z.flush()
                self.done = True
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _tables(conn: Any, database: str) -> dict[str, list[str]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.TABLE_NAME, c.COLUMN_NAME FROM information_schema.COLUMNS c "
            "JOIN information_schema.TABLES t USING (TABLE_SCHEMA, TABLE_NAME) "
            "WHERE c.TABLE_SCHEMA = %s AND t.TABLE_TYPE = 'BASE TABLE' "
            "ORDER BY c.TABLE_NAME, c.ORDINAL_POSITION",
            (database,),
        )
        out: dict[str, list[str]] = {}
        for table, column in cur.fetchall():
            out.setdefault(table, []).append(column)
    return out


def _catalog_ident(name: str) -> str:
    """A table or column name read from information_schema (the server's, not an input), quoted
    with its backticks doubled."""
    return "`" + name.replace("`", "``") + "`"


def fingerprint_query(database: str, table: str, columns: list[str]) -> str:
    row = ", ".join(f"QUOTE({_catalog_ident(c)})" for c in columns)
    # identifiers quoted: the database checked by quote_ident, the rest from the catalog
    source = f"{quote_ident(database)}.{_catalog_ident(table)}"
    digest = f"CONV(SUBSTRING(MD5(CONCAT_WS(',', {row})), 1, 15), 16, 10)"
    return f"SELECT COUNT(*), SUM({digest}) FROM {source}"  # noqa: S608


def read_fingerprints(conn: Any, database: str) -> dict[str, TableFingerprint]:
    """Rows and checksum of every base table (but the drill's mark), in the session's snapshot."""
    out: dict[str, TableFingerprint] = {}
    for table, columns in _tables(conn, database).items():
        if table == _DRILL_MARK:
            continue
        with conn.cursor() as cur:
            cur.execute(fingerprint_query(database, table, columns))
            rows, total = cur.fetchone()
        out[table] = TableFingerprint(rows=int(rows), checksum=str(int(total or 0)))
    return out


def backup_location(store: BackupStore, db: MySQLDatabase, database: str) -> str:
    return backup_prefix(store.prefix, ENGINE, server_label(db.host, db.port), database)


@task(**mysql_backup_retries)
def dump_mysql_database(
    db: MySQLDatabase, store: BackupStore, database: str, backup_id: str, dry_run: bool
) -> BackupResult:
    """``mariadb-dump --single-transaction --routines --triggers --events`` of ``database``,
    gzip'd into S3, then the manifest. Idempotent: a backup whose manifest exists is not taken
    again; a retried one overwrites its own dump object."""
    quote_ident(database)
    s3 = store.get_s3_client()
    root = backup_location(store, db, database) + backup_id + "/"
    location = f"s3://{store.bucket}/{root}"
    existing = get_json(s3, store.bucket, root + MANIFEST)
    conn = db.connect(database=database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT COALESCE(SUM(DATA_LENGTH + INDEX_LENGTH), 0), VERSION() "
                "FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                (database,),
            )
            size, version = cur.fetchone()
        change = Change(
            action="mariadb-dump",
            target=f"{database} -> {location}{DUMP}",
            detail={"database_bytes": int(size), "format": FORMAT},
        )
        result = BackupResult(
            dry_run=dry_run, planned=[change], backup_id=backup_id, location=location,
            database_bytes=int(size),
        )  # fmt: skip
        if existing is not None:
            result.manifest = DumpManifest.model_validate(existing)
            result.already_complete = True
            result.notes.append(f"backup {backup_id} is already complete: not taken again")
            return result
        if dry_run:
            return result
        # the fingerprints' snapshot, just before the dump opens its own
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            cur.execute("SELECT UTC_TIMESTAMP(6)")
            (snapshot_at,) = cur.fetchone()
        fingerprints = read_fingerprints(conn, database)
        conn.rollback()
    finally:
        conn.close()

    upload = MultipartUpload(s3, store.bucket, root + DUMP)
    started = time.monotonic()
    with option_file(db) as cnf, tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            ["mariadb-dump", f"--defaults-extra-file={cnf}", "--single-transaction",
             "--routines", "--triggers", "--events", "--hex-blob", "--skip-dump-date",
             database],  # no --databases: no CREATE DATABASE / USE, restorable anywhere
            stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
        rc = upload.feed_process(proc, _Gzipped)
        if rc != 0:
            raise RuntimeError(
                f"mariadb-dump of {database} failed (exit {rc}): {stderr_tail(stderr)}"
            )
    upload.complete()
    seconds = time.monotonic() - started
    manifest = DumpManifest(
        engine=ENGINE,
        backup_id=backup_id,
        database=database,
        server=f"{db.host}:{db.port}",
        server_version=str(version),
        tool=tool_version("mariadb-dump"),
        format=FORMAT,
        snapshot_at=snapshot_at.replace(tzinfo=UTC),
        completed_at=datetime.now(UTC),
        database_bytes=int(size),
        size=upload.size,
        sha256=upload.sha.hexdigest(),
        dump_seconds=round(seconds, 3),
        tables=fingerprints,
    )
    return complete_backup(s3, store, root, result, change, manifest)


# --- restore drill --------------------------------------------------------------------------


class _Checked:
    """The S3 body read through, sha256 and size counted on the way."""

    def __init__(self, body: Any):
        self.body, self.sha, self.size = body, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.body.read(n if n and n > 0 else 1 << 20)
        self.sha.update(chunk)
        self.size += len(chunk)
        return chunk


@task(**runbook_task_options())
def restore_mysql_into_scratch(
    db: MySQLDatabase, store: BackupStore, manifest: DumpManifest, location: str, scratch: str,
    run_id: str, dry_run: bool,
) -> RestoreResult:  # fmt: skip
    """Create ``scratch`` (marked by a ``_runbooks_drill`` table holding the run id), and pipe
    the backup, gunzip'd, into the ``mariadb`` client, straight from S3; the object's sha256 and
    size are checked against the manifest (the dump names no database: it goes where it is
    piped)."""
    quote_ident(scratch)
    change = Change(
        action="restore",
        target=f"s3://{store.bucket}/{location}{manifest.backup_id}/{DUMP} -> {scratch}",
    )
    result = RestoreResult(dry_run=dry_run, planned=[change], scratch=scratch)
    if dry_run:
        return result
    conn = db.connect(database="")
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote_ident(scratch)}")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {quote_ident(scratch)}.{_DRILL_MARK} "
                "(run_id VARCHAR(64) PRIMARY KEY, created_at DATETIME NOT NULL)"
            )
            cur.execute(
                f"REPLACE INTO {quote_ident(scratch)}.{_DRILL_MARK} VALUES (%s, UTC_TIMESTAMP())",  # noqa: S608
                (run_id,),
            )
    finally:
        conn.close()
    s3 = store.get_s3_client()
    key = f"{location}{manifest.backup_id}/{DUMP}"
    body = _Checked(s3.get_object(Bucket=store.bucket, Key=key)["Body"])
    started = time.monotonic()
    with option_file(db) as cnf, tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            ["mariadb", f"--defaults-extra-file={cnf}", "--batch", scratch],
            stdin=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
        error = None
        try:
            with gzip.GzipFile(fileobj=body) as sql:  # type: ignore[arg-type]
                while chunk := sql.read(1 << 20):
                    proc.stdin.write(chunk)  # type: ignore[union-attr]
            while body.read(1 << 20):
                pass  # the rest (none for an intact object) still counts for sha256
        except (OSError, EOFError, zlib.error) as exc:
            error = f"the backup object does not decompress: {exc}"
        finally:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass
            rc = proc.wait(timeout=3600)
        if error is None and rc != 0:
            error = f"mariadb exited {rc}: {stderr_tail(stderr)}"
    result.seconds = round(time.monotonic() - started, 3)
    result.sha256, result.size = body.sha.hexdigest(), body.size
    if error is None and (body.sha.hexdigest() != manifest.sha256 or body.size != manifest.size):
        error = (
            f"the backup object differs from its manifest (sha256 {body.sha.hexdigest()[:12]}..., "
            f"{body.size} bytes; manifest {manifest.sha256[:12]}..., {manifest.size} bytes)"
        )
    result.error = error
    if error is None:
        result.applied.append(change)
    return result


@task(**mysql_backup_retries)
def fingerprint_mysql_database(db: MySQLDatabase, database: str) -> dict[str, TableFingerprint]:
    conn = db.connect(database=database)
    try:
        with conn.cursor() as cur:
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        out = read_fingerprints(conn, database)
        conn.rollback()
        return out
    finally:
        conn.close()


def _marked(cur: Any, database: str) -> str | None:
    """The run id in the drill's mark table of ``database``; None: not a scratch database."""
    cur.execute(
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (database, _DRILL_MARK),
    )
    if cur.fetchone() is None:
        return None
    cur.execute(f"SELECT run_id FROM {quote_ident(database)}.{_DRILL_MARK} LIMIT 1")  # noqa: S608
    row = cur.fetchone()
    return str(row[0]) if row else ""


@task(**mysql_backup_retries)
def mysql_scratch_left_behind(db: MySQLDatabase, database: str, run_id: str) -> list[str]:
    """Scratch databases of ``database`` (``<database>_drill_*``, marked) of other drill runs."""
    quote_ident(database)
    conn = db.connect(database="")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s",
                (database.replace("_", "\\_") + "\\_drill\\_%",),
            )
            names = [str(r[0]) for r in cur.fetchall()]
            out = []
            for name in names:
                if not _IDENT.fullmatch(name):
                    continue
                mark = _marked(cur, name)
                if mark is not None and mark != run_id:
                    out.append(name)
            return out
    finally:
        conn.close()


@task(**mysql_backup_retries)
def drop_mysql_scratch(db: MySQLDatabase, names: list[str], dry_run: bool) -> ChangeSet:
    """DROP scratch databases, each only if it carries the drill's mark table (idempotent: a
    database already gone is skipped)."""
    result = ChangeSet(dry_run=dry_run)
    conn = db.connect(database="")
    try:
        with conn.cursor() as cur:
            for name in names:
                quote_ident(name)
                change = Change(action="drop_database", target=name)
                if _marked(cur, name) is None:
                    result.notes.append(f"{name}: no drill mark (or gone): left alone")
                    continue
                result.planned.append(change)
                if not dry_run:
                    cur.execute(f"DROP DATABASE {quote_ident(name)}")
                    result.applied.append(change)
        return result
    finally:
        conn.close()
