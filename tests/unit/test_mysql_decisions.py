"""Decisions of the mysql-not-writing runbook, as data tables."""

from __future__ import annotations

from typing import Any

import pytest

from flows.mysql.mysql_not_writing import WriteHealth, writes_land
from tasks.mysql import is_transient
from tasks.mysql_decisions import (
    Blocker,
    ConnectFailure,
    Observation,
    Remedy,
    SchemaDrift,
    WriteProbe,
    classify_connect_error,
    decide_write_fix,
    disk_low,
    group_blockers,
    identifier_problem,
    is_disk_full_error,
    kill_danger,
    normalize_type,
    quote_identifier,
    root_blockers,
    schema_drift,
)

# PyMySQL's own texts, as seen against MariaDB 10.11 and from the socket layer
CONNECT_ERRORS = [
    (2003, "Can't connect to MySQL server on '127.0.0.1' ([Errno 111] Connection refused)",
     ConnectFailure.REFUSED),
    (2003, "Can't connect to MySQL server on 'db' (timed out)", ConnectFailure.TIMEOUT),
    (2013, "Lost connection to MySQL server during query (timed out)", ConnectFailure.TIMEOUT),
    (2003, "Can't connect to MySQL server on 'nope' ([Errno -2] Name or service not known)",
     ConnectFailure.UNRESOLVED),
    (2003, "Can't connect to MySQL server on 'db' ([Errno -3] Temporary failure in name resolution)",
     ConnectFailure.UNRESOLVED),
    (2013, "Lost connection to MySQL server during query ([Errno 104] Connection reset by peer)",
     ConnectFailure.LOST),
    (2006, "MySQL server has gone away (BrokenPipeError(32, 'Broken pipe'))", ConnectFailure.LOST),
    (2003, "Can't connect to MySQL server on 'db' ([Errno 113] No route to host)",
     ConnectFailure.OTHER),
    (1045, "Access denied for user 'app'@'localhost' (using password: YES)",
     ConnectFailure.AUTH_FAILED),
    (1049, "Unknown database 'nope'", ConnectFailure.UNKNOWN_DATABASE),
    (1044, "Access denied for user 'app'@'%' to database 'nope'", ConnectFailure.DATABASE_DENIED),
    (1040, "Too many connections", ConnectFailure.TOO_MANY_CONNECTIONS),
    (1203, "User app already has more than 'max_user_connections' active connections",
     ConnectFailure.TOO_MANY_CONNECTIONS),
    (1129, "Host 'x' is blocked because of many connection errors", ConnectFailure.OTHER),
    (None, "timed out", ConnectFailure.TIMEOUT),
]  # fmt: skip


@pytest.mark.parametrize(("errno", "message", "expected"), CONNECT_ERRORS)
def test_connect_errors_are_classified(
    errno: int | None, message: str, expected: ConnectFailure
) -> None:
    assert classify_connect_error(errno, message) is expected


TRANSIENT = [
    (2013, True),  # lost the connection mid-statement
    (2006, True),
    (1205, True),  # lock wait timeout
    (1213, True),  # deadlock victim
    (2003, False),  # refused: the probe reports it
    (1045, False),
    (1227, False),  # missing privilege
]


@pytest.mark.parametrize(("errno", "transient"), TRANSIENT)
def test_only_transient_errors_are_retried(errno: int, transient: bool) -> None:
    import pymysql

    assert is_transient(pymysql.err.OperationalError(errno, "x")) is transient
    assert is_transient(ValueError("x")) is False


DISK_FULL = [
    (1114, "The table 'moving_averages' is full", True),
    (1021, "Disk full (/var/lib/mysql/x); waiting for someone to free some space...", True),
    (1030, 'Got error 28 "No space left on device" from storage engine InnoDB', True),
    (3, "Error writing file './ib_logfile' (Errcode: 28 \"No space left on device\")", True),
    (1030, 'Got error 168 "Unknown (generic) error from engine" from storage engine', False),
    (1290, "The MariaDB server is running with the --read-only option", False),
    (1205, "Lock wait timeout exceeded; try restarting transaction", False),
    (None, "", False),
]


