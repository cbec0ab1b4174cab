"""A Redis ACL user's password (Redis 6+), for rotate-credentials.

The password is set as its SHA-256 (``ACL SETUSER <user> resetpass #<hex>``): Redis stores only
that hash, and the plaintext is not in the command (nor in a MONITOR stream, the slow log or an
ACL file). ``resetpass`` drops every other password of the user at once, so the old one is refused
as soon as the new one works.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import SecretStr

from blocks.redis import RedisServer
from runbooks.safety import Target
from tasks.credentials import LoginCheck


def redis_login_check(server: RedisServer, password: SecretStr | None) -> LoginCheck:
    try:
        # no CLIENT SETNAME: the login being checked may not be allowed it
        probe = server.model_copy(update={"password": password, "retries": 0, "client_name": ""})
        with probe.client() as client:
            client.ping()
        return LoginCheck(ok=True)
    except redis.AuthenticationError as exc:
        return LoginCheck(ok=False, refused=True, error=type(exc).__name__)
    except redis.ResponseError as exc:  # WRONGPASS / NOAUTH on some versions
        refused = str(exc).startswith(("WRONGPASS", "NOAUTH", "NOPERM"))
        return LoginCheck(ok=False, refused=refused, error=str(exc)[:120])
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return LoginCheck(ok=False, refused=False, error=f"{type(exc).__name__}: {exc}"[:200])


@dataclass
class RedisCredential:
    """The ACL user of ``block_name`` (its ``username``), changed through ``admin`` (a user
    allowed ``ACL SETUSER``, ``ACL SAVE`` / ``CONFIG REWRITE``)."""

    block_name: str
    block: RedisServer
    admin: RedisServer
    _persisted: str | None = field(default=None, repr=False)

    @property
    def user(self) -> str:
        return self.block.username or "default"

    @property
    def label(self) -> str:
        return f"Redis ACL user {self.user} on {self.block.host}:{self.block.port}"

    def try_login(self, password: SecretStr | None) -> LoginCheck:
        return redis_login_check(self.block, password)

    def set_password(self, password: SecretStr) -> None:
        digest = hashlib.sha256(password.get_secret_value().encode()).hexdigest()
        with self.admin.client() as client:
            client.execute_command("ACL", "SETUSER", self.user, "resetpass", f"#{digest}")
            self._persisted = _persist(client)

    def stored_password(self) -> SecretStr | None:
        return self.block.password

    def store(self, password: SecretStr) -> None:
        self.block = self.block.model_copy(update={"password": password})
        self.block.save(self.block_name, overwrite=True)

    def target(self) -> Target:
        return Target("redis-user", f"{self.block.host}:{self.block.port}/{self.user}")

    def sessions(self) -> list[dict[str, Any]]:
        with self.admin.client() as client:
            clients = client.client_list()
        out: dict[str, dict[str, Any]] = {}
        for c in clients:
            if c.get("user") != self.user:
                continue
            host = str(c.get("addr", "?")).rsplit(":", 1)[0]
            row = out.setdefault(host, {"client": host, "name": c.get("name", ""), "sessions": 0})
            row["sessions"] += 1
        return list(out.values())

    def secret_fields(self) -> dict[str, Any]:
        b = self.block
        return {"engine": "redis", "host": b.host, "port": b.port, "db": b.db, "username": self.user}

    def persistence_note(self) -> str | None:
        return self._persisted


def _persist(client: redis.Redis) -> str | None:
    """Write the ACL change where the server reads it at start: its ACL file (ACL SAVE), else
    redis.conf (CONFIG REWRITE). Returns why neither worked, or None."""
    try:
        client.execute_command("ACL", "SAVE")
        return None
    except redis.ResponseError as exc:
        acl_error = str(exc)
    try:
        client.config_rewrite()
        return None
    except redis.ResponseError as exc:
        return (
            f"the new password is only in the server's memory (ACL SAVE: {acl_error[:80]}; "
            f"CONFIG REWRITE: {str(exc)[:80]}): a restart brings the old one back"
        )
