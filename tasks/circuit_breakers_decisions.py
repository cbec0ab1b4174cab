"""Resilience4j circuit breakers as the Spring Boot actuator shows them, and what their recovery
looks like (pure; tests/unit/test_circuit_breakers_decisions.py).

``/actuator/circuitbreakers``: ``{"circuitBreakers": {"<name>": {"failureRate": "100.0%",
"slowCallRate": "0.0%", "failureRateThreshold": "50.0%", "slowCallRateThreshold": "100.0%",
"bufferedCalls": 10, "failedCalls": 10, "slowCalls": 0, "slowFailedCalls": 0,
"notPermittedCalls": 3, "state": "OPEN"}}}`` (rates are ``float + "%"``; ``-1.0%`` until the
sliding window holds its minimum number of calls).

``/actuator/circuitbreakerevents[/<name>]``: ``{"circuitBreakerEvents": [{"circuitBreakerName":
"backendA", "type": "ERROR", "creationTime": "2026-12-01T03:00:00.123+01:00[Europe/Berlin]",
"errorMessage": "java.io.IOException: boom", "durationInMs": 12, "stateTransition": null}]}``;
``stateTransition`` (e.g. ``CLOSED_TO_OPEN``) on STATE_TRANSITION events.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class BreakerState(StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"
    FORCED_OPEN = "FORCED_OPEN"
    DISABLED = "DISABLED"
    METRICS_ONLY = "METRICS_ONLY"
    UNKNOWN = "UNKNOWN"


# calls are refused (or only a few trial calls let through) in these states
TRIPPED = frozenset({BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.FORCED_OPEN})


class Breaker(BaseModel):
    """One circuit breaker as /actuator/circuitbreakers shows it."""

    name: str
    state: BreakerState
    failure_rate: float | None = Field(None, description="Percent; None: too few calls yet.")
    failure_rate_threshold: float | None = None
    slow_call_rate: float | None = None
    slow_call_rate_threshold: float | None = None
    buffered_calls: int = 0
    failed_calls: int = 0
    slow_calls: int = 0
    not_permitted_calls: int = 0

    def describe(self) -> str:
        text = f"{self.name} {self.state.value}"
        if self.failure_rate is not None:
            text += f", failure rate {self.failure_rate:g}%"
            if self.failure_rate_threshold is not None:
                text += f" (threshold {self.failure_rate_threshold:g}%)"
        else:
            text += ", failure rate not computed yet (too few calls)"
        if self.slow_call_rate and self.slow_call_rate > 0:
            text += f", slow calls {self.slow_call_rate:g}%"
            if self.slow_call_rate_threshold is not None:
                text += f" (threshold {self.slow_call_rate_threshold:g}%)"
        return (
            text + f"; {self.failed_calls} of {self.buffered_calls} buffered calls failed, "
            f"{self.not_permitted_calls} refused"
        )

    def tripped_by(self) -> str:
        """Which threshold the numbers show as crossed (what opened it)."""
        crossed = []
        if self.failure_rate is not None and self.failure_rate_threshold is not None:
            if self.failure_rate >= self.failure_rate_threshold:
                crossed.append("failure rate")
        if (
            self.slow_call_rate is not None
            and self.slow_call_rate_threshold is not None
            and self.slow_call_rate >= self.slow_call_rate_threshold
            and self.slow_call_rate > 0
        ):
            crossed.append("slow-call rate")
        return " and ".join(crossed)


class BreakerEvent(BaseModel):
    """One entry of /actuator/circuitbreakerevents."""

    breaker: str
    type: str
    created_at: datetime | None = None
    error_message: str | None = None
    duration_ms: int | None = None
    state_transition: str | None = None


class ErrorGroup(BaseModel):
    """The same error message, counted."""

    message: str
    count: int
    first_at: datetime | None = None
    last_at: datetime | None = None

    def describe(self) -> str:
        when = f", last {self.last_at.isoformat(timespec='seconds')}" if self.last_at else ""
        return f"{self.count}× {self.message}{when}"


def parse_rate(value: Any) -> float | None:
    """``"50.0%"`` -> 50.0; ``"-1.0%"`` (not enough calls yet) -> None; numbers as they are."""
    if value is None:
        return None
    try:
        rate = float(str(value).strip().rstrip("%"))
    except ValueError:
        return None
    return None if rate < 0 else rate


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_state(value: Any) -> BreakerState:
    try:
        return BreakerState(str(value).upper())
    except ValueError:
        return BreakerState.UNKNOWN


def parse_breakers(document: Any) -> list[Breaker]:
    """The breakers of a /actuator/circuitbreakers answer, by name."""
    if not isinstance(document, dict) or not isinstance(document.get("circuitBreakers"), dict):
        raise ValueError("not a Resilience4j /actuator/circuitbreakers answer (no circuitBreakers)")
    return [
        Breaker(
            name=str(name),
            state=parse_state(d.get("state")),
            failure_rate=parse_rate(d.get("failureRate")),
            failure_rate_threshold=parse_rate(d.get("failureRateThreshold")),
            slow_call_rate=parse_rate(d.get("slowCallRate")),
            slow_call_rate_threshold=parse_rate(d.get("slowCallRateThreshold")),
            buffered_calls=_int(d.get("bufferedCalls")),
            failed_calls=_int(d.get("failedCalls")),
            slow_calls=_int(d.get("slowCalls")),
            not_permitted_calls=_int(d.get("notPermittedCalls")),
        )
        for name, d in sorted(document["circuitBreakers"].items())
        if isinstance(d, dict)
    ]


_ZONE_ID = re.compile(r"\[[^\]]*\]$")


def parse_time(value: Any) -> datetime | None:
    """Java's ``ZonedDateTime.toString()`` (``...+01:00[Europe/Berlin]``, ``...Z``) as UTC."""
    if not isinstance(value, str) or not value:
        return None
    text = _ZONE_ID.sub("", value.strip())
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Java prints up to nanoseconds; Python reads microseconds
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def parse_events(document: Any) -> list[BreakerEvent]:
    """The events of a /actuator/circuitbreakerevents answer, oldest first."""
    if not isinstance(document, dict) or not isinstance(document.get("circuitBreakerEvents"), list):
        raise ValueError("not a /actuator/circuitbreakerevents answer (no circuitBreakerEvents)")
    events = [
        BreakerEvent(
            breaker=str(e.get("circuitBreakerName", "")),
            type=str(e.get("type", "")),
            created_at=parse_time(e.get("creationTime")),
            error_message=e.get("errorMessage") or None,
            duration_ms=e.get("durationInMs"),
            state_transition=e.get("stateTransition") or None,
        )
        for e in document["circuitBreakerEvents"]
        if isinstance(e, dict)
    ]
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(events, key=lambda e: e.created_at or epoch)


