"""A MariaDB / MySQL user's password, for rotate-credentials.

The password is sent as its ``mysql_native_password`` hash (``'*' + SHA1(SHA1(pw))`` in upper-case
hex, computed here): ``ALTER USER 'u'@'h' IDENTIFIED BY PASSWORD '*<hash>'``. The server stores only
that hash, and the plaintext is in no statement, general log, slow log or binary log. ALTER USER is
durable (the grant tables are on disk). MariaDB only: MySQL 8 has no ``IDENTIFIED BY PASSWORD``
and is refused with a clear message.

A user name can have several host entries (``'app'@'%'``, ``'app'@'10.0.%'``): each is a login of
its own. Every entry of the block's user name is rotated together when they all have the same
password (the same hash on the server); entries with different passwords are ambiguous (which one
does the block's password belong to?) and the rotation is refused with the entries named.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pymysql
from pydantic import SecretStr

from blocks.mysql import MySQLDatabase
from runbooks.errors import Escalation
from runbooks.safety import Target
from tasks.credentials import LoginCheck

# ER_ACCESS_DENIED_ERROR (wrong password, unknown user/host), ER_ACCOUNT_HAS_BEEN_LOCKED (MariaDB
# 4151, MySQL 3118), ER_USER_BLOCKED... the server said no; anything else: could not tell
_REFUSED_ERRNOS = frozenset({1045, 1698, 3118, 4151})


def native_password_hash(password: SecretStr) -> str:
    """The ``mysql_native_password`` hash (what PASSWORD() returns): ``*`` + SHA1(SHA1(pw))."""
    inner = hashlib.sha1(password.get_secret_value().encode()).digest()
    return "*" + hashlib.sha1(inner).hexdigest().upper()


def mysql_login_check(db: MySQLDatabase, password: SecretStr | None) -> LoginCheck:
    """Connect as the block's user with ``password`` (not the block's), no default database (a
    login check, not a grant check), and run SELECT 1."""
    try:
        conn = db.model_copy(update={"password": password}).connect(database="")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()
        return LoginCheck(ok=True)
    except pymysql.err.MySQLError as exc:
        errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        # the server's message names user and host ("using password: YES"), never the password
        text = str(exc.args[1]) if len(exc.args) > 1 else type(exc).__name__
        return LoginCheck(
            ok=False, refused=errno in _REFUSED_ERRNOS, error=f"{errno}: {text}"[:200]
        )


def _host_entries(admin: MySQLDatabase, user: str) -> list[dict[str, Any]]:
    conn = admin.connect(database="")
    try:
        with conn.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("SELECT VERSION() AS v")
            version = str(cur.fetchone()["v"])
            if "mariadb" not in version.lower():
                # MySQL 8 has no ALTER USER ... IDENTIFIED BY PASSWORD, and its default
                # caching_sha2_password verifier is salted on the server: not implemented
                raise Escalation(
                    f"{admin.host}:{admin.port} runs MySQL {version}, not MariaDB: rotating a "
                    "MySQL user's password by hash is not implemented; rotate it by hand"
                )
            cur.execute(
                "SELECT Host AS host, plugin, authentication_string AS auth "
                "FROM mysql.user WHERE User = %s ORDER BY Host",
                (user,),
            )
            return list(cur.fetchall())
    finally:
        conn.close()


@dataclass
class MySQLCredential:
    """The user of ``block_name`` (its ``user``, every host entry of it), changed through ``admin``
    (CREATE USER privilege, SELECT on mysql.user, PROCESS to list the user's sessions)."""

    block_name: str
    block: MySQLDatabase
    admin: MySQLDatabase
    _hosts: list[str] = field(default_factory=list, repr=False)

    @property
    def user(self) -> str:
        return self.block.user

    @property
    def label(self) -> str:
        hosts = ", ".join(f"'{self.user}'@'{h}'" for h in self._hosts) or f"'{self.user}'"
        return f"MariaDB/MySQL user {hosts} on {self.block.host}:{self.block.port}"

    def hosts(self) -> list[str]:
        """The user's host entries, all with one password; refuses (Escalation) when there are
        none, or several with different passwords."""
        entries = _host_entries(self.admin, self.user)
        if not entries:
            raise Escalation(
                f"user '{self.user}' does not exist on {self.block.host}:{self.block.port} (no "
                "row in mysql.user; or the admin block's user cannot read mysql.user)"
            )
        if len({(e["plugin"], e["auth"]) for e in entries}) > 1:
            listed = ", ".join(f"'{self.user}'@'{e['host']}' ({e['plugin']})" for e in entries)
            raise Escalation(
                f"user '{self.user}' has host entries with different passwords or "
                f"authentication plugins ({listed}): which one the block's password belongs to "
                "is ambiguous; give the entries one password by hand, or drop the ones not used"
            )
        self._hosts = [str(e["host"]) for e in entries]
        return self._hosts

    def try_login(self, password: SecretStr | None) -> LoginCheck:
        return mysql_login_check(self.block, password)

    def set_password(self, password: SecretStr) -> None:
        hosts = self._hosts or self.hosts()
        digest = native_password_hash(password)
        # one statement for every host entry: they change together or not at all
        clause = ", ".join(["%s@%s IDENTIFIED BY PASSWORD %s"] * len(hosts))
        args: list[str] = []
        for host in hosts:
            args += [self.user, host, digest]
        conn = self.admin.connect(database="")
        try:
            with conn.cursor() as cur:
                cur.execute(f"ALTER USER {clause}", args)
        finally:
            conn.close()

    def stored_password(self) -> SecretStr | None:
        return self.block.password

    def store(self, password: SecretStr) -> None:
        self.block = self.block.model_copy(update={"password": password})
        self.block.save(self.block_name, overwrite=True)

    def target(self) -> Target:
        self.hosts()  # refuses an ambiguous user before anything is read or locked
        return Target("mysql-user", f"{self.block.host}:{self.block.port}/{self.user}")

    def sessions(self) -> list[dict[str, Any]]:
        conn = self.admin.connect(database="")
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(
                    "SELECT HOST AS host, DB AS db FROM information_schema.PROCESSLIST "
                    "WHERE USER = %s",
                    (self.user,),
                )
                rows = list(cur.fetchall())
        finally:
            conn.close()
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            client = str(r["host"] or "?").rsplit(":", 1)[0]
            row = out.setdefault(client, {"client": client, "databases": set(), "sessions": 0})
            row["sessions"] += 1
            if r["db"]:
                row["databases"].add(str(r["db"]))
        return [{**r, "databases": sorted(r["databases"])} for r in out.values()]

    def secret_fields(self) -> dict[str, Any]:
        b = self.block
        return {"engine": "mysql", "host": b.host, "port": b.port, "dbname": b.database,
                "username": b.user}  # fmt: skip

    def persistence_note(self) -> str | None:
        return None  # ALTER USER writes the grant tables: durable
