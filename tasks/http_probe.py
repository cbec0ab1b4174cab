"""HTTP health checks: does the service's health endpoint answer (seed 002 "health check fails")."""

from __future__ import annotations

import re
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
    body: str | None = Field(
        None, description="The start of the answer's body, when the caller asked to keep it."
    )
    content_type: str | None = None

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status} in {self.latency_ms:.0f} ms"
        return self.error or "no answer"


def health_verdict(status: int | None, error: str | None) -> bool:
    """2xx is healthy; a 3xx is not followed (a health endpoint answers itself), the rest fail."""
    return error is None and status is not None and 200 <= status < 300


def get_health(url: str, timeout_s: float = 5.0, keep_body_chars: int = 0) -> HealthProbe:
    """GET ``url`` once with a timeout (connect, read and the whole answer); what came back (or
    why nothing did). ``keep_body_chars`` > 0 keeps the start of the body (an actuator's JSON,
    a Go service's "ok"); more than that is never read."""
    started = time.monotonic()
    deadline = started + timeout_s
    body = None
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("GET", url) as response:
                if keep_body_chars:
                    # a body of 4 bytes per character at most; a health endpoint that streams
                    # forever is cut at the cap or the deadline, whichever comes first
                    chunks: list[bytes] = []
                    for chunk in response.iter_bytes():
                        chunks.append(chunk)
                        if sum(map(len, chunks)) >= 4 * keep_body_chars or (
                            time.monotonic() > deadline
                        ):
                            break
                    body = b"".join(chunks).decode("utf-8", "replace")[:keep_body_chars]
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
        body=body,
        content_type=response.headers.get("content-type"),
    )


# a failed probe is the finding, not an error: never retried
@task(**runbook_task_options())
def probe_health(url: str, timeout_s: float = 5.0, keep_body_chars: int = 0) -> HealthProbe:
    """GET ``url`` once with a timeout; what came back (or why nothing did)."""
    return get_health(url, timeout_s, keep_body_chars)


class HeapProfile(BaseModel):
    """A heap profile kept as evidence: Go pprof's text form, or a JVM heap dump's size."""

    url: str
    kind: str = Field(
        description="pprof (Go /debug/pprof/heap?debug=1) or heapdump (JVM actuator)."
    )
    size_bytes: int | None = Field(None, description="Bytes the endpoint sent (up to the cap).")
    truncated: bool = Field(False, description="The cap was reached before the end.")
    in_use_bytes: int | None = Field(None, description="pprof: bytes in use, from its header.")
    text: str | None = Field(None, description="pprof: the start of the profile, as evidence.")
    error: str | None = None


_PPROF_HEADER = re.compile(r"heap profile: \d+: (\d+) \[")


def pprof_in_use(text: str) -> int | None:
    """Bytes in use from a pprof heap profile's first line (``heap profile: 12: 4096 [...``)."""
    match = _PPROF_HEADER.search(text.split("\n", 1)[0])
    return int(match.group(1)) if match else None


@task(**runbook_task_options())
def fetch_heap_profile(
    url: str, kind: str, timeout_s: float = 30.0, max_bytes: int = 1024**3, keep_chars: int = 20_000
) -> HeapProfile:
    """Download a heap profile once (a Go pprof heap profile, or a JVM heap dump, counted only).

    A heap dump can be gigabytes: it is streamed, counted and dropped, never stored; reading stops
    at ``max_bytes``. Failure is evidence too (the endpoint may not be exposed), not an error.
    """
    if kind == "pprof":
        url = str(httpx.URL(url).copy_merge_params({"debug": "1"}))
    size, chunks, truncated = 0, [], False
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    return HeapProfile(url=url, kind=kind, error=f"HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if kind == "pprof" and sum(map(len, chunks)) < keep_chars:
                        chunks.append(chunk)
                    if size >= max_bytes:
                        truncated = True
                        break
    except httpx.HTTPError as exc:
        return HeapProfile(
            url=url, kind=kind, size_bytes=size or None, error=f"{type(exc).__name__}: {exc}"[:300]
        )
    text = b"".join(chunks).decode("utf-8", "replace")[:keep_chars] if kind == "pprof" else None
    return HeapProfile(
        url=url,
        kind=kind,
        size_bytes=size,
        truncated=truncated,
        in_use_bytes=pprof_in_use(text) if text else None,
        text=text,
    )
