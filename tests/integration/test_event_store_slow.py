"""event-store-slow against a real PostgreSQL events table of 200,000 rows.

The table (schema ``evstore``, owned by a role the runbook's login is a member of, so it may
build indexes) has no index but its primary key. An application session runs a slow query shape
a few times (pg_stat_statements records it with $n parameters); the runbook finds the sequential
scans, proposes (status, updated_at), builds it CONCURRENTLY once approved while a writer
inserts all the time, and verifies it is valid and used. A build killed halfway (its INVALID
leftover) is repaired by the next run.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql

from blocks.event_store import EventStore
from blocks.postgres import PostgresDatabase
from flows.event_store.event_store_slow import (
    EventStoreSlowParams,
    EventStoreSlowSummary,
    event_store_slow,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.pg_performance_decisions import index_name
from tests.approvals import Approver
from tests.conftest import unique
from tests.pg_env import wait_until
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

SCHEMA, TABLE = "evstore", "events"
ROWS = 200_000
INDEX = index_name(TABLE, ("status", "updated_at"))
SAFETY = SafetyParams(budget_max_actions=1000, approval_poll_s=1)
SLOW_QUERY = (
    "SELECT id, payload FROM evstore.events WHERE status = %s AND updated_at < %s"
    " ORDER BY updated_at LIMIT 50"
)


@dataclass
class Env:
    server: PostgresServer
    db: str
    owner: str
    ops: str
    app: str
    password: str
    admin: psycopg.Connection
    blocks: dict[str, str] = field(default_factory=dict)

    def connect(self, role: str, app: str = "test") -> psycopg.Connection:
        return psycopg.connect(
            self.server.conninfo(dbname=self.db, user=role, password=self.password),
            application_name=app,
            autocommit=True,
        )

    def block(self) -> str:
        name = unique("slow-events")
        database = PostgresDatabase(
            host=self.server.host,
            port=self.server.port,
            dbname=self.db,
            user=self.ops,
            password=self.password,
            connect_timeout_s=5,
            statement_timeout_s=10,
        )
        EventStore(database=database, schema_name=SCHEMA, table=TABLE).save(name, overwrite=True)
        return name

    def index_state(self, name: str = INDEX) -> tuple[int, bool] | None:
        row = self.admin.execute(
            "SELECT x.indexrelid::int, x.indisvalid FROM pg_index AS x"
            " JOIN pg_class AS i ON i.oid = x.indexrelid"
            " JOIN pg_namespace AS n ON n.oid = i.relnamespace"
            " WHERE n.nspname = %s AND i.relname = %s",
            (SCHEMA, name),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def indexes(self) -> set[str]:
        rows = self.admin.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            (SCHEMA, TABLE),
        ).fetchall()
        return {r[0] for r in rows}

    def run_slow_query(self, times: int = 5) -> None:
        with self.connect(self.app, "events-api") as conn:
            for _ in range(times):
                conn.execute(SLOW_QUERY, ("PENDING", "2100-01-01")).fetchall()
            # a statement on a temporary table of its session: no other session can EXPLAIN it
            # (joined on an expression: never through the primary key, whose scans would count)
            conn.execute("CREATE TEMP TABLE wanted AS SELECT generate_series(1, 1000, 7) AS id")
            for _ in range(times):
                conn.execute(
                    "SELECT e.id FROM evstore.events AS e JOIN wanted AS w ON w.id = e.id + 0"
                    " WHERE e.payload <> %s",
                    ("y",),
                ).fetchall()


@pytest.fixture(scope="module")
def env(postgres: PostgresServer) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:8]
    db = f"rbslow_{suffix}"
    owner, ops, app = f"rbslowown_{suffix}", f"rbslowops_{suffix}", f"rbslowapp_{suffix}"
    password = f"pw-{uuid.uuid4().hex}"
    with psycopg.connect(postgres.conninfo(), autocommit=True) as root:
        root.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        root.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
        for role in (ops, app):
            root.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
        # the runbook may build indexes (as a member of the owner) and read every session's stats
        root.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(owner), sql.Identifier(ops)))
        root.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(ops)))
    admin = psycopg.connect(postgres.conninfo(dbname=db), autocommit=True)
    e = Env(postgres, db, owner, ops, app, password, admin)
    admin.execute("CREATE EXTENSION pg_stat_statements")
    admin.execute(
        sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
            sql.Identifier(SCHEMA), sql.Identifier(owner)
        )
    )
    table = sql.Identifier(SCHEMA, TABLE)
    admin.execute(
        sql.SQL(
            "CREATE TABLE {} (id bigserial PRIMARY KEY, status text NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL,"
            " payload text)"
        ).format(table)
    )
    admin.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(table, sql.Identifier(owner)))
    admin.execute(
        sql.SQL(
            "INSERT INTO {} (status, updated_at, payload) SELECT"
            " CASE WHEN i %% 100 = 0 THEN 'PENDING' WHEN i %% 100 = 1 THEN 'PROCESSING'"
            "  WHEN i %% 100 < 5 THEN 'FAILED' ELSE 'COMPLETED' END,"
            " now() - make_interval(secs => i * 10), repeat('x', 100)"
            " FROM generate_series(1, %s) AS i"
        ).format(table),
        (ROWS,),
    )
    admin.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
    admin.execute(
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(SCHEMA), sql.Identifier(app)
        )
    )
    admin.execute(
        sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(table, sql.Identifier(app))
    )
    admin.execute(
        sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
            sql.Identifier(SCHEMA, f"{TABLE}_id_seq"), sql.Identifier(app)
        )
    )
    admin.execute("SELECT pg_stat_statements_reset()")
    e.run_slow_query()
    yield e
    admin.close()
    with psycopg.connect(postgres.conninfo(), autocommit=True) as root:
        root.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
        for role in (ops, app, owner):
            root.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def params(block: str, **overrides) -> EventStoreSlowParams:
    return EventStoreSlowParams(**({"event_store_block": block, "safety": SAFETY} | overrides))


def run(block: str, **overrides) -> EventStoreSlowSummary:
    state = event_store_slow(params=params(block, **overrides), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


class Writer(threading.Thread):
    """An application inserting events one by one, timing each insert."""

    def __init__(self, env: Env):
        super().__init__(daemon=True)
        self.env = env
        self.stop = threading.Event()
        self.inserts: list[tuple[float, float]] = []  # (started, seconds)
        self.errors: list[str] = []

    def run(self) -> None:
        with self.env.connect(self.env.app, "events-writer") as conn:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    conn.execute(
                        "INSERT INTO evstore.events (status, updated_at, payload)"
                        " VALUES ('PENDING', now(), 'new')"
                    )
                except psycopg.Error as exc:  # recorded: the test asserts there are none
                    self.errors.append(str(exc))
                self.inserts.append((t0, time.monotonic() - t0))
                time.sleep(0.002)

    @property
    def max_wait_s(self) -> float:
        return max(s for _, s in self.inserts)


class BuildWatcher(threading.Thread):
    """Watches pg_stat_progress_create_index: when the build on the table ran."""

    def __init__(self, env: Env):
        super().__init__(daemon=True)
        self.env = env
        self.stop = threading.Event()
        self.seen: list[float] = []
        self.phases: set[str] = set()

    def run(self) -> None:
        with psycopg.connect(self.env.server.conninfo(dbname=self.env.db), autocommit=True) as c:
            while not self.stop.is_set():
                rows = c.execute(
                    "SELECT phase, command FROM pg_stat_progress_create_index"
                    " WHERE datname = current_database()"
                ).fetchall()
                if rows:
                    self.seen.append(time.monotonic())
                    self.phases |= {f"{cmd}: {phase}" for phase, cmd in rows}
                time.sleep(0.002)


def test_missing_extension_is_reported_not_failed(env: Env) -> None:
    block = env.block()
    env.admin.execute("DROP EXTENSION pg_stat_statements")
    try:
        summary = run(block, dry_run=True)
    finally:
        env.admin.execute("CREATE EXTENSION pg_stat_statements")

    assert summary.statements.available is False
    assert "pg_stat_statements is not installed" in summary.report
    # the store's own query shapes still find the missing index
    assert summary.outcome is Outcome.PLANNED
    assert [c.detail["index"] for c in summary.build.planned] == [INDEX]
    assert env.index_state() is None


def test_proposes_builds_concurrently_under_writes_and_verifies(env: Env) -> None:
    block = env.block()
    before_indexes = env.indexes()

    # dry-run: the diagnosis and the plan, nothing built
    dry = run(block, dry_run=True)
    assert dry.outcome is Outcome.PLANNED
    assert dry.statements.available
    slow = [s for s in dry.statements.by_mean if "updated_at < $2" in s.query]
    assert slow and slow[0].calls >= 5
    sources = {c.source for c in dry.candidates if c.columns == ("status", "updated_at")}
    # the slow statement's generic plan and the store's own shapes agree on the columns
    assert f"statement {slow[0].queryid}" in sources
    assert {"shape pending_oldest", "shape stuck_processing"} <= sources
    assert [c.detail["index"] for c in dry.build.planned] == [INDEX]
    assert "Seq Scan" in dry.before_plans[0].text
    # the temporary table's statement cannot be EXPLAINed here: reported, not a failure
    unexplained = [r for r in dry.before_plans if r.error]
    assert [r.error for r in unexplained] == ['relation "wanted" does not exist']
    assert "could not EXPLAIN 1 statement(s)" in dry.report
    assert "| large tables read by sequential scans | FAILING | events:" in dry.report
    # the runbook's own statistics reads are not among the slow statements
    assert not any("s.mean_exec_time" in s.query for s in dry.statements.by_total)
    assert env.indexes() == before_indexes

    # approved: built CONCURRENTLY while a writer inserts without pause
    writer, watcher = Writer(env), BuildWatcher(env)
    answer = {"approve": True, "approver": "alice", "reason": "index for the events API"}
    approver = Approver("event-store-slow", answer)
    writer.start()
    watcher.start()
    approver.start()
    try:
        state = event_store_slow(params=params(block), return_state=True)
    finally:
        writer.stop.set()
        watcher.stop.set()
        writer.join(10)
        watcher.join(10)
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert "CREATE INDEX CONCURRENTLY" in approver.description
    assert state.is_completed(), state.message
    summary: EventStoreSlowSummary = state.result()

    assert summary.outcome is Outcome.RESOLVED
    assert summary.build.built == [INDEX]
    oid_valid = env.index_state()
    assert oid_valid is not None and oid_valid[1] is True
    assert env.indexes() == before_indexes | {INDEX}
    # the writer: no insert failed, and it kept inserting while the index was built
    assert writer.errors == []
    assert watcher.seen, "the build never showed in pg_stat_progress_create_index"
    assert any("CONCURRENTLY" in p for p in watcher.phases)
    during = [s for t, s in writer.inserts if watcher.seen[0] <= t <= watcher.seen[-1]]
    assert during, "no insert ran during the build"
    print(
        f"\nbuild {summary.build.build_s[INDEX]:.2f}s; writer: {len(during)} inserts during the "
        f"build, longest {max(during) * 1000:.1f} ms; longest overall {writer.max_wait_s * 1000:.1f} ms"
    )
    # the slow query's plan: a sequential scan before, the new index after
    assert summary.after_plans
    assert all(INDEX not in b.text for b in summary.before_plans)
    assert all(INDEX in a.text for a in summary.after_plans)
    assert "before and after" in summary.report and "Seq Scan on events" in summary.report
    assert "| create index concurrently | approved | alice |" in summary.report
    assert env.password not in summary.report

    # a re-run finds the index in place: nothing to build, the same index
    again = run(block)
    assert again.outcome is Outcome.NO_ACTION_NEEDED
    assert env.index_state() == oid_valid


def test_a_killed_build_leaves_an_invalid_index_that_the_next_run_rebuilds(env: Env) -> None:
    block = env.block()
    env.admin.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(SCHEMA, INDEX)))
    # a writer's open transaction makes the concurrent build wait; its backend killed while it
    # waits, the build leaves its index INVALID
    writer = env.connect(env.app, "slow-writer")
    writer.autocommit = False
    writer.execute("INSERT INTO evstore.events (status, updated_at) VALUES ('PENDING', now())")
    builder = psycopg.connect(env.server.conninfo(dbname=env.db), autocommit=True)
    builder_pid = builder.info.backend_pid
    failure: list[BaseException] = []

    def build() -> None:
        try:
            builder.execute(
                sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} (status, updated_at)").format(
                    sql.Identifier(INDEX), sql.Identifier(SCHEMA, TABLE)
                )
            )
        except psycopg.Error as exc:
            failure.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    assert wait_until(lambda: env.index_state() is not None)
    assert wait_until(
        lambda: env.admin.execute(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (builder_pid,)
        ).fetchone()[0]
    )
    env.admin.execute("SELECT pg_terminate_backend(%s)", (builder_pid,))
    thread.join(10)
    writer.rollback()
    writer.close()
    builder.close()
    assert failure and isinstance(failure[0], psycopg.OperationalError)
    leftover = env.index_state()
    assert leftover is not None and leftover[1] is False

    answer = {"approve": True, "approver": "alice", "reason": "repair"}
    approver = Approver("event-store-slow", answer)
    approver.start()
    state = event_store_slow(params=params(block), return_state=True)
    approver.join(10)
    assert approver.error is None
    assert "rebuild_invalid_index" in approver.description
    assert state.is_completed(), state.message
    summary: EventStoreSlowSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert summary.build.dropped_invalid == [INDEX] and summary.build.built == [INDEX]
    rebuilt = env.index_state()
    assert rebuilt is not None and rebuilt[1] is True and rebuilt[0] != leftover[0]
    assert "invalid index(es) on events" in summary.report


def test_a_build_behind_a_long_transaction_gives_up_at_lock_timeout(env: Env) -> None:
    block = env.block()
    env.admin.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(SCHEMA, INDEX)))
    # an open transaction that wrote to the table: CONCURRENTLY must wait for it to end
    writer = env.connect(env.app, "long-writer")
    writer.autocommit = False
    writer.execute("INSERT INTO evstore.events (status, updated_at) VALUES ('PENDING', now())")
    approver = Approver("event-store-slow", {"approve": True, "approver": "alice", "reason": "x"})
    approver.start()
    try:
        t0 = time.monotonic()
        state = event_store_slow(
            params=params(block, lock_timeout_ms=500, leftover_drop_wait_s=1), return_state=True
        )
        elapsed = time.monotonic() - t0
        # the transaction still open, the leftover could not be dropped either: it says so
        assert state.is_failed()
        assert "lock_timeout 500 ms" in state.message
        assert f"INVALID leftover {INDEX} could not be dropped" in state.message
        leftover = env.index_state()
        assert leftover is not None and leftover[1] is False
        # the writer's transaction was never disturbed: it commits
        writer.commit()
    finally:
        writer.close()
    approver.join(10)
    assert approver.error is None
    print(f"\nrun with a 500 ms lock timeout behind an open transaction: {elapsed:.1f}s")

    # with that transaction gone, a build that gives up drops its leftover at once: here a
    # fresh open transaction blocks the build, and ends while the leftover is being dropped
    env.admin.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(SCHEMA, INDEX)))
    writer = env.connect(env.app, "long-writer")
    writer.autocommit = False
    writer.execute("INSERT INTO evstore.events (status, updated_at) VALUES ('PENDING', now())")

    def end_when_the_drop_waits() -> None:
        # the build gave up and its leftover's DROP waits for this transaction: end it
        dropping = wait_until(
            lambda: env.admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query ILIKE 'DROP INDEX CONCURRENTLY%%' AND wait_event_type = 'Lock'"
            ).fetchone()[0],
            timeout_s=90,
        )
        if dropping:
            writer.commit()

    ender = threading.Thread(target=end_when_the_drop_waits, daemon=True)
    approver = Approver(
        "event-store-slow",
        {"approve": True, "approver": "alice", "reason": "x"},
        ignore={approver.paused_run},
    )
    approver.start()
    ender.start()
    try:
        state = event_store_slow(
            params=params(block, lock_timeout_ms=500, leftover_drop_wait_s=60), return_state=True
        )
    finally:
        ender.join(100)
        writer.close()
    approver.join(10)
    assert state.is_failed()
    assert f"INVALID leftover {INDEX} was dropped" in state.message
    assert env.index_state() is None
