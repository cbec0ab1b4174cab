"""archive-old-events against a real PostgreSQL events table.

Each test gets a table of its own (a target of its own) in this module's database, seeded with:
old terminal rows (COMPLETED / FAILED, updated 100 days ago: ids 1-OLD, every id not a multiple of
10), old rows still being worked on (PENDING / PROCESSING, 100 days ago: multiples of 10 below
OLD, and one old CANCELLED row a run does not ask for), and new terminal rows (updated 1 day ago,
ids above OLD). The runbook's login may read, lock (FOR UPDATE needs UPDATE), delete, and create
the archive table in the schema.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from blocks.event_store import EventStore
from blocks.postgres import PostgresDatabase
from flows.event_store.archive_old_events import (
    ArchiveParams,
    ArchiveSummary,
    archive_old_events,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.approvals import Approver
from tests.conftest import unique
from tests.pg_env import scratch_database
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

SCHEMA = "archive_ops"
SAFETY = SafetyParams(budget_max_actions=1000, approval_poll_s=1)
OLD = 20_000  # ids 1..OLD are 100 days old
NEW = 2_000  # ids OLD+1..OLD+NEW are 1 day old
CANCELLED_ID = OLD + NEW + 1


def old_terminal_ids() -> set[int]:
    return {i for i in range(1, OLD + 1) if i % 10 != 0}


@dataclass
class Env:
    server: PostgresServer
    db: str
    role: str
    writer_role: str
    password: str
    admin: psycopg.Connection

    def table(self) -> str:
        """A freshly seeded events table; returns its name."""
        name = unique("events").replace("-", "_")
        t = sql.Identifier(SCHEMA, name)
        self.admin.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, status text NOT NULL,"
                " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, payload text)"
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
                " 'event ' || i FROM generate_series(1, %(n)s) AS i"
            ).format(t),
            {"old": OLD, "n": OLD + NEW},
        )
        self.admin.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (%s, 'CANCELLED', now() - interval '120 days',"
                " now() - interval '100 days', 'cancelled')"
            ).format(t),
            (CANCELLED_ID,),
        )
        self.admin.execute(sql.SQL("VACUUM ANALYZE {}").format(t))
        for role, grants in (
            (self.role, "SELECT, UPDATE, DELETE"),
            (self.writer_role, "SELECT, INSERT, UPDATE"),
        ):
            self.admin.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(grants), t, sql.Identifier(role))
            )
        return name

    def block(self, table: str, **overrides) -> str:
        name = unique("archive-events")
        database = PostgresDatabase(
            host=self.server.host,
            port=self.server.port,
            dbname=self.db,
            user=self.role,
            password=self.password,
            connect_timeout_s=5,
            statement_timeout_s=10,
        )
        fields = {"database": database, "schema_name": SCHEMA, "table": table}
        EventStore(**(fields | overrides)).save(name, overwrite=True)
        return name

    def ids(self, table: str) -> set[int]:
        if not self.exists(table):
            return set()
        rows = self.admin.execute(
            sql.SQL("SELECT id FROM {}").format(sql.Identifier(SCHEMA, table))
        )
        return {r[0] for r in rows.fetchall()}

    def rows(self, table: str) -> dict[int, tuple]:
        cur = self.admin.execute(
            sql.SQL("SELECT id, status, created_at, updated_at, payload FROM {}").format(
                sql.Identifier(SCHEMA, table)
            )
        )
        return {r[0]: r[1:] for r in cur.fetchall()}

    def exists(self, table: str) -> bool:
        (found,) = self.admin.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f'{SCHEMA}."{table}"',)
        ).fetchone()
        return found


@pytest.fixture(scope="module")
def env(postgres: PostgresServer) -> Iterator[Env]:
    with scratch_database(postgres, "rbarchive", ["rbarchiver", "rbarchwriter"], SCHEMA) as scratch:
        role, writer = scratch.roles
        # the runbook creates the archive table in the schema (it then owns it)
        scratch.admin.execute(
            sql.SQL("GRANT CREATE ON SCHEMA {} TO {}").format(
                sql.Identifier(SCHEMA), sql.Identifier(role)
            )
        )
        yield Env(postgres, scratch.db, role, writer, scratch.password, scratch.admin)


def params(block: str, **overrides) -> ArchiveParams:
    return ArchiveParams(**({"event_store_block": block, "safety": SAFETY} | overrides))


def run(block: str, **overrides) -> ArchiveSummary:
    state = archive_old_events(params=params(block, **overrides), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


class Writer(threading.Thread):
    """The application: inserts new events and updates random existing ones (old ones too),
    one short transaction each, timing every statement."""

    def __init__(self, env: Env, table: str):
        super().__init__(daemon=True)
        self.env, self.table = env, table
        self.stop = threading.Event()
        self.waits: list[float] = []
        self.errors: list[str] = []
        self.next_id = 1_000_000

    def run(self) -> None:
        t = sql.Identifier(SCHEMA, self.table)
        insert = sql.SQL("INSERT INTO {} VALUES (%s, 'PENDING', now(), now(), 'new')").format(t)
        update = sql.SQL("UPDATE {} SET payload = payload || '.' WHERE id = %s").format(t)
        rng = random.Random(7)
        conninfo = self.env.server.conninfo(
            dbname=self.env.db, user=self.env.writer_role, password=self.env.password
        )
        with psycopg.connect(conninfo, autocommit=True) as conn:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    if rng.random() < 0.5:
                        self.next_id += 1
                        conn.execute(insert, (self.next_id,))
                    else:
                        conn.execute(update, (rng.randint(1, OLD + NEW),))
                except psycopg.Error as exc:  # recorded: the test asserts there are none
                    self.errors.append(str(exc))
                self.waits.append(time.monotonic() - t0)


def test_dry_run_reports_counts_and_moves_nothing(env: Env) -> None:
    table = env.table()
    block = env.block(table)
    before = env.rows(table)

    summary = run(block, dry_run=True)

    assert summary.outcome is Outcome.PLANNED
    expected = len(old_terminal_ids())
    assert summary.before.total == expected
    failed = len([i for i in old_terminal_ids() if i % 3 == 0])
    assert summary.before.by_status == {"FAILED": failed, "COMPLETED": expected - failed}
    assert summary.before.oldest is not None and summary.before.newest is not None
    assert {c.action for c in summary.archive.planned} == {"create_archive_table", "archive_events"}
    assert summary.archive.applied == [] and summary.archive.moved == 0
    assert f"{expected:,} event(s) older than" in summary.report
    assert env.rows(table) == before
    assert not env.exists(f"{table}_archive")


def test_moves_exactly_the_old_terminal_events_under_a_concurrent_writer(env: Env) -> None:
    table = env.table()
    # small first batches that grow: many transactions while the writer runs
    block = env.block(table, batch_size=200, max_batch_size=2000, batch_target_ms=50)
    before = env.rows(table)
    writer = Writer(env, table)
    writer.start()
    time.sleep(0.3)  # the writer is running before the archive starts
    try:
        summary = run(block)
    finally:
        writer.stop.set()
        writer.join(10)

    assert summary.outcome is Outcome.RESOLVED, summary.report
    archive = f"{table}_archive"
    moved = old_terminal_ids()
    assert env.ids(archive) == moved
    assert env.ids(table).isdisjoint(moved)
    # every row still in the table, old non-terminal, CANCELLED and new ones alike, is there
    kept = set(before) - moved
    assert kept <= env.ids(table)
    assert summary.archive.moved == summary.archive.inserted == len(moved)
    assert len(summary.archive.batch_sizes) > 3
    # archived rows are the rows as they were (the writer only appended dots to payloads)
    archived = env.rows(archive)
    for i in list(moved)[:500]:
        assert archived[i][:3] == before[i][:3] and archived[i][3].startswith(before[i][3])
    assert summary.after.total == 0
    assert "archive grew by exactly the rows moved" in summary.report
    assert writer.errors == []
    print(
        f"\narchive: {summary.archive.moved} rows in {len(summary.archive.batch_sizes)} batches, "
        f"slowest {summary.archive.slowest_batch_s * 1000:.0f} ms; writer: {len(writer.waits)} "
        f"statements, longest {max(writer.waits) * 1000:.1f} ms"
    )
    assert max(writer.waits) < 1.0

    # a re-run finds nothing to move, changes nothing
    archive_rows, table_rows = env.rows(archive), env.rows(table)
    again = run(block)
    assert again.outcome is Outcome.NO_ACTION_NEEDED
    assert env.rows(archive) == archive_rows and env.rows(table) == table_rows


def test_time_budget_stops_and_the_next_run_continues(env: Env) -> None:
    table = env.table()
    block = env.block(table, batch_size=100, max_batch_size=100)

    state = archive_old_events(params=params(block, time_budget_s=0.001), return_state=True)

    assert state.is_failed() and "time budget" in state.message
    first = env.ids(f"{table}_archive")
    assert 0 < len(first) < len(old_terminal_ids())
    rest = run(block)
    assert rest.outcome is Outcome.RESOLVED
    assert rest.archive.moved == len(old_terminal_ids()) - len(first)
    assert env.ids(f"{table}_archive") == old_terminal_ids()


@pytest.mark.parametrize("approve", [False, True])
def test_more_than_approve_over_needs_approval(env: Env, approve: bool) -> None:
    table = env.table()
    block = env.block(table)
    before = env.rows(table)
    answer = {"approve": approve, "approver": "carol", "reason": "monthly archive"}
    approver = Approver("archive-old-events", answer)
    approver.start()

    state = archive_old_events(params=params(block, approve_over=100), return_state=True)

    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert f"{len(old_terminal_ids()):,} events would move" in approver.description
    if not approve:
        assert state.is_failed() and "rejected by carol" in state.message
        assert env.rows(table) == before and not env.exists(f"{table}_archive")
        return
    assert state.is_completed(), state.message
    assert env.ids(f"{table}_archive") == old_terminal_ids()


def test_refuses_statuses_still_being_worked_on(env: Env) -> None:
    table = env.table()
    block = env.block(table)
    before = env.rows(table)

    state = archive_old_events(
        params=params(block, statuses=["COMPLETED", "PENDING"]), return_state=True
    )

    assert state.is_failed() and "refusing to archive events in PENDING" in state.message
    assert env.rows(table) == before and not env.exists(f"{table}_archive")


def test_time_column_and_archive_name_parameters(env: Env) -> None:
    table = env.table()
    block = env.block(table)
    # by created_at (120 days old for every row) with a 110-day cutoff: old and new terminal
    # rows alike, CANCELLED included when asked
    summary = run(
        block,
        time_column="created_at",
        older_than_days=110,
        statuses=["COMPLETED", "FAILED", "CANCELLED"],
        archive_table="events_cold",
    )
    expected = old_terminal_ids() | set(range(OLD + 1, OLD + NEW + 1)) | {CANCELLED_ID}
    assert summary.outcome is Outcome.RESOLVED
    assert env.ids("events_cold") == expected


def test_an_existing_archive_without_a_unique_id_is_refused(env: Env) -> None:
    table = env.table()
    block = env.block(table)
    before = env.rows(table)
    # an archive someone made by hand: the same columns, no primary key
    env.admin.execute(
        sql.SQL("CREATE TABLE {} (LIKE {})").format(
            sql.Identifier(SCHEMA, f"{table}_archive"), sql.Identifier(SCHEMA, table)
        )
    )
    env.admin.execute(
        sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(
            sql.Identifier(SCHEMA, f"{table}_archive"), sql.Identifier(env.role)
        )
    )

    state = archive_old_events(params=params(block), return_state=True)

    assert state.is_failed()
    assert "no primary key or unique index on id" in state.message
    assert "nothing was moved" in state.message
    assert env.rows(table) == before and env.ids(f"{table}_archive") == set()
