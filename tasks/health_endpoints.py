"""Probe services' health endpoints (plain, Spring Boot actuator, Go style) side by side.

Example:
    ``probe_endpoints([HealthEndpoint(service="orders", url="http://orders:8082/actuator/health",
    style="actuator")])`` -> ``[ServiceHealth(service="orders", up=False, status="DOWN",
    down_components=["db"], ...)]``
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prefect import task

from runbooks.retry import runbook_task_options
from tasks.health_endpoints_decisions import (
    BODY_CHARS,
    HealthEndpoint,
    HealthStyle,
    ServiceHealth,
    judge_health,
)
from tasks.http_probe import get_health

__all__ = ["HealthEndpoint", "HealthStyle", "ServiceHealth", "probe_endpoint", "probe_endpoints"]


def probe_endpoint(endpoint: HealthEndpoint) -> ServiceHealth:
    """GET one endpoint once, within its timeout, and read the answer in its style."""
    keep = 0 if endpoint.style is HealthStyle.PLAIN else BODY_CHARS
    return judge_health(endpoint, get_health(endpoint.url, endpoint.timeout_s, keep))


# a service that is down is the finding, not an error: never retried
@task(**runbook_task_options())
def probe_endpoints(endpoints: list[HealthEndpoint], parallel: int = 8) -> list[ServiceHealth]:
    """Probe every endpoint, ``parallel`` at a time; results in the order given.

    A sweep takes about as long as its slowest endpoint (each bounded by its own timeout), not
    the sum of them.
    """
    if not endpoints:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(endpoints)))) as pool:
        return list(pool.map(probe_endpoint, endpoints))
