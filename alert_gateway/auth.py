"""Bearer-token authentication of alert senders."""

from __future__ import annotations

import hmac
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from alert_gateway.settings import GatewaySettings, prefect_auth_headers


class GatewayConfigError(RuntimeError):
    """The gateway cannot start with this configuration (the message says why)."""


def resolve_token(settings: GatewaySettings) -> SecretStr | None:
    """The token senders must present: from the settings, else from the named Secret block.

    Raises `GatewayConfigError` when there is none and ``insecure`` was not chosen explicitly.
    """
    token = settings.token
    if token is None and settings.token_secret_block:
        token = _read_secret_block(settings)
    if token is not None and not token.get_secret_value():
        raise GatewayConfigError("the gateway token is empty")
    if token is None and not settings.insecure:
        raise GatewayConfigError(
            "no token: set RUNBOOKS_GATEWAY_TOKEN (or RUNBOOKS_GATEWAY_TOKEN_SECRET_BLOCK), "
            "or pass --insecure to accept unauthenticated alerts"
        )
    return token


def _read_secret_block(settings: GatewaySettings) -> SecretStr:
    name = settings.token_secret_block or ""
    url = (
        f"{settings.prefect_api_url.rstrip('/')}/block_types/slug/secret/block_documents/name/"
        f"{quote(name, safe='')}"
    )
    try:
        response = httpx.get(
            url,
            params={"include_secrets": "true"},
            headers=prefect_auth_headers(settings),
            timeout=10,
        )
    except httpx.HTTPError as exc:
        raise GatewayConfigError(f"cannot read Secret block {name!r}: {exc!r}") from exc
    if response.status_code == 404:
        raise GatewayConfigError(f"Secret block {name!r} not found at {settings.prefect_api_url}")
    if not response.is_success:
        raise GatewayConfigError(f"cannot read Secret block {name!r}: HTTP {response.status_code}")
    value = response.json().get("data", {}).get("value")
    if not isinstance(value, str):
        raise GatewayConfigError(f"Secret block {name!r} does not hold a string")
    return SecretStr(value)


def bearer_matches(authorization: str | None, token: SecretStr) -> bool:
    """Whether an ``Authorization`` header carries the token (compared in constant time)."""
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.get_secret_value().encode())
