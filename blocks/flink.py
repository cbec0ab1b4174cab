"""Flink cluster connection settings (the JobManager's REST endpoint)."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field, model_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr
from blocks.http_auth import auth_problem, http_client


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
        problem = auth_problem(self.username, self.password, self.token)
        if problem:
            raise ValueError(problem)
        return self

    def get_client(self) -> httpx.Client:
        """An HTTP client bound to the REST URL, with auth and timeout (close it after use)."""
        return http_client(
            self.rest_url,
            username=self.username,
            password=self.password,
            token=self.token,
            timeout_s=self.request_timeout_s,
            verify_tls=self.verify_tls,
        )
