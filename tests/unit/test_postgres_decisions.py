"""Decisions of the db-connection-pool-exhausted runbook, as data tables."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import errors

from blocks.postgres import PostgresDatabase
from tasks.postgres import (
    Backend,
    ConnectionUsage,
    IdleCriteria,
    PoolAction,
    PoolTargets,
    classify_sessions,
    decide_pool_relief,
    describe_idle,
    has_headroom,
    is_transient,
    skip_reason,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def backend(**overrides: Any) -> Backend:
    """An application session idle for 10 minutes: qualifies under the default criteria."""
    fields: dict[str, Any] = {
        "pid": 4242,
        "backend_start": NOW,
        "backend_type": "client backend",
        "datname": "orders",
        "usename": "orders_app",
        "application_name": "orders-api",
        "client_addr": "10.0.0.7",
        "state": "idle",
        "state_change": NOW,
        "idle_s": 600.0,
        "signalable": True,
        "own_session": False,
    }
    return Backend(**(fields | overrides))


def criteria(**overrides: Any) -> IdleCriteria:
    return IdleCriteria(**({"idle_for_s": 300.0} | overrides))


@pytest.mark.parametrize(
    ("backend_fields", "criteria_fields", "expected"),
    [
        ({}, {}, None),
        # idle time: strictly longer than the threshold
        ({"idle_s": 300.0}, {}, "idle too briefly"),
        ({"idle_s": 299.9}, {}, "idle too briefly"),
        ({"idle_s": 300.1}, {}, None),
        ({"idle_s": 0.5}, {"idle_for_s": 1.0}, "idle too briefly"),
        ({"idle_s": 1.5}, {"idle_for_s": 1.0}, None),
        ({"idle_s": None}, {}, "idle too briefly"),
        # state
        ({"state": "active"}, {}, "state active"),
        ({"state": "active"}, {"include_idle_in_transaction": True}, "state active"),
        ({"state": "fastpath function call"}, {}, "state fastpath function call"),
        ({"state": "disabled"}, {}, "state disabled"),
        ({"state": None}, {}, "state unknown"),
        ({"state": "idle in transaction"}, {}, "state idle in transaction"),
        ({"state": "idle in transaction"}, {"include_idle_in_transaction": True}, None),
        ({"state": "idle in transaction (aborted)"}, {}, "state idle in transaction (aborted)"),
        ({"state": "idle in transaction (aborted)"}, {"include_idle_in_transaction": True}, None),
        ({"state": "idle"}, {"include_idle_in_transaction": True}, None),
        # never the runbook's own session, whatever else holds
        ({"own_session": True}, {}, "the runbook's own session"),
        (
            {"own_session": True, "idle_s": 9999.0},
            {"include_idle_in_transaction": True},
            "the runbook's own session",
        ),
        # only client sessions: replication and background processes never qualify
        ({"backend_type": "walsender"}, {}, "not a client session"),
        ({"backend_type": "autovacuum worker"}, {}, "not a client session"),
        ({"backend_type": "background worker"}, {}, "not a client session"),
        ({"backend_type": "logical replication worker"}, {}, "not a client session"),
        (
            {"backend_type": "checkpointer", "state": None, "usename": None},
            {},
            "not a client session",
        ),
        ({"backend_type": None}, {}, "not a client session"),
        # exclusions
        ({}, {"exclude_roles": ["orders_app"]}, "excluded role"),
        ({}, {"exclude_roles": ["replicator", "orders_app"]}, "excluded role"),
        ({}, {"exclude_roles": ["Orders_App"]}, None),
        ({}, {"exclude_roles": ["billing_app"]}, None),
        ({}, {"exclude_applications": ["orders-api"]}, "excluded application"),
        ({}, {"exclude_applications": ["pgbouncer"]}, None),
        ({"application_name": ""}, {"exclude_applications": [""]}, "excluded application"),
        ({"application_name": None}, {"exclude_applications": ["psql"]}, None),
        ({"state": "active"}, {"exclude_roles": ["orders_app"]}, "excluded role"),
        # database scope
        ({}, {"databases": ["billing"]}, "database not targeted"),
        ({}, {"databases": ["billing", "orders"]}, None),
        ({"datname": None}, {"databases": ["orders"]}, "database not targeted"),
        ({}, {"databases": []}, None),
        # a session the runbook role may not signal (superuser, or no pg_signal_backend)
        (
            {"signalable": False},
            {},
            "the runbook role may not terminate it (superuser session or no pg_signal_backend)",
        ),
    ],
)
def test_which_backends_qualify(
    backend_fields: dict[str, Any], criteria_fields: dict[str, Any], expected: str | None
) -> None:
    assert skip_reason(backend(**backend_fields), criteria(**criteria_fields)) == expected


def usage(
    client: int, max_connections: int = 100, su_reserved: int = 3, reserved: int = 0
) -> ConnectionUsage:
    return ConnectionUsage(
        max_connections=max_connections,
        superuser_reserved_connections=su_reserved,
        reserved_connections=reserved,
        total_backends=client + 5,
        client_backends=client,
        by_state={"idle": client},
    )


@pytest.mark.parametrize(
    ("client", "max_connections", "su_reserved", "reserved", "target_percent", "min_free", "ok"),
    [
        (50, 100, 3, 0, 20, 5, True),  # 47 free, 48% free
        (90, 100, 3, 0, 20, 5, False),  # 7 free but only 7% free
        (90, 100, 3, 0, 5, 5, True),
        (93, 100, 3, 0, 0, 5, False),  # 4 free < 5
        (92, 100, 3, 0, 0, 5, True),  # exactly 5 free
        (97, 100, 3, 0, 0, 0, True),  # full, but nothing demanded
        (99, 100, 3, 0, 0, 0, False),  # superusers eat into their reserve: headroom -2
        (57, 60, 3, 0, 0, 1, False),
        (56, 60, 3, 0, 0, 1, True),
        (85, 100, 3, 5, 0, 5, True),  # PostgreSQL 16 reserved_connections: 92 usable, 7 free
        (85, 100, 3, 5, 0, 10, False),
        (0, 100, 3, 0, 100, 0, True),
        (1, 100, 3, 0, 100, 0, False),
        (80, 100, 0, 0, 20, 0, True),  # exactly 20% free
        (81, 100, 0, 0, 20, 0, False),
    ],
)
def test_pool_headroom(
    client: int,
    max_connections: int,
    su_reserved: int,
    reserved: int,
    target_percent: float,
    min_free: int,
    ok: bool,
) -> None:
    targets = PoolTargets(target_headroom_percent=target_percent, min_free_connections=min_free)
    assert has_headroom(usage(client, max_connections, su_reserved, reserved), targets) is ok


@pytest.mark.parametrize(
    ("client", "idle", "recent", "left_alone", "min_free", "action", "sufficient", "recently"),
    [
        (50, 0, 0, 0, 5, PoolAction.NONE, True, False),  # healthy: nothing to do
        (50, 20, 0, 0, 5, PoolAction.NONE, True, False),  # idle sessions alone: no reason to act
        (50, 0, 30, 0, 5, PoolAction.NONE, True, False),
        (95, 0, 0, 0, 5, PoolAction.ESCALATE, False, False),  # busy sessions alone exhaust it
        (95, 0, 0, 7, 5, PoolAction.ESCALATE, False, False),  # idle, but none the runbook's
        (95, 10, 0, 0, 5, PoolAction.TERMINATE, True, False),  # 12 free after
        (95, 3, 0, 0, 5, PoolAction.TERMINATE, True, False),  # exactly 5 free after
        (95, 2, 0, 0, 5, PoolAction.TERMINATE, False, False),  # helps, but stays short
        (99, 1, 0, 0, 5, PoolAction.TERMINATE, False, False),
        (97, 97, 0, 0, 97, PoolAction.TERMINATE, True, False),
        # a sudden pool leak: every idle session younger than the threshold
        (97, 0, 25, 0, 5, PoolAction.TERMINATE, True, True),
        (97, 0, 25, 3, 5, PoolAction.TERMINATE, True, True),
        (97, 0, 2, 0, 5, PoolAction.TERMINATE, False, True),  # all it can, still short
        # long-idle ones suffice: the recently idle ones are left to their application
        (95, 10, 25, 0, 5, PoolAction.TERMINATE, True, False),
        (95, 3, 25, 0, 5, PoolAction.TERMINATE, True, False),
        # long-idle ones are not enough: the recently idle ones too
        (95, 2, 25, 0, 5, PoolAction.TERMINATE, True, True),
        (99, 1, 1, 0, 5, PoolAction.TERMINATE, False, True),
    ],
)
def test_whether_to_act(
    client: int,
    idle: int,
    recent: int,
    left_alone: int,
    min_free: int,
    action: PoolAction,
    sufficient: bool,
    recently: bool,
) -> None:
    targets = PoolTargets(target_headroom_percent=0, min_free_connections=min_free)
    decision = decide_pool_relief(
        usage(client), targets, idle=idle, recently_idle=recent, left_alone=left_alone
    )
    assert (decision.action, decision.sufficient, decision.recently_idle) == (
        action,
        sufficient,
        recently,
    )


@pytest.mark.parametrize(
    ("idle", "recent", "left_alone", "words"),
    [
        (0, 0, 0, "no idle connection to terminate: busy connections alone exhaust the pool"),
        (0, 0, 7, "no idle connection the runbook may terminate: 7 idle one(s) are excluded"),
        (0, 25, 0, "none is idle over the threshold; terminating also the 25 idle for less"),
        (1, 25, 0, "the 1 idle over the threshold are not enough; terminating also the 25"),
        (10, 25, 0, "terminating 10 idle connection(s) should leave"),
    ],
)
def test_decision_says_why(idle: int, recent: int, left_alone: int, words: str) -> None:
    decision = decide_pool_relief(
        usage(97),
        PoolTargets(target_headroom_percent=0, min_free_connections=5),
        idle=idle,
        recently_idle=recent,
        left_alone=left_alone,
    )
    assert words in decision.reason
    assert ("needs approval" in decision.reason) is decision.recently_idle


def session(pid: int, **overrides: Any) -> Backend:
    return backend(pid=pid, **overrides)


@pytest.mark.parametrize(
    ("sessions", "idle", "recent", "left_alone", "busy"),
    [
        ([], [], [], {}, 0),
        # a sudden leak: idle, otherwise eligible, but younger than the threshold
        ([session(1, idle_s=2.0), session(2, idle_s=17.0)], [], [2, 1], {}, 0),
        ([session(1), session(2, idle_s=2.0)], [1], [2], {}, 0),
        # oldest first
        ([session(1, idle_s=400.0), session(2, idle_s=900.0)], [2, 1], [], {}, 0),
        ([session(1, state="active", idle_s=0.0)], [], [], {}, 1),
        ([session(1, state=None, idle_s=None)], [], [], {}, 1),
        # idle ones the runbook never touches, whatever their age
        (
            [
                session(1, usename="batch"),
                session(2, usename="batch", idle_s=2.0),
                session(3, application_name="ops-console"),
                session(4, signalable=False),
                session(5, state="idle in transaction"),
                session(6, datname="billing"),
            ],
            [],
            [],
            {
                "excluded role": 2,
                "excluded application": 1,
                "the runbook role may not terminate it (superuser session or no pg_signal_backend)": 1,
                "state idle in transaction": 1,
                "database not targeted": 1,
            },
            0,
        ),
        # neither the runbook's own session nor non-client processes count at all
        ([session(1, own_session=True), session(2, backend_type="walsender")], [], [], {}, 0),
    ],
)
def test_sessions_are_sorted_by_what_terminating_could_free(
    sessions: list[Backend],
    idle: list[int],
    recent: list[int],
    left_alone: dict[str, int],
    busy: int,
) -> None:
    survey = classify_sessions(
        sessions,
        criteria(
            exclude_roles=["batch"], exclude_applications=["ops-console"], databases=["orders"]
        ),
    )
    assert [b.pid for b in survey.candidates] == idle
    assert [b.pid for b in survey.recently_idle] == recent
    assert survey.left_alone == left_alone
    assert survey.busy == busy


@pytest.mark.parametrize(
    ("ages", "threshold", "words"),
    [
        ([2.1, 2.5, 2.9], 300.0, "3 idle for 2.1-2.9s (median 2.5s), below the 300s threshold"),
        ([17.0] * 25, 300.0, "25 idle for 17s, below the 300s threshold"),
        ([320.1, 400.0], 300.0, "2 idle for 320-400s (median 360s), over the 300s threshold"),
        ([0.4], 0.5, "1 idle for 0.4s, below the 0.5s threshold"),
    ],
)
def test_idle_sessions_are_described_by_age_and_holder(
    ages: list[float], threshold: float, words: str
) -> None:
    text = describe_idle([session(i, idle_s=a) for i, a in enumerate(ages)], threshold)
    assert text == f"{words}, held by orders_app/orders-api ({len(ages)})"


def test_survey_says_what_it_saw() -> None:
    survey = classify_sessions(
        [
            *(session(i, idle_s=2.0 + i / 10, application_name="leaky") for i in range(5)),
            session(10, state="active"),
            session(11, usename="batch"),
        ],
        criteria(exclude_roles=["batch"]),
    )
    assert survey.describe() == (
        "5 idle for 2.0-2.4s (median 2.2s), below the 300s threshold, held by orders_app/leaky (5)"
        "; 1 idle left alone (excluded role: 1); 1 busy"
    )
    assert survey.evidence() == {
        "idle_threshold_s": 300.0,
        "idle_over_threshold": {"count": 0},
        "idle_below_threshold": {
            "count": 5,
            "idle_s": {"youngest": 2.0, "median": 2.2, "oldest": 2.4},
            "by_role_application": {"orders_app/leaky": 5},
        },
        "idle_left_alone": {"excluded role": 1},
        "busy": 1,
    }


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (psycopg.OperationalError("connection failed: Connection refused"), True),
        (
            psycopg.OperationalError("connection failed: FATAL:  sorry, too many clients already"),
            True,
        ),
        (
            psycopg.OperationalError(
                "connection failed: FATAL:  remaining connection slots are reserved for non-replication "
                "superuser connections"
            ),
            True,
        ),
        (psycopg.OperationalError("connection failed: timeout expired"), True),
        (
            psycopg.OperationalError(
                "consuming input failed: server closed the connection unexpectedly"
            ),
            True,
        ),
        (
            psycopg.OperationalError(
                'connection failed: FATAL:  password authentication failed for user "ops"'
            ),
            False,
        ),
        (
            psycopg.OperationalError('connection failed: FATAL:  database "orders" does not exist'),
            False,
        ),
        (psycopg.OperationalError('connection failed: FATAL:  role "ops" does not exist'), False),
        (
            psycopg.OperationalError(
                'connection failed: FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "ops"'
            ),
            False,
        ),
        (
            psycopg.OperationalError(
                'connection failed: FATAL:  permission denied for database "orders"'
            ),
            False,
        ),
        (errors.TooManyConnections("too many clients"), True),
        (errors.ConnectionFailure("connection lost"), True),
        (errors.SqlclientUnableToEstablishSqlconnection("no route"), True),
        (errors.AdminShutdown("terminating connection due to administrator command"), True),
        (errors.CrashShutdown("crash"), True),
        (errors.CannotConnectNow("the database system is starting up"), True),
        (errors.DeadlockDetected("deadlock detected"), True),
        (errors.SerializationFailure("could not serialize access"), True),
        (errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (errors.LockNotAvailable("could not obtain lock"), False),
        (errors.InsufficientPrivilege("permission denied"), False),
        (errors.UndefinedTable("relation does not exist"), False),
        (errors.InvalidPassword("password authentication failed"), False),
        (psycopg.InterfaceError("the connection is closed"), False),
        (ValueError("not a database error"), False),
    ],
)
def test_only_transient_errors_are_retried(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_password_never_shows_in_block_renderings() -> None:
    db = PostgresDatabase(host="db", user="runbooks", password="hunter2-secret")
    for rendering in (repr(db), str(db), db.model_dump_json(), str(db.model_dump())):
        assert "hunter2-secret" not in rendering
