"""Database backup and restore drill: the runbooks' tasks beside the bare tools on the same servers.

A throwaway PostgreSQL (started as the tests start it) gets a database of about ``--size-mb`` MB
(default 1024): an events table (jsonb payloads, text, timestamps) and a devices table. A moto S3
server (its own process) holds the objects. Contenders, each timed ``--repeats`` times:

    bare backup     pg_dump -Fc | boto3 upload_fileobj (what `pg_dump | aws s3 cp - s3://...` does)
    project backup  tasks.pg_backup.dump_database: the same dump streamed in parallel multipart
                    uploads, sha256, and every table's rows and checksum read in the dump's
                    snapshot (``--no-checksums``: counts only), then the manifest
    bare restore    boto3 get_object streamed into pg_restore, into a new database
    project restore tasks.pg_backup.restore_into_scratch (sha256 while streaming) plus the drill's
                    comparison: rows and checksums of every table in the restored database

The table shows seconds, MB/s of database and the ratio bare/project (above 1: the project is
faster; the issue's goal is 0.9 or more).

    python -m bench db-backup [--size-mb 1024] [--repeats 1] [--no-checksums] [--jobs 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid
from datetime import UTC, datetime

import boto3
import psycopg
from psycopg import sql

from blocks.backup_store import BackupStore
from blocks.postgres import PostgresDatabase
from tasks.db_backup_format import DUMP, new_backup_id
from tasks.pg_backup import (
    backup_location,
    dump_database,
    fingerprint_database,
    libpq_env,
    load_database_manifest,
    pg_program,
    restore_into_scratch,
)
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.servers import start_postgres

DATABASE = "bench_events"
# ~1 KB per event row: a jsonb payload, text and timestamps (compresses as real events do, ~4x)
SEED = """
INSERT INTO events (status, payload, created_at, updated_at)
SELECT (ARRAY['PENDING','PROCESSING','COMPLETED','FAILED'])[1 + i %% 4],
       jsonb_build_object('match', i %% 5000, 'seq', i, 'team', md5((i %% 97)::text),
                          'note', md5(i::text) || repeat(md5((i * 7)::text), 20)),
       now() - make_interval(secs => i), now() - make_interval(secs => i / 2)
FROM generate_series(%(first)s::bigint, %(last)s) AS i
"""


def seed(conninfo: str, size_mb: int) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE events (id bigserial PRIMARY KEY, status text, payload jsonb,"
            " created_at timestamptz, updated_at timestamptz);"
            "CREATE INDEX ON events (status, updated_at);"
            "CREATE TABLE devices (token text PRIMARY KEY, platform text, last_seen date);"
            "INSERT INTO devices SELECT md5(i::text), 'fcm', date '2026-01-01' + i % 300"
            " FROM generate_series(1, 100000) i"
        )
        first, step = 1, 50_000
        while True:
            conn.execute(SEED, {"first": first, "last": first + step - 1})
            first += step
            (size,) = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            if size >= size_mb * 1024 * 1024:
                conn.execute("VACUUM ANALYZE")
                return size


def bare_backup(db: PostgresDatabase, s3, bucket: str, key: str) -> float:
    started = time.monotonic()
    proc = subprocess.Popen(
        [pg_program("pg_dump"), "--format=custom", "--no-password"],
        stdout=subprocess.PIPE,
        env=libpq_env(db, DATABASE),
    )
    s3.upload_fileobj(proc.stdout, bucket, key)
    assert proc.wait() == 0
    return time.monotonic() - started


def bare_restore(db: PostgresDatabase, admin: psycopg.Connection, s3, bucket: str, key: str) -> float:
    target = f"bare_{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
    proc = subprocess.Popen(
        [pg_program("pg_restore"), "--no-owner", "--no-acl", "--exit-on-error", f"--dbname={target}"],
        stdin=subprocess.PIPE,
        env=libpq_env(db, target),
    )
    s3.download_fileobj(bucket, key, proc.stdin)
    proc.stdin.close()
    assert proc.wait() == 0
    seconds = time.monotonic() - started
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(target)))
    return seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench db-backup")
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-checksums", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="the drill's restore_jobs")
    args = parser.parse_args(argv)

    server = start_postgres()
    moto = MotoServer().start()
    try:
        admin = psycopg.connect(server.conninfo(), autocommit=True)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        t0 = time.monotonic()
        size = seed(server.conninfo(dbname=DATABASE), args.size_mb)
        print(f"seeded {size / 1e6:.0f} MB in {time.monotonic() - t0:.0f}s", flush=True)
        db = PostgresDatabase(
            host=server.host, port=server.port, dbname=DATABASE, user=server.user,
            password=server.password, statement_timeout_s=3600,
        )
        s3 = boto3.client(
            "s3", endpoint_url=moto.endpoint_url, region_name=moto.region,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
        )
        bucket = "bench-db-backups"
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region})
        store = BackupStore(
            bucket=bucket, prefix="database-backups", endpoint_url=moto.endpoint_url,
            region=moto.region, aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY, timeout_s=120,
        )
        times: dict[str, list[float]] = {k: [] for k in ("bare backup", "project backup", "bare restore", "project restore")}
        dump_bytes = 0
        for _ in range(args.repeats):
            key = f"bare/{uuid.uuid4().hex}.dump"
            times["bare backup"].append(bare_backup(db, s3, bucket, key))
            backup_id = new_backup_id(datetime.now(UTC), uuid.uuid4().hex)
            started = time.monotonic()
            result = dump_database.fn(db, store, DATABASE, backup_id, [], not args.no_checksums, False)
            times["project backup"].append(time.monotonic() - started)
            manifest = result.manifest
            dump_bytes = manifest.size
            times["bare restore"].append(bare_restore(db, admin, s3, bucket, key))
            location = backup_location(store, db, DATABASE)
            manifest = load_database_manifest.fn(store, location, backup_id)
            run_id = uuid.uuid4().hex
            scratch = f"drill_{run_id[:8]}"
            started = time.monotonic()
            restored = restore_into_scratch.fn(
                db, store, location, manifest, scratch, run_id, False, jobs=args.jobs
            )
            assert restored.error is None and restored.sha256 == manifest.sha256, restored.error
            found = fingerprint_database.fn(db, scratch, list(manifest.tables), not args.no_checksums)
            times["project restore"].append(time.monotonic() - started)
            assert {t: f.rows for t, f in found.items()} == {t: f.rows for t, f in manifest.tables.items()}
            assert found == manifest.tables
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(scratch)))
            s3.delete_object(Bucket=bucket, Key=f"{location}{backup_id}/{DUMP}")

        print()
        print(f"database {size / 1e6:.0f} MB, dump {dump_bytes / 1e6:.0f} MB (custom format), "
              f"checksums {'off' if args.no_checksums else 'on'}, restore jobs {args.jobs}, "
              f"{args.repeats} repeat(s), median")
        print(f"{'contender':<18}{'seconds':>9}{'DB MB/s':>9}{'ratio':>8}")
        for kind in ("backup", "restore"):
            bare = statistics.median(times[f"bare {kind}"])
            mine = statistics.median(times[f"project {kind}"])
            print(f"{'bare ' + kind:<18}{bare:>9.1f}{size / 1e6 / bare:>9.1f}{1.0:>8.2f}")
            print(f"{'project ' + kind:<18}{mine:>9.1f}{size / 1e6 / mine:>9.1f}{bare / mine:>8.2f}")
        admin.close()
    finally:
        moto.stop()
        server.stop()
    return 0
