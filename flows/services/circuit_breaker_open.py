"""Service runbook ``circuit-breaker-open``: a Resilience4j circuit breaker of a Spring Boot
service is open (events going to the DLQ, "Circuit breaker opened" in the logs).

Read the service's breakers and their recent events through its actuator, name the failing
dependency (breaker, failure rate against its threshold, the errors that opened it, grouped),
check the dependency's own health endpoint where one is configured, then wait, bounded, for the
breaker to recover by itself: OPEN -> HALF_OPEN (trial calls) -> CLOSED. Closed: resolved, with
the transitions it went through. Still open at the deadline, back to OPEN after its trial calls,
or forced open: escalated with the evidence. It changes nothing: the breaker is doing its job,
and the fix is the dependency's.
"""

import time
from datetime import datetime

from prefect import flow
from pydantic import BaseModel, Field

from runbooks.errors import Escalation
from runbooks.params import OptionalServiceName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from tasks.circuit_breakers import (
    ActuatorUnavailable,
    read_breaker_events,
    read_circuit_breakers,
)
from tasks.circuit_breakers_decisions import (
    TRIPPED,
    Breaker,
    BreakerEvent,
    BreakerState,
    ErrorGroup,
    WatchVerdict,
    count_reopens,
    group_errors,
    transitions,
    watch_verdict,
)
from tasks.health_endpoints import HealthEndpoint, ServiceHealth, probe_endpoint
from tasks.http_probe import HealthUrl

RUNBOOK = "circuit-breaker-open"


class CircuitBreakerOpenParams(RunbookParams):
    """Parameters of the circuit-breaker-open runbook."""

    actuator_url: HealthUrl = Field(
        description="The service's actuator base URL, e.g. http://orders:8082/actuator (its "
        "circuitbreakers and circuitbreakerevents endpoints are read)."
    )
    breaker: OptionalServiceName = Field(
        None,
        description="The circuit breaker (the alert's name label); empty: every breaker that "
        "is not CLOSED.",
    )
    dependency_health: dict[str, HealthEndpoint] = Field(
        default_factory=dict,
        description="Breaker name -> the health endpoint of the dependency it guards (plain, "
        "actuator or go style), checked before and after the wait.",
    )
    wait_timeout_s: float = Field(
        300,
        gt=0,
        le=3600,
        description="How long to wait for the breaker to close again (OPEN -> HALF_OPEN -> "
        "CLOSED), in seconds; give it at least waitDurationInOpenState plus the trial calls.",
    )
    poll_interval_s: float = Field(
        5, gt=0, le=60, description="Pause between looks at the breaker while waiting."
    )
    tolerated_reopens: int = Field(
        0,
        ge=0,
        le=20,
        description="HALF_OPEN -> OPEN transitions (failed trial calls) to sit through before "
        "escalating; 0: the first failed trial escalates.",
    )
    http_timeout_s: float = Field(
        5, gt=0, le=60, description="Timeout of each call to the actuator."
    )
    error_groups: int = Field(
        5, ge=1, le=50, description="Distinct error messages shown per breaker."
    )


class BreakerWatch(BaseModel):
    """One tripped breaker: what opened it and what it did while the run watched."""

    breaker: Breaker
    errors: list[ErrorGroup] = Field(
        default_factory=list, description="Its recent ERROR events, grouped by message."
    )
    opened_at: datetime | None = Field(None, description="Its last CLOSED_TO_OPEN, if buffered.")
    known_until: datetime | None = Field(
        None, description="Its last transition the diagnosis saw (the service's clock)."
    )
    dependency_before: ServiceHealth | None = None
    dependency_after: ServiceHealth | None = None
    states_seen: list[BreakerState] = Field(default_factory=list)
    transitions: list[str] = Field(default_factory=list, description="Seen while watching.")
    verdict: WatchVerdict = WatchVerdict.WAITING
    last: Breaker | None = None
    unreadable: str | None = Field(None, description="Why the last look failed, if it did.")

    def path(self) -> str:
        """The states it went through: from its transition events where the actuator kept
        them (a poll misses a HALF_OPEN that lasts a moment), else from the polls."""
        if self.transitions:
            states = [self.breaker.state.value] + [t.rsplit("_TO_", 1)[1] for t in self.transitions]
        else:
            states = [s.value for s in self.states_seen]
        return " -> ".join(states)


