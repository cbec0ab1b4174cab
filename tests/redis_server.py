"""A throwaway real Redis for the session: a primary that needs a password, an ACL user for the
runbook with only the commands it needs, and a replica, so CLIENT LIST shows a real replication
link (flag S) on the primary.

Tests use their own database numbers and key prefixes; `reset()` puts maxclients back."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.servers import free_port, wait_for_port

RUNBOOK_USER = "runbooks"
# what the block's docstring asks for; +flushdb only where flushes may be asked for
RUNBOOK_ACL = (
    "+ping +hello +auth +select +info +dbsize +flushdb "
    "+client|list +client|kill +client|id +client|setname"
)
MAXCLIENTS = 1000


@dataclass
class RedisTestServer:
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="runbooks-redis-")))
    port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    admin_password: str = field(default_factory=lambda: f"redis-admin-{uuid.uuid4().hex}")
    password: str = field(default_factory=lambda: f"redis-rb-{uuid.uuid4().hex}")
    user: str = RUNBOOK_USER
    host: str = "127.0.0.1"
    procs: list[subprocess.Popen] = field(default_factory=list)

    def admin(self, db: int = 0, name: str = "test-admin", **kwargs) -> redis.Redis:
        options = {"socket_timeout": 10, "decode_responses": True} | kwargs
        client = redis.Redis(
            host=self.host,
            port=self.port,
            db=db,
            password=self.admin_password,
            client_name=name,
            **options,
        )
        client.ping()
        return client

    def reset(self) -> None:
        with self.admin() as admin:
            admin.config_set("maxclients", MAXCLIENTS)

    def _start(self, port: int, *extra: str) -> None:
        workdir = self.home / str(port)
        workdir.mkdir()
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--maxclients",
                str(MAXCLIENTS),
                "--requirepass",
                self.admin_password,
                *extra,
            ],
            stdout=(workdir / "log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        wait_for_port(port, 15)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=15)
        shutil.rmtree(self.home, ignore_errors=True)


def start_redis() -> RedisTestServer:
    """redis-server (0.1 s) with requirepass and the runbook's ACL user, plus one replica."""
    server = RedisTestServer()
    server._start(server.port)
    with server.admin() as admin:
        admin.acl_setuser(
            server.user,
            enabled=True,
            passwords=[f"+{server.password}"],
            commands=RUNBOOK_ACL.split(),
        )
    server._start(
        server.replica_port,
        "--replicaof",
        server.host,
        str(server.port),
        "--masterauth",
        server.admin_password,
    )
    return server
