"""db-connection-pool-exhausted's last resort (seed 002 scenario 2, "restart database (last
resort)"): a real PostgreSQL run by a real supervisord of this module's own, its pool filled with
busy sessions nothing may terminate. The restart is offered only through approval; approved, the
postmaster really restarts and the headroom is back; rejected or in dry-run, nothing restarts."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from blocks.postgres import PostgresDatabase
from blocks.supervisor import SupervisorHost
from flows.postgres.db_connection_pool_exhausted import (
    ConnectionPoolParams,
    db_connection_pool_exhausted,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.approvals import Approver
from tests.conftest import read_incident_report, unique
from tests.servers import _pg_bin, free_port, wait_for_port

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 12  # 3 reserved for superusers: 9 for ordinary roles
PASSWORD = f"pw-{uuid.uuid4().hex}"


@dataclass
class Stack:
    home: Path
    pg_port: int
    sv_port: int
    sv_password: str
    proc: subprocess.Popen

    def conninfo(self, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.pg_port} dbname=postgres user={user} password={PASSWORD} connect_timeout=5"

    def started_at(self) -> str:
        with psycopg.connect(self.conninfo()) as conn:
            return str(conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0])

    def block(self) -> str:
        name = unique("last-resort-sv")
        SupervisorHost(
            url=f"http://127.0.0.1:{self.sv_port}/RPC2", username="runbooks",
            password=self.sv_password, request_timeout_s=5, change_timeout_s=60,
        ).save(name, overwrite=True)
        return name


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="runbooks-lastresort-"))
    pg = pwd.getpwnam("postgres")
    data = home / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        os.chown(home, pg.pw_uid, pg.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    pwfile = home / "pw"
    pwfile.write_text(PASSWORD)
    if run_as:
        os.chown(pwfile, pg.pw_uid, pg.pw_gid)
    subprocess.run(
        [*run_as, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
         "--pwfile", str(pwfile), "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )
    pg_port, sv_port, sv_password = free_port(), free_port(), f"sv-{uuid.uuid4().hex}"
    user_line = "user=postgres" if run_as else ""
    conf = home / "supervisord.conf"
    conf.write_text(f"""\
[supervisord]
nodaemon=true
logfile={home}/supervisord.log
pidfile={home}/supervisord.pid

[inet_http_server]
port=127.0.0.1:{sv_port}
username=runbooks
password={sv_password}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:postgres]
command={_pg_bin("postgres")} -D {data} -p {pg_port} -c listen_addresses=127.0.0.1 -k {home} -c max_connections={MAX_CONNECTIONS} -c fsync=off
{user_line}
startsecs=2
stopsignal=INT
stopwaitsecs=30
autorestart=false
redirect_stderr=true
stdout_logfile={home}/postgres.log
""")
    supervisord = Path(sys.executable).parent / "supervisord"
    proc = subprocess.Popen([str(supervisord), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield from _serve(home, pg_port, sv_port, sv_password, proc)
    finally:  # a failed set-up too: supervisord stops the postgres it started
        proc.terminate()
        proc.wait(60)


def _serve(home: Path, pg_port: int, sv_port: int, sv_password: str, proc: subprocess.Popen) -> Iterator[Stack]:
    wait_for_port(sv_port, 30)
    wait_for_port(pg_port, 60)
    s = Stack(home, pg_port, sv_port, sv_password, proc)
    # the port opens before recovery ends ("the database system is starting up"): wait for that
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = psycopg.connect(s.conninfo(), autocommit=True, connect_timeout=5)
            break
        except psycopg.OperationalError as exc:
            if "starting up" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with conn:
        conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")
    yield s


class Busy:
    """Ordinary sessions, every one busy in a long query: nothing a runbook may terminate."""

    def __init__(self, stack: Stack, n: int):
        self.conns = [psycopg.connect(stack.conninfo("app"), autocommit=True, application_name="batch") for _ in range(n)]
        self.threads = [threading.Thread(target=self._sleep, args=(c,), daemon=True) for c in self.conns]
        for t in self.threads:
            t.start()
        time.sleep(0.5)

    @staticmethod
    def _sleep(conn: psycopg.Connection) -> None:
        try:
            conn.execute("SELECT pg_sleep(600)")
        except psycopg.Error:
            pass  # cut by the restart

    def close(self) -> None:
        for c in self.conns:
            try:
                c.cancel()
                c.close()
            except psycopg.Error:
                pass


@pytest.fixture
def busy(stack: Stack) -> Iterator[Busy]:
    b = Busy(stack, 8)
    yield b
    b.close()


def params(stack: Stack, **overrides) -> ConnectionPoolParams:
    db_block = unique("last-resort-db")
    PostgresDatabase(
        host="127.0.0.1", port=stack.pg_port, user="postgres", password=PASSWORD, connect_timeout_s=3,
    ).save(db_block, overwrite=True)
    fields = {
        "db_block": db_block,
        "idle_threshold_s": 300,
        "min_free_connections": 3,
        "target_headroom_percent": 0,
        "verify_timeout_s": 5,
        "last_resort_platform": f"supervisord/{stack.block()}",
        "last_resort_service": "postgres",
        "restart_timeout_s": 60,
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return ConnectionPoolParams(**(fields | overrides))


def test_restart_is_offered_and_done_only_after_approval(stack: Stack, busy: Busy) -> None:
    before = stack.started_at()
    approver = Approver(
        "db-connection-pool-exhausted",
        {"approve": True, "approver": "carol", "reason": "batch sessions hung, app down"},
    )
    approver.start()

    state = db_connection_pool_exhausted(params=params(stack), return_state=True)

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert "cuts every session" in approver.description
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    assert stack.started_at() != before, "the postmaster restarted"
    assert all(c.closed or c.broken for c in busy.conns)
    report = read_incident_report(state.state_details.flow_run_id)
    assert "last resort" in report and "carol" in report


def test_a_rejected_restart_restarts_nothing(stack: Stack, busy: Busy) -> None:
    before = stack.started_at()
    approver = Approver(
        "db-connection-pool-exhausted", {"approve": False, "approver": "dave", "reason": "not now"}
    )
    approver.start()

    state = db_connection_pool_exhausted(params=params(stack), return_state=True)

    approver.join(5)
    assert state.is_failed() and "rejected by dave" in state.message
    assert stack.started_at() == before


def test_dry_run_plans_the_restart_and_restarts_nothing(stack: Stack, busy: Busy) -> None:
    before = stack.started_at()
    state = db_connection_pool_exhausted(params=params(stack, dry_run=True), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.PLANNED
    assert "last resort" in state.result().report
    assert stack.started_at() == before


def test_without_a_platform_it_escalates_as_before(stack: Stack, busy: Busy) -> None:
    before = stack.started_at()
    state = db_connection_pool_exhausted(
        params=params(stack, last_resort_platform=None, last_resort_service=None), return_state=True
    )
    assert state.is_failed() and "scale up the database" in state.message
    assert stack.started_at() == before