@pytest.mark.parametrize(("errno", "message", "full"), DISK_FULL)
def test_disk_full_errors(errno: int | None, message: str, full: bool) -> None:
    assert is_disk_full_error(errno, message) is full
    assert WriteProbe(attempted=True, errno=errno, error=message).disk_full is (
        full and errno is not None
    )


DISK_LOW = [
    (10, 100, 5.0, False),
    (4, 100, 5.0, True),
    (5, 100, 5.0, False),
    (0, 100, 0.0, False),
    (None, None, 5.0, None),  # not on the runbook's host: unknown
    (10, 0, 5.0, None),
]


@pytest.mark.parametrize(("free", "total", "floor", "low"), DISK_LOW)
def test_disk_low(free: int | None, total: int | None, floor: float, low: bool | None) -> None:
    assert disk_low(free, total, floor) is low


IDENTIFIERS = [
    ("moving_averages", True),
    ("_x9", True),
    ("T", True),
    ("a" * 64, True),
    ("a" * 65, False),
    ("9lives", False),
    ("a-b", False),
    ("a`b", False),
    ("a b", False),
    ("db.table", False),
    ("", False),
    ("x;DROP TABLE t", False),
    ("ümlaut", False),
]


@pytest.mark.parametrize(("name", "ok"), IDENTIFIERS)
def test_identifiers_are_checked_before_quoting(name: str, ok: bool) -> None:
    assert (identifier_problem(name) is None) is ok
    if ok:
        assert quote_identifier(name) == f"`{name}`"
    else:
        with pytest.raises(ValueError, match="not a MySQL identifier"):
            quote_identifier(name)


TYPES = [
    ("int", "int(11)", True),
    ("INT", "int(11)", True),
    ("integer", "int(11)", True),
    ("bigint", "bigint(20)", True),
    ("int unsigned", "int(10) unsigned", True),
    ("int", "int(10) unsigned", False),
    ("boolean", "tinyint(1)", True),
    ("tinyint", "tinyint(1)", False),
    ("varchar(16)", "varchar(16)", True),
    ("varchar(16)", "varchar(32)", False),
    ("decimal(18, 8)", "decimal(18,8)", True),
    ("numeric(18,8)", "decimal(18,8)", True),
    ("decimal(18,8)", "decimal(10,2)", False),
    ("double precision", "double", True),
    ("datetime(6)", "datetime(6)", True),
    ("datetime", "datetime(6)", False),
    ("timestamp", "datetime", False),
]


@pytest.mark.parametrize(("expected", "actual", "same"), TYPES)
def test_column_types_compare_as_mysql_spells_them(expected: str, actual: str, same: bool) -> None:
    assert (normalize_type(expected) == normalize_type(actual)) is same


TABLE = {
    "id": "bigint(20)",
    "symbol": "varchar(16)",
    "avg_price": "decimal(18,8)",
    "created_at": "datetime(6)",
}

DRIFTS = [
    (TABLE, TABLE, [], [], {}),
    ({"ID": "bigint", "Symbol": "varchar(16)"}, {"id": "bigint(20)", "symbol": "varchar(16)"}, [], [], {}),
    (TABLE, {k: v for k, v in TABLE.items() if k != "avg_price"}, ["avg_price"], [], {}),
    ({k: v for k, v in TABLE.items() if k != "symbol"}, TABLE, [], ["symbol"], {}),
    (TABLE, TABLE | {"avg_price": "float"}, [], [],
     {"avg_price": {"expected": "decimal(18,8)", "actual": "float"}}),
    ({"a": "int", "b": "int"}, {"b": "varchar(3)", "c": "int(11)"}, ["a"], ["c"],
     {"b": {"expected": "int", "actual": "varchar(3)"}}),
]  # fmt: skip


