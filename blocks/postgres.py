"""PostgreSQL connection settings."""

from __future__ import annotations

from typing import Literal

import psycopg
from prefect.blocks.core import Block
from psycopg.conninfo import make_conninfo
from pydantic import Field

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr


class PostgresDatabase(Block):
    """How to reach a PostgreSQL server, with the timeouts every runbook session uses.

    The role needs `pg_read_all_stats` (to see other roles' sessions in `pg_stat_activity`)
    and `pg_signal_backend` (to terminate them); superuser sessions can only be terminated
    by a superuser. Runbooks that change tables need the matching table privileges.

    Example:
        ```python
        from blocks.postgres import PostgresDatabase
        with PostgresDatabase.load("BLOCK_NAME").connect(autocommit=True) as conn:
            conn.execute("SELECT 1")
        ```
    """

    _block_type_name = "Runbooks PostgreSQL Database"
    _block_type_slug = "runbooks-postgres-database"
    _description = "Host, credentials, TLS mode and timeouts of a PostgreSQL server."
    model_config = BLOCK_CONFIG

    host: str = Field(description="Host name or IP address of the server.")
    port: int = Field(5432, ge=1, le=65535, description="TCP port of the server.")
    dbname: str = Field("postgres", description="Database the runbook connects to.")
    user: str = Field(description="Role the runbook logs in as.")
    password: OptionalSecretStr = Field(
        None, description="Password of the role; empty to use a client certificate or .pgpass."
    )
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "prefer", description="libpq sslmode; use verify-full across untrusted networks."
    )
    application_name: str = Field(
        "runbooks",
        description="Shown in pg_stat_activity, so DBAs can tell runbook sessions apart.",
    )
    connect_timeout_s: int = Field(
        10, ge=1, le=300, description="Give up connecting after this many seconds."
    )
    statement_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Server cancels any runbook statement running longer."
    )

    def connect(self, autocommit: bool = False) -> psycopg.Connection:
        """Open a session with this block's settings; use it as a context manager to close it."""
        # make_conninfo quotes every value; the string holds the password, so it is never logged
        conninfo = make_conninfo(
            "",
            host=self.host,
            port=self.port,
            dbname=self.dbname,
            user=self.user,
            password=self.password.get_secret_value() if self.password else None,
            sslmode=self.sslmode,
            application_name=self.application_name,
            connect_timeout=self.connect_timeout_s,
            options=f"-c statement_timeout={int(self.statement_timeout_s * 1000)}",
        )
        return psycopg.connect(conninfo, autocommit=autocommit)
