"""event-processing-stuck against a real PostgreSQL table.

The table has awkward names (a schema, a table name with a space and capitals, non-default
columns) so identifier quoting is exercised for real. The runbook logs in as a role that
may only read and update that table.

Rows per test: 35 stuck (PROCESSING, touched 3 hours ago, ids 1-35), one stuck row a
consumer holds locked (id 36), fresh PROCESSING rows (101-105), old DONE (201-205) and
old PENDING (301-303) rows. The backlog tests have tables of their own: 60,000 stuck rows
(even ids) mixed with 60,000 that are not; and, to be split into ranges of ids reset side by
side, 120,000 stuck rows among 240,000 with text ids in an order unrelated to the rows'.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from blocks.event_store import EventStore
from blocks.postgres import PostgresDatabase
from flows.event_store.event_processing_stuck import (
    StuckEventsParams,
    StuckEventsSummary,
    event_processing_stuck,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.approvals import Approver
from tests.conftest import read_incident_report, unique
from tests.pg_env import scratch_database
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

SCHEMA, TABLE = "ops", "Event Log"
STUCK = list(range(1, 36))
LOCKED = 36
FRESH = list(range(101, 106))
DONE = list(range(201, 206))
PENDING = list(range(301, 304))
NOT_STUCK = FRESH + DONE + PENDING
# every test acts on the same table: the budget has its own test (on its own table)
SAFETY = SafetyParams(budget_max_actions=1000, approval_poll_s=1)
# more than the old per-run ceiling (100 batches of 500), small enough to seed in a moment
BACKLOG = 60_000
# enough for the reset to split into ranges (over SPLIT_MIN_ROWS_LEFT after the first batches)
LARGE_BACKLOG = 120_000
BATCHING_DEFAULTS = {
    name: EventStore.model_fields[name].default
    for name in ("batch_size", "max_batch_size", "batch_target_ms", "time_budget_s")
}


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

    def copy_table(self) -> str:
        """A fresh copy of the seeded table (a target of its own); returns its name."""
        name = unique("Event Log")
        copy = sql.Identifier(SCHEMA, name)
        self.admin.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(copy, self.table)
        )
        self.admin.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(copy, self.table))
        self.admin.execute(
            sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(copy, sql.Identifier(self.role))
        )
        return name

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
            # fixed batches of 10 (they do not grow): the tests count transactions
            "batch_size": 10,
            "max_batch_size": 10,
        }
        EventStore(**(fields | overrides)).save(name, overwrite=True)
        return name

    def backlog_table(self) -> str:
        """A table of its own: BACKLOG stuck rows at even ids; at odd ids, rows that are not
        stuck (fresh PROCESSING, old DONE and PENDING). Returns its name."""
        name = unique("Backlog")
        table = sql.Identifier(SCHEMA, name)
        self.admin.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(table, self.table)
        )
        self.admin.execute(
            sql.SQL(
                "INSERT INTO {} SELECT id,"
                " CASE WHEN id %% 2 = 0 OR id %% 5 = 0 THEN 'PROCESSING'"
                "  WHEN id %% 3 = 0 THEN 'DONE' ELSE 'PENDING' END,"
                " now() - CASE WHEN id %% 2 = 1 AND id %% 5 = 0 THEN interval '1 minute'"
                "  ELSE interval '3 hours' END,"
                " 'event ' || id FROM generate_series(1, %s) AS id"
            ).format(table),
            (2 * BACKLOG,),
        )
        self.admin.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
        self.admin.execute(
            sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(table, sql.Identifier(self.role))
        )
        return name

    def text_id_table(self, stuck: int) -> str:
        """A table of its own with text ids (md5 of n: unrelated to n's order), 2 * ``stuck``
        rows: n even stuck, n odd not (fresh PROCESSING, old DONE or PENDING); payload 'event n'.
        Returns its name."""
        name = unique("Text Ids")
        table = sql.Identifier(SCHEMA, name)
        self.admin.execute(
            sql.SQL(
                "CREATE TABLE {} (event_id text PRIMARY KEY, state text NOT NULL,"
                " touched_at timestamptz NOT NULL, payload text)"
            ).format(table)
        )
        self.admin.execute(
            sql.SQL(
                "INSERT INTO {} SELECT md5(n::text),"
                " CASE WHEN n %% 2 = 0 OR n %% 5 = 0 THEN 'PROCESSING'"
                "  WHEN n %% 3 = 0 THEN 'DONE' ELSE 'PENDING' END,"
                " now() - CASE WHEN n %% 2 = 1 AND n %% 5 = 0 THEN interval '1 minute'"
                "  ELSE interval '3 hours' END,"
                " 'event ' || n FROM generate_series(1, %s) AS n"
            ).format(table),
            (2 * stuck,),
        )
        self.admin.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
        self.admin.execute(
            sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(table, sql.Identifier(self.role))
        )
        return name

    def stuck_count(self, table: str) -> int:
        (count,) = self.admin.execute(
            sql.SQL(
                "SELECT count(*) FROM {} WHERE state = 'PROCESSING'"
                " AND touched_at < now() - interval '1 hour'"
            ).format(sql.Identifier(SCHEMA, table))
        ).fetchone()
        return count

    def digest(self, table: str, where: str) -> str:
        """One hash of the rows ``where`` selects, with their system columns (xmin: written)."""
        (digest,) = self.admin.execute(
            sql.SQL(
                "SELECT md5(string_agg(concat_ws(',', event_id, state, touched_at, xmin, ctid),"
                " ';' ORDER BY event_id)) FROM {} WHERE {}"
            ).format(sql.Identifier(SCHEMA, table), sql.SQL(where))
        ).fetchone()
        return digest

    def rows(self, table: str = TABLE) -> dict[int, tuple]:
        """Every row with its system columns: a row written or locked would differ."""
        cur = self.admin.execute(
            sql.SQL(
                "SELECT event_id, state, touched_at, payload, xmin::text, xmax::text, ctid::text"
                " FROM {} ORDER BY event_id"
            ).format(sql.Identifier(SCHEMA, table))
        )
        return {r[0]: r[1:] for r in cur.fetchall()}

    def state(self, ids: list[int], table: str = TABLE) -> set[str]:
        rows = self.rows(table)
        return {rows[i][0] for i in ids}


@pytest.fixture(scope="module")
def env(postgres: PostgresServer) -> Iterator[Env]:
    with scratch_database(postgres, "rbevents", ["rbconsumer"], SCHEMA) as scratch:
        role = scratch.roles[0]
        e = Env(postgres, scratch.db, role, scratch.password, scratch.admin)
        e.admin.execute(
            sql.SQL(
                "CREATE TABLE {} (event_id bigint PRIMARY KEY, state text NOT NULL,"
                " touched_at timestamptz NOT NULL, payload text)"
            ).format(e.table)
        )
        e.admin.execute(
            sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(e.table, sql.Identifier(role))
        )
        yield e


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


def params(block: str, **overrides) -> StuckEventsParams:
    return StuckEventsParams(**({"event_store_block": block, "safety": SAFETY} | overrides))


def run(env: Env, block: str, **overrides) -> StuckEventsSummary:
    state = event_processing_stuck(params=params(block, **overrides), return_state=True)
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
    # each batch's before and after are its rows' status as taken and as written
    assert [c.detail["status"] for c in summary.reset.planned] == ["PROCESSING"] * 4
    assert [c.detail for c in summary.reset.applied] == [
        c.detail | {"status": "PENDING"} for c in summary.reset.planned
    ]
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
    assert {c.detail["status"] for c in summary.reset.planned} == {"PROCESSING"}
    # every row, with its system columns (xmin/xmax/ctid): not written, not even locked
    assert env.rows() == before

    # a plan above the approval limit is only reported in dry-run: no pause, no change
    big = run(env, block, dry_run=True, approve_over=1)
    assert big.outcome is Outcome.PLANNED and big.reset.applied == []
    assert "Approvals" not in big.report
    assert env.rows() == before


def test_threshold_override(env: Env, seeded: psycopg.Connection) -> None:
    block = env.block()
    before = env.rows()

    # 3-hour-old events are not stuck under a 4-hour threshold
    relaxed = run(env, block, stuck_after_s=4 * 3600)
    assert relaxed.outcome is Outcome.NO_ACTION_NEEDED and relaxed.before.count == 0
    assert env.rows() == before


@pytest.mark.parametrize("approve", [False, True])
def test_resetting_more_than_approve_over_needs_approval(
    env: Env, seeded: psycopg.Connection, approve: bool
) -> None:
    block = env.block()
    before = env.rows()
    answer = {"approve": approve, "approver": "bob", "reason": "consumer redeployed"}
    approver = Approver("event-processing-stuck", answer)
    approver.start()

    state = event_processing_stuck(params=params(block, approve_over=20), return_state=True)

    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    # the form shows how many and why: 36 planned (the locked one can't be told apart unlocked)
    assert "36 events would go back to PENDING" in approver.description
    assert "approve_over=20" in approver.description
    if not approve:
        assert state.is_failed()
        assert "rejected by bob: consumer redeployed" in state.message
        assert env.rows() == before
        return
    assert state.is_completed(), state.message
    summary: StuckEventsSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED and summary.reset.reset_count == 35
    assert env.state(STUCK) == {"PENDING"}
    assert "| reset stuck events to PENDING | approved | bob | consumer redeployed |" in (
        summary.report
    )


def test_reset_budget_stops_the_second_reset(env: Env, seeded: psycopg.Connection) -> None:
    # a table of its own: a target no other test has spent budget on
    table = env.copy_table()
    block = env.block(table=table)
    one_per_hour = SafetyParams(budget_max_actions=1, approval_poll_s=1)

    first = run(env, block, safety=one_per_hour)
    assert first.outcome is Outcome.RESOLVED
    assert first.reset.reset_count == 36  # the copy's row 36 is not locked by anyone
    after_first = env.rows(table)
    assert env.state([*STUCK, LOCKED], table) == {"PENDING"}

    # the consumer leaves more events stuck: the next reset is over budget
    env.admin.execute(
        sql.SQL(
            "UPDATE {} SET touched_at = now() - interval '3 hours' WHERE event_id = ANY(%s)"
        ).format(sql.Identifier(SCHEMA, table)),
        (FRESH,),
    )
    stuck_again = env.rows(table)

    state = event_processing_stuck(params=params(block, safety=one_per_hour), return_state=True)

    assert state.is_failed()
    assert "budget" in state.message and "1 per 1h" in state.message
    # exactly one reset happened: the newly stuck rows are untouched
    assert env.rows(table) == stuck_again
    assert env.state(FRESH, table) == {"PROCESSING"}
    for i in [*STUCK, LOCKED]:
        assert stuck_again[i] == after_first[i]


@contextlib.contextmanager
def _held_by_a_consumer(env: Env, table: str, event_id: object) -> Iterator[psycopg.Connection]:
    """A consumer's open transaction holding one row locked, as a live consumer does."""
    consumer = psycopg.connect(env.server.conninfo(dbname=env.db))
    try:
        consumer.execute(
            sql.SQL("SELECT 1 FROM {} WHERE event_id = %s FOR UPDATE").format(
                sql.Identifier(SCHEMA, table)
            ),
            (event_id,),
        )
        yield consumer
    finally:
        consumer.close()


def test_a_backlog_beyond_the_old_ceiling_is_reset_with_defaults(env: Env) -> None:
    table = env.backlog_table()
    block = env.block(table=table, **BATCHING_DEFAULTS)
    not_stuck = env.digest(table, "event_id % 2 = 1")
    held = BACKLOG  # a stuck row in the middle of the table, which a consumer holds
    with _held_by_a_consumer(env, table, held) as consumer:
        summary = run(env, block, approve_over=10 * BACKLOG)
        assert consumer.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

    assert summary.outcome is Outcome.RESOLVED, summary.report
    assert summary.before.count == BACKLOG
    reset = summary.reset
    assert reset.reset_count == sum(reset.batch_sizes) == BACKLOG - 1
    assert not reset.out_of_time
    assert max(reset.batch_sizes) <= BATCHING_DEFAULTS["max_batch_size"]
    assert summary.after.count == 1 and summary.after.locked == 1
    assert env.stuck_count(table) == 1
    # one transaction per batch
    (transactions,) = env.admin.execute(
        sql.SQL(
            "SELECT count(DISTINCT xmin::text) FROM {} WHERE event_id %% 2 = 0 AND event_id <> %s"
        ).format(sql.Identifier(SCHEMA, table)),
        (held,),
    ).fetchone()
    assert transactions == len(reset.batch_sizes)
    # each batch starts after the last one ended: the table is walked once, in id order
    ranges = [(int(c.detail["first_id"]), int(c.detail["last_id"])) for c in reset.applied]
    assert ranges == sorted(ranges)
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert ranges[0][0] == 2 and ranges[-1][1] == 2 * BACKLOG
    assert env.digest(table, "event_id % 2 = 1") == not_stuck
    assert "event(s) reset to PENDING in" in summary.report


def test_batches_grow_while_they_take_less_than_the_target(env: Env) -> None:
    table = env.backlog_table()
    # a target no batch comes near: each batch is twice the last, up to the largest
    block = env.block(table=table, **(BATCHING_DEFAULTS | {"batch_target_ms": 10_000}))

    summary = run(env, block, approve_over=10 * BACKLOG)

    assert summary.outcome is Outcome.RESOLVED
    assert summary.reset.batch_sizes == [500, 1000, 2000, 4000, 8000, 16_000, 20_000, 8500]
    assert env.stuck_count(table) == 0


def test_a_time_budget_that_ends_early_reports_what_is_left_and_escalates(env: Env) -> None:
    table = env.backlog_table()
    # batches of 10 rows cannot reset 60,000 in a second
    slow = env.block(table=table, time_budget_s=1)
    everything = env.digest(table, "true")

    # the plan names every stuck row in at most 200 chunks of ids; nothing changes
    plan = run(env, slow, dry_run=True)
    assert plan.outcome is Outcome.PLANNED
    assert sum(plan.reset.batch_sizes) == BACKLOG and len(plan.reset.planned) == 200
    assert plan.reset.batch_sizes[0] == BACKLOG // 200
    assert env.digest(table, "true") == everything

    state = event_processing_stuck(
        params=params(slow, approve_over=10 * BACKLOG), return_state=True
    )

    assert state.is_failed()
    left = env.stuck_count(table)
    done = BACKLOG - left
    assert 0 < done < BACKLOG
    # the reset rows are the lowest stuck ids: the batches walked the table in id order
    (lowest_left,) = env.admin.execute(
        sql.SQL(
            "SELECT min(event_id) FROM {} WHERE state = 'PROCESSING'"
            " AND touched_at < now() - interval '1 hour'"
        ).format(sql.Identifier(SCHEMA, table))
    ).fetchone()
    assert lowest_left == 2 * done + 2
    assert state.message.startswith("Escalated to a human: time budget of 1s ended: ")
    assert f"{done:,} event(s) reset to PENDING in " in state.message
    assert f"{left:,} still stuck, about " in state.message
    assert "The next run continues" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| Outcome | **ESCALATED** |" in report
    assert "| no resettable stuck events left | FAILING |" in report

    # the next run, with the default budget, finishes the job
    rest = run(env, env.block(table=table, **BATCHING_DEFAULTS), approve_over=10 * BACKLOG)
    assert rest.outcome is Outcome.RESOLVED
    assert rest.reset.reset_count == left and env.stuck_count(table) == 0


def test_a_large_backlog_is_reset_in_ranges_side_by_side(env: Env) -> None:
    table = env.text_id_table(LARGE_BACKLOG)
    block = env.block(table=table, **BATCHING_DEFAULTS)
    odd = "substr(payload, 7)::int % 2 = 1"
    not_stuck = env.digest(table, odd)
    stuck_before = env.digest(table, f"NOT ({odd})")
    held = env.admin.execute("SELECT md5('1000')").fetchone()[0]  # a stuck row a consumer holds
    with _held_by_a_consumer(env, table, held) as consumer:
        summary = run(env, block, approve_over=10 * LARGE_BACKLOG)
        # skipped, never waited on: the consumer's transaction is still open
        assert consumer.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

    assert summary.outcome is Outcome.RESOLVED, summary.report
    reset = summary.reset
    assert reset.ranges == 2, "a backlog this large is split"
    assert reset.reset_count == sum(reset.batch_sizes) == LARGE_BACKLOG - 1
    assert not reset.out_of_time
    assert max(reset.batch_sizes) <= BATCHING_DEFAULTS["max_batch_size"]
    assert len(reset.planned) == len(reset.applied) == len(reset.batch_sizes)
    assert {c.detail["status"] for c in reset.planned} == {"PROCESSING"}
    assert {c.detail["status"] for c in reset.applied} == {"PENDING"}
    # exactly the stuck rows changed, each once, one transaction per batch; nothing else did
    assert env.digest(table, odd) == not_stuck
    (rows, transactions, states, still_old, held_state) = env.admin.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE event_id <> %(held)s),"
            " count(DISTINCT xmin::text) FILTER (WHERE event_id <> %(held)s),"
            " array_agg(DISTINCT state) FILTER (WHERE event_id <> %(held)s),"
            " count(*) FILTER (WHERE event_id <> %(held)s"
            "  AND touched_at < now() - interval '1 hour'),"
            " max(state) FILTER (WHERE event_id = %(held)s)"
            " FROM {} WHERE NOT ({})"
        ).format(sql.Identifier(SCHEMA, table), sql.SQL(odd.replace("%", "%%"))),
        {"held": held},
    ).fetchone()
    assert rows == LARGE_BACKLOG - 1 and states == ["PENDING"] and still_old == 0
    assert transactions == len(reset.batch_sizes)
    assert held_state == "PROCESSING"
    assert summary.after.count == 1 and summary.after.locked == 1
    assert env.digest(table, f"NOT ({odd})") != stuck_before

    # a re-run resets only the row the consumer let go of, and nothing else
    everything_else = env.digest(table, f"event_id <> '{held}'")
    again = run(env, block, approve_over=10 * LARGE_BACKLOG)
    assert again.outcome is Outcome.RESOLVED
    assert again.reset.reset_count == 1 and again.reset.ranges == 1
    assert env.digest(table, f"event_id <> '{held}'") == everything_else
    assert env.stuck_count(table) == 0