@pytest.mark.parametrize(("expected", "actual", "missing", "extra", "differs"), DRIFTS)
def test_schema_drift(
    expected: dict[str, str],
    actual: dict[str, str],
    missing: list[str],
    extra: list[str],
    differs: dict[str, dict[str, str]],
) -> None:
    drift = schema_drift(expected, actual)
    assert (drift.missing, drift.extra, drift.type_differs) == (missing, extra, differs)
    assert drift.drifted is bool(missing or extra or differs)
    for name in missing:
        assert f"missing column(s) {name}" in drift.describe()


def lock_row(blocker: int, waiter: int, **overrides: Any) -> dict[str, Any]:
    row = {
        "thread_id": blocker, "trx_id": f"trx-{blocker}", "trx_started": "2026-12-01 00:00:00",
        "trx_age_s": 120.0, "trx_rows_modified": 0, "trx_rows_locked": 1, "waiting": 0,
        "user": "batch", "host": "10.0.0.9:5123", "db": "market", "command": "Sleep",
        "state_s": 118, "waiter_thread_id": waiter, "wait_s": 7.5,
    }  # fmt: skip
    return row | overrides


def test_lock_waits_group_by_blocker_and_roots_are_the_ones_not_waiting() -> None:
    rows = [
        lock_row(5, 6, wait_s=3),
        lock_row(5, 7, wait_s=9),
        lock_row(5, 6),  # a waiter on two of its locks counts once
        # thread 7 waits on 5 and itself blocks 8: killing 7 would only move the queue
        lock_row(7, 8, trx_id="trx-7", waiting=1, command="Query", user="app"),
    ]
    blockers = group_blockers(rows)
    assert [b.thread_id for b in blockers] == [5, 7]
    assert blockers[0].waiters == [6, 7] and blockers[0].longest_wait_s == 9
    assert [b.thread_id for b in root_blockers(blockers)] == [5]
    assert "thread 5 (batch@10.0.0.9:5123) blocks 2 writer(s)" in blockers[0].describe()
    assert "idle inside a transaction open for 120s" in blockers[0].describe()


KILL_DANGERS = [
    ({"trx_id": "42", "trx_rows_modified": 3}, "changed 3 row(s)"),
    ({"trx_id": "42", "trx_rows_modified": 0}, "rolls all of it back"),
    ({"trx_id": ""}, None),  # no transaction (a metadata lock holder): nothing to roll back
]


@pytest.mark.parametrize(("fields", "danger"), KILL_DANGERS)
def test_killing_a_session_inside_a_transaction_needs_approval(
    fields: dict, danger: str | None
) -> None:
    found = kill_danger(Blocker(thread_id=5, **fields))
    assert (found is None) if danger is None else (danger in found)


DRIFTED = SchemaDrift(missing=["avg_price"])
EXTRA_ONLY = SchemaDrift(extra=["note"])
BLOCKER = Blocker(thread_id=5, trx_id="42", waiters=[6])
WAITING_BLOCKER = Blocker(thread_id=7, trx_id="43", waiting=True, waiters=[8])

