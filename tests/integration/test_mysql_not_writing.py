"""mysql-not-writing against a real MariaDB 10.11: real lock waits, really killed.

The module has its own database with the seed's `moving_averages` table (its newest row an hour
old: the symptom) and a canary table, the writers' user, a batch user whose open transaction
blocks them, and the runbook's least-privileged user: PROCESS (other users' threads and
transactions), CONNECTION ADMIN (KILL them), READ_ONLY ADMIN (SET GLOBAL read_only), SELECT on
the database and INSERT on the canary table.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pymysql
import pytest
from prefect import flow

from blocks.mysql import MySQLDatabase
from flows.mysql.mysql_not_writing import (
    MySQLNotWritingParams,
    MySQLNotWritingSummary,
    mysql_not_writing,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.mysql import find_blockers, kill_blocking_session
from tests.approvals import Approver
from tests.conftest import read_incident_report, read_run_logs, unique
from tests.mariadb_server import MariaDBServer
from tests.servers import free_port

pytestmark = pytest.mark.integration

RUNBOOK = "mysql-not-writing"
TABLE = "moving_averages"
COLUMNS = {
    "id": "bigint",
    "symbol": "varchar(16)",
    "avg_price": "decimal(18,8)",
    "created_at": "datetime(6)",
}


@dataclass
class Env:
    server: MariaDBServer
    db: str
    app_user: str
    batch_user: str
    ops_user: str
    password: str = field(default_factory=lambda: f"pw-{uuid.uuid4().hex}")

    def connect(self, user: str, **kw) -> pymysql.connections.Connection:
        return pymysql.connect(
            host=self.server.host, port=self.server.port, user=user, password=self.password,
            database=self.db, connect_timeout=5, **kw,
        )  # fmt: skip

    def admin(self) -> pymysql.connections.Connection:
        return self.server.admin(self.db)

    def block(self, **overrides) -> str:
        name = unique("mysql-db")
        fields = {
            "host": self.server.host,
            "port": self.server.port,
            "database": self.db,
            "user": self.ops_user,
            "password": self.password,
            "connect_timeout_s": 3,
            "read_timeout_s": 10,
            "write_timeout_s": 10,
        }
        MySQLDatabase(**(fields | overrides)).save(name, overwrite=True)
        return name

    def query(self, sql: str, args=None) -> list[tuple]:
        with self.admin() as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def threads(self) -> set[int]:
        return {r[0] for r in self.query("SELECT ID FROM information_schema.PROCESSLIST")}

    def read_only(self) -> bool:
        return bool(self.query("SELECT @@read_only")[0][0])


@pytest.fixture(scope="module")
def env(mariadb: MariaDBServer) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:8]
    e = Env(
        mariadb, f"rbmarket_{suffix}", f"rbapp_{suffix}", f"rbbatch_{suffix}", f"rbops_{suffix}"
    )
    with mariadb.admin() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{e.db}`")
        cur.execute(
            f"CREATE TABLE `{e.db}`.{TABLE} (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " symbol VARCHAR(16) NOT NULL, avg_price DECIMAL(18,8) NOT NULL,"
            " created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), KEY (created_at))"
        )
        cur.execute(
            f"CREATE TABLE `{e.db}`.canary (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
        )
        # the symptom: the newest row is an hour old
        cur.execute(
            f"INSERT INTO `{e.db}`.{TABLE} (symbol, avg_price, created_at)"
            " VALUES ('BTCUSDT', 1, NOW(6) - INTERVAL 1 HOUR)"
        )
        for user in (e.app_user, e.batch_user, e.ops_user):
            cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (e.password,))
        for user in (e.app_user, e.batch_user):
            cur.execute(f"GRANT SELECT, INSERT, UPDATE ON `{e.db}`.* TO '{user}'@'%'")
        cur.execute(
            f"GRANT PROCESS, CONNECTION ADMIN, READ_ONLY ADMIN ON *.* TO '{e.ops_user}'@'%'"
        )
        cur.execute(f"GRANT SELECT ON `{e.db}`.* TO '{e.ops_user}'@'%'")
        cur.execute(f"GRANT INSERT ON `{e.db}`.canary TO '{e.ops_user}'@'%'")
    yield e
    with mariadb.admin() as conn, conn.cursor() as cur:
        cur.execute("SET GLOBAL read_only = OFF")
        cur.execute(f"DROP DATABASE `{e.db}`")
        for user in (e.app_user, e.batch_user, e.ops_user):
            cur.execute(f"DROP USER '{user}'@'%'")


def wait_until(check, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@dataclass
class Scene:
    """A batch session holding row locks in an open transaction, and a writer waiting on them."""

    blocker: pymysql.connections.Connection
    writer: pymysql.connections.Connection
    writer_thread: threading.Thread
    writer_result: list
    symbol: str

    @property
    def blocker_id(self) -> int:
        return self.blocker.thread_id()

    @property
    def writer_id(self) -> int:
        return self.writer.thread_id()


@pytest.fixture
def scene(env: Env) -> Iterator[Scene]:
    blocker = env.connect(env.batch_user)
    with blocker.cursor() as cur:
        # every row and the gap after the last: the writers' next INSERT waits for it
        cur.execute(f"SELECT id FROM {TABLE} WHERE id >= 0 FOR UPDATE")
    writer = env.connect(env.app_user, autocommit=True)
    symbol = f"T{uuid.uuid4().hex[:8]}"
    result: list = []

    def write() -> None:
        try:
            with writer.cursor() as cur:
                cur.execute("SET SESSION innodb_lock_wait_timeout = 300")
                cur.execute(f"INSERT INTO {TABLE} (symbol, avg_price) VALUES (%s, 42.5)", (symbol,))
            result.append("inserted")
        except pymysql.err.MySQLError as exc:
            result.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    s = Scene(blocker, writer, thread, result, symbol)
    assert wait_until(
        lambda: env.query(
            "SELECT COUNT(*) FROM information_schema.INNODB_TRX"
            " WHERE trx_mysql_thread_id = %s AND trx_state = 'LOCK WAIT'",
            (s.writer_id,),
        )[0][0]
    ), "the writer never waited for the blocker's lock"
    yield s
    if s.blocker_id in env.threads():
        env.query("KILL %s", (s.blocker_id,))
    thread.join(15)
    for conn in (blocker, writer):
        try:
            conn.close()
        except pymysql.err.Error:
            pass


def params(env: Env, **overrides) -> MySQLNotWritingParams:
    fields = {
        "db_block": env.block(),
        "table": TABLE,
        "timestamp_column": "created_at",
        "max_row_age_s": 600,
        "expected_columns": COLUMNS,
        "verify_timeout_s": 15,
        # every test acts on the same server: budgets are not under test here
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return MySQLNotWritingParams(**(fields | overrides))


def landed(env: Env, symbol: str) -> list[tuple]:
    return env.query(f"SELECT symbol, avg_price FROM {TABLE} WHERE symbol = %s", (symbol,))


def test_kills_the_blocking_session_after_approval_and_the_insert_lands(
    env: Env, scene: Scene
) -> None:
    approver = Approver(RUNBOOK, {"approve": True, "approver": "alice", "reason": "batch is hung"})
    approver.start()

    state = mysql_not_writing(params=params(env), return_state=True)

    assert state.is_completed(), state.message
    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    # what the human sees: which session, that it is inside a transaction, what killing costs
    assert f"thread {scene.blocker_id} ({env.batch_user}@" in approver.description
    assert "inside a transaction" in approver.description
    assert "rolls all of it back" in approver.description
    summary: MySQLNotWritingSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    named = summary.blockers.blockers
    assert [b.thread_id for b in named] == [scene.blocker_id]
    assert named[0].user == env.batch_user and named[0].waiters == [scene.writer_id]
    assert named[0].in_transaction and named[0].idle
    assert summary.killed[0].killed == [scene.blocker_id]
    assert summary.server.super_read_only is None  # MariaDB has none
    assert summary.server.identity == f"{summary.server.hostname}:{env.server.port}"
    # the effect: the blocker is gone, the writer's row is in the table
    assert scene.blocker_id not in env.threads()
    scene.writer_thread.join(15)
    assert scene.writer_result == ["inserted"]
    assert landed(env, scene.symbol) == [(scene.symbol, pytest.approx(42.5))]
    assert summary.after.new_row is True
    report = read_incident_report(state.state_details.flow_run_id)
    assert f"Find why {env.batch_user}@" in report
    assert (
        f"Killed thread {scene.blocker_id}, whose open transaction blocked 1 writer(s); "
        "writes land again" in report
    )
    assert "| read_only | OK | read_only=OFF, super_read_only=not on this server |" in report
    assert env.password not in report


def test_rejected_kill_leaves_the_blocker_alone(env: Env, scene: Scene) -> None:
    approver = Approver(RUNBOOK, {"approve": False, "approver": "carol", "reason": "month-end"})
    approver.start()

    state = mysql_not_writing(params=params(env), return_state=True)

    approver.join(5)
    assert state.is_failed() and "rejected by carol: month-end" in state.message
    assert scene.blocker_id in env.threads()
    assert scene.writer_thread.is_alive() and landed(env, scene.symbol) == []


def test_dry_run_kills_nothing(env: Env, scene: Scene) -> None:
    state = mysql_not_writing(params=params(env, dry_run=True), return_state=True)

    assert state.is_completed(), state.message
    summary: MySQLNotWritingSummary = state.result()
    assert summary.outcome is Outcome.PLANNED
    assert [c.target for c in summary.killed[0].planned] == [f"thread {scene.blocker_id}"]
    assert summary.killed[0].applied == []
    # the blocker is alive and still in its transaction; the writer still waits
    assert scene.blocker_id in env.threads()
    with scene.blocker.cursor() as cur:
        cur.execute("SELECT 1")
    assert scene.writer_thread.is_alive() and scene.writer_result == []
    assert landed(env, scene.symbol) == []
    # the blocker commits: the writer was only waiting, and its row lands
    scene.blocker.commit()
    scene.writer_thread.join(15)
    assert scene.writer_result == ["inserted"]


@pytest.fixture
def read_only(env: Env) -> Iterator[None]:
    env.query("SET GLOBAL read_only = ON")
    yield
    env.query("SET GLOBAL read_only = OFF")


def test_read_only_server_is_reported_and_left_alone_without_must_be_writable(
    env: Env, read_only: None
) -> None:
    # the writers are refused: that is the symptom
    with (
        env.connect(env.app_user, autocommit=True) as conn,
        pytest.raises(pymysql.err.OperationalError, match="read-only"),
    ):
        conn.cursor().execute(f"INSERT INTO {TABLE} (symbol, avg_price) VALUES ('X', 1)")

    state = mysql_not_writing(params=params(env, canary_table="canary"), return_state=True)

    assert state.is_failed()
    assert "read-only" in state.message and "must_be_writable is off" in state.message
    assert env.read_only()


def test_read_only_is_cleared_with_must_be_writable_and_approval(env: Env, read_only: None) -> None:
    approver = Approver(
        RUNBOOK, {"approve": True, "approver": "bob", "reason": "it is the primary"}
    )
    approver.start()

    state = mysql_not_writing(
        params=params(env, canary_table="canary", must_be_writable=True), return_state=True
    )

    assert state.is_completed(), state.message
    approver.join(5)
    assert approver.error is None and "two servers take writes" in approver.description
    summary: MySQLNotWritingSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert [c.target for c in summary.writable.applied] == ["read_only"]
    assert not env.read_only()
    assert summary.after.canary.ok
    assert "Cleared read_only (the server was read-only); writes land again" in summary.report
    # the writers can write again
    with env.connect(env.app_user, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} (symbol, avg_price) VALUES ('AFTER', 1)")


def test_read_only_rejected_stays_read_only(env: Env, read_only: None) -> None:
    approver = Approver(RUNBOOK, {"approve": False, "approver": "bob", "reason": "a replica"})
    approver.start()

    state = mysql_not_writing(
        params=params(env, canary_table="canary", must_be_writable=True), return_state=True
    )

    approver.join(5)
    assert state.is_failed() and "rejected by bob: a replica" in state.message
    assert env.read_only()


def test_schema_drift_is_reported(env: Env) -> None:
    expected = COLUMNS | {"volume": "bigint", "avg_price": "double"}

    state = mysql_not_writing(params=params(env, expected_columns=expected), return_state=True)

    assert state.is_failed()
    assert "schema drift" in state.message and "missing column(s) volume" in state.message
    assert "avg_price is decimal(18,8), expected double" in state.message


def test_stale_table_on_a_healthy_server_escalates_to_the_writers(env: Env) -> None:
    # a table of its own: the other tests' writers leave fresh rows in moving_averages
    env.query(f"CREATE TABLE stale_averages LIKE {TABLE}")
    env.query(
        "INSERT INTO stale_averages (symbol, avg_price, created_at)"
        " VALUES ('ETHUSDT', 1, NOW(6) - INTERVAL 2 HOUR)"
    )
    p = params(env, table="stale_averages", canary_table="canary")

    state = mysql_not_writing(params=p, return_state=True)

    assert state.is_failed()
    assert "writers are not sending" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| new rows | FAILING |" in report and "test write succeeded" in report


def test_wrong_password_is_a_clear_error_and_the_password_is_nowhere(env: Env) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    state = mysql_not_writing(
        params=params(env, db_block=env.block(password=wrong)), return_state=True
    )

    assert state.is_failed()
    assert "authentication failed: validate credentials" in state.message
    run_id = state.state_details.flow_run_id
    report = read_incident_report(run_id)
    logs = "\n".join(log["message"] for log in read_run_logs(run_id))
    for text in (state.message, report, logs):
        assert wrong not in text and env.password not in text
    assert f"Access denied for user '{env.ops_user}'" in report


def test_connection_refused_is_classified(env: Env) -> None:
    state = mysql_not_writing(
        params=params(env, db_block=env.block(port=free_port())), return_state=True
    )

    assert state.is_failed()
    assert "MySQL unreachable (connection refused" in state.message
    assert "Connection refused) (3 attempts)" in state.message  # a blip is not an outage
    assert "MySQL service crash" in state.message and "disk full" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "last resort, only with approval, never automatic" in report


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_hung_server_is_classified_as_timed_out(env: Env, silent_port: int) -> None:
    block = env.block(port=silent_port, read_timeout_s=1)
    state = mysql_not_writing(params=params(env, db_block=block), return_state=True)

    assert state.is_failed()
    assert "MySQL unreachable (timed out" in state.message


def test_kill_rechecks_the_blocker_at_the_last_moment_and_is_idempotent(
    env: Env, scene: Scene
) -> None:
    db = MySQLDatabase.load(env.block())

    @flow
    def survey():
        return find_blockers(db)

    @flow
    def kill(trx_id: str):
        return kill_blocking_session(db, scene.blocker_id, dry_run=False, trx_id=trx_id)

    (blocker,) = survey().blockers
    assert blocker.thread_id == scene.blocker_id and blocker.waiters == [scene.writer_id]

    # approved for another transaction than the one blocking now: spared
    other = kill(str(int(blocker.trx_id) + 1000))
    assert other.applied == [] and other.spared == [scene.blocker_id]
    assert scene.blocker_id in env.threads()

    first = kill(blocker.trx_id)
    assert first.killed == [scene.blocker_id]
    assert first.applied[0].detail == {"present": False}
    assert scene.blocker_id not in env.threads()
    scene.writer_thread.join(15)
    assert scene.writer_result == ["inserted"]

    again = kill(blocker.trx_id)  # a re-run finds nothing to kill, and does not fail
    assert again.applied == [] and again.killed == [] and again.spared == [scene.blocker_id]


def test_a_full_table_is_reported_as_disk_full(env: Env) -> None:
    """A MEMORY table at max_heap_table_size answers ER_RECORD_FILE_FULL (1114), as InnoDB does
    when its tablespace cannot grow: the test write sees it and the runbook escalates."""
    with env.admin() as conn, conn.cursor() as cur:
        cur.execute("SET SESSION max_heap_table_size = 16384")
        cur.execute(
            "CREATE TABLE full_canary (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=MEMORY"
        )
        with pytest.raises(pymysql.err.OperationalError, match="is full"):
            for _ in range(100_000):
                cur.execute("INSERT INTO full_canary () VALUES ()")
        cur.execute(f"GRANT INSERT ON `{env.db}`.full_canary TO '{env.ops_user}'@'%'")

    state = mysql_not_writing(params=params(env, canary_table="full_canary"), return_state=True)

    assert state.is_failed()
    assert "disk full" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "test write failed (1114: The table 'full_canary' is full)" in report
    assert "GiB free" in report  # the server runs on this host: its data directory's free space


def test_unknown_database_is_classified(env: Env) -> None:
    state = mysql_not_writing(
        params=params(env, db_block=env.block(database="no_such_db")), return_state=True
    )

    assert state.is_failed()
    # the runbook user may not even learn whether it exists: MariaDB answers 1044 for that
    assert "access to the database denied: validate the configured database name" in state.message


def test_writers_waiting_for_a_table_lock_escalate_without_a_kill(env: Env) -> None:
    """LOCK TABLES holds a metadata lock, not a row lock: InnoDB's lock waits do not name its
    holder, so the runbook reports the waiting writers and kills nobody."""
    env.query(f"GRANT LOCK TABLES ON `{env.db}`.* TO '{env.batch_user}'@'%'")
    holder = env.connect(env.batch_user, autocommit=True)
    with holder.cursor() as cur:
        cur.execute(f"LOCK TABLES {TABLE} WRITE")
    writer = env.connect(env.app_user, autocommit=True)
    result: list = []

    def write() -> None:
        with writer.cursor() as cur:
            cur.execute(f"INSERT INTO {TABLE} (symbol, avg_price) VALUES ('MDL', 1)")
        result.append("inserted")

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        assert wait_until(
            lambda: env.query(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                " WHERE ID = %s AND STATE LIKE 'Waiting for table metadata lock'",
                (writer.thread_id(),),
            )[0][0]
        )
        state = mysql_not_writing(params=params(env), return_state=True)

        assert state.is_failed()
        assert "cannot name" in state.message and "1 wait for a metadata lock" in state.message
        report = read_incident_report(state.state_details.flow_run_id)
        assert (
            "| new rows | FAILING | newest row unknown: reading the table waited over 5s" in report
        )
        assert {holder.thread_id(), writer.thread_id()} <= env.threads()  # nobody was killed
        assert thread.is_alive() and result == []
    finally:
        with holder.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        thread.join(15)
        holder.close()
        writer.close()
    assert result == ["inserted"]


def test_missing_table_is_reported(env: Env) -> None:
    state = mysql_not_writing(params=params(env, table="moving_avgs"), return_state=True)

    assert state.is_failed()
    assert "the table does not exist: validate the table schema" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| table schema | FAILING | table moving_avgs does not exist |" in report
