"""Archive of old events: the runbook's batches beside one bare statement, under live writes.

A throwaway PostgreSQL (started as the tests start it) holds an events table of ``--rows`` old
terminal events (COMPLETED / FAILED, 100 days old; default 1,000,000) plus 10% more rows that
stay (old PENDING / PROCESSING and new terminal ones). While each contender runs, ``--writers``
threads keep inserting new events and updating random existing ones (old ones included: those
are the rows the archive locks), one short transaction each, timing every statement.

    bare      WITH moved AS (DELETE FROM events WHERE status = ANY(...) AND updated_at < cutoff
              RETURNING *) INSERT INTO events_archive SELECT * FROM moved     (one statement)
    project   tasks.event_archive.archive_old_events with the block's default batching
    s3        (with --s3) tasks.event_archive_s3.archive_old_events_to_s3: the same batches
              written as gzip'd JSON-lines objects to a local moto S3, each verified before its
              rows are deleted (row locks are held through the upload)

Each contender gets a freshly seeded table. The table shows rows/s and the ratio to bare, the
batches and the slowest, and the writers' statement latency before and during each contender.

    python -m bench archive-events [--rows 1000000] [--writers 2] [--s3]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.stack import percentile
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.servers import PostgresServer, start_postgres

STATUSES = ["COMPLETED", "FAILED"]
SEED = """
INSERT INTO events (id, status, created_at, updated_at, payload)
SELECT i,
  CASE WHEN i %% 11 = 0 THEN (CASE WHEN i %% 2 = 0 THEN 'PENDING' ELSE 'PROCESSING' END)
       WHEN i %% 11 = 1 AND i %% 3 = 0 THEN 'COMPLETED'
       WHEN i %% 3 = 0 THEN 'FAILED' ELSE 'COMPLETED' END,
  now() - interval '120 days',
  now() - CASE WHEN i %% 11 = 1 AND i %% 3 = 0 THEN interval '1 day' ELSE interval '100 days' END,
  repeat('x', 120)
