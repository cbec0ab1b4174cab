"""An AWS account and region, or a LocalStack / moto endpoint standing in for one."""

from __future__ import annotations

import re
from typing import Any

from botocore.config import Config
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, field_validator

from blocks.fields import BLOCK_CONFIG


class AwsAccount(Block):
    """Where the declared SQS queues, SNS topics and CloudWatch metrics live, and how to reach it.

    Without credentials boto3's default chain is used (instance profile, IRSA, environment).
    For LocalStack set `endpoint_url` (e.g. http://localstack:4566) and `health_url`
    (http://localstack:4566/_localstack/health); other stand-ins (moto) have no health URL.

    Example:
        ```python
        from blocks.aws import AwsAccount
        sqs = AwsAccount.load("BLOCK_NAME").get_client("sqs")
        ```
    """

    _block_type_name = "Runbooks AWS Account"
    _block_type_slug = "runbooks-aws-account"
    _description = (
        "An AWS account and region (or a LocalStack/moto endpoint): credentials, endpoint, "
        "health URL and timeouts."
    )
    model_config = BLOCK_CONFIG

    credentials: AwsCredentials | None = Field(
        None, description="prefect-aws credentials; empty: boto3's default chain."
    )
    region: str | None = Field(
        None, description="AWS region; empty: the credentials' region, then boto3's default."
    )
    endpoint_url: str | None = Field(
        None,
        description="One endpoint for every service (LocalStack, moto); empty: AWS's own "
        "(or the credentials' endpoint_url).",
    )
    health_url: str | None = Field(
        None,
        description="LocalStack's health endpoint (<endpoint>/_localstack/health); empty: no "
        "health check (AWS and moto have none).",
    )
    timeout_s: float = Field(
        10.0, gt=0, le=120, description="Connect and read timeout of every request, in seconds."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Attempts per request; boto3's standard mode retries only transient errors "
        "(throttling, 5xx, connection errors).",
    )

    @field_validator("endpoint_url", "health_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+\S*$", url):
            raise ValueError("expected an http(s):// URL")
        return url

    @field_validator("region")
    @classmethod
    def _region(cls, region: str | None) -> str | None:
        if region is not None and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
            raise ValueError("not an AWS region name (e.g. eu-west-1)")
        return region

    def region_name(self) -> str | None:
        if self.region:
            return self.region
        return self.credentials.region_name if self.credentials else None

    def endpoint(self) -> str | None:
        if self.endpoint_url:
            return self.endpoint_url
        return self.credentials.aws_client_parameters.endpoint_url if self.credentials else None

    def get_client(self, service: str) -> Any:
        """A boto3 client with this account's credentials, timeouts and standard-mode retries."""
        import boto3

        session = self.credentials.get_boto3_session() if self.credentials else boto3.Session()
        config = Config(
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
            # total_max_attempts counts the first try; botocore's max_attempts counts only retries
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
        )
        return session.client(
            service, region_name=self.region_name(), endpoint_url=self.endpoint(), config=config
        )
