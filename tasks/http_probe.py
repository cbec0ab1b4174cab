"""HTTP health checks: does the service's health endpoint answer (seed 002 "health check fails")."""

from __future__ import annotations

import time
from typing import Annotated

import httpx
from prefect import task
from pydantic import AfterValidator, BaseModel, Field

from runbooks.retry import runbook_task_options


def _http_url(value: str) -> str:
    # a URL may come from an alert label (blackbox exporter's `instance`): only http(s) is
    # probed, never file:// or another scheme httpx or a proxy could make something else of
    url = httpx.URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value[:80]!r} is not an http(s) URL with a host")
    if url.userinfo:
        # reports, events and logs show the URL: a password in it would be shown too
        raise ValueError("a health URL must not carry credentials (user:password@)")
    return value


HealthUrl = Annotated[str, AfterValidator(_http_url)]


class HealthProbe(BaseModel):
    """One request to a health endpoint."""

    url: str
    ok: bool = Field(description="Answered with a 2xx status within the timeout.")
    status: int | None = Field(None, description="HTTP status, None when nothing answered.")
    latency_ms: float | None = None
    error: str | None = Field(None, description="Why nothing (or no 2xx) came back.")

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status} in {self.latency_ms:.0f} ms"
        return self.error or "no answer"


def health_verdict(status: int | None, error: str | None) -> bool:
    """2xx is healthy; a 3xx is not followed (a health endpoint answers itself), the rest fail."""
    return error is None and status is not None and 200 <= status < 300


# a failed probe is the finding, not an error: never retried
@task(**runbook_task_options())
def probe_health(url: str, timeout_s: float = 5.0) -> HealthProbe:
    """GET ``url`` once with a timeout; what came back (or why nothing did)."""
    started = time.monotonic()
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        return HealthProbe(url=url, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    latency = (time.monotonic() - started) * 1000
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return HealthProbe(
        url=url,
        ok=health_verdict(response.status_code, error),
        status=response.status_code,
        latency_ms=latency,
        error=error,
    )
