"""Redis connection settings."""

from __future__ import annotations

import ssl
from typing import Any

import redis
from prefect.blocks.core import Block
from pydantic import Field
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: a refused or dropped connection, a timeout, a loading server.

    redis-py makes a refused password (``AuthenticationError``) a ``ConnectionError``: it would
    only repeat, and each retry is one more failed login in the server's ACL log. So would a
    server certificate that does not verify (wrong CA, wrong name): redis-py raises it as a
    ``ConnectionError`` raised while handling the ``ssl.SSLCertVerificationError``.
    """
    if isinstance(exc, redis.AuthenticationError):
        return False
    if isinstance(exc.__context__, ssl.SSLCertVerificationError):
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


class _TransientRetry(Retry):
    """redis-py's Retry, but never for what would only fail again (bad credentials)."""

    def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None, **kwargs: Any) -> Any:
        def retryable(error: Exception) -> bool:
            return is_transient(error) and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, is_retryable=retryable, **kwargs)


class RedisServer(Block):
    """How to reach a Redis server, with the timeouts every runbook connection uses.

    With ACLs (Redis 6+), the runbook's user needs ``+ping +hello +auth +select +info +dbsize
    +client|list +client|id +client|kill +client|setname`` (and ``+client|setinfo`` on Redis
    7.2+), and ``+flushdb`` only if a person may ever ask redis-degraded to flush the database.

    Example:
        ```python
        from blocks.redis import RedisServer
        RedisServer.load("BLOCK_NAME").client().ping()
        ```
    """

    _block_type_name = "Runbooks Redis Server"
    _block_type_slug = "runbooks-redis-server"
    _description = "Host, database number, ACL credentials, TLS and timeouts of a Redis server."
    model_config = BLOCK_CONFIG

    host: str = Field(description="Host name or IP address of the server.")
    port: int = Field(6379, ge=1, le=65535, description="TCP port of the server.")
    db: int = Field(0, ge=0, le=10_000, description="Database number the runbook works on.")
    username: str | None = Field(
        None, description="ACL user (Redis 6+); empty: the `default` user (requirepass)."
    )
    password: OptionalSecretStr = Field(
        None, description="Password of the user (or requirepass); empty when none is set."
    )
    tls: bool = Field(False, description="Connect over TLS (rediss://).")
    tls_ca_file: str | None = Field(
        None, description="CA bundle that signed the server's certificate; empty: the system's."
    )
    client_name: str = Field(
        "runbooks",
        description="Shown in CLIENT LIST, so operators can tell runbook connections apart.",
    )
    socket_connect_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Give up connecting after this many seconds."
    )
    socket_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="Give up waiting for a reply after this many seconds."
    )
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of a command on a dropped connection or timeout (never on a "
        "refused password), with exponential backoff and jitter.",
    )

    def client(self) -> redis.Redis:
        """A client with this block's settings; use it as a context manager to close it."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username or None,
            password=self.password.get_secret_value() if self.password else None,
            ssl=self.tls,
            ssl_ca_certs=self.tls_ca_file if self.tls else None,
            socket_connect_timeout=self.socket_connect_timeout_s,
            socket_timeout=self.socket_timeout_s,
            retry=_TransientRetry(
                ExponentialWithJitterBackoff(base=0.1, cap=2.0),
                self.retries,
                supported_errors=(redis.ConnectionError, redis.TimeoutError),
            ),
            client_name=self.client_name or None,
            decode_responses=True,
        )
