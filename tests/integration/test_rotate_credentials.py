"""rotate-credentials against a real PostgreSQL and a real moto Secrets Manager.

Each test has its own application role (the login rotated) and the module an admin role with
CREATEROLE (the login that sets it). The password is searched for in everything the run left:
logs, artifacts, events, task runs, the pending Secret block, the server's own log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL
from prefect_aws import AwsCredentials
from prefect_aws.client_parameters import AwsClientParameters
from psycopg import sql

from blocks.postgres import PostgresDatabase
from deployments.catalog import PROJECT_ROOT
from flows.security.rotate_credentials import RotateCredentialsParams, rotate_credentials
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from runbooks.safety import Target
from tasks.credentials import new_password, pending_block_name
from tests.conftest import read_incident_report, read_run_logs, unique
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: PostgresServer
    root: psycopg.Connection
    db: str
    admin_block: str
    aws_block: str
    moto: MotoServer

    def login(self, role: str, password: str) -> bool:
        try:
            with psycopg.connect(
                self.server.conninfo(dbname=self.db, user=role, password=password)
            ) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.OperationalError as exc:
            assert "password authentication failed" in str(exc), exc
            return False


@pytest.fixture(scope="module")
def env(postgres: PostgresServer, moto: MotoServer) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:8]
    db, admin_role, admin_pw = f"rbrotate_{suffix}", f"rbrotadmin_{suffix}", f"pw-{uuid.uuid4().hex}"
    root = psycopg.connect(postgres.conninfo(), autocommit=True)
    root.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    root.execute(
        sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
            sql.Identifier(admin_role), sql.Literal(admin_pw)
        )
    )
    root.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(admin_role)))
    admin_block = unique("rotate-admin")
    PostgresDatabase(
        host=postgres.host, port=postgres.port, dbname=db, user=admin_role, password=admin_pw,
        connect_timeout_s=5,
    ).save(admin_block, overwrite=True)
    aws_block = unique("rotate-aws")
    AwsCredentials(
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=moto.region,
        aws_client_parameters=AwsClientParameters(endpoint_url=moto.endpoint_url),
    ).save(aws_block, overwrite=True)
    yield Env(postgres, root, db, admin_block, aws_block, moto)
    root.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
    for (role,) in root.execute(
        "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (f"rbrot%{suffix}",)
    ).fetchall():
        root.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    root.close()


@dataclass
class App:
    role: str
    password: str
    block: str


@pytest.fixture
def app(env: Env) -> App:
    role = f"rbrotapp_{uuid.uuid4().hex[:6]}_{env.db[-8:]}"
    password = f"old-{uuid.uuid4().hex}"
    env.root.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
    )
    block = unique("rotate-app")
    PostgresDatabase(
        host=env.server.host, port=env.server.port, dbname=env.db, user=role, password=password,
        connect_timeout_s=5,
    ).save(block, overwrite=True)
    return App(role, password, block)


def params(env: Env, app: App, **overrides) -> RotateCredentialsParams:
    fields = {
        "login_block": app.block,
        "admin_block": env.admin_block,
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return RotateCredentialsParams(**(fields | overrides))


def stored(app: App) -> str:
    return PostgresDatabase.load(app.block).password.get_secret_value()


def everything_the_run_left(env: Env, run_id) -> str:
    """Logs, artifacts, events and task runs of the run, and the server's log, as one text."""
    api = PREFECT_API_URL.value()
    parts = [read_incident_report(run_id), json.dumps(read_run_logs(run_id))]
    artifacts = httpx.post(
        f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [str(run_id)]}}}, timeout=10
    ).json()
    parts.append(json.dumps(artifacts))
    events = httpx.post(
        f"{api}/events/filter",
        json={"filter": {"related": {"resources_in_roles": [[f"prefect.flow-run.{run_id}", "flow-run"]]}},
              "limit": 200},
        timeout=10,
    ).json()
    parts.append(json.dumps(events))
    task_runs = httpx.post(
        f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [str(run_id)]}}}, timeout=10
    ).json()
    parts.append(json.dumps(task_runs))
    parts.append(json.dumps(httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()))
    parts.append(env.server.log_path.read_text(errors="replace"))
    return "\n".join(parts)


