"""Prometheus and Alertmanager: where runbooks read metrics and firing alerts."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field, field_validator, model_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr
from blocks.http_auth import auth_problem, http_client


class _HttpApi(Block):
    """Base of the blocks below: a URL, one auth method, a timeout (not a block type itself)."""

    model_config = BLOCK_CONFIG

    url: str = Field(description="Base URL of the API.")
    username: str | None = Field(None, description="User for HTTP basic auth, if required.")
    password: OptionalSecretStr = Field(None, description="Password for HTTP basic auth.")
    token: OptionalSecretStr = Field(None, description="Bearer token, if required.")
    timeout_s: float = Field(
        10.0, gt=0, le=120, description="Timeout of every request (and of each query), in seconds."
    )
    verify_tls: bool = Field(
        True, description="Verify the server's TLS certificate (only turn off for test servers)."
    )

    @field_validator("url")
    @classmethod
    def _http_base_url(cls, url: str) -> str:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("expected an http(s):// URL with a host")
        if parsed.userinfo:
            raise ValueError("put credentials in username/password or token, not in the URL")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _one_auth_method(self) -> _HttpApi:
        problem = auth_problem(self.username, self.password, self.token)
        if problem:
            raise ValueError(problem)
        return self

    def get_client(self) -> httpx.Client:
        """An HTTP client bound to the URL, with auth and timeout (close it after use)."""
        return http_client(
            self.url,
            username=self.username,
            password=self.password,
            token=self.token,
            timeout_s=self.timeout_s,
            verify_tls=self.verify_tls,
        )


class PrometheusServer(_HttpApi):
    """How to reach a Prometheus server's HTTP API (queries, its own alerts and targets).

    Example:
        ```python
        from blocks.prometheus import PrometheusServer
        with PrometheusServer.load("BLOCK_NAME").get_client() as client:
            client.get("/api/v1/query", params={"query": "up"}).json()
        ```
    """

    _block_type_name = "Runbooks Prometheus Server"
    _block_type_slug = "runbooks-prometheus-server"
    _description = "URL, credentials and timeout of a Prometheus server's HTTP API."

    url: str = Field(
        description="Base URL of Prometheus (or a compatible API: Thanos, Mimir's /prometheus, "
        "VictoriaMetrics), e.g. 'http://prometheus:9090'."
    )


class AlertmanagerServer(_HttpApi):
    """How to reach an Alertmanager's v2 API (firing alerts, silences).

    Example:
        ```python
        from blocks.prometheus import AlertmanagerServer
        with AlertmanagerServer.load("BLOCK_NAME").get_client() as client:
            client.get("/api/v2/alerts", params={"active": "true"}).json()
        ```
    """

    _block_type_name = "Runbooks Alertmanager"
    _block_type_slug = "runbooks-alertmanager"
    _description = "URL, credentials and timeout of an Alertmanager's v2 API."

    url: str = Field(description="Base URL of Alertmanager, e.g. 'http://alertmanager:9093'.")
