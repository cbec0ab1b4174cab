"""Decisions of rotate-credentials and access-audit, as data tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.credentials import (
    LoginCheck,
    RotationStep,
    decide_rotation,
    new_password,
    pending_block_name,
)
from tasks.pg_access import (
    AuditPolicy,
    FailedLogin,
    RoleInfo,
    Severity,
    audit_findings,
    parse_failed_logins,
)

OK = LoginCheck(ok=True)
REFUSED = LoginCheck(ok=False, refused=True, error="password authentication failed")
DOWN = LoginCheck(ok=False, refused=False, error="connection refused")

# pending copy exists, how it logs in, how the stored one logs in -> step
ROTATION_CASES = [
    (False, None, OK, RotationStep.ROTATE),
    (False, None, REFUSED, RotationStep.ROTATE),  # stored one broken already: a new one fixes it
    (False, None, DOWN, RotationStep.ESCALATE),  # cannot ask the server: never change blind
    (True, OK, REFUSED, RotationStep.FINISH_PENDING),  # died after setting it on the server
    (True, REFUSED, OK, RotationStep.DISCARD_PENDING),  # died before setting it
    (True, REFUSED, REFUSED, RotationStep.ESCALATE),  # someone else changed it
    (True, DOWN, OK, RotationStep.ESCALATE),
]


@pytest.mark.parametrize(("pending", "pending_login", "current", "step"), ROTATION_CASES)
def test_decide_rotation(pending, pending_login, current, step) -> None:
    got, why = decide_rotation(pending, pending_login, current)
    assert got is step and why


def test_new_passwords_are_long_random_and_safe_to_quote() -> None:
    seen = {new_password().get_secret_value() for _ in range(200)}
    assert len(seen) == 200
    for pw in seen:
        assert len(pw) >= 43 and pw[0] not in "-_"
        assert pw.replace("-", "").replace("_", "").isalnum()
    assert "*" in repr(new_password())  # a SecretStr: masked when printed


@pytest.mark.parametrize("key", ["a", "1234/app", "x" * 300])
def test_pending_block_name_is_a_valid_block_name(key) -> None:
    name = pending_block_name(key)
    assert name == pending_block_name(key) and len(name) <= 60
    assert all(c.islower() or c.isdigit() or c == "-" for c in name)


PREFIX = "2026-12-01 03:00:01.123 UTC [4242] "
# log lines -> (user, client, reason) of each refused login
LOG_CASES = [
    (
        [
            PREFIX + "[unknown]@[unknown] 10.0.0.7(50312) LOG:  connection received: host=10.0.0.7 port=50312",
            PREFIX + 'app@orders 10.0.0.7(50312) FATAL:  password authentication failed for user "app"',
        ],
        [("app", "10.0.0.7", "wrong password")],
    ),
    (  # no address in the FATAL line: taken from the same process's connection line
        [
            "2026-12-01 03:00:01 UTC [77] LOG:  connection received: host=192.168.1.9 port=1",
            '2026-12-01 03:00:01 UTC [77] FATAL:  password authentication failed for user "bob"',
        ],
        [("bob", "192.168.1.9", "wrong password")],
    ),
    (
        [PREFIX + 'FATAL:  no pg_hba.conf entry for host "203.0.113.5", user "etl", database "x", no encryption'],
        [("etl", "203.0.113.5", "not allowed from this address (pg_hba.conf)")],
    ),
    ([PREFIX + '[local] FATAL:  role "admin" does not exist'], [("admin", "[local]", "unknown role")]),
    ([PREFIX + 'FATAL:  role "ro" is not permitted to log in'], [("ro", "unknown", "role cannot log in")]),
    (  # an ordinary error, and a connection that was authorized: nothing
        [
            PREFIX + "app@orders 10.0.0.7(1) ERROR:  relation \"x\" does not exist",
            PREFIX + "app@orders 10.0.0.7(1) LOG:  connection authorized: user=app database=orders",
        ],
        [],
    ),
    (  # IPv6 client in the line
        [PREFIX + 'app@orders ::1(40000) FATAL:  password authentication failed for user "app"'],
        [("app", "::1", "wrong password")],
    ),
]


@pytest.mark.parametrize(("lines", "expected"), LOG_CASES)
def test_parse_failed_logins(lines, expected) -> None:
    assert [(f.user, f.client, f.reason) for f in parse_failed_logins(lines)] == expected


NOW = datetime(2026, 12, 1, tzinfo=UTC)


def role(name: str, **kw) -> RoleInfo:
    fields = dict(
        name=name, superuser=False, can_login=True, create_role=False, create_db=False,
        replication=False, bypass_rls=False, valid_until=None, password_hash="scram-sha-256",
    )
    return RoleInfo(**(fields | kw))


def fails(user: str, client: str, n: int, reason: str = "wrong password") -> list[FailedLogin]:
    return [FailedLogin(at="", user=user, client=client, reason=reason)] * n


# roles, failed logins -> (severity, subject, a word of the finding)
FINDING_CASES = [
    ([role("postgres", superuser=True)], [], []),
    ([role("app")], [], []),
    ([role("dba", superuser=True)], [], [("high", "dba", "superuser")]),
    ([role("old", password_hash="md5")], [], [("medium", "old", "MD5")]),
    ([role("old", password_hash="md5", can_login=False)], [], []),  # cannot log in: moot
    ([role("soon", valid_until=NOW + timedelta(days=3))], [], [("medium", "soon", "expires")]),
    ([role("later", valid_until=NOW + timedelta(days=60))], [], []),
    ([role("gone", valid_until=NOW - timedelta(days=1))], [], [("low", "gone", "expired")]),
    ([role("etl", member_of=["pg_read_all_data"])], [], [("medium", "etl", "pg_read_all_data")]),
    ([role("mgr", create_role=True)], [], [("low", "mgr", "CREATEROLE")]),
    ([], fails("app", "10.0.0.7", 5), [("high", "app from 10.0.0.7", "5 failed logins")]),
    ([], fails("app", "10.0.0.7", 4), []),
    ([], fails("app", "10.0.0.7", 3) + fails("app", "10.0.0.8", 3), []),  # per address
    (
        [],
        fails("a", "198.51.100.1", 1, "unknown role") * 5,
        [("high", "198.51.100.1", "do not exist")],
    ),
]


@pytest.mark.parametrize(("roles", "failures", "expected"), FINDING_CASES)
def test_audit_findings(roles, failures, expected) -> None:
    found = audit_findings(roles, failures, AuditPolicy(), NOW)
    assert len(found) == len(expected), found
    for f, (severity, subject, word) in zip(found, expected, strict=True):
        assert (f.severity, f.subject) == (Severity(severity), subject)
        assert word in f.finding


def test_findings_are_most_severe_first() -> None:
    found = audit_findings(
        [role("old", password_hash="md5"), role("dba", superuser=True), role("mgr", create_role=True)],
        [],
        AuditPolicy(),
        NOW,
    )
    assert [f.severity for f in found] == [Severity.HIGH, Severity.MEDIUM, Severity.LOW]
