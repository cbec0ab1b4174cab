"""access-audit against a real PostgreSQL: real roles, real refused logins in the server's log
(log_connections on, as the test server runs), real sessions."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from blocks.postgres import PostgresDatabase
from flows.security.access_audit import AccessAuditParams, access_audit
from runbooks.report import Outcome
from tests.conftest import read_incident_report, unique
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: PostgresServer
    root: psycopg.Connection
    suffix: str
    block: str
    superuser: str
    reader: str
    expiring: str
    legacy: str
    app: str
    app_password: str


@pytest.fixture(scope="module")
def env(postgres: PostgresServer) -> Iterator[Env]:
    s = uuid.uuid4().hex[:8]
    root = psycopg.connect(postgres.conninfo(), autocommit=True)
    roles = {
        "superuser": f"rbaud_root_{s}",
        "reader": f"rbaud_reader_{s}",
        "expiring": f"rbaud_exp_{s}",
        "legacy": f"rbaud_md5_{s}",
        "app": f"rbaud_app_{s}",
    }
    pw = f"pw-{uuid.uuid4().hex}"
    q = sql.Identifier
    root.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(q(roles["superuser"]), sql.Literal(pw)))
    root.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(q(roles["reader"]), sql.Literal(pw)))
    root.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(q(roles["reader"])))
    root.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(q(roles["expiring"]), sql.Literal(pw)))
    (until,) = root.execute("SELECT (now() + interval '3 days')::text").fetchone()
    root.execute(sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(q(roles["expiring"]), sql.Literal(until)))
    root.execute("SET password_encryption = 'md5'")
    root.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(q(roles["legacy"]), sql.Literal(pw)))
    root.execute("RESET password_encryption")
    root.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(q(roles["app"]), sql.Literal(pw)))
    block = unique("audit-db")
    # the audit reads pg_authid (how passwords are hashed): a superuser login
    PostgresDatabase(
        host=postgres.host, port=postgres.port, user=postgres.user, password=postgres.password,
        connect_timeout_s=5,
    ).save(block, overwrite=True)
    yield Env(postgres, root, s, block, roles["superuser"], roles["reader"], roles["expiring"],
              roles["legacy"], roles["app"], pw)
    for role in roles.values():
        root.execute(sql.SQL("DROP ROLE {}").format(q(role)))
    root.close()


def refused(env: Env, user: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(env.server.conninfo(user=user, password="guess-" + uuid.uuid4().hex))


def test_audit_finds_superusers_weak_passwords_expiry_and_password_guessing(env: Env) -> None:
    refused(env, env.app, 6)  # someone guessing the app's password
    unknown = f"rbaud_nobody_{env.suffix}"
    refused(env, unknown, 5)  # probing for role names
    sessions = [
        psycopg.connect(env.server.conninfo(user=env.app, password=env.app_password), application_name="orders-api")
        for _ in range(2)
    ]
    try:
        state = access_audit(
            params=AccessAuditParams(db_block=env.block, log_path=str(env.server.log_path)),
            return_state=True,
        )
    finally:
        for conn in sessions:
            conn.close()

    assert state.is_failed(), "high findings escalate"
    assert env.superuser in state.message and "6 failed logins" in state.message
    run_id = state.state_details.flow_run_id
    report = read_incident_report(run_id)
    findings = {(f["severity"], f["subject"]): f["finding"] for f in _findings(report, env)}
    assert any(sub == env.superuser and sev == "high" for sev, sub in findings)
    assert any(sub == f"{env.app} from 127.0.0.1" and sev == "high" for sev, sub in findings)
    assert env.legacy in report and "MD5" in report
    assert env.expiring in report and "expires on" in report
    assert env.reader in report and "pg_read_all_data" in report
    assert "orders-api" in report  # sessions by role and client
    assert env.app_password not in report


def test_audit_with_everything_allowed_reports_without_escalating(env: Env) -> None:
    state = access_audit(
        params=AccessAuditParams(
            db_block=env.block,
            log_path=str(env.server.log_path),
            allowed_superusers=["postgres", env.superuser],
            failed_login_threshold=100_000,
        ),
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.NO_ACTION_NEEDED


def test_audit_says_when_the_log_cannot_be_read(env: Env) -> None:
    state = access_audit(
        params=AccessAuditParams(
            db_block=env.block,
            allowed_superusers=["postgres", env.superuser],
            failed_login_threshold=100_000,
        ),
        return_state=True,
    )
    assert state.is_completed(), state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "logging_collector off" in report


def _findings(report: str, env: Env) -> list[dict]:
    """The findings the report's evidence lists (JSON) that concern this module's roles."""
    block = report.split("**findings**\n```json\n", 1)[1].split("\n```", 1)[0]
    return [f for f in json.loads(block) if env.suffix in f.get("subject", "")]
