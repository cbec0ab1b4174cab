"""rotate-credentials for a Redis ACL user, on a real redis-server of the module's own that keeps
its users in an ACL file, so the rotation's ACL SAVE is proven by restarting the server."""

from __future__ import annotations

import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from blocks.redis import RedisServer
from flows.security.rotate_credentials import RotateCredentialsParams, rotate_credentials
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.conftest import read_incident_report, read_run_logs, unique
from tests.servers import free_port, wait_for_port

pytestmark = pytest.mark.integration


@dataclass
class AclRedis:
    port: int
    home: Path
    admin_password: str
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.home), "--aclfile", str(self.home / "users.acl")],
            stdout=(self.home / "log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, 15)

    def restart(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: only what is in the ACL file comes back
        self.proc.wait(10)
        self.start()

    def login(self, user: str, password: str) -> bool:
        try:
            with redis.Redis(port=self.port, username=user, password=password, socket_timeout=5) as c:
                return c.ping() is True
        except redis.AuthenticationError:
            return False


@pytest.fixture(scope="module")
def server() -> Iterator[AclRedis]:
    home = Path(tempfile.mkdtemp(prefix="runbooks-redis-acl-"))
    admin_password = f"admin-{uuid.uuid4().hex}"
    # the admin may manage users and save them; default (no password) is off
    (home / "users.acl").write_text(
        f"user default off\nuser admin on >{admin_password} ~* &* +@all\n"
    )
    s = AclRedis(free_port(), home, admin_password)
    s.start()
    yield s
    assert s.proc is not None
    s.proc.terminate()
    s.proc.wait(10)


@dataclass
class Login:
    user: str
    password: str
    block: str
    admin_block: str


@pytest.fixture
def login(server: AclRedis) -> Login:
    user, password = f"app-{uuid.uuid4().hex[:6]}", f"old-{uuid.uuid4().hex}"
    with redis.Redis(port=server.port, username="admin", password=server.admin_password) as admin:
        admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], commands=["+ping", "+get"], keys=["app:*"])
        admin.execute_command("ACL", "SAVE")
    block, admin_block = unique("rotate-redis"), unique("rotate-redis-admin")
    RedisServer(host="127.0.0.1", port=server.port, username=user, password=password).save(block, overwrite=True)
    RedisServer(
        host="127.0.0.1", port=server.port, username="admin", password=server.admin_password
    ).save(admin_block, overwrite=True)
    return Login(user, password, block, admin_block)


def params(login: Login, **overrides) -> RotateCredentialsParams:
    fields = {
        "engine": "redis",
        "login_block": login.block,
        "admin_block": login.admin_block,
        "safety": SafetyParams(budget_max_actions=1000),
    }
    return RotateCredentialsParams(**(fields | overrides))


def test_rotates_an_acl_user_and_the_change_survives_a_restart(server: AclRedis, login: Login) -> None:
    with redis.Redis(port=server.port, username=login.user, password=login.password) as app:
        app.ping()  # a connected client: listed as a session that needs the new password
        state = rotate_credentials(params=params(login), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    new = RedisServer.load(login.block).password.get_secret_value()
    assert new != login.password
    assert server.login(login.user, new) and not server.login(login.user, login.password)
    acl_file = (server.home / "users.acl").read_text()
    assert new not in acl_file and login.password not in acl_file  # only SHA-256 hashes

    server.restart()
    assert server.login(login.user, new) and not server.login(login.user, login.password)

    run_id = state.state_details.flow_run_id
    report = read_incident_report(run_id)
    assert "127.0.0.1" in report  # the connected client, by address
    text = report + str(read_run_logs(run_id))
    assert new not in text and login.password not in text


def test_dry_run_changes_nothing(server: AclRedis, login: Login) -> None:
    state = rotate_credentials(params=params(login, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.PLANNED
    assert server.login(login.user, login.password)
    assert RedisServer.load(login.block).password.get_secret_value() == login.password
