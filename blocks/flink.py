"""Flink cluster connection settings (the JobManager's REST endpoint)."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field, model_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr


class FlinkCluster(Block):
    """How to reach a Flink cluster's REST API (JobManager / dashboard port).

    Example:
        ```python
        from blocks.flink import FlinkCluster
        with FlinkCluster.load("BLOCK_NAME").get_client() as client:
            client.get("/jobs/overview").json()
        ```
    """

    _block_type_name = "Runbooks Flink Cluster"
    _block_type_slug = "runbooks-flink-cluster"
    _description = "REST endpoint, credentials and timeouts of a Flink cluster's JobManager."
    model_config = BLOCK_CONFIG

    rest_url: str = Field(
        description="Base URL of the JobManager REST API, e.g. 'http://flink-jobmanager:8081'."
    )
    username: str | None = Field(
        None, description="User for HTTP basic auth, when a proxy in front of Flink requires it."
    )
    password: OptionalSecretStr = Field(None, description="Password for HTTP basic auth.")
    token: OptionalSecretStr = Field(
        None, description="Bearer token, when a proxy in front of Flink requires one."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of every REST request, in seconds."
    )
    verify_tls: bool = Field(
        True, description="Verify the server's TLS certificate (only turn off for test clusters)."
    )

    @model_validator(mode="after")
    def _one_auth_method(self) -> FlinkCluster:
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both username and password")
        if self.username is not None and self.token is not None:
            raise ValueError("set either basic auth (username/password) or a token, not both")
        return self

    def get_client(self) -> httpx.Client:
        """An HTTP client bound to the REST URL, with auth and timeout (close it after use)."""
        auth = (
            httpx.BasicAuth(self.username, self.password.get_secret_value())
            if self.username is not None and self.password is not None
            else None
        )
        headers = {"Authorization": f"Bearer {self.token.get_secret_value()}"} if self.token else {}
        return httpx.Client(
            base_url=self.rest_url.rstrip("/"),
            auth=auth,
            headers=headers,
            timeout=self.request_timeout_s,
            verify=self.verify_tls,
            # a redirect on a POST /jars/:id/run would silently turn into a GET
            follow_redirects=False,
        )
