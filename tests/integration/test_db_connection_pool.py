"""db-connection-pool-exhausted against a real PostgreSQL: real sessions, really terminated.

Each test opens a crowd of sessions in the module's own database: idle ones (the victims),
one busy in a query, one idle in a transaction, one of an excluded role, one of an excluded
application and an idle superuser. The runbook logs in as a least-privileged role
(pg_signal_backend + pg_read_all_stats). An admin session in another database watches
pg_stat_activity.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from prefect import flow

from blocks.postgres import PostgresDatabase
from flows.postgres.db_connection_pool_exhausted import (
    ConnectionPoolParams,
    ConnectionPoolSummary,
    db_connection_pool_exhausted,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.postgres import IdleCriteria, survey_connections, terminate_idle_connections
from tests.approvals import Approver
from tests.conftest import read_actions_table, read_incident_report
from tests.pg_env import Env, env, wait_until  # noqa: F401 - env: a fixture

pytestmark = pytest.mark.integration

IDLE_S = 1.0
LOCK_KEY = 4711
EXCLUDED_APP = "ops-console"


@dataclass
class Crowd:
    """The sessions of one test, by role in the scenario."""

    idle: list[psycopg.Connection]
    idle_in_transaction: psycopg.Connection
    excluded_role: psycopg.Connection  # holds the advisory lock the busy session waits for
    excluded_app: psycopg.Connection
    superuser: psycopg.Connection
    busy: psycopg.Connection
    busy_thread: threading.Thread
    busy_result: list

    def pid(self, conn: psycopg.Connection) -> int:
        return conn.info.backend_pid

    @property
    def idle_pids(self) -> set[int]:
        return {c.info.backend_pid for c in self.idle}

    def survivors(self) -> list[psycopg.Connection]:
        return [self.idle_in_transaction, self.excluded_role, self.excluded_app, self.superuser]

    def finish_busy_query(self) -> None:
        """Release the lock the busy session waits on; its query must then complete."""
        self.excluded_role.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        self.busy_thread.join(timeout=15)
        assert not self.busy_thread.is_alive()


@pytest.fixture
def crowd(env: Env) -> Iterator[Crowd]:
    opened: list[psycopg.Connection] = []

    def open_(role: str, app: str, autocommit: bool = True) -> psycopg.Connection:
        conn = env.connect(role, app, autocommit)
        opened.append(conn)
        return conn

    idle = [open_(env.app_role, "victim-idle") for _ in range(4)]
    iit = open_(env.app_role, "victim-idle-in-tx", autocommit=False)
    iit.execute("SELECT 1")
    excluded_role = open_(env.batch_role, "nightly-batch")
    excluded_role.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    excluded_app = open_(env.app_role, EXCLUDED_APP)
    superuser = open_(env.server.user, "dba-psql")
    busy = open_(env.app_role, "victim-busy")
    result: list = []
    thread = threading.Thread(
        target=lambda: result.append(
            busy.execute("SELECT 'done' FROM pg_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        ),
        daemon=True,
    )
    thread.start()
    c = Crowd(idle, iit, excluded_role, excluded_app, superuser, busy, thread, result)

    def settled() -> bool:
        rows = env.admin.execute(
            "SELECT pid, state, extract(epoch FROM now() - state_change) FROM pg_stat_activity"
            " WHERE datname = %s",
            (env.db,),
        ).fetchall()
        by_pid = {pid: (state, age) for pid, state, age in rows}
        idle_long = all(
            by_pid.get(c.pid(conn), (None, 0))[1] > IDLE_S + 0.3
            for conn in [*idle, iit, excluded_role, excluded_app, superuser]
        )
        return idle_long and by_pid.get(c.pid(busy), (None, 0))[0] == "active"

    assert wait_until(settled), "sessions never settled into idle/active"
    yield c
    if thread.is_alive():
        c.finish_busy_query()
    for conn in opened:
        conn.close()


def params(env: Env, min_free: int, **overrides) -> ConnectionPoolParams:
    fields = {
        "db_block": env.block(),
        "idle_threshold_s": IDLE_S,
        "exclude_roles": [env.batch_role],
        "exclude_applications": [EXCLUDED_APP],
        "databases": [env.db],
        "target_headroom_percent": 0,
        "min_free_connections": min_free,
        "verify_timeout_s": 10,
        # every test acts on the same server: the budget has its own test
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return ConnectionPoolParams(**(fields | overrides))


def assert_alive(env: Env, conns: list[psycopg.Connection]) -> None:
    live = env.live_pids()
    for conn in conns:
        assert conn.info.backend_pid in live
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("include_idle_in_transaction", [False, True])
def test_terminates_long_idle_sessions_only(
    env: Env, crowd: Crowd, include_idle_in_transaction: bool
) -> None:
    victims = set(crowd.idle_pids)
    if include_idle_in_transaction:
        victims.add(crowd.pid(crowd.idle_in_transaction))
    # the flow's own session takes one slot: demand just more than is free now, so the pool
    # counts as exhausted until the victims are gone
    p = params(env, env.headroom() + 1, include_idle_in_transaction=include_idle_in_transaction)
    # a session inside a transaction loses its work: that needs a human's approval
    approver = Approver(
        "db-connection-pool-exhausted",
        {"approve": True, "approver": "alice", "reason": "batch job is hung"},
    )
    if include_idle_in_transaction:
        approver.start()

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_completed(), state.message
    if include_idle_in_transaction:
        approver.join(5)
        assert approver.error is None and approver.paused_run is not None
        assert "inside a transaction" in approver.description
        assert str(crowd.pid(crowd.idle_in_transaction)) in approver.description
    summary: ConnectionPoolSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert set(summary.terminate.terminated) == victims
    assert summary.terminate.session_pid not in victims
    # the actions table's "after" is the server's view once acting is done, not the plan again
    rows = read_actions_table(state.state_details.flow_run_id)
    assert {r["target"] for r in rows} == {c.target for c in summary.terminate.planned}
    for row in rows:
        assert row["status"] == "applied"
        assert row["before"]["state"] in ("idle", "idle in transaction")
        assert row["before"]["idle_s"] > IDLE_S
        assert row["after"] == {"present": False}
    assert summary.after.headroom >= p.min_free_connections
    # the victims are gone from the server and their clients see it
    assert wait_until(lambda: not (env.live_pids() & victims))
    for conn in crowd.idle:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    # the busy query finishes normally and its session stays usable
    crowd.finish_busy_query()
    assert crowd.busy_result == [("done",)]
    survivors = [crowd.busy, crowd.excluded_role, crowd.excluded_app, crowd.superuser]
    if not include_idle_in_transaction:
        survivors.append(crowd.idle_in_transaction)
    assert_alive(env, survivors)
    assert env.admin.execute("SELECT 1").fetchone() == (1,)
    assert env.server.password not in summary.report and env.password not in summary.report
    assert "Cap idle connections in the pools of" in summary.report


def test_dry_run_terminates_nothing(env: Env, crowd: Crowd) -> None:
    before = env.live_pids()
    p = params(env, env.headroom() + 1, dry_run=True)

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_completed(), state.message
    summary: ConnectionPoolSummary = state.result()
    assert summary.outcome is Outcome.PLANNED
    assert {b.pid for b in summary.candidates} == crowd.idle_pids
    assert len(summary.terminate.planned) == 4 and summary.terminate.applied == []
    time.sleep(0.5)  # a termination would have landed by now
    assert env.live_pids() == before
    assert_alive(env, [*crowd.idle, *crowd.survivors()])


def test_healthy_pool_is_left_alone(env: Env, crowd: Crowd) -> None:
    before = env.live_pids()
    state = db_connection_pool_exhausted(params=params(env, 0), return_state=True)

    assert state.is_completed(), state.message
    summary: ConnectionPoolSummary = state.result()
    assert summary.outcome is Outcome.NO_ACTION_NEEDED
    assert summary.terminate is None
    assert env.live_pids() == before


def test_escalates_when_no_idle_session_may_be_terminated(env: Env, crowd: Crowd) -> None:
    before = env.live_pids()
    # every idle session is excluded: nothing is left that terminating could free
    p = params(env, env.headroom() + 1, exclude_applications=[EXCLUDED_APP, "victim-idle"])

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_failed()
    # idle sessions are there: the runbook says they are not its to terminate, not "busy"
    assert "no idle connection the runbook may terminate: " in state.message
    assert "busy connections alone" not in state.message
    assert "scale up the database" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    left_alone = evidence(report, "client sessions")["idle_left_alone"]
    assert left_alone["excluded application"] == 5 and left_alone["excluded role"] == 1
    assert left_alone["state idle in transaction"] == 1
    assert f"{sum(left_alone.values())} idle one(s) are excluded" in state.message
    assert "; 1 busy |" in report
    assert env.live_pids() == before


def test_fails_verification_when_idle_sessions_are_not_enough(env: Env, crowd: Crowd) -> None:
    p = params(env, env.headroom() + 10, verify_timeout_s=2)

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_failed()
    assert "still exhaust the pool" in state.message and "active: " in state.message
    # the idle sessions were still terminated: partial relief while humans scale up
    assert wait_until(lambda: not (env.live_pids() & crowd.idle_pids))
    assert_alive(env, crowd.survivors())


def test_terminate_rechecks_each_session_at_the_last_moment(env: Env, crowd: Crowd) -> None:
    """Sessions that changed between listing and terminating are left alone; re-runs are no-ops."""
    db = PostgresDatabase.load(env.block())
    criteria = IdleCriteria(
        idle_for_s=IDLE_S,
        exclude_roles=[env.batch_role],
        exclude_applications=[EXCLUDED_APP],
        databases=[env.db],
    )
    turns_busy, disconnects, recycled, stays_idle = crowd.idle
    busy_pid, gone_pid, recycled_pid, idle_pid = (c.info.backend_pid for c in crowd.idle)

    @flow
    def find():
        return survey_connections(db, criteria).candidates

    candidates = find()
    assert {b.pid for b in candidates} == crowd.idle_pids

    # after listing: one session starts a query (it waits on the advisory lock) ...
    thread = threading.Thread(
        target=lambda: turns_busy.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,)), daemon=True
    )
    thread.start()
    assert wait_until(
        lambda: env.admin.execute(
            "SELECT state = 'active' FROM pg_stat_activity WHERE pid = %s", (busy_pid,)
        ).fetchone()[0]
    )
    # ... one disconnects, and one pid stands for a newer session than the one listed
    disconnects.close()
    assert wait_until(lambda: gone_pid not in env.live_pids())
    candidates = [
        b.model_copy(update={"backend_start": b.backend_start.replace(year=2000)})
        if b.pid == recycled_pid
        else b
        for b in candidates
    ]

    @flow
    def terminate():
        return terminate_idle_connections(db, candidates, criteria, dry_run=False)

    result = terminate()
    assert result.terminated == [idle_pid]
    assert result.spared == [busy_pid]
    assert set(result.gone) == {gone_pid, recycled_pid}
    assert wait_until(lambda: idle_pid not in env.live_pids())
    assert_alive(env, [recycled])

    again = terminate()  # idempotent: nothing is signalled twice, nothing fails
    assert again.applied == [] and again.terminated == []
    assert set(again.gone) == {gone_pid, recycled_pid, idle_pid}
    assert again.spared == [busy_pid]

    # both waiting queries get the lock in turn and complete
    crowd.finish_busy_query()
    crowd.busy.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert_alive(env, [turns_busy])


def test_the_runbooks_own_sessions_are_never_candidates(env: Env) -> None:
    """A session with the block's application_name is the runbooks' own (an earlier step's
    connection can still be listed, idle, a moment after it closed: on a loaded CI machine the
    runbook once asked approval to terminate its own just-closed session): neither listed nor
    terminated, however long idle; another application's idle session is both."""
    db = PostgresDatabase.load(env.block())
    ours = env.connect(env.app_role, db.application_name)
    theirs = env.connect(env.app_role, "victim-idle")
    try:
        time.sleep(IDLE_S + 0.5)
        criteria = IdleCriteria(idle_for_s=IDLE_S, databases=[env.db])

        @flow
        def find():
            return survey_connections(db, criteria)

        survey = find()
        listed = {b.pid for b in survey.candidates + survey.recently_idle}
        assert theirs.info.backend_pid in listed
        assert ours.info.backend_pid not in listed

        # handed to the terminate step anyway (as listed: its pid, start and idle spell), its
        # last-moment re-check spares it
        backend_start, state_change = env.admin.execute(
            "SELECT backend_start, state_change FROM pg_stat_activity WHERE pid = %s",
            (ours.info.backend_pid,),
        ).fetchone()
        listed_theirs = next(b for b in survey.candidates if b.pid == theirs.info.backend_pid)
        own = listed_theirs.model_copy(
            update={
                "pid": ours.info.backend_pid,
                "backend_start": backend_start,
                "state_change": state_change,
            }
        )

        @flow
        def terminate():
            return terminate_idle_connections(db, [own], criteria, dry_run=False)

        assert terminate().spared == [ours.info.backend_pid]
        assert_alive(env, [ours])
    finally:
        ours.close()
        theirs.close()


