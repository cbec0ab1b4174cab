"""What a health endpoint's answer means, by style (pure; tests/unit/test_health_endpoints_decisions.py).

- plain: any 2xx is up.
- actuator (Spring Boot ``/actuator/health``): the JSON ``status`` decides (HTTP 503 with
  ``DOWN`` or ``OUT_OF_SERVICE``); the components that are down are named, with their error.
- go (``/healthz``, ``/health``): 2xx is up; the body ("ok", or a JSON status) is shown briefly.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from runbooks.params import ServiceName
from tasks.http_probe import HealthProbe, HealthUrl

# Spring Boot's statuses that make /actuator/health answer 503 (its default HTTP mapping)
ACTUATOR_DOWN = frozenset({"DOWN", "OUT_OF_SERVICE"})
# statuses that mean "nothing to say", not "something is wrong"
ACTUATOR_FINE = frozenset({"UP", "UNKNOWN"})
BODY_CHARS = 4000  # an actuator health document with details fits; a Go "ok" certainly does
SHOWN_CHARS = 120


class HealthStyle(StrEnum):
    PLAIN = "plain"
    ACTUATOR = "actuator"
    GO = "go"


class HealthEndpoint(BaseModel):
    """One service's health endpoint, as a runbook parameter."""

    service: ServiceName = Field(description="The service the endpoint belongs to.")
    url: HealthUrl = Field(description="The health endpoint (http or https), probed with GET.")
    # fields whose schema is a reference get no title from pydantic; the run form needs one
    style: HealthStyle = Field(
        HealthStyle.PLAIN,
        title="Style",
        description="plain: 2xx is up; actuator: Spring Boot /actuator/health (its JSON status "
        "decides, DOWN components are named); go: /healthz or /health, 2xx is up, body shown.",
    )
    timeout_s: float = Field(5.0, gt=0, le=60, description="A probe that takes longer failed.")


class ServiceHealth(BaseModel):
    """What one service's health endpoint said."""

    service: str
    url: str
    style: HealthStyle
    up: bool
    status: str = Field(
        description="What it said: the actuator's status (UP, DOWN...), a Go body ('ok'), "
        "'HTTP 200', or 'no answer'."
    )
    http_status: int | None = None
    latency_ms: float | None = None
    down_components: list[str] = Field(
        default_factory=list, description="Actuator components DOWN or OUT_OF_SERVICE."
    )
    degraded_components: list[str] = Field(
        default_factory=list,
        description="Actuator components with another status than UP or UNKNOWN (e.g. a "
        "Resilience4j breaker's CIRCUIT_OPEN).",
    )
    detail: str | None = Field(
        None, description="The components' errors, or the start of the body."
    )
    error: str | None = Field(None, description="Why the endpoint did not answer, or not 2xx.")

    def describe(self) -> str:
        said = self.status
        if self.http_status is not None and str(self.http_status) not in said:
            said += f", HTTP {self.http_status}"
        if self.latency_ms is not None:
            said += f", {self.latency_ms:.0f} ms"
        if self.error and self.http_status is None:
            said += f": {self.error}"
        text = f"{self.service} {'up' if self.up else 'down'} ({said})"
        if self.down_components:
            text += f"; components down: {', '.join(self.down_components)}"
        if self.degraded_components:
            text += f"; degraded: {', '.join(self.degraded_components)}"
        if self.detail:
            text += f"; {self.detail}"
        return text


def brief(text: str | None, limit: int = SHOWN_CHARS) -> str:
    """One line of at most ``limit`` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _component_status(node: Any) -> str | None:
    return str(node["status"]) if isinstance(node, dict) and "status" in node else None


def _component_error(node: dict[str, Any]) -> str | None:
    details = node.get("details")
    if isinstance(details, dict):
        for key in ("error", "message", "reason"):
            if details.get(key):
                return brief(str(details[key]), 160)
    return None


def actuator_components(
    document: dict[str, Any], path: str = ""
) -> list[tuple[str, str, str | None]]:
    """Every leaf health component as (path, status, error): ``db``, ``db/primary``.

    Spring Boot 2.2+ nests them under ``components``; 2.0/2.1 under ``details`` (where
    ``details`` of a leaf holds its own data, with no ``status`` inside).
    """
    found: list[tuple[str, str, str | None]] = []
    for key in ("components", "details"):
        children = document.get(key)
        if not isinstance(children, dict):
            continue
        for name, child in children.items():
            status = _component_status(child)
            if status is None:
                continue
            child_path = f"{path}/{name}" if path else str(name)
            nested = actuator_components(child, child_path)
            if nested:
                found += nested
            else:
                found.append((child_path, status, _component_error(child)))
    return found


def read_actuator(probe: HealthProbe) -> dict[str, Any]:
    """ServiceHealth fields from a Spring Boot /actuator/health answer."""
    try:
        document = json.loads(probe.body or "")
    except ValueError:
        document = None
    if not isinstance(document, dict) or "status" not in document:
        return {
            "up": probe.ok,
            "status": f"HTTP {probe.status} (not actuator health JSON)",
            "detail": brief(probe.body) or None,
        }
    status = str(document["status"])
    components = actuator_components(document)
    down = [(p, e) for p, s, e in components if s in ACTUATOR_DOWN]
    errors = [f"{p}: {e}" for p, e in down if e]
    return {
        # 2xx with DOWN only happens with a custom status mapping: the JSON says what is true
        "up": probe.ok and status not in ACTUATOR_DOWN,
        "status": status,
        "down_components": [p for p, _ in down],
        "degraded_components": [
            f"{p} {s}" for p, s, _ in components if s not in ACTUATOR_DOWN | ACTUATOR_FINE
        ],
        "detail": "; ".join(errors) or None,
    }


def read_go(probe: HealthProbe) -> dict[str, Any]:
    """ServiceHealth fields from a Go-style /healthz or /health: 2xx is up, the body is shown."""
    shown = brief(probe.body)
    try:
        document = json.loads(probe.body or "")
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("status"), str):
        shown = document["status"]
    return {"up": probe.ok, "status": shown or f"HTTP {probe.status}", "detail": None}


def judge_health(endpoint: HealthEndpoint, probe: HealthProbe) -> ServiceHealth:
    """The service's health from its endpoint's answer, read in the endpoint's style."""
    base = {
        "service": endpoint.service,
        "url": endpoint.url,
        "style": endpoint.style,
        "http_status": probe.status,
        "latency_ms": probe.latency_ms,
        "error": probe.error,
    }
    if probe.status is None:
        return ServiceHealth(**base, up=False, status="no answer")
    if endpoint.style is HealthStyle.ACTUATOR:
        return ServiceHealth(**base, **read_actuator(probe))
    if endpoint.style is HealthStyle.GO:
        return ServiceHealth(**base, **read_go(probe))
    return ServiceHealth(**base, up=probe.ok, status=f"HTTP {probe.status}")
