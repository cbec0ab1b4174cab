"""access-audit (engine mysql) against a real MariaDB 10.11: real accounts, roles and grants, real
refused logins in the server's error log, real sessions.

The session's MariaDB (tests/mariadb_server.py) is shared: the accounts made here match no address
the other tests log in from (an anonymous account on 'localhost' would take their logins), and are
dropped at the end. Its root accounts have no password (mariadb-install-db
--auth-root-authentication-method=normal): the audit rightly reports them, so the escalating test
looks for this module's accounts among the findings.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pymysql
import pytest

from blocks.mysql import MySQLDatabase
from flows.security.access_audit import AccessAuditParams, access_audit
from runbooks.errors import Escalation
from runbooks.report import Outcome
from tests.conftest import read_incident_report, unique

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: object
    suffix: str
    password: str
    app: str
    full_block: str  # an audit login that may read the mysql schema and every session
    narrow_block: str  # one that sees only itself


@pytest.fixture(scope="module")
def env(mariadb) -> Iterator[Env]:
    s = uuid.uuid4().hex[:8]
    pw = f"pw-{uuid.uuid4().hex}"
    n = {
        k: f"rbaud_{k}_{s}"
        for k in ("auditor", "narrow", "app", "dba", "etl", "file", "exp", "soon", "nopw", "locked")
    }
    role = f"rbaud_admin_{s}"
    statements = [
        ("CREATE USER %s@'%%' IDENTIFIED BY %s", (n["auditor"], pw)),
        ("GRANT SELECT ON mysql.* TO %s@'%%'", (n["auditor"],)),
        ("GRANT PROCESS ON *.* TO %s@'%%'", (n["auditor"],)),
        ("CREATE USER %s@'%%' IDENTIFIED BY %s", (n["narrow"], pw)),
        ("CREATE USER %s@'%%' IDENTIFIED BY %s", (n["app"], pw)),
        # a superuser from anywhere; one through a role; FILE; password states
        ("CREATE USER %s@'%%' IDENTIFIED BY %s", (n["dba"], pw)),
        ("GRANT SUPER ON *.* TO %s@'%%'", (n["dba"],)),
        (f"CREATE ROLE {role}", None),
        (f"GRANT SUPER ON *.* TO {role}", None),
        ("CREATE USER %s@'10.%%' IDENTIFIED BY %s", (n["etl"], pw)),
        (f"GRANT {role} TO %s@'10.%%'", (n["etl"],)),
        ("CREATE USER %s@'%%' IDENTIFIED BY %s", (n["file"], pw)),
        ("GRANT FILE ON *.* TO %s@'%%'", (n["file"],)),
        ("CREATE USER %s@'%%' IDENTIFIED BY %s PASSWORD EXPIRE", (n["exp"], pw)),
        ("CREATE USER %s@'%%' IDENTIFIED BY %s PASSWORD EXPIRE INTERVAL 5 DAY", (n["soon"], pw)),
        ("CREATE USER %s@'192.0.2.%%'", (n["nopw"],)),  # no password (TEST-NET address)
        ("CREATE USER %s@'%%' IDENTIFIED BY %s ACCOUNT LOCK", (n["locked"], pw)),
        ("GRANT SUPER ON *.* TO %s@'%%'", (n["locked"],)),
        ("CREATE USER ''@'192.0.2.1'", None),  # anonymous, from an address no test uses
    ]
    with mariadb.admin() as conn, conn.cursor() as cur:
        for statement, args in statements:
            cur.execute(statement, args)
    blocks = {}
    for key in ("auditor", "narrow"):
        blocks[key] = unique("audit-mysql")
        MySQLDatabase(
            host=mariadb.host,
            port=mariadb.port,
            database="mysql" if key == "auditor" else "information_schema",
            user=n[key],
            password=pw,
            connect_timeout_s=5,
        ).save(blocks[key], overwrite=True)
    yield Env(mariadb, s, pw, n["app"], blocks["auditor"], blocks["narrow"])
    with mariadb.admin() as conn, conn.cursor() as cur:
        for key in n:
            host = "10.%" if key == "etl" else "192.0.2.%" if key == "nopw" else "%"
            cur.execute("DROP USER IF EXISTS %s@%s", (n[key], host))
        cur.execute("DROP USER IF EXISTS ''@'192.0.2.1'")
        cur.execute(f"DROP ROLE IF EXISTS {role}")


def login(env: Env, user: str, password: str) -> pymysql.connections.Connection:
    return pymysql.connect(
        host=env.server.host, port=env.server.port, user=user, password=password, connect_timeout=5
    )


def test_mysql_audit_finds_superusers_roles_passwords_and_guessing(env: Env) -> None:
    for _ in range(6):  # someone guessing the app's password
        with pytest.raises(pymysql.err.OperationalError, match="Access denied"):
            login(env, env.app, "guess-" + uuid.uuid4().hex)
    sessions = [login(env, env.app, env.password) for _ in range(2)]
    try:
        state = access_audit(
            params=AccessAuditParams(
                engine="mysql", db_block=env.full_block, log_path=str(env.server.log_path)
            ),
            return_state=True,
        )
    finally:
        for conn in sessions:
            conn.close()

    assert state.is_failed(), "high findings escalate"
    with pytest.raises(Escalation, match="high finding"):
        state.result()
    report = read_incident_report(state.state_details.flow_run_id)
    s = env.suffix
    found = {(f["severity"], f["subject"]): f["finding"] for f in _findings(report, s)}
    assert "from any address" in found[("high", f"'rbaud_dba_{s}'@'%'")]
    assert f"through role rbaud_admin_{s}" in found[("high", f"'rbaud_etl_{s}'@'10.%'")]
    assert "FILE" in found[("medium", f"'rbaud_file_{s}'@'%'")]
    assert "next login" in found[("low", f"'rbaud_exp_{s}'@'%'")]
    assert "expires on" in found[("medium", f"'rbaud_soon_{s}'@'%'")]
    assert "without a password" in found[("high", f"'rbaud_nopw_{s}'@'192.0.2.%'")]
    assert "6 refused logins" in found[("high", f"rbaud_app_{s} from localhost")]
    # the locked superuser cannot log in: listed as locked, no finding
    assert not [k for k in found if f"rbaud_locked_{s}" in k[1]]
    assert f"'rbaud_locked_{s}'@'%'" in report and "locked account(s) left out" in report
    # the anonymous account (no suffix to match: looked up by subject)
    all_found = {(f["severity"], f["subject"]) for f in _findings(report, "")}
    assert ("high", "''@'192.0.2.1'") in all_found
    assert "Access_denied_errors" in report
    assert f'"role": "rbaud_app_{s}"' in report and '"sessions": 2' in report
    assert env.password not in report


def test_mysql_audit_by_a_login_that_sees_only_itself(env: Env) -> None:
    """Without SELECT on the mysql schema or PROCESS: no claim about passwords, no other
    sessions; and with the server logging to stderr, it says where to find refused logins."""
    state = access_audit(
        params=AccessAuditParams(engine="mysql", db_block=env.narrow_block), return_state=True
    )
    assert state.is_completed(), state.message
    result = state.result()
    assert result.outcome is Outcome.NO_ACTION_NEEDED
    assert [(a.user, a.host, a.has_password) for a in result.accounts] == [
        (f"rbaud_narrow_{env.suffix}", "%", None)
    ]
    assert result.sessions == []
    report = read_incident_report(state.state_details.flow_run_id)
    assert "not readable" in report and "logs to stderr" in report


def _findings(report: str, marker: str) -> list[dict]:
    """The findings the report's evidence lists (JSON) whose subject contains ``marker``."""
    block = report.split("**findings**\n```json\n", 1)[1].split("\n```", 1)[0]
    return [f for f in json.loads(block) if marker in f.get("subject", "")]
