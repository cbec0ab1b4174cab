"""rotate-credentials for a MariaDB user, on the session's real MariaDB 10.11.

The module has its own database, an admin user with only what the rotation needs (CREATE USER,
SELECT on mysql.user, PROCESS), and per test an application user with two host entries ('%' and
'127.0.0.1', one password): both are rotated together. The server's general log is on during the
rotation, to show the plaintext never reaches the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pymysql
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from blocks.mysql import MySQLDatabase
from deployments.catalog import PROJECT_ROOT
from flows.security.rotate_credentials import RotateCredentialsParams, rotate_credentials
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from runbooks.safety import Target
from tasks.credentials import pending_block_name
from tasks.mysql_credentials import native_password_hash
from tests.conftest import read_incident_report, read_run_logs, unique
from tests.mariadb_server import MariaDBServer

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: MariaDBServer
    db: str
    admin_user: str
    admin_password: str

    def login(self, user: str, password: str) -> bool:
        try:
            pymysql.connect(
                host=self.server.host, port=self.server.port, user=user, password=password,
                connect_timeout=5,
            ).close()  # fmt: skip
            return True
        except pymysql.err.OperationalError as exc:
            if exc.args[0] == 1045:
                return False
            raise

    def root(self, *statements: tuple[str, tuple]) -> list:
        with self.server.admin() as conn, conn.cursor() as cur:
            out = []
            for query, args in statements:
                cur.execute(query, args)
                out.append(cur.fetchall())
            return out


@pytest.fixture(scope="module")
def env(mariadb: MariaDBServer) -> Iterator[Env]:
    suffix = uuid.uuid4().hex[:8]
    e = Env(mariadb, f"rbrotate_{suffix}", f"rbrotadm_{suffix}", f"adm-{uuid.uuid4().hex}")
    e.root(
        (f"CREATE DATABASE `{e.db}`", ()),
        ("CREATE USER %s@'%%' IDENTIFIED BY %s", (e.admin_user, e.admin_password)),
        ("GRANT CREATE USER, PROCESS ON *.* TO %s@'%%'", (e.admin_user,)),
        ("GRANT SELECT ON mysql.* TO %s@'%%'", (e.admin_user,)),
    )
    yield e
    e.root((f"DROP DATABASE `{e.db}`", ()), ("DROP USER %s@'%%'", (e.admin_user,)))


@dataclass
class Login:
    user: str
    password: str
    block: str
    admin_block: str


@pytest.fixture
def login(env: Env) -> Iterator[Login]:
    user, password = f"rbrotapp_{uuid.uuid4().hex[:6]}", f"old-{uuid.uuid4().hex}"
    hosts = ("%", "127.0.0.1")
    env.root(
        *[("CREATE USER %s@%s IDENTIFIED BY %s", (user, h, password)) for h in hosts],
        *[(f"GRANT SELECT ON `{env.db}`.* TO %s@%s", (user, h)) for h in hosts],
    )
    block, admin_block = unique("rotate-mysql"), unique("rotate-mysql-admin")
    common = {"host": env.server.host, "port": env.server.port, "database": env.db,
              "connect_timeout_s": 3, "read_timeout_s": 10}  # fmt: skip
    MySQLDatabase(user=user, password=password, **common).save(block, overwrite=True)
    MySQLDatabase(user=env.admin_user, password=env.admin_password, **common).save(
        admin_block, overwrite=True
    )
    yield Login(user, password, block, admin_block)
    env.root(*[("DROP USER IF EXISTS %s@%s", (user, h)) for h in hosts])


def params(login: Login, **overrides) -> RotateCredentialsParams:
    fields = {
        "engine": "mysql",
        "login_block": login.block,
        "admin_block": login.admin_block,
        "safety": SafetyParams(budget_max_actions=1000),
    }
    return RotateCredentialsParams(**(fields | overrides))


def auth_strings(env: Env, user: str) -> dict[str, str]:
    (rows,) = env.root(
        ("SELECT Host, authentication_string FROM mysql.user WHERE User = %s", (user,))
    )
    return dict(rows)


@pytest.fixture
def general_log(env: Env) -> Iterator[str]:
    path = env.server.datadir.parent / f"general-{uuid.uuid4().hex[:6]}.log"
    env.root(
        ("SET GLOBAL general_log_file = %s", (str(path),)),
        ("SET GLOBAL log_output = 'FILE'", ()),
        ("SET GLOBAL general_log = ON", ()),
    )
    yield path
    env.root(("SET GLOBAL general_log = OFF", ()))


def test_rotates_every_host_entry_and_the_plaintext_never_reaches_the_server(
    env: Env, login: Login, general_log
) -> None:
    app = pymysql.connect(
        host=env.server.host, port=env.server.port, user=login.user, password=login.password,
        database=env.db,
    )  # fmt: skip
    try:  # a connected client: listed as a session that will need the new password
        state = rotate_credentials(params=params(login), return_state=True)
    finally:
        app.close()

    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    new = MySQLDatabase.load(login.block).password.get_secret_value()
    assert new != login.password
    assert env.login(login.user, new) and not env.login(login.user, login.password)
    # both host entries hold the new password's hash, and only the hash
    assert auth_strings(env, login.user) == {
        "%": native_password_hash(SecretStr(new)),
        "127.0.0.1": native_password_hash(SecretStr(new)),
    }
    env.root(("FLUSH LOGS", ()))
    log = general_log.read_text(errors="replace")
    assert "IDENTIFIED BY PASSWORD" in log  # the statement was logged: with the hash only
    assert new not in log and login.password not in log

    run_id = state.state_details.flow_run_id
    report = read_incident_report(run_id)
    assert "127.0.0.1" in report  # the connected client, by address
    assert f"'{login.user}'@'%'" in report
    text = report + str(read_run_logs(run_id))
    assert new not in text and login.password not in text


def test_dry_run_changes_nothing(env: Env, login: Login) -> None:
    before = auth_strings(env, login.user)
    state = rotate_credentials(params=params(login, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.PLANNED
    assert auth_strings(env, login.user) == before
    assert env.login(login.user, login.password)
    assert MySQLDatabase.load(login.block).password.get_secret_value() == login.password


def test_host_entries_with_different_passwords_are_refused_as_ambiguous(
    env: Env, login: Login
) -> None:
    env.root(("ALTER USER %s@'127.0.0.1' IDENTIFIED BY %s", (login.user, "another-one")))
    before = auth_strings(env, login.user)
    state = rotate_credentials(params=params(login), return_state=True)
    assert state.is_failed() and "Escalated" in state.message
    assert "ambiguous" in state.message and f"'{login.user}'@'127.0.0.1'" in state.message
    assert "another-one" not in state.message
    assert auth_strings(env, login.user) == before
    assert MySQLDatabase.load(login.block).password.get_secret_value() == login.password


def test_a_stored_password_already_refused_is_replaced(env: Env, login: Login) -> None:
    env.root(*[("ALTER USER %s@%s IDENTIFIED BY %s", (login.user, h, "changed-by-someone"))
               for h in ("%", "127.0.0.1")])  # fmt: skip
    state = rotate_credentials(params=params(login), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    new = MySQLDatabase.load(login.block).password.get_secret_value()
    assert env.login(login.user, new) and not env.login(login.user, "changed-by-someone")


def test_a_rotation_killed_after_the_server_changed_is_finished_by_the_next_run(
    env: Env, login: Login
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.rotation_victim", login.block, login.admin_block, "mysql"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=180,
        env={
            **os.environ,
            "PYTHONPATH": str(PROJECT_ROOT),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
        },
    )
    assert proc.returncode == -9, (
        f"victim did not die by SIGKILL: {proc.returncode} {proc.stderr[-2000:]!r}"
    )
    # the server has a password nobody stored but the pending copy
    stored = MySQLDatabase.load(login.block).password.get_secret_value()
    assert stored == login.password and not env.login(login.user, login.password)
    key = Target("mysql-user", f"{env.server.host}:{env.server.port}/{login.user}").key
    pending = Secret.load(pending_block_name(key)).get()
    assert env.login(login.user, pending)

    state = rotate_credentials(params=params(login), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().step == "finish the interrupted rotation"
    assert MySQLDatabase.load(login.block).password.get_secret_value() == pending
    assert env.login(login.user, pending)
    with pytest.raises(ValueError):
        Secret.load(pending_block_name(key))
