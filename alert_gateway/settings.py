"""Gateway configuration: environment variables prefixed ``RUNBOOKS_GATEWAY_`` (or keyword args)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


def default_prefect_api_url() -> str:
    """Prefect's own ``PREFECT_API_URL`` setting, or the local server's default address.

    Prefect is imported only when the variable is not in the environment: importing it costs
    seconds, and the gateway restarts after a crash should be quick.
    """
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "http://127.0.0.1:4200/api"


class GatewaySettings(BaseSettings):
    """How the alert gateway authenticates, stores and forwards alerts."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_GATEWAY_", extra="ignore")

    token: SecretStr | None = Field(
        None, description="Bearer token alert senders must present (env RUNBOOKS_GATEWAY_TOKEN)."
    )
    token_secret_block: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the token, read at start-up "
        "when `token` is not set.",
    )
    insecure: bool = Field(
        False,
        description="Accept alerts without authentication (explicit opt-in, for local demos).",
    )
    spool_path: Path = Field(
        Path(".runbooks/gateway-spool.sqlite3"),
        description="SQLite file where accepted alerts wait until Prefect has them.",
    )
    cooldown_s: float = Field(
        300.0,
        ge=0,
        le=7 * 86400,
        description="A fingerprint that fired is not forwarded again as firing within this window; "
        "the same alert still firing and re-sent after it is a new event (another run). "
        "0 disables both: nothing is held back and a re-sent alert is always the same event.",
    )
    retention_s: float = Field(
        7 * 86400.0,
        ge=60,
        description="How long delivered events are remembered, so a re-sent resolved alert "
        "(or a firing one within its episode) stays a duplicate (Prefect keeps events 7 days "
        "by default).",
    )
    prefect_api_url: str = Field(
        default_factory=default_prefect_api_url, description="Prefect API the events go to."
    )
    prefect_api_auth_string: SecretStr | None = Field(
        None,
        description="'user:password' when the Prefect server requires basic auth "
        "(its PREFECT_SERVER_API_AUTH_STRING).",
    )
    slack_signing_secret: SecretStr | None = Field(
        None,
        description="Signing secret of the Slack app whose Approve / Reject buttons answer "
        "approval requests (env RUNBOOKS_GATEWAY_SLACK_SIGNING_SECRET); empty: "
        "/slack/interactions answers 404.",
    )
    slack_response_url_prefixes: tuple[str, ...] = Field(
        ("https://hooks.slack.com/",),
        description="Where Slack's response_url may point; the message is updated only there.",
    )
    max_body_bytes: int = Field(MIB, ge=1024, le=64 * MIB, description="Largest accepted request.")
    forward_batch_size: int = Field(
        100, ge=1, le=1000, description="Most events sent to Prefect in one request."
    )
    forward_timeout_s: float = Field(
        10.0, gt=0, le=120, description="Timeout of one delivery request to Prefect."
    )
    backoff_initial_s: float = Field(
        0.2, gt=0, le=60, description="First wait after a failed delivery (doubles each failure)."
    )
    backoff_max_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Longest wait between delivery attempts while Prefect is down.",
    )

    @model_validator(mode="after")
    def _backoff_bounds(self) -> GatewaySettings:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("backoff_initial_s must not exceed backoff_max_s")
        return self


def prefect_auth_headers(settings: GatewaySettings) -> dict[str, str]:
    """Headers for requests to the Prefect API (basic auth when the server requires it)."""
    if settings.prefect_api_auth_string is None:
        return {}
    credentials = settings.prefect_api_auth_string.get_secret_value().encode()
    return {"Authorization": f"Basic {base64.b64encode(credentials).decode()}"}
