"""Reset of events stuck in PROCESSING: the runbook beside one bare UPDATE, under live traffic.

A throwaway PostgreSQL (started as the tests start it) holds an events table of ``--rows`` rows
(default 200,000), ``--stuck`` of them (default 100,000) PROCESSING for 2 hours, spread evenly
among rows that are DONE, PENDING or freshly PROCESSING. While each contender runs, another
process keeps ``--writers`` threads inserting new events and ``--claimers`` threads claiming
them the way consumers do (``FOR UPDATE SKIP LOCKED``, then PENDING -> PROCESSING -> DONE);
the claimers never touch the stuck rows. Contenders, each on a freshly seeded table:

    bare UPDATE     UPDATE events SET status = 'PENDING', updated_at = now()
                    WHERE status = 'PROCESSING' AND updated_at < now() - interval '1 hour'
    project (task)  tasks.event_store.reset_stuck_events with the block's default batching
    project (flow)  the whole event-processing-stuck run: lock, counts, plan, budget, reset,
                    verification, report (a Prefect server on SQLite runs beside it)

The table shows each contender's rows/s and its ratio to the bare UPDATE of the same round,
and the writers' INSERT (and claimers' claim) latency in the seconds before each contender and
while it ran.

    python -m bench stuck-reset [--stuck 100000] [--rows N] [--rounds 1]
    python -m bench stuck-reset --stuck 1000000 --only task,flow
    python -m bench stuck-reset --stuck 1000000 --only bare,task --parallel-ranges 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.stack import percentile, prefect_server
from tests.servers import PostgresServer, start_postgres

CONTENDERS = ("bare", "task", "flow")
LABELS = {"bare": "bare UPDATE", "task": "project (task)", "flow": "project (flow)"}
BARE = (
    "UPDATE events SET status = 'PENDING', updated_at = now()"
    " WHERE status = 'PROCESSING' AND updated_at < now() - interval '1 hour'"
)
COUNT_STUCK = (
    "SELECT count(*) FROM events"
    " WHERE status = 'PROCESSING' AND updated_at < now() - interval '1 hour'"
)
# the stuck rows are spread evenly: row i is stuck when floor(i * stuck / rows) steps up at i
SEED = """
INSERT INTO events (id, status, updated_at, payload)
SELECT i,
  CASE WHEN stuck THEN 'PROCESSING'
       WHEN i %% 3 = 0 THEN 'DONE' WHEN i %% 3 = 1 THEN 'PENDING' ELSE 'PROCESSING' END,
  CASE WHEN stuck THEN now() - interval '2 hours'
       WHEN i %% 3 = 2 THEN now() - interval '1 minute' ELSE now() - interval '3 hours' END,
  repeat('x', 120)
FROM (SELECT i, (i * %(stuck)s) / %(rows)s > ((i - 1) * %(stuck)s) / %(rows)s AS stuck
      FROM generate_series(1::bigint, %(rows)s) AS i) AS g