# observation fields, must_be_writable, remedy, words in the reason
DECISIONS = [
    ({"connect_failure": ConnectFailure.REFUSED, "connect_error": "refused"}, False,
     Remedy.ESCALATE, ["unreachable (connection refused", "MySQL service crash", "Disk full".lower()]),
    ({"connect_failure": ConnectFailure.TIMEOUT, "connect_error": "timed out"}, True,
     Remedy.ESCALATE, ["unreachable (timed out", "incorrect JDBC configuration"]),
    ({"connect_failure": ConnectFailure.AUTH_FAILED}, True, Remedy.ESCALATE, ["validate credentials"]),
    ({"connect_failure": ConnectFailure.UNKNOWN_DATABASE}, False, Remedy.ESCALATE,
     ["unknown database", "database name"]),
    ({"connect_failure": ConnectFailure.DATABASE_DENIED}, False, Remedy.ESCALATE, ["grants"]),
    ({"table_exists": False}, True, Remedy.ESCALATE, ["does not exist"]),
    ({"drift": DRIFTED, "read_only": True}, True, Remedy.ESCALATE, ["schema drift", "avg_price"]),
    ({"drift": SchemaDrift(type_differs={"a": {"expected": "int", "actual": "text"}})}, False,
     Remedy.ESCALATE, ["a is text, expected int"]),
    ({"drift": EXTRA_ONLY, "fresh": True}, False, Remedy.NONE, []),
    ({"disk_full": True, "blockers": [BLOCKER]}, True, Remedy.ESCALATE, ["disk full"]),
    ({"read_only": True}, True, Remedy.CLEAR_READ_ONLY, ["read-only", "approval"]),
    ({"read_only": True}, False, Remedy.ESCALATE, ["not cleared", "must_be_writable is off"]),
    ({"blockers": [BLOCKER, WAITING_BLOCKER]}, False, Remedy.KILL_BLOCKERS, ["thread 5"]),
    ({"blockers": [WAITING_BLOCKER]}, False, Remedy.ESCALATE, ["cannot name"]),
    ({"metadata_lock_waiters": 2}, False, Remedy.ESCALATE, ["2 wait for a metadata lock"]),
    ({"fresh": False}, False, Remedy.ESCALATE, ["writers are not sending"]),
    ({"fresh": False, "lock_waits_known": False}, False, Remedy.ESCALATE,
     ["lock waits could not be read", "data_lock_waits"]),
    ({"fresh": True, "lock_waits_known": False}, False, Remedy.NONE, []),
    ({"fresh": True}, False, Remedy.NONE, []),
    ({"fresh": None}, False, Remedy.NONE, []),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "must_be_writable", "remedy", "words"), DECISIONS)
def test_decision_table(
    fields: dict[str, Any], must_be_writable: bool, remedy: Remedy, words: list[str]
) -> None:
    decision = decide_write_fix(Observation(**fields), must_be_writable=must_be_writable)
    assert decision.remedy is remedy, decision.reason
    for word in words:
        assert word.lower() in decision.reason.lower(), decision.reason


def test_unreachable_escalation_names_the_restart_as_a_human_last_resort() -> None:
    decision = decide_write_fix(
        Observation(connect_failure=ConnectFailure.REFUSED, connect_error="x"),
        must_be_writable=True,
    )
    assert any("last resort" in f and "never automatic" in f for f in decision.follow_ups)


OK_WRITE = WriteProbe(attempted=True, ok=True)
FAILED_WRITE = WriteProbe(attempted=True, ok=False, errno=1205, error="Lock wait timeout")
NO_WRITE = WriteProbe()

HEALTH = [
    (False, 0, True, NO_WRITE, True),
    (False, 0, False, NO_WRITE, False),
    (False, 0, False, OK_WRITE, True),
    (False, 0, None, OK_WRITE, True),
    (False, 0, None, FAILED_WRITE, False),
    (False, 0, None, NO_WRITE, True),  # nothing but read_only and waits to watch
    (True, 0, True, OK_WRITE, False),  # the runbook user may write past read_only; writers can't
    (False, 1, True, OK_WRITE, False),
    (None, 0, True, NO_WRITE, True),
]


@pytest.mark.parametrize(("read_only", "blocked", "new_row", "canary", "ok"), HEALTH)
def test_writes_land(
    read_only: bool | None, blocked: int, new_row: bool | None, canary: WriteProbe, ok: bool
) -> None:
    health = WriteHealth(
        read_only=read_only, blocked_writers=blocked, new_row=new_row, canary=canary
    )
    assert writes_land(health) is ok


SWITCHES = [
    (None, None),  # the server has no such variable (super_read_only on MariaDB)
    (0, False),
    (1, True),
    ("OFF", False),
    ("ON", True),
    ("0", False),
    ("NO_LOCK", True),  # MariaDB 11's read_only values: still read-only
    ("NO_LOCK_NO_ADMIN", True),
]


@pytest.mark.parametrize(("value", "on"), SWITCHES)
def test_switch_variables(value: object, on: bool | None) -> None:
    from tasks.mysql import _on

    assert _on(value) is on