class CircuitBreakerOpenResult(BaseModel):
    outcome: Outcome
    breakers: list[Breaker] = Field(description="Every breaker of the service, as first read.")
    watched: list[BreakerWatch] = Field(default_factory=list)
    waited_s: float = 0
    report: str


@flow(
    name=RUNBOOK,
    description="Circuit breaker open: read the service's Resilience4j breakers and events "
    "through its actuator, name the failing dependency and its errors, check the dependency's "
    "health, wait (bounded) for OPEN -> HALF_OPEN -> CLOSED; escalate what stays or goes back "
    "open, with the evidence. Changes nothing.",
)
@ends_as_reported
def circuit_breaker_open(params: CircuitBreakerOpenParams) -> CircuitBreakerOpenResult:
    with incident_report(
        runbook=RUNBOOK, title="Circuit breaker open", severity="P2", params=params
    ) as report:
        breakers = _read_or_escalate(report, params)
        report.evidence("circuit breakers", [b.model_dump(mode="json") for b in breakers])
        watched = _pick(report, params, breakers)
        if not watched:
            shown = [b for b in breakers if b.name == params.breaker] or breakers
            report.finish(
                Outcome.NO_ACTION_NEEDED,
                f"No breaker open at {params.actuator_url}: calls go through, nothing to wait "
                "for (" + "; ".join(b.describe() for b in shown) + ").",
            )
            return CircuitBreakerOpenResult(
                outcome=report.outcome, breakers=breakers, report=report.to_markdown()
            )
        for w in watched:
            _diagnose(report, params, w)
        forced = [w for w in watched if w.breaker.state is BreakerState.FORCED_OPEN]
        if forced:
            for w in forced:
                w.verdict = WatchVerdict.FORCED
            _escalate(report, params, forced, 0.0)
        waited = _watch(report, params, watched)
        _conclude(report, params, watched, waited)
    return CircuitBreakerOpenResult(
        outcome=report.outcome or Outcome.FAILED,
        breakers=breakers,
        watched=watched,
        waited_s=waited,
        report=report.to_markdown(),
    )


def _read_or_escalate(report: IncidentReport, params: CircuitBreakerOpenParams) -> list[Breaker]:
    try:
        breakers = read_circuit_breakers(params.actuator_url, params.http_timeout_s)
    except ActuatorUnavailable as exc:
        report.check("actuator answers", False, str(exc))
        report.follow_ups += [
            "Check the service itself answers (its health endpoint, its pods or containers): "
            "an unreachable actuator often means the service is down (service-not-responding)",
            "Check management.endpoints.web.exposure.include lists circuitbreakers and "
            "circuitbreakerevents, and the management port and base path in actuator_url",
        ]
        raise Escalation(
            f"the breakers could not be read: {exc}. Without them the failing dependency is "
            "unknown; nothing was changed"
        ) from exc
    report.check(
        "actuator answers",
        True,
        f"{len(breakers)} breaker(s): " + ", ".join(f"{b.name} {b.state.value}" for b in breakers),
    )
    return breakers


def _pick(
    report: IncidentReport, params: CircuitBreakerOpenParams, breakers: list[Breaker]
) -> list[BreakerWatch]:
    if params.breaker:
        named = [b for b in breakers if b.name == params.breaker]
        if not named:
            raise Escalation(
                f"the service at {params.actuator_url} has no circuit breaker named "
                f"{params.breaker!r} (it has: {', '.join(b.name for b in breakers) or 'none'}); "
                "check the alert's name label"
            )
        candidates = named
    else:
        candidates = breakers
    for b in candidates:
        report.check(f"breaker {b.name} closed", b.state not in TRIPPED, b.describe())
    return [
        BreakerWatch(breaker=b, states_seen=[b.state]) for b in candidates if b.state in TRIPPED
    ]


