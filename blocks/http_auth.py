"""HTTP auth and clients shared by the blocks of REST services (Flink, Prometheus, Alertmanager).

Each of those services sits behind either nothing, HTTP basic auth or a bearer token (a reverse
proxy, an ingress); one check and one client builder keep that the same for all of them.
"""

from __future__ import annotations

import httpx
from pydantic import SecretStr


def auth_problem(username: str | None, password: SecretStr | None, token: SecretStr | None) -> str | None:
    """Why these settings are not one usable auth method; None when they are."""
    if (username is None) != (password is None):
        return "basic auth needs both username and password"
    if username is not None and token is not None:
        return "set either basic auth (username/password) or a token, not both"
    return None


def http_client(
    base_url: str,
    *,
    username: str | None,
    password: SecretStr | None,
    token: SecretStr | None,
    timeout_s: float,
    verify_tls: bool = True,
) -> httpx.Client:
    """A client bound to ``base_url`` with the auth, a timeout on every request and no redirects
    (a redirected POST silently turns into a GET)."""
    auth = (
        httpx.BasicAuth(username, password.get_secret_value())
        if username is not None and password is not None
        else None
    )
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    return httpx.Client(
        base_url=base_url.rstrip("/"),
        auth=auth,
        headers=headers,
        timeout=timeout_s,
        verify=verify_tls,
        follow_redirects=False,
    )
