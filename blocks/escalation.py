"""Where escalations go: Prefect notification blocks, an AWS SNS topic, a generic webhook."""

from __future__ import annotations

import re
from typing import Any

from botocore.config import Config
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, field_validator

from blocks.fields import BLOCK_CONFIG, OptionalSecretStr

# "<block-type-slug>/<block-document-name>", as Block.load accepts it
NOTIFICATION_BLOCK_REF = re.compile(r"^[a-z0-9][a-z0-9-]*/[^/\s][^/]*$")


class EscalationPolicy(Block):
    """Who hears about a runbook that could not finish on its own.

    On failure, spent budget, a rejected action or an approval that timed out, a runbook sends one
    message to every configured channel: saved Prefect notification blocks (Slack, Teams, a custom
    webhook, ...), an AWS SNS topic and a generic JSON webhook. Channels are independent: one
    failing does not stop the others. Dry-run and observe runs never page: what they found goes
    only to the quieter ``observe_notification_blocks``.

    Example:
        ```python
        from blocks.escalation import EscalationPolicy
        from runbooks.escalation import EscalationMessage, send_escalation

        policy = EscalationPolicy.load("BLOCK_NAME")
        deliveries = send_escalation(message, policy)
        ```
    """

    _block_type_name = "Runbooks Escalation Policy"
    _block_type_slug = "runbooks-escalation-policy"
    _description = (
        "Channels that receive runbook escalations: Prefect notification blocks, an AWS SNS topic "
        "and a generic JSON webhook."
    )
    model_config = BLOCK_CONFIG

    notification_blocks: list[str] = Field(
        default_factory=list,
        description=(
            "Saved Prefect notification blocks to notify, as '<block-type-slug>/<name>', "
            "e.g. 'slack-webhook/oncall' or 'custom-webhook/incident-bot'."
        ),
    )
    observe_notification_blocks: list[str] = Field(
        default_factory=list,
        description=(
            "Saved Prefect notification blocks, as '<block-type-slug>/<name>', that receive what "
            "dry-run and observe runs found (e.g. 'would escalate'). Findings go here, never to "
            "the paging channels above; empty: dry-runs notify nobody."
        ),
    )
    ticket_notification_blocks: list[str] = Field(
        default_factory=list,
        description=(
            "Saved Prefect notification blocks, as '<block-type-slug>/<name>', that receive "
            "escalations of ticket-level severities (P3, P4: respond within 1 h / 4 h) instead "
            "of the paging channels above; empty: those go to the paging channels too. The SNS "
            "topic and the webhook get every severity, with its response ('page' or 'ticket')."
        ),
    )
    sns_topic_arn: str | None = Field(
        None, description="ARN of the AWS SNS topic escalations are published to."
    )
    aws_region: str | None = Field(
        None,
        description="AWS region of the SNS topic; defaults to the credentials' region, then the ARN's.",
    )
    aws_endpoint_url: str | None = Field(
        None,
        description="SNS endpoint override (a VPC endpoint, or a local moto/LocalStack server).",
    )
    aws_credentials: AwsCredentials | None = Field(
        None,
        description="prefect-aws credentials for SNS; without them boto3's default chain is used.",
    )
    webhook_url: str | None = Field(
        None, description="Generic webhook that receives each escalation as a JSON POST."
    )
    webhook_token: OptionalSecretStr = Field(
        None, description="Bearer token sent to the generic webhook (Authorization header)."
    )
    attempts: int = Field(
        3,
        ge=1,
        le=10,
        description=(
            "Attempts per HTTP channel (generic webhook, custom webhook blocks); only transient "
            "errors are retried: connect errors, timeouts, HTTP 5xx and 429."
        ),
    )
    retry_backoff_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="Base of the exponential backoff between attempts, in seconds (with jitter).",
    )
    timeout_s: float = Field(
        10.0, gt=0, le=120, description="Timeout of every request to a channel, in seconds."
    )

    @field_validator(
        "notification_blocks", "observe_notification_blocks", "ticket_notification_blocks"
    )
    @classmethod
    def _block_refs(cls, refs: list[str]) -> list[str]:
        bad = [ref for ref in refs if not NOTIFICATION_BLOCK_REF.match(ref)]
        if bad:
            raise ValueError(f"expected '<block-type-slug>/<name>', got {bad}")
        return refs

    @field_validator("sns_topic_arn")
    @classmethod
    def _topic_arn(cls, arn: str | None) -> str | None:
        if arn is not None and not re.match(r"^arn:[^:]+:sns:[^:]*:[^:]*:[^:]+$", arn):
            raise ValueError("expected an SNS topic ARN, arn:aws:sns:<region>:<account>:<topic>")
        return arn

    @field_validator("webhook_url", "aws_endpoint_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError("expected an http(s):// URL")
        return url

    def has_channels(self) -> bool:
        return bool(
            self.notification_blocks
            or self.ticket_notification_blocks
            or self.sns_topic_arn
            or self.webhook_url
        )

    def load_notification_block(self, ref: str) -> NotificationBlock:
        """Load one of the notification blocks; TypeError if the block cannot notify."""
        block = Block.load(ref, _sync=True)
        if not isinstance(block, NotificationBlock):
            raise TypeError(f"block {ref!r} is a {type(block).__name__}, not a notification block")
        return block

    def sns_region(self) -> str | None:
        if self.aws_region:
            return self.aws_region
        if self.aws_credentials and self.aws_credentials.region_name:
            return self.aws_credentials.region_name
        if self.sns_topic_arn:
            return self.sns_topic_arn.split(":")[3] or None
        return None

    def get_sns_client(self) -> Any:
        """A boto3 SNS client with timeouts and standard-mode retries (transient errors only)."""
        import boto3

        session = (
            self.aws_credentials.get_boto3_session() if self.aws_credentials else boto3.Session()
        )
        endpoint = self.aws_endpoint_url
        if endpoint is None and self.aws_credentials:
            endpoint = self.aws_credentials.aws_client_parameters.endpoint_url
        config = Config(
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
            retries={"mode": "standard", "max_attempts": self.attempts},
        )
        return session.client(
            "sns", region_name=self.sns_region(), endpoint_url=endpoint, config=config
        )