def _events(params: CircuitBreakerOpenParams, name: str) -> list[BreakerEvent]:
    return read_breaker_events(params.actuator_url, name, params.http_timeout_s)


def _diagnose(report: IncidentReport, params: CircuitBreakerOpenParams, w: BreakerWatch) -> None:
    """What opened the breaker: its numbers, its errors, its dependency's health."""
    name, b = w.breaker.name, w.breaker
    crossed = b.tripped_by()
    report.step(
        f"{name} is {b.state.value}"
        + (f": its {crossed} reached the threshold" if crossed else "")
        + f" ({b.describe()})"
    )
    try:
        events = _events(params, name)
    except ActuatorUnavailable as exc:
        report.step(f"events of {name} not read: {exc}")
        events = []
    w.errors = group_errors(events, params.error_groups)
    moves = transitions(events)
    opened = [e for e in moves if e.state_transition.endswith("_TO_OPEN")]
    w.opened_at = opened[-1].created_at if opened else None
    w.known_until = moves[-1].created_at if moves else None
    if w.opened_at:
        report.step(f"{name} opened at {w.opened_at.isoformat(timespec='seconds')}")
    if w.errors:
        report.step(
            f"{name}: the dependency's errors, most frequent first: "
            + "; ".join(g.describe() for g in w.errors)
        )
    else:
        report.step(f"{name}: no ERROR event in the actuator's buffer (slow calls, or rotated out)")
    report.evidence(f"{name}: errors grouped", [g.model_dump(mode="json") for g in w.errors])
    report.evidence(
        f"{name}: state transitions buffered",
        [f"{_when(e.created_at)} {e.state_transition}" for e in transitions(events)],
    )
    endpoint = params.dependency_health.get(name)
    if endpoint:
        w.dependency_before = probe_endpoint(endpoint)
        report.check(
            f"dependency of {name} healthy ({endpoint.service})",
            w.dependency_before.up,
            w.dependency_before.describe(),
        )


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="milliseconds") if at else "an unknown time"


def _watch(
    report: IncidentReport, params: CircuitBreakerOpenParams, watched: list[BreakerWatch]
) -> float:
    """Poll the breakers until each closed, one fails its verdict, or the deadline; seconds."""
    started = time.monotonic()
    report.step(
        f"waiting up to {params.wait_timeout_s:.0f}s for "
        + ", ".join(w.breaker.name for w in watched)
        + " to go OPEN -> HALF_OPEN -> CLOSED (nothing is changed meanwhile)"
    )
    unreadable: str | None = None
    while True:
        out_of_time = time.monotonic() - started >= params.wait_timeout_s
        try:
            now = {
                b.name: b for b in read_circuit_breakers(params.actuator_url, params.http_timeout_s)
            }
            unreadable = None
        except ActuatorUnavailable as exc:
            if unreadable is None:
                report.step(f"breakers not readable while waiting: {exc}")
            unreadable = str(exc)
            now = {}
        for w in watched:
            if w.verdict is not WatchVerdict.WAITING:
                continue
            current = now.get(w.breaker.name)
            if current is None:
                w.unreadable = unreadable or "the breaker is gone from /actuator/circuitbreakers"
                w.verdict = WatchVerdict.STILL_OPEN if out_of_time else WatchVerdict.WAITING
                continue
            w.last, w.unreadable = current, None
            if current.state is not w.states_seen[-1]:
                report.step(f"{current.name}: {w.states_seen[-1].value} -> {current.describe()}")
                w.states_seen.append(current.state)
            try:
                moves = transitions(_events(params, current.name), w.known_until)
            except ActuatorUnavailable:
                moves = []
            if moves:  # the buffer may have rotated them out since: keep what was seen
                for e in moves[len(w.transitions) :]:
                    report.step(f"{current.name}: {e.state_transition} at {_when(e.created_at)}")
                w.transitions = [e.state_transition for e in moves]
            w.verdict = watch_verdict(
                current.state,
                count_reopens(w.states_seen, moves),
                params.tolerated_reopens,
                out_of_time,
            )
        if all(w.verdict is not WatchVerdict.WAITING for w in watched):
            break
        if any(w.verdict in (WatchVerdict.REOPENED, WatchVerdict.FORCED) for w in watched):
            break
        left = params.wait_timeout_s - (time.monotonic() - started)
        time.sleep(max(0.0, min(params.poll_interval_s, left)))
    if unreadable:
        report.step(f"the actuator stopped answering while waiting: {unreadable}")
    return time.monotonic() - started


