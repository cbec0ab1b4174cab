"""PostgreSQL backups to S3 and restore drills: pg_dump streamed into a multipart upload, the
tables' rows and checksums read in the dump's own snapshot, pg_restore fed straight from S3.

Fingerprints are in tasks.pg_fingerprint, the streaming upload in tasks.s3_upload.

pg_dump and pg_restore are the tools: nothing else reads or writes PostgreSQL's dump format, and a
DBA can restore any of these backups by hand with them (`aws s3 cp <key>/dump - | pg_restore`).
They get the connection from libpq's environment variables (PGHOST, PGPASSWORD, ...), never on the
command line (visible to every user in `ps`), and are started without a shell.

The layout and the pure decisions are in tasks.db_backup_format.
"""

from __future__ import annotations

import glob
import hashlib
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any

import psycopg
from botocore.exceptions import BotoCoreError
from prefect import task
from psycopg import sql
from pydantic import BaseModel, Field

from blocks.backup_store import BackupStore
from blocks.postgres import PostgresDatabase
from runbooks.audit import scrub_text
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.db_backup_format import (
    DUMP,
    MANIFEST,
    DumpManifest,
    StoredBackup,
    TableFingerprint,
    backup_prefix,
    human_bytes,
    is_scratch_left_behind,
    scratch_comment,
    server_label,
)
from tasks.pg_fingerprint import fingerprint_connection, fingerprint_tables, user_tables
from tasks.postgres import is_transient
from tasks.s3_objects import get_json, put_json
from tasks.s3_upload import MultipartUpload

ENGINE = "postgres"


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.OperationalError):
        return is_transient(exc)
    return isinstance(exc, BotoCoreError)  # connection errors; boto3 already retried 5xx


backup_retries = runbook_task_options(psycopg.OperationalError, BotoCoreError, when=_transient)


# --- the programs ---------------------------------------------------------------------------


def pg_program(name: str, server_major: int | None = None) -> str:
    """The pg_dump/pg_restore to use: the newest installed one, which must not be older than the
    server (an older pg_dump refuses a newer server)."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)),  # type: ignore[union-attr]
    )
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise FileNotFoundError(f"{name} not found: install the PostgreSQL client (postgresql-client)")
    if server_major is not None and found:
        major = int(re.search(r"/(\d+)/bin/", path).group(1))  # type: ignore[union-attr]
        if major < server_major:
            raise RuntimeError(
                f"{name} {major} is older than the server ({server_major}): install "
                f"postgresql-client-{server_major}"
            )
    return path


def tool_version(path: str) -> str:
    """What a dump program says its version is (kept in the manifest)."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()[:200]


def libpq_env(db: PostgresDatabase, dbname: str) -> dict[str, str]:
    """The environment pg_dump/pg_restore connect with: the block's settings, nothing inherited
    from this process's own PG* variables (they would point somewhere else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=db.host,
        PGPORT=str(db.port),
        PGUSER=db.user,
        PGDATABASE=dbname,
        PGSSLMODE=db.sslmode,
        PGCONNECT_TIMEOUT=str(db.connect_timeout_s),
        PGAPPNAME=f"{db.application_name}-backup",
        # identical text for the checksums on both sides
        PGTZ="UTC",
    )
    if db.password is not None:
        env["PGPASSWORD"] = db.password.get_secret_value()
    return env


def stderr_tail(f: IO[bytes], limit: int = 600) -> str:
    """The end of a program's captured error output, secrets masked."""
    f.seek(0)
    text = f.read().decode(errors="replace").strip()
    return scrub_text(text[-limit:]) if text else ""


def _resolve_tables(conn: psycopg.Connection, wanted: list[str]) -> list[str]:
    existing = user_tables(conn)
    if not wanted:
        return existing
    missing = sorted(set(wanted) - set(existing))
    if missing:
        raise ValueError(f"no such table(s) to fingerprint: {', '.join(missing)}")
    return sorted(set(wanted))


# --- backup ---------------------------------------------------------------------------------


class BackupResult(ChangeSet):
    backup_id: str
    location: str = Field(description="s3://bucket/key of the backup's folder.")
    manifest: DumpManifest | None = None
    database_bytes: int = 0
    already_complete: bool = False


def backup_location(store: BackupStore, db: PostgresDatabase, database: str) -> str:
    return backup_prefix(store.prefix, ENGINE, server_label(db.host, db.port), database)


