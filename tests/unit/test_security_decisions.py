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


# --- access-audit on MySQL / MariaDB -----------------------------------------------------------

from tasks.mysql_access import (  # noqa: E402
    MySQLAccount,
    MySQLAuditPolicy,
    effective_privileges,
    mariadb_account,
    mysql_audit_findings,
    parse_grantee,
    parse_mysql_failed_logins,
)

MYSQL_LOG_CASES = [
    # MariaDB 10.11 (log_warnings=2)
    (
        [
            "2026-12-01 14:50:02 5 [Warning] Access denied for user 'app'@'localhost' (using password: YES)"
        ],
        [("2026-12-01 14:50:02", "app", "localhost", "wrong password")],
    ),
    # MySQL 8 (log_error_verbosity=3)
    (
        [
            "2026-12-01T14:50:02.123456Z 8 [Note] [MY-010926] [Server] Access denied for user "
            "'root'@'10.0.0.7' (using password: NO)"
        ],
        [("2026-12-01T14:50:02", "root", "10.0.0.7", "no password given")],
    ),
    # a quote inside a user name is doubled; other lines are not refused logins
    (
        [
            "2026-12-01 14:50:03 0 [Note] mariadbd: ready for connections.",
            "2026-12-01 14:50:04 9 [Warning] Access denied for user 'o''neil'@'192.0.2.1' "
            "(using password: YES)",
            "2026-12-01 14:50:05 10 [Warning] Aborted connection 10 to db: 'x' user: 'app'",
        ],
        [("2026-12-01 14:50:04", "o'neil", "192.0.2.1", "wrong password")],
    ),
    ([], []),
]


@pytest.mark.parametrize(("lines", "expected"), MYSQL_LOG_CASES)
def test_parse_mysql_failed_logins(lines, expected) -> None:
    assert [
        (f.at, f.user, f.client, f.reason) for f in parse_mysql_failed_logins(lines)
    ] == expected


GRANTEE_CASES = [
    ("'app'@'%'", ("app", "%")),
    ("'o''neil'@'10.0.0.%'", ("o'neil", "10.0.0.%")),
    ("''@'localhost'", ("", "localhost")),
    ("'dba'", ("dba", "")),  # a MariaDB role
    ("app@%", None),
]


@pytest.mark.parametrize(("grantee", "expected"), GRANTEE_CASES)
def test_parse_grantee(grantee, expected) -> None:
    assert parse_grantee(grantee) == expected


def test_effective_privileges_follow_roles_of_roles_without_looping() -> None:
    own = {("app", "%"): {"SELECT"}, ("dba", ""): {"SUPER"}, ("ops", ""): {"FILE"}}
    roles = {("app", "%"): {"ops"}, ("ops", ""): {"dba"}, ("dba", ""): {"ops"}}  # a cycle
    eff = effective_privileges(own, roles)
    assert eff[("app", "%")] == {"SELECT", "FILE", "SUPER"}
    assert eff[("dba", "")] == {"SUPER", "FILE"}


# a row of mysql.global_priv -> (has_password, password_expired, lifetime days, locked) or None
GLOBAL_PRIV_CASES = [
    ('{"access":18446744073709551615}', (False, False, None, False)),  # root after install-db
    (
        '{"access":0,"plugin":"mysql_native_password","authentication_string":"*D82","password_last_changed":1796136162}',
        (True, False, None, False),
    ),
    (
        '{"access":0,"plugin":"mysql_native_password","authentication_string":"","account_locked":true,"password_last_changed":0}',
        (False, True, None, True),  # mariadb.sys
    ),
    (
        '{"plugin":"mysql_native_password","authentication_string":"*B69","password_last_changed":1,"password_lifetime":10}',
        (True, False, 10, False),
    ),
    ('{"plugin":"unix_socket","authentication_string":""}', (True, False, None, False)),
    ('{"access":549755812863,"is_role":true}', None),
]