"""


@dataclass
class Latencies:
    """(start, seconds) of each INSERT and each claim the load process made."""

    inserts: list[tuple[float, float]] = field(default_factory=list)
    claims: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @staticmethod
    def window(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
        return [d for t, d in samples if start <= t < end]


@dataclass
class Round:
    number: int
    contender: str
    rows: int
    seconds: float
    before: tuple[list[float], list[float]]
    during: tuple[list[float], list[float]]
    batches: int | None = None
    slowest_batch_s: float | None = None
    left: int = 0
    timeline: list[str] = field(default_factory=list)
    lock_waits: dict[str, int] = field(default_factory=dict)
    lock_kinds: set[str] = field(default_factory=set)
    ranges: int | None = None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench stuck-reset")
    parser.add_argument("--stuck", type=int, default=100_000, help="stuck rows")
    parser.add_argument("--rows", type=int, default=None, help="table rows (default 2x stuck)")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--claimers", type=int, default=2)
    parser.add_argument("--write-rate", type=float, default=250.0, help="INSERTs/s per writer")
    parser.add_argument("--before-s", type=float, default=3.0, help="load measured before each")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default=",".join(CONTENDERS), help="e.g. task,flow")
    parser.add_argument(
        "--parallel-ranges", type=int, default=None,
        help="the block's parallel_ranges (default: the block's default)",
    )
    args = parser.parse_args(argv)
    args.rows = args.rows or 2 * args.stuck
    only = [c for c in CONTENDERS if c in args.only.split(",")]

    pg = start_postgres()
    print(f"PostgreSQL on port {pg.port} ({pg.datadir})")
    try:
        with prefect_server() as (api, env, _home):
            # the project's flow and task run here, against that server, quietly; in the
            # environment (not temporary_settings): the target lock renews its lease from a
            # thread of its own, which a context-local setting does not reach
            if "prefect" in sys.modules:
                raise RuntimeError("Prefect was imported before its settings were made")
            os.environ.update(
                PREFECT_API_URL=api,
                PREFECT_HOME=env["PREFECT_HOME"],
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_LOGGING_LEVEL="WARNING",
                PREFECT_LOGGING_TO_API_ENABLED="false",
            )
            rounds = _run(pg, args, only)
    finally:
        pg.stop()
        shutil.rmtree(pg.datadir.parent, ignore_errors=True)  # a 2M-row table is ~1 GB
    _print(rounds, args)
    return 0 if all(r.left == 0 and r.rows == args.stuck for r in rounds) else 1


def _run(pg: PostgresServer, args: argparse.Namespace, only: list[str]) -> list[Round]:
    from blocks.event_store import EventStore
    from blocks.postgres import PostgresDatabase

    with psycopg.connect(pg.conninfo(), autocommit=True) as root:
        root.execute("CREATE DATABASE bench")
        # PostgreSQL itself logs every wait for a lock that lasts longer than deadlock_timeout:
        # the writers' "no wait over 200 ms" measured at the server, apart from the client-side
        # latency that a CPU-starved writer thread inflates on a shared machine
        for setting in ("log_lock_waits = on", "deadlock_timeout = '200ms'",
                        "log_line_prefix = '%m [%p] %a: '"):
            root.execute(f"ALTER SYSTEM SET {setting}")
        root.execute("SELECT pg_reload_conf()")
    database = PostgresDatabase(
        host=pg.host, port=pg.port, dbname="bench", user=pg.user, password=pg.password,
        application_name="runbooks-bench", statement_timeout_s=3600,
    )
    block = f"bench-{uuid.uuid4().hex[:8]}"
    ranges = {} if args.parallel_ranges is None else {"parallel_ranges": args.parallel_ranges}
    EventStore(database=database, table="events", **ranges).save(block)
    results = []
    for n in range(args.rounds):
        for contender in only:
            print(f"round {n + 1}: seeding {args.rows:,} rows, {args.stuck:,} stuck ...", flush=True)
            _seed(pg, args)
            print(f"round {n + 1}: {LABELS[contender]} ...", flush=True)
            results.append(_measure(pg, args, n + 1, contender, block))
    return results


def _seed(pg: PostgresServer, args: argparse.Namespace) -> None:
    with psycopg.connect(pg.conninfo("bench"), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS events")
        conn.execute(
            "CREATE TABLE events (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
            " status text NOT NULL, updated_at timestamptz NOT NULL, payload text)"
        )
        conn.execute(SEED, {"stuck": args.stuck, "rows": args.rows})
        conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), %s)", (args.rows,))
        conn.execute("VACUUM ANALYZE events")
        # a checkpoint now rather than in the middle of a contender
        conn.execute("CHECKPOINT")


def _measure(
    pg: PostgresServer, args: argparse.Namespace, number: int, contender: str, block: str
) -> Round:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    load = ctx.Process(
        target=_load,
        args=(pg.conninfo("bench"), args.rows, args.writers, args.claimers, args.write_rate,
              stop, send),
    )
    load.start()
    time.sleep(0.5 + args.before_s)  # connect and warm up, then the "before" window
    log = pg.datadir.parent / "log"
    log_from = log.stat().st_size
    run = _contender(pg, contender, block)
    started = time.monotonic()
    rows, batches, slowest, timeline, ranges = run()
    ended = time.monotonic()
    stop.set()
    latencies: Latencies = receive.recv()
    load.join(30)
    if latencies.errors:
        print(f"  load errors: {latencies.errors[:3]}")
    with psycopg.connect(pg.conninfo("bench"), autocommit=True) as conn:
        (left,) = conn.execute(COUNT_STUCK).fetchone()

    def windows(start: float, end: float) -> tuple[list[float], list[float]]:
        return (Latencies.window(latencies.inserts, start, end),
                Latencies.window(latencies.claims, start, end))

    return Round(
        number, contender, rows, ended - started, windows(started - args.before_s, started),
        windows(started, ended), batches, slowest, left, timeline,
        *_lock_waits(log, log_from), ranges=ranges,
    )


def _lock_waits(log: Any, offset: int) -> tuple[dict[str, int], set[str]]:
    """Per application name, the waits for a lock over deadlock_timeout the server logged;
    and what was waited for ("ShareLock on transaction", "ExclusiveLock on extension of
    relation", ...)."""
    with open(log, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    waits: dict[str, int] = {}
    kinds: set[str] = set()
    for line in lines:
        if "still waiting for" in line:
            app = line.partition("] ")[2].partition(":")[0] or "other"
            waits[app] = waits.get(app, 0) + 1
            what = line.partition("still waiting for ")[2].partition(" after ")[0]
            kinds.add(f"{app}: {' '.join(w for w in what.split() if not w[0].isdigit())}")
    return waits, kinds


# rows reset, batches, the slowest batch's seconds, the flow report's timeline, ranges of ids
Outcome = tuple[int, int, float | None, list[str], int | None]


def _contender(pg: PostgresServer, contender: str, block: str) -> Callable[[], Outcome]:
    """The contender, ready to run: what is timed is only the call."""
    from blocks.event_store import EventStore
    from flows.event_store.event_processing_stuck import StuckEventsParams, event_processing_stuck
    from runbooks.params import SafetyParams
    from tasks.event_store import ResetResult, reset_stuck_events

    def outcome(result: ResetResult, report: str = "") -> Outcome:
        timeline = report.partition("### Timeline\n")[2].partition("\n\n")[0].splitlines()
        return (result.reset_count, len(result.batch_sizes), result.slowest_batch_s, timeline,
                result.ranges)

    def bare() -> Outcome:
        with psycopg.connect(pg.conninfo("bench"), autocommit=True) as conn:
            return conn.execute(BARE).rowcount, 1, None, [], None

    store = EventStore.load(block)

    def task() -> Outcome:
        return outcome(reset_stuck_events(store, dry_run=False))

    def flow() -> Outcome:
        params = StuckEventsParams(
            event_store_block=block, approve_over=100_000_000,
            safety=SafetyParams(budget_max_actions=1000),
        )
        state = event_processing_stuck(params=params, return_state=True)
        if not state.is_completed():
            raise RuntimeError(f"the flow run ended {state.type.value}: {state.message}")
        summary = state.result()
        return outcome(summary.reset, summary.report)

    return {"bare": bare, "task": task, "flow": flow}[contender]


def _load(conninfo: str, seeded: int, writers: int, claimers: int, write_rate: float,
          stop: Any, send: Any) -> None:
    """Writers insert new events at a steady rate; claimers take them as consumers do."""
    out = Latencies()
    lock = threading.Lock()

    def writer() -> None:
        mine = []
        with psycopg.connect(conninfo, autocommit=True, application_name="bench-writer") as conn:
            interval = 1 / write_rate
            next_at = time.monotonic()
            while not stop.is_set():
                t0 = time.monotonic()
                conn.execute(
                    "INSERT INTO events (status, updated_at, payload)"
                    " VALUES ('PENDING', now(), repeat('y', 120))"
                )
                mine.append((t0, time.monotonic() - t0))
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        with lock:
            out.inserts.extend(mine)

    def claimer() -> None:
        mine = []
        floor = seeded  # only the writers' new events: the stuck rows are not theirs
        with psycopg.connect(conninfo, autocommit=True, application_name="bench-claimer") as conn:
            while not stop.is_set():
                t0 = time.monotonic()
                row = conn.execute(
                    "UPDATE events SET status = 'PROCESSING', updated_at = now() WHERE id = ("
                    " SELECT id FROM events WHERE status = 'PENDING' AND id > %s"
                    " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
                    (floor,),
                ).fetchone()
                if row is None:
                    time.sleep(0.005)
                    continue
                mine.append((t0, time.monotonic() - t0))
                floor = max(floor, row[0])
                conn.execute("UPDATE events SET status = 'DONE' WHERE id = %s", row)
        with lock:
            out.claims.extend(mine)

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported by the parent
                with lock:
                    out.errors.append(f"{type(exc).__name__}: {exc}")
        return run

    threads = [threading.Thread(target=guarded(writer)) for _ in range(writers)]
    threads += [threading.Thread(target=guarded(claimer)) for _ in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    send.send(out)


def _ms(values: list[float]) -> str:
    if not values:
        return f"{'-':>7} {'-':>7} {'-':>7} {0:>6}"
    return (f"{percentile(values, 50) * 1000:7.1f} {percentile(values, 99) * 1000:7.1f}"
            f" {max(values) * 1000:7.1f} {len(values):6d}")


def _print(rounds: list[Round], args: argparse.Namespace) -> None:
    print(f"\nstuck-event reset: {args.rows:,}-row table, {args.stuck:,} stuck; "
          f"{args.writers} writers ({args.write_rate:g} INSERT/s each), {args.claimers} claimers")
    print(f"{'':16} {'rows':>10} {'seconds':>8} {'rows/s':>9} {'x bare':>7} {'batches':>8}"
          f" {'slowest':>8} {'ranges':>6} {'left':>5}")
    bare = {r.number: r.rows / r.seconds for r in rounds if r.contender == "bare"}
    for r in rounds:
        rate = r.rows / r.seconds
        base = bare.get(r.number)
        ratio = f"{rate / base:7.2f}" if base else f"{'-':>7}"
        slowest = f"{r.slowest_batch_s * 1000:6.0f}ms" if r.slowest_batch_s else f"{'-':>8}"
        print(f"{LABELS[r.contender]:16} {r.rows:10,} {r.seconds:8.2f} {rate:9,.0f} {ratio}"
              f" {r.batches or 0:8d} {slowest} {r.ranges or 1:6d} {r.left:5d}")
    for kind, index in (("writers' INSERT", 0), ("claimers' claim", 1)):
        print(f"\n{kind + ' latency (ms)':32} {'p50':>7} {'p99':>7} {'max':>7} {'n':>6}")
        for r in rounds:
            print(f"{'before ' + LABELS[r.contender]:32} {_ms(r.before[index])}")
            print(f"{'during ' + LABELS[r.contender]:32} {_ms(r.during[index])}")
    print("\nwaits for a lock over 200 ms, logged by PostgreSQL (log_lock_waits):")
    for r in rounds:
        waits = ", ".join(f"{app} {n}" for app, n in sorted(r.lock_waits.items())) or "none"
        print(f"  during {LABELS[r.contender]:16} {waits}")
        for kind in sorted(r.lock_kinds):
            print(f"    {kind}")
    for r in rounds:
        if r.timeline:
            print(f"\nflow run's timeline (round {r.number}):")
            print("\n".join(f"  {line}" for line in r.timeline))
    if len(rounds) > len({r.contender for r in rounds}):
        print("\nmedian over rounds:")
        for c in CONTENDERS:
            rates = [r.rows / r.seconds for r in rounds if r.contender == c]
            if rates:
                print(f"  {LABELS[c]:16} {statistics.median(rates):9,.0f} rows/s")