@task(**backup_retries)
def dump_database(
    db: PostgresDatabase,
    store: BackupStore,
    database: str,
    backup_id: str,
    tables: list[str],
    checksums: bool,
    dry_run: bool,
    system_identifier: str | None = None,
) -> BackupResult:
    """pg_dump (custom format) of ``database`` straight into S3, then its manifest.

    The dump and the fingerprints share one exported snapshot (``pg_dump --snapshot``), so the
    manifest's counts are exactly what the dump holds while writers go on. Idempotent: a backup
    whose manifest exists is not taken again; a retried one overwrites its own dump object.
    """
    s3 = store.get_s3_client()
    root = backup_location(store, db, database) + backup_id + "/"
    location = f"s3://{store.bucket}/{root}"
    existing = get_json(s3, store.bucket, root + MANIFEST)
    with fingerprint_connection(db, database) as conn:
        (size,) = conn.execute("SELECT pg_database_size(current_database())").fetchone()  # type: ignore[misc]
        change = Change(
            action="pg_dump",
            target=f"{database} -> {location}{DUMP}",
            detail={"database_bytes": size, "format": "custom"},
        )
        result = BackupResult(
            dry_run=dry_run, planned=[change], backup_id=backup_id, location=location,
            database_bytes=size,
        )
        if existing is not None:
            result.manifest = DumpManifest.model_validate(existing)
            result.already_complete = True
            result.notes.append(f"backup {backup_id} is already complete: not taken again")
            return result
        if dry_run:
            return result
        resolved = _resolve_tables(conn, tables)

    (major,) = _server_major(db, database)
    program = pg_program("pg_dump", major)
    upload = MultipartUpload(s3, store.bucket, root + DUMP)
    started = time.monotonic()
    # REPEATABLE READ: every statement of the transaction sees the exported snapshot
    snap = fingerprint_connection(db, database, autocommit=False)
    try:
        snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot_id, snapshot_at, version = snap.execute(  # type: ignore[misc]
            "SELECT pg_export_snapshot(), now(), current_setting('server_version')"
        ).fetchone()
        fingerprints: dict[str, TableFingerprint] = {}
        errors: list[BaseException] = []

        def fingerprint() -> None:
            try:
                fingerprints.update(
                    fingerprint_tables(
                        lambda: fingerprint_connection(db, database), resolved, checksums, snapshot_id
                    )
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread
                errors.append(exc)

        worker = threading.Thread(target=fingerprint, name="dump-fingerprints", daemon=True)
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(
                [program, "--format=custom", "--no-password", f"--snapshot={snapshot_id}",
                 ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=libpq_env(db, database),
            )
            worker.start()
            rc = upload.feed_process(proc)
            if rc != 0:
                raise RuntimeError(f"pg_dump of {database} failed (exit {rc}): {stderr_tail(stderr)}")
        upload.complete()
        worker.join()
        if errors:
            raise errors[0]
    finally:
        snap.close()
    seconds = time.monotonic() - started
    manifest = DumpManifest(
        backup_id=backup_id,
        database=database,
        server=f"{db.host}:{db.port}",
        system_identifier=system_identifier,
        server_version=version,
        tool=tool_version(program),
        snapshot_at=snapshot_at,
        completed_at=datetime.now(UTC),
        database_bytes=size,
        size=upload.size,
        sha256=upload.sha.hexdigest(),
        dump_seconds=round(seconds, 3),
        tables=fingerprints,
    )
    return complete_backup(s3, store, root, result, change, manifest)


def complete_backup(
    s3: Any, store: BackupStore, root: str, result: BackupResult, change: Change,
    manifest: DumpManifest,
) -> BackupResult:
    """Write the manifest, last: from now on the backup is complete (of any engine)."""
    put_json(s3, store.bucket, root + MANIFEST, manifest)
    result.manifest = manifest
    result.applied.append(
        change.model_copy(
            update={
                "detail": change.detail
                | {"size": manifest.size, "seconds": round(manifest.dump_seconds, 1)}
            }
        )
    )
    return result


def _server_major(db: PostgresDatabase, database: str) -> tuple[int]:
    with fingerprint_connection(db, database) as conn:
        (num,) = conn.execute("SHOW server_version_num").fetchone()  # type: ignore[misc]
    return (int(num) // 10000,)


@task(**backup_retries)
def list_database_backups(store: BackupStore, location: str) -> list[StoredBackup]:
    """Every backup below ``location`` (a backup_prefix), oldest first."""
    s3 = store.get_s3_client()
    found: dict[str, StoredBackup] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=location):
        for obj in page.get("Contents", []):
            backup_id, _, name = obj["Key"][len(location) :].partition("/")
            b = found.setdefault(backup_id, StoredBackup(backup_id=backup_id, complete=False))
            b.size += obj["Size"]
            b.complete = b.complete or name == MANIFEST
    return [found[k] for k in sorted(found)]


@task(**backup_retries)
def load_database_manifest(store: BackupStore, location: str, backup_id: str) -> DumpManifest:
    raw = get_json(store.get_s3_client(), store.bucket, f"{location}{backup_id}/{MANIFEST}")
    if raw is None:
        raise FileNotFoundError(
            f"backup s3://{store.bucket}/{location}{backup_id}/ has no manifest: incomplete"
        )
    return DumpManifest.model_validate(raw)


@task(**backup_retries)
def delete_backups(
    store: BackupStore, location: str, backups: list[StoredBackup], reasons: dict[str, str],
    dry_run: bool,
) -> ChangeSet:
    """Delete whole backups, the manifest first (a half-deleted backup reads as incomplete,
    never as a complete backup missing its dump). Idempotent: gone objects are skipped."""
    result = ChangeSet(dry_run=dry_run)
    s3 = store.get_s3_client()
    for b in backups:
        change = Change(
            action="delete_backup",
            target=f"s3://{store.bucket}/{location}{b.backup_id}/",
            detail={"bytes": b.size, "complete": b.complete, "why": reasons.get(b.backup_id, "")},
        )
        result.planned.append(change)
        if dry_run:
            continue
        root = f"{location}{b.backup_id}/"
        keys = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=root)
            for o in page.get("Contents", [])
        ]
        keys.sort(key=lambda k: not k.endswith(MANIFEST))
        for key in keys:
            s3.delete_object(Bucket=store.bucket, Key=key)
        result.applied.append(change)
    return result