def test_rotates_verifies_stores_in_block_and_secrets_manager(env: Env, app: App) -> None:
    secret_id = f"rotation/{app.role}"
    state = rotate_credentials(
        params=params(env, app, secret_id=secret_id, aws_credentials_block=env.aws_block),
        return_state=True,
    )

    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    new = stored(app)
    assert new != app.password and len(new) >= 40
    assert env.login(app.role, new) and not env.login(app.role, app.password)
    sm = env.moto.client("secretsmanager")
    # what clients read: AWSCURRENT (named: moto's default version does not follow a stage move)
    current = json.loads(
        sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"]
    )
    assert current["password"] == new and current["username"] == app.role
    # the verifier went to the server, never the password
    (verifier,) = env.root.execute(
        "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (app.role,)
    ).fetchone()
    assert verifier.startswith("SCRAM-SHA-256$")
    text = everything_the_run_left(env, state.state_details.flow_run_id)
    assert new not in text and app.password not in text
    assert "Rotated the password" in text
    # the pending copy is gone
    with pytest.raises(ValueError):
        Secret.load(pending_block_name(_target_key(env, app)))

    # a second rotation rotates again and moves AWSCURRENT to a new version
    state = rotate_credentials(
        params=params(env, app, secret_id=secret_id, aws_credentials_block=env.aws_block),
        return_state=True,
    )
    assert state.is_completed(), state.message
    newer = stored(app)
    assert newer != new and env.login(app.role, newer) and not env.login(app.role, new)
    current = sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")
    assert json.loads(current["SecretString"])["password"] == newer
    previous = sm.get_secret_value(SecretId=secret_id, VersionStage="AWSPREVIOUS")
    assert json.loads(previous["SecretString"])["password"] == new


def test_dry_run_changes_nothing(env: Env, app: App) -> None:
    state = rotate_credentials(params=params(env, app, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.PLANNED
    assert stored(app) == app.password and env.login(app.role, app.password)


def test_a_login_not_authenticated_by_password_is_rolled_back(env: Env, app: App) -> None:
    """pg_hba.conf trusts this role: any password logs in, so the old one is not refused. The
    rotation protects nothing and is rolled back: the old password is set again."""
    hba = env.server.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {app.role} 127.0.0.1/32 trust\n" + original)
    env.root.execute("SELECT pg_reload_conf()")
    try:
        state = rotate_credentials(params=params(env, app), return_state=True)
    finally:
        hba.write_text(original)
        env.root.execute("SELECT pg_reload_conf()")
    assert state.is_failed()
    assert "rolled back" in state.message and "trust" in state.message
    assert stored(app) == app.password, "the block keeps the old password"
    assert env.login(app.role, app.password), "the old password is set again on the server"
    text = everything_the_run_left(env, state.state_details.flow_run_id)
    assert app.password not in text


def test_a_rotation_killed_after_setting_the_password_is_finished_by_the_next_run(
    env: Env, app: App
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.rotation_victim", app.block, env.admin_block],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    assert proc.returncode == -9, f"victim did not die by SIGKILL: {proc.returncode} {proc.stderr[-2000:]!r}"
    # the server has a password nobody stored but the pending copy
    assert not env.login(app.role, app.password) and stored(app) == app.password
    pending = Secret.load(pending_block_name(_target_key(env, app))).get()
    assert env.login(app.role, pending)

    state = rotate_credentials(params=params(env, app), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().step == "finish the interrupted rotation"
    assert stored(app) == pending and env.login(app.role, pending)
    with pytest.raises(ValueError):
        Secret.load(pending_block_name(_target_key(env, app)))


def test_a_pending_password_that_never_reached_the_server_is_thrown_away(env: Env, app: App) -> None:
    # a run died after keeping its pending copy, before ALTER ROLE
    orphan = new_password()
    Secret(value=orphan).save(pending_block_name(_target_key(env, app)), overwrite=True)

    state = rotate_credentials(params=params(env, app), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().step == "discard the pending password, then rotate"
    new = stored(app)
    assert new not in (app.password, orphan.get_secret_value())
    assert env.login(app.role, new) and not env.login(app.role, orphan.get_secret_value())


def _target_key(env: Env, app: App) -> str:
    (sysid,) = env.root.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    return Target("postgres-role", f"{env.server.host}:{env.server.port}/{app.role}", f"{sysid}/{app.role}").key