def group_errors(events: list[BreakerEvent], limit: int = 10) -> list[ErrorGroup]:
    """ERROR events grouped by message, most frequent first (then most recent)."""
    groups: dict[str, ErrorGroup] = {}
    for e in events:
        if e.type != "ERROR":
            continue
        message = " ".join((e.error_message or "(no message)").split())[:300]
        group = groups.setdefault(message, ErrorGroup(message=message, count=0))
        group.count += 1
        if e.created_at:
            group.first_at = min(filter(None, [group.first_at, e.created_at]))
            group.last_at = max(filter(None, [group.last_at, e.created_at]))
    epoch = datetime.min.replace(tzinfo=UTC)
    ordered = sorted(groups.values(), key=lambda g: (g.count, g.last_at or epoch), reverse=True)
    return ordered[:limit]


def transitions(events: list[BreakerEvent], after: datetime | None = None) -> list[BreakerEvent]:
    """The breaker's state transitions (those later than ``after``), oldest first.

    ``after`` is a time of the service's own clock (an event's creationTime), so a skew between
    the service's clock and the runbook's cannot hide a transition or show an old one.
    """
    return [
        e
        for e in events
        if e.type == "STATE_TRANSITION"
        and e.state_transition
        and (after is None or (e.created_at is not None and e.created_at > after))
    ]


class WatchVerdict(StrEnum):
    CLOSED = "closed"
    REOPENED = "reopened"
    FORCED = "forced open"
    WAITING = "waiting"
    STILL_OPEN = "still open"


def watch_verdict(
    state: BreakerState, reopens: int, tolerated_reopens: int, out_of_time: bool
) -> WatchVerdict:
    """What one look at a tripped breaker says about its recovery.

    ``reopens``: HALF_OPEN -> OPEN transitions seen while watching (trial calls failed again: the
    dependency is still broken). FORCED_OPEN never recovers by itself: someone forced it.
    """
    if state in (BreakerState.CLOSED, BreakerState.DISABLED, BreakerState.METRICS_ONLY):
        return WatchVerdict.CLOSED
    if state is BreakerState.FORCED_OPEN:
        return WatchVerdict.FORCED
    if reopens > tolerated_reopens:
        return WatchVerdict.REOPENED
    return WatchVerdict.STILL_OPEN if out_of_time else WatchVerdict.WAITING


def count_reopens(seen: list[BreakerState], events: list[BreakerEvent]) -> int:
    """HALF_OPEN -> OPEN, from the transition events, or from the states polled where the events
    endpoint misses them (its buffer is small and may be full of ERROR events)."""
    from_events = sum(1 for e in events if e.state_transition == "HALF_OPEN_TO_OPEN")
    from_polls = sum(
        1
        for before, after in zip(seen, seen[1:], strict=False)
        if before is BreakerState.HALF_OPEN and after is BreakerState.OPEN
    )
    return max(from_events, from_polls)