# --- restore drill --------------------------------------------------------------------------


class RestoreResult(ChangeSet):
    scratch: str
    seconds: float = 0.0
    sha256: str = ""
    size: int = 0
    error: str | None = None


@task(**runbook_task_options())
def restore_into_scratch(
    db: PostgresDatabase,
    store: BackupStore,
    location: str,
    manifest: DumpManifest,
    scratch: str,
    run_id: str,
    dry_run: bool,
    jobs: int = 1,
) -> RestoreResult:
    """Create the scratch database (marked as this run's) and pg_restore the backup into it,
    with its sha256 computed as it downloads. With ``jobs`` > 1 and room on the local disk the
    object is spooled to a file first and restored with that many connections (``pg_restore
    --jobs`` must seek); otherwise pg_restore reads it straight from S3. Not retried: a
    half-restored scratch database is dropped and a new drill starts clean.

    pg_restore's failure is returned, not raised: with the checksum it explains a corrupted backup.
    """
    key = f"{location}{manifest.backup_id}/{DUMP}"
    change = Change(
        action="restore_backup",
        target=f"s3://{store.bucket}/{key} -> {scratch}",
        detail={"bytes": manifest.size, "backup_id": manifest.backup_id},
    )
    result = RestoreResult(dry_run=dry_run, planned=[change], scratch=scratch)
    if dry_run:
        return result
    with fingerprint_connection(db, db.dbname) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(scratch), sql.Literal(scratch_comment(run_id))
            )
        )
        (num,) = conn.execute("SHOW server_version_num").fetchone()  # type: ignore[misc]
    program = pg_program("pg_restore", int(num) // 10000)
    s3 = store.get_s3_client()
    sha = hashlib.sha256()
    started = time.monotonic()
    body = s3.get_object(Bucket=store.bucket, Key=key)["Body"]
    args = [program, "--no-owner", "--no-acl", "--exit-on-error", "--no-password",
            f"--dbname={scratch}"]
    spool_dir = tempfile.gettempdir()
    if jobs > 1 and shutil.disk_usage(spool_dir).free > manifest.size * 2 + (1 << 30):
        result.error = _restore_spooled(body, args, jobs, spool_dir, sha, result, db, scratch)
    else:
        result.error = _restore_streaming(body, args, sha, result, db, scratch)
    result.seconds = round(time.monotonic() - started, 3)
    result.sha256 = sha.hexdigest()
    result.applied.append(change.model_copy(update={"detail": change.detail | {"seconds": result.seconds}}))
    return result


def _restore_spooled(
    body: Any, args: list[str], jobs: int, spool_dir: str, sha: Any, result: RestoreResult,
    db: PostgresDatabase, scratch: str,
) -> str | None:
    """Download to a local file (pg_restore --jobs needs to seek), then restore with ``jobs``
    connections: tables load and indexes build side by side. A corrupted object is known before
    pg_restore starts."""
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="drill-", suffix=".dump") as spool:
        for chunk in body.iter_chunks(4 * 1024 * 1024):
            sha.update(chunk)
            result.size += len(chunk)
            spool.write(chunk)
        spool.flush()
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(
                [*args, f"--jobs={jobs}", spool.name],
                stderr=stderr,
                stdout=subprocess.DEVNULL,
                env=libpq_env(db, scratch),
            )
            try:
                rc = proc.wait(timeout=6 * 3600)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            return f"exit {rc}: {stderr_tail(stderr)}" if rc != 0 else None