@pytest.mark.parametrize(("priv", "expected"), GLOBAL_PRIV_CASES)
def test_mariadb_account(priv, expected) -> None:
    account = mariadb_account("u", "h", priv)
    if expected is None:
        assert account is None
        return
    assert account is not None
    got = (
        account.has_password,
        account.password_expired,
        account.password_lifetime_days,
        account.locked,
    )
    assert got == expected


def account(user: str, host: str = "%", **kw) -> MySQLAccount:
    fields = dict(
        user=user,
        host=host,
        plugin="mysql_native_password",
        has_password=True,
        password_changed=NOW - timedelta(days=30),
    )
    return MySQLAccount(**(fields | kw))


# accounts, refused logins, server default_password_lifetime -> (severity, subject, a word)
MYSQL_FINDING_CASES = [
    ([account("root", "localhost", privileges=["SUPER"])], [], 0, []),
    ([account("app", privileges=["SELECT"])], [], 0, []),
    (
        [account("dba", privileges=["SUPER"])],
        [],
        0,
        [("high", "'dba'@'%'", "from any address")],
    ),
    (
        [account("etl", privileges=["SUPER"], roles=["admin"])],
        [],
        0,
        [("high", "'etl'@'%'", "through role admin")],
    ),
    ([account("dba", privileges=["SUPER"], locked=True)], [], 0, []),  # cannot log in
    (
        [account("", "localhost", has_password=False)],
        [],
        0,
        [("high", "''@'localhost'", "anonymous")],
    ),
    ([account("app", has_password=False)], [], 0, [("high", "'app'@'%'", "without a password")]),
    ([account("svc", "localhost", plugin="unix_socket", has_password=True)], [], 0, []),
    ([account("app", has_password=None)], [], 0, []),  # not readable: no claim either way
    (
        [account("old", plugin="mysql_old_password")],
        [],
        0,
        [("medium", "'old'@'%'", "old_password")],
    ),
    (
        [account("etl", privileges=["FILE", "SELECT"])],
        [],
        0,
        [("medium", "'etl'@'%'", "FILE")],
    ),
    ([account("exp", password_expired=True)], [], 0, [("low", "'exp'@'%'", "next login")]),
    # own lifetime 35 days, changed 30 days ago: expires in 5
    ([account("soon", password_lifetime_days=35)], [], 0, [("medium", "'soon'@'%'", "expires")]),
    # the server's default lifetime of 20 days applies: expired 10 days ago
    ([account("gone")], [], 20, [("low", "'gone'@'%'", "expired on")]),
    ([account("never", password_lifetime_days=0)], [], 20, []),  # its own 0 wins: never
    (
        [],
        fails("app", "10.0.0.7", 5),
        0,
        [("high", "app from 10.0.0.7", "5 refused logins")],
    ),
    ([], fails("app", "10.0.0.7", 3) + fails("app", "10.0.0.8", 3), 0, []),  # per address
]


@pytest.mark.parametrize(("accounts", "failures", "lifetime", "expected"), MYSQL_FINDING_CASES)
def test_mysql_audit_findings(accounts, failures, lifetime, expected) -> None:
    found = mysql_audit_findings(accounts, failures, MySQLAuditPolicy(), lifetime, NOW)
    assert len(found) == len(expected), found
    for f, (severity, subject, word) in zip(found, expected, strict=True):
        assert (f.severity, f.subject) == (Severity(severity), subject)
        assert word in f.finding


def test_mysql_allowed_lists_match_user_or_account() -> None:
    policy = MySQLAuditPolicy(allowed_superusers=["dba@10.%"], allowed_powerful=["'etl'@'%'"])
    found = mysql_audit_findings(
        [
            account("dba", "10.%", privileges=["SUPER"]),
            account("dba", "%", privileges=["SUPER"]),
            account("etl", privileges=["FILE"]),
        ],
        [],
        policy,
        0,
        NOW,
    )
    assert [(f.severity, f.subject) for f in found] == [(Severity.HIGH, "'dba'@'%'")]
