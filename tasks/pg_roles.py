"""PostgreSQL roles: logging in as one, setting its password without sending it to the server in
clear, and (tasks.pg_access) what an access audit reads about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from pydantic import SecretStr

from blocks.postgres import PostgresDatabase
from runbooks.safety import Target
from tasks.credentials import LoginCheck
from tasks.pg_access import role_sessions
from tasks.postgres import get_system_identifier

# SQLSTATE 28P01 invalid_password, 28000 invalid_authorization_specification (pg_hba reject, role
# cannot log in); libpq reports a failed connection without SQLSTATE, by text
_REFUSED = ("password authentication failed", "28P01", "28000", "is not permitted to log in")


def login_check(db: PostgresDatabase, password: SecretStr | None) -> LoginCheck:
    """Connect as the block's role with ``password`` (not the block's) and run SELECT 1."""
    try:
        with db.model_copy(update={"password": password}).connect(autocommit=True) as conn:
            conn.execute("SELECT 1")
        return LoginCheck(ok=True)
    except psycopg.OperationalError as exc:
        text = str(exc)
        refused = any(r in text for r in _REFUSED) or exc.sqlstate in ("28P01", "28000")
        # libpq's message names host, port and role, never the password
        return LoginCheck(ok=False, refused=refused, error=text.strip().splitlines()[-1][:200])


def scram_verifier(conn: psycopg.Connection, role: str, password: SecretStr) -> str:
    """The SCRAM-SHA-256 verifier libpq computes (PQencryptPasswordConn), as `\\password` does:
    the server stores only this, and the plaintext appears in no statement, log or
    pg_stat_statements entry on the server."""
    return conn.pgconn.encrypt_password(
        password.get_secret_value().encode(), role.encode(), b"scram-sha-256"
    ).decode()


def set_role_password(admin: PostgresDatabase, role: str, password: SecretStr) -> None:
    with admin.connect(autocommit=True) as conn:
        verifier = scram_verifier(conn, role, password)
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier))
        )


@dataclass
class PostgresCredential:
    """The login of ``block_name``'s role, set through ``admin`` (CREATEROLE, or superuser for a
    superuser role), stored back into the block."""

    block_name: str
    block: PostgresDatabase
    admin: PostgresDatabase

    @property
    def role(self) -> str:
        return self.block.user

    @property
    def label(self) -> str:
        return f"role {self.role} on {self.block.host}:{self.block.port}"

    def try_login(self, password: SecretStr | None) -> LoginCheck:
        return login_check(self.block, password)

    def set_password(self, password: SecretStr) -> None:
        set_role_password(self.admin, self.role, password)

    def stored_password(self) -> SecretStr | None:
        return self.block.password

    def store(self, password: SecretStr) -> None:
        self.block = self.block.model_copy(update={"password": password})
        self.block.save(self.block_name, overwrite=True)

    def target(self) -> Target:
        sysid = get_system_identifier(self.admin)
        return Target(
            "postgres-role", f"{self.block.host}:{self.block.port}/{self.role}", f"{sysid}/{self.role}"
        )

    def sessions(self) -> list[dict[str, Any]]:
        return [s.model_dump() for s in role_sessions(self.admin, self.role)]

    def secret_fields(self) -> dict[str, Any]:
        b = self.block
        return {"engine": "postgres", "host": b.host, "port": b.port, "dbname": b.dbname,
                "username": b.user}

    def persistence_note(self) -> str | None:
        return None  # ALTER ROLE is durable