FROM generate_series(1::bigint, %(total)s) AS i
"""
OLD_TERMINAL = (
    "SELECT count(*) FROM events WHERE status = ANY(%s) AND updated_at < now() - interval '90 days'"
)
BARE = (
    "WITH moved AS (DELETE FROM events WHERE status = ANY(%(statuses)s) AND updated_at < %(cutoff)s"
    " RETURNING *) INSERT INTO events_archive SELECT * FROM moved"
)


@dataclass
class Result:
    contender: str
    rows: int
    seconds: float
    batches: int | None = None
    slowest_batch_s: float | None = None
    before: list[float] = field(default_factory=list)
    during: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Writers:
    """Threads inserting new events and updating random ones, timing each statement."""

    def __init__(self, pg: PostgresServer, n: int, max_id: int):
        self.pg, self.n, self.max_id = pg, n, max_id
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)
        ]

    def _run(self, k: int) -> None:
        import random

        rng = random.Random(k)
        next_id = 10_000_000_000 + k * 1_000_000_000
        with psycopg.connect(self.pg.conninfo(), autocommit=True) as conn:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    if rng.random() < 0.5:
                        next_id += 1
                        conn.execute(
                            "INSERT INTO events VALUES (%s, 'PENDING', now(), now(), 'new')",
                            (next_id,),
                        )
                    else:
                        conn.execute(
                            "UPDATE events SET payload = 'touched' WHERE id = %s",
                            (rng.randint(1, self.max_id),),
                        )
                except psycopg.Error as exc:
                    self.errors.append(str(exc).splitlines()[0])
                self.samples.append((t0, time.monotonic() - t0))
                time.sleep(0.001)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def window(self, start: float, end: float) -> list[float]:
        return [d for t, d in self.samples if start <= t < end]


def _seed(pg: PostgresServer, total: int) -> int:
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS events, events_archive")
        conn.execute(
            "CREATE TABLE events (id bigint PRIMARY KEY, status text NOT NULL,"
            " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, payload text)"
        )
        conn.execute(SEED, {"total": total})
        conn.execute("CREATE INDEX events_status_updated_at_idx ON events (status, updated_at)")
        conn.execute("VACUUM ANALYZE events")
        conn.execute("CREATE TABLE events_archive (LIKE events INCLUDING ALL)")
        (old,) = conn.execute(OLD_TERMINAL, (STATUSES,)).fetchone()
        conn.execute("CHECKPOINT")
    return old


def _contender(
    pg: PostgresServer, name: str, args: argparse.Namespace, total: int, s3: Any = None
) -> Result:
    from blocks.event_store import EventStore
    from blocks.postgres import PostgresDatabase
    from tasks.event_archive import ArchiveSpec, archive_old_events
    from tasks.event_archive_s3 import archive_old_events_to_s3

    expected = _seed(pg, total)
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        (cutoff,) = conn.execute("SELECT now() - interval '90 days'").fetchone()
    with Writers(pg, args.writers, total) as writers:
        time.sleep(args.before_s)
        start = time.monotonic()
        if name == "bare":
            with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
                cur = conn.execute(BARE, {"statuses": STATUSES, "cutoff": cutoff})
                rows, batches, slowest = cur.rowcount, None, None
        else:
            database = PostgresDatabase(
                host=pg.host,
                port=pg.port,
                dbname="postgres",
                user=pg.user,
                password=pg.password,
                statement_timeout_s=600,
            )
            store = EventStore(database=database, table="events", time_budget_s=3600)
            spec = ArchiveSpec(
                archive_table="events_archive",
                time_column="updated_at",
                statuses=STATUSES,
                cutoff=cutoff,
                older_than_days=90,
                time_budget_s=3600,
            )
            if name == "s3":
                result = archive_old_events_to_s3.fn(
                    store, s3, spec, s3.bucket, "bench", dry_run=False
                )
            else:
                result = archive_old_events.fn(store, spec, dry_run=False)
            rows, batches = result.moved, len(result.batch_sizes)
            slowest = result.slowest_batch_s
        end = time.monotonic()
        time.sleep(0.2)
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        (left,) = conn.execute(
            "SELECT count(*) FROM events WHERE status = ANY(%s) AND updated_at < %s",
            (STATUSES, cutoff),
        ).fetchone()
        (archived,) = conn.execute("SELECT count(*) FROM events_archive").fetchone()
    if name == "s3":
        archived = rows  # counted by the task's verified objects
    if left or archived != rows or rows != expected:
        print(f"  {name}: {rows:,} moved of {expected:,}, {left:,} left, archive {archived:,}")
    return Result(
        name,
        rows,
        end - start,
        batches,
        slowest,
        before=writers.window(start - args.before_s, start),
        during=writers.window(start, end),
        errors=writers.errors,
    )


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    ms = sorted(v * 1000 for v in values)
    return f"{percentile(ms, 50):.1f} / {percentile(ms, 99):.1f} / {ms[-1]:.0f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench archive-events")
    parser.add_argument("--rows", type=int, default=1_000_000, help="old terminal events (about)")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--before-s", type=float, default=2.0, help="load measured before each")
    parser.add_argument("--s3", action="store_true", help="also archive to a local moto S3")
    args = parser.parse_args(argv)
    total = round(args.rows * 1.1)

    pg = start_postgres()
    print(f"PostgreSQL on port {pg.port} ({pg.datadir})")
    moto = MotoServer().start() if args.s3 else None
    try:
        results = []
        store = None
        if moto is not None:
            from blocks.backup_store import BackupStore

            bucket = "bench-event-archive"
            moto.client("s3").create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
            )
            store = BackupStore(
                bucket=bucket,
                endpoint_url=moto.endpoint_url,
                region=moto.region,
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
            )
        for name in ("bare", "project", *(("s3",) if moto else ())):
            print(f"{name}: seeding {total:,} rows ...", flush=True)
            results.append(_contender(pg, name, args, total, store))
    finally:
        if moto is not None:
            moto.stop()
        pg.stop()
        shutil.rmtree(pg.datadir.parent, ignore_errors=True)
    bare = results[0]
    print(
        f"\narchive of old events: {bare.rows:,} old terminal of {total:,} rows, "
        f"{args.writers} writers"
    )
    print(
        "| | rows | seconds | rows/s | x bare | batches | slowest batch |"
        " writers p50 / p99 / max before (ms) | writers p50 / p99 / max during (ms) |"
        " writer statements > 200 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r.rows / r.seconds if r.seconds else 0
        ratio = rate / (bare.rows / bare.seconds) if bare.seconds and bare.rows else 0
        slowest = f"{r.slowest_batch_s * 1000:.0f} ms" if r.slowest_batch_s is not None else "-"
        over = sum(1 for d in r.during if d > 0.2)
        print(
            f"| {r.contender} | {r.rows:,} | {r.seconds:.2f} | {rate:,.0f} | {ratio:.2f} | "
            f"{r.batches if r.batches is not None else 1} | {slowest} | {_ms(r.before)} | "
            f"{_ms(r.during)} | {over} |"
        )
        if r.errors:
            print(f"  {r.contender}: writer errors {r.errors[:3]}")
    return 0