def _restore_streaming(
    body: Any, args: list[str], sha: Any, result: RestoreResult, db: PostgresDatabase, scratch: str
) -> str | None:
    """Feed pg_restore from S3 as the object downloads: no local disk, one connection."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stderr=stderr,
            stdout=subprocess.DEVNULL,
            env=libpq_env(db, scratch),
        )
        # reading S3 on its own thread: pg_restore writes rows while the next chunk downloads
        chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=8)

        def download() -> None:
            try:
                for chunk in body.iter_chunks(1024 * 1024):
                    chunks.put(chunk)
            finally:
                chunks.put(None)

        reader = threading.Thread(target=download, name="restore-get", daemon=True)
        reader.start()
        broken = False
        try:
            while (chunk := chunks.get()) is not None:
                sha.update(chunk)
                result.size += len(chunk)
                if not broken:
                    try:
                        proc.stdin.write(chunk)  # type: ignore[union-attr]
                    except BrokenPipeError:
                        broken = True  # pg_restore gave up; keep hashing to name the cause
            try:
                proc.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass
            rc = proc.wait(timeout=6 * 3600)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(timeout=30)
        return f"exit {rc}: {stderr_tail(stderr)}" if rc != 0 else None


@task(**backup_retries)
def fingerprint_database(
    db: PostgresDatabase, database: str, tables: list[str], checksums: bool
) -> dict[str, TableFingerprint]:
    """Rows and checksums of ``tables`` in ``database`` (those that exist)."""
    with fingerprint_connection(db, database) as conn:
        existing = set(user_tables(conn))
    return fingerprint_tables(
        lambda: fingerprint_connection(db, database), [t for t in tables if t in existing], checksums
    )


class ScratchDatabase(BaseModel):
    name: str
    comment: str | None


@task(**backup_retries)
def scratch_databases(db: PostgresDatabase) -> list[ScratchDatabase]:
    """Databases whose comment marks them as a drill's scratch database."""
    with fingerprint_connection(db, db.dbname) as conn:
        rows = conn.execute(
            "SELECT d.datname, shobj_description(d.oid, 'pg_database') FROM pg_database d"
            " WHERE shobj_description(d.oid, 'pg_database') LIKE 'runbooks disaster-recovery%'"
        ).fetchall()
    return [ScratchDatabase(name=n, comment=c) for n, c in rows]


@task(**backup_retries)
def drop_scratch_databases(
    db: PostgresDatabase, names: list[str], run_id: str, dry_run: bool, left_behind: bool = False
) -> ChangeSet:
    """DROP DATABASE ... WITH (FORCE), only for databases marked as a drill's scratch database:
    this run's, or (``left_behind``) another drill's that died before dropping its own.
    Idempotent: a database already gone is skipped."""
    result = ChangeSet(dry_run=dry_run)
    with fingerprint_connection(db, db.dbname) as conn:
        for name in names:
            row = conn.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                (name,),
            ).fetchone()
            if row is None:
                result.notes.append(f"{name} is already gone")
                continue
            comment = row[0]
            ours = comment == scratch_comment(run_id) or (
                left_behind and is_scratch_left_behind(comment, run_id)
            )
            if not ours:
                result.notes.append(f"{name} is not a drill's scratch database: left alone")
                continue
            change = Change(action="drop_database", target=name, detail={"comment": comment})
            result.planned.append(change)
            if dry_run:
                continue
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            result.applied.append(change)
    return result


def describe_manifest(m: DumpManifest) -> str:
    rows = sum(t.rows for t in m.tables.values())
    return (
        f"backup {m.backup_id} of {m.database} ({human_bytes(m.size)} dump of a "
        f"{human_bytes(m.database_bytes)} database, {len(m.tables)} tables, {rows} rows, taken "
        f"in {m.dump_seconds:.1f}s)"
    )
