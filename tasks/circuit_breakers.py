"""Read a Spring Boot service's Resilience4j circuit breakers and their events through its
actuator (``/actuator/circuitbreakers``, ``/actuator/circuitbreakerevents/{name}``)."""

from __future__ import annotations

from urllib.parse import quote

import httpx
from prefect import task

from runbooks.retry import runbook_task_options
from tasks.circuit_breakers_decisions import Breaker, BreakerEvent, parse_breakers, parse_events


class ActuatorUnavailable(RuntimeError):
    """The actuator did not answer, or not with the Resilience4j endpoint's JSON."""


def _get_json(url: str, timeout_s: float) -> object:
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise ActuatorUnavailable(f"{url}: {type(exc).__name__}: {exc}"[:300]) from exc
    if response.status_code == 404:
        raise ActuatorUnavailable(
            f"{url}: HTTP 404 (endpoint not exposed: management.endpoints.web.exposure.include "
            "needs circuitbreakers and circuitbreakerevents)"
        )
    if response.status_code != 200:
        raise ActuatorUnavailable(f"{url}: HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError as exc:
        raise ActuatorUnavailable(f"{url}: the answer is not JSON") from exc


def actuator_base(actuator_url: str) -> str:
    return actuator_url.rstrip("/")


# the caller polls: one attempt each, never retried here
@task(**runbook_task_options())
def read_circuit_breakers(actuator_url: str, timeout_s: float = 5.0) -> list[Breaker]:
    """Every circuit breaker of the service, with its state and sliding-window numbers."""
    url = f"{actuator_base(actuator_url)}/circuitbreakers"
    try:
        return parse_breakers(_get_json(url, timeout_s))
    except ValueError as exc:
        raise ActuatorUnavailable(f"{url}: {exc}") from exc


@task(**runbook_task_options())
def read_breaker_events(
    actuator_url: str, breaker: str, timeout_s: float = 5.0
) -> list[BreakerEvent]:
    """The breaker's recent events (the actuator keeps a bounded buffer), oldest first."""
    url = f"{actuator_base(actuator_url)}/circuitbreakerevents/{quote(breaker, safe='')}"
    try:
        events = parse_events(_get_json(url, timeout_s))
    except ValueError as exc:
        raise ActuatorUnavailable(f"{url}: {exc}") from exc
    return [e for e in events if e.breaker == breaker]
