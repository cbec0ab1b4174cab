"""Push providers' public status pages (FCM, APNs), each read once with a timeout."""

from __future__ import annotations

import httpx
from prefect import task
from pydantic import BaseModel, Field

from runbooks.retry import runbook_task_options
from tasks.http_probe import HealthUrl
from tasks.push_decisions import PageState, StatusReading, parse_status_page

MAX_BODY_BYTES = 2_000_000


class StatusPage(BaseModel):
    """A provider's status page: its JSON (Statuspage API, Google incidents.json, Apple's data)."""

    provider: str = Field(description="Provider as the delivery metric labels it, e.g. fcm.")
    url: HealthUrl
    component: str = Field(
        "", description="Product or service to look for on the page (empty: the whole page)."
    )


# an unreachable page is a finding (unknown), not an error: never retried
@task(**runbook_task_options())
def read_status_page(page: StatusPage, timeout_s: float) -> StatusReading:
    """GET the page with a timeout; what it says about the provider, or unknown and why."""

    def reading(state: PageState, detail: str) -> StatusReading:
        return StatusReading(provider=page.provider, url=page.url, state=state, detail=detail)

    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=True, trust_env=False) as client,
            client.stream("GET", page.url) as response,
        ):
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return reading(PageState.UNKNOWN, f"larger than {MAX_BODY_BYTES} bytes")
    except httpx.HTTPError as exc:
        return reading(PageState.UNKNOWN, f"unreachable: {type(exc).__name__}: {exc}"[:300])
    if response.status_code != 200:
        return reading(PageState.UNKNOWN, f"HTTP {response.status_code}")
    state, detail = parse_status_page(body.decode("utf-8", errors="replace"), page.component)
    return reading(state, detail)
