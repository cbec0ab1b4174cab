"""event-processing-stuck against a real PostgreSQL table.

The table has awkward names (a schema, a table name with a space and capitals, non-default
columns) so identifier quoting is exercised for real. The runbook logs in as a role that
may only read and update that table.

Rows per test: 35 stuck (PROCESSING, touched 3 hours ago, ids 1-35), one stuck row a
consumer holds locked (id 36), fresh PROCESSING rows (101-105), old DONE (201-205) and
old PENDING (301-303) rows.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from blocks.event_store import EventStore
from blocks.postgres import PostgresDatabase
from flows.event_store import StuckEventsParams, StuckEventsSummary, event_processing_stuck
from runbooks.report import Outcome
from tests.conftest import unique
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

SCHEMA, TABLE = "ops", "Event Log"
STUCK = list(range(1, 36))
LOCKED = 36
FRESH = list(range(101, 106))
DONE = list(range(201, 206))
PENDING = list(range(301, 304))
NOT_STUCK = FRESH + DONE + PENDING


@dataclass
class Env:
    server: PostgresServer
    db: str
    role: str
    password: str
    admin: psycopg.Connection  # superuser, in the events database

    @property
    def table(self) -> sql.Composed:
        return sql.Identifier(SCHEMA, TABLE)

    def block(self, **overrides) -> str:
        name = unique("events")
        database = PostgresDatabase(
            host=self.server.host,
            port=self.server.port,
            dbname=self.db,
            user=self.role,
            password=self.password,
            connect_timeout_s=5,
            statement_timeout_s=5,
        )
        fields = {
            "database": database,
            "schema_name": SCHEMA,
            "table": TABLE,
            "id_column": "event_id",
            "status_column": "state",
            "updated_at_column": "touched_at",
            "stuck_after_s": 3600,
            "batch_size": 10,
        }
        EventStore(**(fields | overrides)).save(name, overwrite=True)
        return name

    def rows(self) -> dict[int, tuple]:
        """Every row with its system columns: a row written or locked would differ."""
        cur = self.admin.execute(
            sql.SQL(
                "SELECT event_id, state, touched_at, payload, xmin::text, xmax::text, ctid::text"
                " FROM {} ORDER BY event_id"
            ).format(self.table)
        )
        return {r[0]: r[1:] for r in cur.fetchall()}

    def state(self, ids: list[int]) -> set[str]:
        rows = self.rows()
        return {rows[i][0] for i in ids}


@pytest.fixture(scope="module")
def env(postgres: PostgresServer) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:8]
    db, role, password = f"rbevents_{suffix}", f"rbconsumer_{suffix}", f"pw-{uuid.uuid4().hex}"
    with psycopg.connect(postgres.conninfo(), autocommit=True) as root:
        root.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        root.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    admin = psycopg.connect(postgres.conninfo(dbname=db), autocommit=True)
    e = Env(postgres, db, role, password, admin)
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    admin.execute(
        sql.SQL(
            "CREATE TABLE {} (event_id bigint PRIMARY KEY, state text NOT NULL,"
            " touched_at timestamptz NOT NULL, payload text)"
        ).format(e.table)
    )
    admin.execute(
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(SCHEMA), sql.Identifier(role)
        )
    )
    admin.execute(sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(e.table, sql.Identifier(role)))
    yield e
    admin.close()
    with psycopg.connect(postgres.conninfo(), autocommit=True) as root:
        root.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
        root.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def seeded(env: Env) -> Iterator[psycopg.Connection]:
    """Seed the table; yield a consumer's session holding row LOCKED with FOR UPDATE."""
    env.admin.execute(sql.SQL("TRUNCATE {}").format(env.table))
    insert = sql.SQL(
        "INSERT INTO {} SELECT id, %s, now() - make_interval(secs => %s), 'event ' || id"
        " FROM unnest(%s::bigint[]) AS id"
    ).format(env.table)
    env.admin.execute(insert, ("PROCESSING", 3 * 3600, [*STUCK, LOCKED]))
    env.admin.execute(insert, ("PROCESSING", 60, FRESH))
    env.admin.execute(insert, ("DONE", 3 * 3600, DONE))
    env.admin.execute(insert, ("PENDING", 3 * 3600, PENDING))
    consumer = psycopg.connect(
        env.server.conninfo(dbname=env.db), application_name="event-consumer"
    )
    consumer.execute(
        sql.SQL("SELECT 1 FROM {} WHERE event_id = %s FOR UPDATE").format(env.table), (LOCKED,)
    )
    yield consumer
    consumer.close()