def _conclude(
    report: IncidentReport,
    params: CircuitBreakerOpenParams,
    watched: list[BreakerWatch],
    waited: float,
) -> None:
    for w in watched:
        report.evidence(f"{w.breaker.name}: transitions while waiting", w.transitions)
        report.check(
            f"breaker {w.breaker.name} closed again",
            w.verdict is WatchVerdict.CLOSED,
            f"{w.verdict.value} after {waited:.0f}s: {w.path()}"
            + (f"; now {w.last.describe()}" if w.last else ""),
        )
    if any(w.verdict is not WatchVerdict.CLOSED for w in watched):
        _escalate(report, params, watched, waited)
    report.follow_ups += [
        "Find why the dependency failed (the errors above) before it happens again: its logs, "
        "deployments and resources at the time the breaker opened",
        "Replay or reprocess what the service sent to its DLQ while the breaker was open",
    ]
    report.finish(
        Outcome.RESOLVED,
        "; ".join(
            f"{w.breaker.name} closed again after {waited:.0f}s ({w.path()}"
            + (f"; transitions {', '.join(w.transitions)}" if w.transitions else "")
            + ")"
            for w in watched
        )
        + ". The dependency answers the breaker's trial calls again; nothing was changed.",
    )


def _escalate(
    report: IncidentReport,
    params: CircuitBreakerOpenParams,
    watched: list[BreakerWatch],
    waited: float,
) -> None:
    stuck = [w for w in watched if w.verdict is not WatchVerdict.CLOSED]
    parts = []
    for w in stuck:
        endpoint = params.dependency_health.get(w.breaker.name)
        if endpoint:
            w.dependency_after = probe_endpoint(endpoint)
            report.check(
                f"dependency of {w.breaker.name} healthy after the wait ({endpoint.service})",
                w.dependency_after.up,
                w.dependency_after.describe(),
            )
        why = {
            WatchVerdict.FORCED: "was forced open (FORCED_OPEN): it stays open until someone "
            "transitions it back through the actuator",
            WatchVerdict.REOPENED: "went back to OPEN: its HALF_OPEN trial calls failed again",
            WatchVerdict.STILL_OPEN: f"is still {(w.last or w.breaker).state.value} after "
            f"{waited:.0f}s",
        }.get(w.verdict, f"is {w.verdict.value}")
        text = f"{w.breaker.name} {why} ({w.path()})"
        if w.unreadable:
            text += f"; its state could not be read at the end: {w.unreadable}"
        if w.errors:
            text += f"; errors: {'; '.join(g.describe() for g in w.errors[:3])}"
        dependency = w.dependency_after or w.dependency_before
        if dependency:
            text += f"; dependency {dependency.describe()}"
        parts.append(text)
    report.follow_ups += [
        "Fix the dependency the breaker guards (the errors above name it): the breaker closes "
        "by itself once its trial calls succeed",
        "If the dependency is healthy but the breaker stays open, compare the breaker's "
        "threshold and the errors it records (recordExceptions / ignoreExceptions)",
    ]
    raise Escalation(" | ".join(parts) + ". Nothing was changed")
