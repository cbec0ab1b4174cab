"""A PostgreSQL database of its own for runbook tests: roles as in production, the runbook's
least-privileged login (pg_signal_backend + pg_read_all_stats) and an admin session watching
pg_stat_activity."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql

from blocks.postgres import PostgresDatabase
from tests.conftest import unique
from tests.servers import PostgresServer


@dataclass
class Env:
    server: PostgresServer
    admin: psycopg.Connection
    db: str
    app_role: str
    batch_role: str
    ops_role: str
    password: str = field(default_factory=lambda: f"pw-{uuid.uuid4().hex}")

    def connect(self, role: str, app: str, autocommit: bool = True) -> psycopg.Connection:
        password = self.server.password if role == self.server.user else self.password
        return psycopg.connect(
            self.server.conninfo(dbname=self.db, user=role, password=password),
            application_name=app,
            autocommit=autocommit,
        )

    def block(self, **overrides) -> str:
        name = unique("pool-db")
        fields = {
            "host": self.server.host,
            "port": self.server.port,
            "dbname": self.db,
            "user": self.ops_role,
            "password": self.password,
            "connect_timeout_s": 5,
            "statement_timeout_s": 10,
        }
        PostgresDatabase(**(fields | overrides)).save(name, overwrite=True)
        return name

    def live_pids(self) -> set[int]:
        rows = self.admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.db,)
        ).fetchall()
        return {pid for (pid,) in rows}

    def headroom(self) -> int:
        return free_connections(self.admin)


@pytest.fixture(scope="module")
def env(postgres: PostgresServer) -> Iterator[Env]:
    admin = psycopg.connect(postgres.conninfo(), application_name="test-admin", autocommit=True)
    suffix = uuid.uuid4().hex[:8]
    e = Env(
        postgres,
        admin,
        f"rbpool_{suffix}",
        f"rbapp_{suffix}",
        f"rbbatch_{suffix}",
        f"rbops_{suffix}",
    )
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(e.db)))
    for role in (e.app_role, e.batch_role, e.ops_role):
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(e.password)
            )
        )
    admin.execute(
        sql.SQL("GRANT pg_signal_backend, pg_read_all_stats TO {}").format(
            sql.Identifier(e.ops_role)
        )
    )
    yield e
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(e.db)))
    for role in (e.app_role, e.batch_role, e.ops_role):
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    admin.close()


def wait_until(check, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def free_connections(conn: psycopg.Connection) -> int:
    """Connection slots an ordinary role can still take on the server, as the server counts them."""
    (free,) = conn.execute(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
        " - count(*) FILTER (WHERE backend_type = 'client backend')::int FROM pg_stat_activity"
    ).fetchone()
    return free


@dataclass
class Scratch:
    """A database of a test module's own, its login roles (one password) and a superuser session
    in it."""

    db: str
    roles: list[str]
    password: str
    admin: psycopg.Connection


@contextlib.contextmanager
def scratch_database(
    postgres: PostgresServer, db_prefix: str, role_prefixes: list[str], schema: str
) -> Iterator[Scratch]:
    """Create a database, login roles and ``schema`` (USAGE granted to every role); drop them all
    afterwards, sessions still connected included."""
    suffix = uuid.uuid4().hex[:8]
    db, roles = f"{db_prefix}_{suffix}", [f"{p}_{suffix}" for p in role_prefixes]
    password = f"pw-{uuid.uuid4().hex}"
    with psycopg.connect(postgres.conninfo(), autocommit=True) as root:
        root.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        for role in roles:
            root.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
    admin = psycopg.connect(postgres.conninfo(dbname=db), autocommit=True)
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    for role in roles:
        admin.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )
    try:
        yield Scratch(db, roles, password, admin)
    finally:
        admin.close()
        with psycopg.connect(postgres.conninfo(), autocommit=True) as root:
            root.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
            for role in roles:
                root.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