def test_sessions_carry_the_block_timeouts_and_name(env: Env) -> None:
    db = PostgresDatabase.load(env.block(application_name="runbooks-test", statement_timeout_s=1.5))
    with db.connect() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1500ms",)
        assert conn.execute("SHOW application_name").fetchone() == ("runbooks-test",)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(5)")


LEAK = 25
LEAKY_APP = "leaky-app"
# how the report words idle ages: "2.1s", or "2.1-2.9s (median 2.5s)"
AGES = r"([\d.]+)(?:s|-([\d.]+)s \(median [\d.]+s\))"


@pytest.fixture
def leak(env: Env) -> Iterator[list[psycopg.Connection]]:
    """A sudden pool leak: 25 sessions of one application, idle for a couple of seconds."""
    conns = [env.connect(env.app_role, LEAKY_APP) for _ in range(LEAK)]
    time.sleep(2)
    yield conns
    for conn in conns:
        conn.close()


def evidence(report: str, label: str) -> dict:
    block = report.split(f"**{label}**\n```json\n", 1)[1].split("```", 1)[0]
    return json.loads(block)


@pytest.mark.parametrize("approve", [False, True])
def test_recently_idle_leak_is_diagnosed_and_offered_for_approval(
    env: Env, leak: list[psycopg.Connection], approve: bool
) -> None:
    """Idle for seconds, not minutes: the report says so, and terminating them needs a human."""
    leaked = {c.info.backend_pid for c in leak}
    p = params(env, env.headroom() + 1, idle_threshold_s=300)
    approver = Approver(
        "db-connection-pool-exhausted",
        {"approve": approve, "approver": "bob", "reason": "checked the leaky app"},
    )
    approver.start()

    state = db_connection_pool_exhausted(params=p, return_state=True)

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    # what the human sees: how long, below which threshold, whose, and every session in the plan
    held = rf"below the 300s threshold, held by {env.app_role}/{LEAKY_APP} \({LEAK}\)"
    assert re.search(
        rf"{LEAK} are idle only {AGES}, {held}: their application may be using them",
        approver.description,
    ), approver.description
    assert all(f"pid={pid} " in approver.description for pid in leaked)
    report = read_incident_report(state.state_details.flow_run_id)
    assert "busy connections alone" not in report
    seen = re.search(rf"\| idle connections \| FAILING \| {LEAK} idle for {AGES}, {held}; ", report)
    assert seen, report
    youngest, oldest = float(seen[1]), float(seen[2] or seen[1])
    assert 2 <= youngest <= oldest < 300
    sessions = evidence(report, "client sessions")
    assert sessions["idle_over_threshold"] == {"count": 0}
    below = sessions["idle_below_threshold"]
    assert below["count"] == LEAK
    assert below["by_role_application"] == {f"{env.app_role}/{LEAKY_APP}": LEAK}
    assert 2 <= below["idle_s"]["youngest"] <= below["idle_s"]["oldest"] < 300
    assert "none is idle over the threshold; terminating also the 25 idle for less" in report

    if not approve:
        assert state.is_failed()
        assert "rejected by bob: checked the leaky app" in state.message
        assert leaked <= env.live_pids()
        for conn in leak:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        return
    assert state.is_completed(), state.message
    summary: ConnectionPoolSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert set(summary.terminate.terminated) == leaked
    assert wait_until(lambda: not (env.live_pids() & leaked))
    rows = read_actions_table(state.state_details.flow_run_id)
    assert len(rows) == LEAK
    assert all(r["before"]["state"] == "idle" and r["after"] == {"present": False} for r in rows)
    assert f"Find why {env.app_role}/{LEAKY_APP} opened {LEAK} connection(s)" in summary.report