def run(env: Env, block: str, **overrides) -> StuckEventsSummary:
    state = event_processing_stuck(
        params=StuckEventsParams(event_store_block=block, **overrides), return_state=True
    )
    assert state.is_completed(), state.message
    return state.result()


def test_resets_stuck_events_in_batches_around_a_locked_one(
    env: Env, seeded: psycopg.Connection
) -> None:
    block = env.block()
    before = env.rows()

    summary = run(env, block)

    # the consumer's transaction held its lock the whole time: the flow skipped, never waited
    assert seeded.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert summary.outcome is Outcome.RESOLVED
    assert summary.before.count == 36
    assert summary.before.sample_ids == [str(i) for i in range(1, 11)]
    assert summary.reset.reset_count == 35
    assert summary.reset.batch_sizes == [10, 10, 10, 5]
    assert summary.after.count == 1 and summary.after.locked == 1
    after = env.rows()
    assert env.state(STUCK) == {"PENDING"}
    assert all(after[i][1] > before[i][1] for i in STUCK), "updated_at must move to now()"
    # one transaction per batch, taken in id order: each batch has its own xmin
    by_xmin: dict[str, list[int]] = defaultdict(list)
    for i in STUCK:
        by_xmin[after[i][3]].append(i)
    assert sorted(by_xmin.values()) == [STUCK[0:10], STUCK[10:20], STUCK[20:30], STUCK[30:35]]
    # the locked row, fresh, done and pending rows are untouched
    for i in [LOCKED, *NOT_STUCK]:
        assert after[i] == before[i]
    assert "locked by open transactions" in summary.report
    assert "Check the event consumer for deadlocks" in summary.report
    assert env.password not in summary.report

    # re-run while the consumer still holds its row: nothing to do, nothing changes
    rerun = run(env, block)
    assert rerun.outcome is Outcome.NO_ACTION_NEEDED
    assert rerun.reset.reset_count == 0 and rerun.after.locked == 1
    assert env.rows() == after

    # the consumer goes away without finishing: now its row is reset too, exactly once
    seeded.rollback()
    released = run(env, block)
    assert released.outcome is Outcome.RESOLVED
    assert released.reset.reset_count == 1 and released.reset.batch_sizes == [1]
    assert env.state([LOCKED]) == {"PENDING"}
    final = env.rows()
    for i in STUCK + NOT_STUCK:
        assert final[i] == after[i]

    done = run(env, block)
    assert done.outcome is Outcome.NO_ACTION_NEEDED
    assert done.before.count == 0 and done.reset is None
    assert env.rows() == final


def test_dry_run_changes_nothing(env: Env, seeded: psycopg.Connection) -> None:
    block = env.block()
    before = env.rows()

    summary = run(env, block, dry_run=True)

    assert summary.outcome is Outcome.PLANNED
    assert summary.reset.applied == [] and summary.reset.reset_count == 0
    # without locking it cannot tell the consumer's row apart: it plans all 36
    assert summary.reset.batch_sizes == [10, 10, 10, 6]
    assert [c.detail["first_id"] for c in summary.reset.planned] == ["1", "11", "21", "31"]
    assert env.rows() == before


def test_threshold_override_and_batch_limit(env: Env, seeded: psycopg.Connection) -> None:
    block = env.block()
    before = env.rows()

    # 3-hour-old events are not stuck under a 4-hour threshold
    relaxed = run(env, block, stuck_after_s=4 * 3600)
    assert relaxed.outcome is Outcome.NO_ACTION_NEEDED and relaxed.before.count == 0
    assert env.rows() == before

    # a run stops after max_batches and says so; the next run finishes the job
    started = time.monotonic()
    state = event_processing_stuck(
        params=StuckEventsParams(event_store_block=block, max_batches=2), return_state=True
    )
    assert state.is_failed()
    assert "15 stuck event(s) remain" in state.message and "batch limit" in state.message
    assert env.state(STUCK[:20]) == {"PENDING"} and env.state(STUCK[20:]) == {"PROCESSING"}
    assert time.monotonic() - started < 30

    rest = run(env, block, max_batches=2)
    assert rest.outcome is Outcome.RESOLVED and rest.reset.batch_sizes == [10, 5]
    assert env.state(STUCK) == {"PENDING"} and env.state([LOCKED]) == {"PROCESSING"}
