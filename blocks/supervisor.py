"""supervisord connection settings (its XML-RPC interface)."""

from __future__ import annotations

import http.client
import socket
import ssl
import xmlrpc.client
from typing import Any
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from pydantic import Field, field_validator, model_validator
from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr

SCHEMES = ("http", "https", "unix")


class SupervisorHost(Block):
    """How to reach a supervisord's XML-RPC interface (``[inet_http_server]`` or its socket).

    Example:
        ```python
        from blocks.supervisor import SupervisorHost
        with SupervisorHost.load("BLOCK_NAME").get_client() as server:
            server.supervisor.getAllProcessInfo()
        ```
    """

    _block_type_name = "Runbooks Supervisor"
    _block_type_slug = "runbooks-supervisor"
    _description = (
        "XML-RPC endpoint, credentials and timeouts of a supervisord that runs services as "
        "supervised processes."
    )
    model_config = BLOCK_CONFIG

    url: str = Field(
        description="The XML-RPC interface: 'http://host:9001/RPC2' ([inet_http_server]), "
        "'https://...' behind a TLS proxy, or 'unix:///run/supervisor.sock' "
        "([unix_http_server]). Credentials go in username/password, never in the URL."
    )
    username: str | None = Field(
        None, description="User of the [inet_http_server]/[unix_http_server] section."
    )
    password: OptionalSecretStr = Field(None, description="Password of that user.")
    request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of every read (status, logs), in seconds."
    )
    change_timeout_s: float = Field(
        60.0,
        gt=0,
        le=900,
        description="Timeout of a stop or start that supervisord waits out before answering, "
        "in seconds: longer than the programs' stopwaitsecs plus startsecs.",
    )
    verify_tls: bool = Field(
        True, description="Verify an https proxy's certificate (only turn off for test hosts)."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        # the messages never repeat the URL: it may hold credentials
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError("url must start with http://, https:// or unix://")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url holds credentials: give them as username and password")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("url names no host")
        if parts.scheme == "unix" and not (parts.netloc + parts.path).startswith("/"):
            raise ValueError("a unix url names an absolute socket path: unix:///path/to/sock")
        return url

    @model_validator(mode="after")
    def _auth_pair(self) -> SupervisorHost:
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both username and password")
        return self

    def get_client(self, timeout_s: float | None = None) -> xmlrpc.client.ServerProxy:
        """An XML-RPC proxy with basic auth and a timeout (default: ``request_timeout_s``).

        Use it as a context manager (closes its connection). The password travels only in the
        transport's Authorization header: never in the proxy's URL, its repr or an error.
        """
        transport = TimeoutTransport(
            self.url,
            self.username,
            self.password.get_secret_value() if self.password is not None else None,
            timeout_s or self.request_timeout_s,
            verify_tls=self.verify_tls,
        )
        parts = urlsplit(self.url)
        # ServerProxy speaks only http(s) URLs; for a socket the host is a placeholder and the
        # transport connects to the socket (what supervisorctl does)
        uri = "http://localhost/RPC2" if parts.scheme == "unix" else self.url
        return xmlrpc.client.ServerProxy(uri, transport=transport)


class _UnixConnection(UnixStreamHTTPConnection):
    """supervisor's socket connection, with the timeout it leaves out of connect()."""

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketfile)


class TimeoutTransport(SupervisorTransport):
    """supervisor's own XML-RPC transport (basic auth header, unix sockets) with a timeout.

    supervisor's ``SupervisorTransport`` opens its connections without a timeout, speaks no
    https, and keeps a connection that failed mid-request for the next call; this subclass only
    supplies timeout-bound connections and drops a connection after any error.
    """

    def __init__(
        self,
        url: str,
        username: str | None,
        password: str | None,
        timeout: float,
        *,
        verify_tls: bool = True,
    ) -> None:
        parts = urlsplit(url)
        # the parent only knows http and unix URLs; it keeps the URL, which holds no secret
        super().__init__(username, password, "unix://" if parts.scheme == "unix" else "http://x")
        self.serverurl = url
        self.timeout = timeout
        if parts.scheme == "unix":
            path = parts.netloc + parts.path

            def connect_unix() -> http.client.HTTPConnection:
                conn = _UnixConnection("localhost", timeout=timeout)
                conn.socketfile = path
                return conn

            self._get_connection = connect_unix
        elif parts.scheme == "https":
            context = ssl.create_default_context()
            if not verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._get_connection = lambda: http.client.HTTPSConnection(
                parts.hostname, parts.port or 443, timeout=timeout, context=context
            )
        else:
            self._get_connection = lambda: http.client.HTTPConnection(
                parts.hostname, parts.port or 80, timeout=timeout
            )

    def request(self, host: Any, handler: Any, request_body: Any, verbose: Any = 0) -> Any:
        try:
            return super().request(host, handler, request_body, verbose)
        except BaseException:
            # a timed-out or reset connection must not carry the next call
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<TimeoutTransport {self.serverurl} timeout={self.timeout}s>"
