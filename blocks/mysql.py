"""MySQL / MariaDB connection settings."""

from __future__ import annotations

import ssl
from typing import Literal

# PyMySQL is pure Python: it installs without libmysqlclient headers or a compiler, where
# mysqlclient (MySQLdb) needs both; it speaks to MySQL 5.7/8.x and MariaDB alike.
import pymysql
from prefect.blocks.core import Block
from pydantic import Field

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr


class MySQLDatabase(Block):
    """How to reach a MySQL or MariaDB server, with the timeouts every runbook session uses.

    Privileges the runbook user needs: PROCESS (other users' threads in PROCESSLIST and their
    InnoDB transactions), CONNECTION ADMIN (KILL another user's thread; SUPER on MySQL 5.7),
    READ_ONLY ADMIN on MariaDB 10.11 / SYSTEM_VARIABLES_ADMIN on MySQL 8 (SET GLOBAL read_only),
    SELECT on the watched tables, and INSERT on the canary table if one is used.

    Example:
        ```python
        from blocks.mysql import MySQLDatabase
        conn = MySQLDatabase.load("BLOCK_NAME").connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()
        ```
    """

    _block_type_name = "Runbooks MySQL Database"
    _block_type_slug = "runbooks-mysql-database"
    _description = "Host, credentials, TLS and timeouts of a MySQL or MariaDB server."
    model_config = BLOCK_CONFIG

    host: str = Field(description="Host name or IP address of the server.")
    port: int = Field(3306, ge=1, le=65535, description="TCP port of the server.")
    database: str = Field(description="Database (schema) holding the tables the runbook watches.")
    user: str = Field(description="User the runbook logs in as.")
    password: OptionalSecretStr = Field(None, description="Password of the user; empty for none.")
    ssl_mode: Literal["disabled", "required", "verify-ca", "verify-identity"] = Field(
        "disabled",
        description="TLS: disabled, required (encrypt, no certificate check), verify-ca, or "
        "verify-identity (also the host name); use verify-identity across untrusted networks.",
    )
    ssl_ca: str | None = Field(
        None, description="Path of the CA bundle that signed the server's certificate."
    )
    connect_timeout_s: int = Field(
        10, ge=1, le=300, description="Give up connecting after this many seconds."
    )
    read_timeout_s: int = Field(
        30, ge=1, le=3600, description="Give up waiting for a reply after this many seconds."
    )
    write_timeout_s: int = Field(
        30, ge=1, le=3600, description="Give up sending a statement after this many seconds."
    )

    lock_wait_timeout_s: int = Field(
        5,
        ge=1,
        le=3600,
        description="A runbook statement waits at most this long for a table or row lock "
        "(lock_wait_timeout, innodb_lock_wait_timeout), so a locked table cannot hang the runbook.",
    )

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        """Open an autocommit session with this block's settings; close it when done."""
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password.get_secret_value() if self.password else "",
            database=database if database is not None else self.database,
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            write_timeout=self.write_timeout_s,
            ssl=self._ssl_context(),
            autocommit=True,
            charset="utf8mb4",
            program_name="runbooks",
            init_command=(
                f"SET SESSION lock_wait_timeout = {self.lock_wait_timeout_s},"
                f" innodb_lock_wait_timeout = {self.lock_wait_timeout_s}"
            ),
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.ssl_mode == "disabled":
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_ca)
        ctx.check_hostname = self.ssl_mode == "verify-identity"
        if self.ssl_mode == "required":
            ctx.verify_mode = ssl.CERT_NONE  # encrypted, but any certificate is accepted
        return ctx
