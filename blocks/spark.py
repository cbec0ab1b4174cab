"""Spark standalone cluster settings and the streaming application's submission request."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field, field_validator, model_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr
from blocks.http_auth import auth_problem, http_client

PYTHON_RUNNER = "org.apache.spark.deploy.PythonRunner"


class SparkCluster(Block):
    """How to reach a Spark standalone master (its REST submission server and web UI) and how the
    streaming application is submitted there, so a runbook can resubmit it as it was.

    Example:
        ```python
        from blocks.spark import SparkCluster
        spark = SparkCluster.load("BLOCK_NAME")
        with spark.get_client() as client:
            client.get("/v1/submissions/status/driver-20260101000000-0000").json()
        ```
    """

    _block_type_name = "Runbooks Spark Cluster"
    _block_type_slug = "runbooks-spark-cluster"
    _description = (
        "REST submission URL, web UI, credentials and timeouts of a Spark standalone master, and the "
        "streaming application's submission (resource, main class, args, properties, checkpoint)."
    )
    model_config = BLOCK_CONFIG

    rest_url: str = Field(
        description="Base URL of the master's REST submission server "
        "(spark.master.rest.enabled true), e.g. 'http://spark-master:6066'."
    )
    ui_url: str = Field(
        description="Base URL of the master's web UI, whose /json/ lists drivers and applications, "
        "e.g. 'http://spark-master:8080'."
    )
    username: str | None = Field(
        None, description="User for HTTP basic auth, when a proxy in front of Spark requires it."
    )
    password: OptionalSecretStr = Field(None, description="Password for HTTP basic auth.")
    token: OptionalSecretStr = Field(
        None, description="Bearer token, when a proxy (or spark.master.rest.filters) requires one."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of every REST request, in seconds."
    )
    verify_tls: bool = Field(
        True, description="Verify the server's TLS certificate (only turn off for test clusters)."
    )
    app_name: str = Field(
        description="The streaming application's name (spark.app.name), as the master's UI lists it."
    )
    app_resource: str = Field(
        description="The application's file as the driver's host sees it: a .py file or a jar "
        "(local path, or hdfs://, s3a://, http:// URL)."
    )
    main_class: str = Field(
        PYTHON_RUNNER,
        description=f"Main class of the driver; Python applications use {PYTHON_RUNNER}.",
    )
    app_args: list[str] = Field(
        default_factory=list,
        description="Arguments of the main class. Python: [the .py file, comma-separated "
        "py-files or '', the script's own arguments...].",
    )
    spark_properties: dict[str, str] = Field(
        default_factory=dict,
        description="Spark properties of the submission (driver/executor memory and cores, "
        "spark.cores.max, ...); spark.app.name and spark.submit.deployMode are set from this block.",
    )
    environment_variables: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the driver (PYSPARK_PYTHON, PYTHONPATH, SPARK_HOME, ...).",
    )
    checkpoint_location: str = Field(
        description="The streaming query's checkpointLocation (a directory the runbook can read: "
        "a local or mounted path, or file:///...): its offsets/ and commits/ logs are how the "
        "runbook sees progress, and a resubmitted driver continues from it."
    )

    @field_validator("checkpoint_location")
    @classmethod
    def _local_checkpoint(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError(
                "checkpoint_location must be a path the runbook can read (local, mounted, or "
                "file:///...), not a remote file system URL"
            )
        return value

    @model_validator(mode="after")
    def _one_auth_method(self) -> SparkCluster:
        problem = auth_problem(self.username, self.password, self.token)
        if problem:
            raise ValueError(problem)
        return self

    def get_client(self) -> httpx.Client:
        """An HTTP client bound to the REST submission URL (close it after use)."""
        return self._client(self.rest_url)

    def get_ui_client(self) -> httpx.Client:
        """An HTTP client bound to the master's web UI (close it after use)."""
        return self._client(self.ui_url)

    def _client(self, url: str) -> httpx.Client:
        return http_client(
            url,
            username=self.username,
            password=self.password,
            token=self.token,
            timeout_s=self.request_timeout_s,
            verify_tls=self.verify_tls,
        )
