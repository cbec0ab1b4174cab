"""The OODA "decide" of the service health sweep (seed 002 "Initial Response"): what each
service's health endpoint, metrics and alerts say, and the one situation that decides the
response. Pure; tests/unit/test_sweep_decisions.py.

Precedence, most urgent first (only the first that applies acts; the rest are reported):

1. ALL_DOWN: every service (two or more) is down -> infrastructure (Docker, network), P1;
   no per-service restarts, they would all fail the same way.
2. SOME_DOWN: one or more services down, others up -> that service (its logs, its workload).
   A service that is down explains errors and latency seen elsewhere, so it comes first.
3. CIRCUIT_OPEN: a service is up but one of its circuit breakers is open -> the breaker's
   dependency. An open breaker fails calls fast, so it also explains an error spike.
4. ERROR_SPIKE: a service answers more 5xx than the threshold -> application logs (a bad deploy).
5. HIGH_LATENCY: a service's p99 is over the threshold -> database connections, resource usage.
6. HEALTHY: nothing of the above.

Where the services run (seed 002 "Check container status", when the sweep is given a platform),
each service's instances are one more signal. The health endpoint decides whether a service is
up: one that does not answer is down even while every instance runs and is ready (hung), and the
instances say what kind of down it is (none running, crash-looping, not found) in the evidence
and the hand-off. A service the platform does not know is not handed to a runbook that acts on
its workload. A service that answers while its instances crash-loop, or while none runs, has a
problem no situation acts on: it is reported (``also``) for a person to look at.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from tasks.health_endpoints_decisions import ServiceHealth
from tasks.prometheus import Sample
from tasks.workloads import WorkloadStatus

# the Resilience4j health indicator's status of an open breaker (CIRCUIT_HALF_OPEN is recovering)
BREAKER_OPEN = "CIRCUIT_OPEN"
ACTUATOR_HEALTH_SUFFIX = "/actuator/health"
# the platforms' words for an instance that keeps dying and being started again: Kubernetes'
# waiting reason, Docker's container status, supervisord's retrying-at-start state
CRASH_LOOP_STATES = frozenset({"crashloopbackoff", "restarting", "backoff"})


class Problem(StrEnum):
    """What is wrong with one service."""

    DOWN = "down"
    CIRCUIT_OPEN = "circuit breaker open"
    ERROR_SPIKE = "error spike"
    HIGH_LATENCY = "high latency"
    # no situation of its own: the service answers, so this is reported, not acted on
    INSTANCES_FAILING = "answers, but its instances fail on the platform"


class Instances(StrEnum):
    """What the platform shows of a service's instances, worst first."""

    NOT_FOUND = "not found on the platform"
    CRASH_LOOPING = "crash-looping"
    NONE_RUNNING = "no instance running"
    PARTLY = "not every instance running and ready"
    RUNNING = "every instance running"
    UNREAD = "platform not read"


class Situation(StrEnum):
    ALL_DOWN = "ALL SERVICES DOWN"
    SOME_DOWN = "SERVICE DOWN"
    CIRCUIT_OPEN = "CIRCUIT BREAKER OPEN"
    ERROR_SPIKE = "ERROR SPIKE"
    HIGH_LATENCY = "HIGH LATENCY"
    HEALTHY = "HEALTHY"


# (situation, severity, the seed's advice); seed 002 "Severity Levels" and "Decide"
RESPONSES: dict[Situation, tuple[str, str]] = {
    Situation.ALL_DOWN: ("P1", "check infrastructure (Docker, network)"),
    Situation.SOME_DOWN: ("P2", "check the service's logs and its workload"),
    Situation.CIRCUIT_OPEN: ("P2", "check the dependency the open breaker guards"),
    Situation.ERROR_SPIKE: ("P2", "check application logs for stack traces"),
    Situation.HIGH_LATENCY: ("P3", "check database connections, resource usage"),
    Situation.HEALTHY: ("P4", "nothing to do"),
}

# which service problem makes which situation, in precedence order (ALL_DOWN is DOWN everywhere)
PRECEDENCE: tuple[tuple[Problem, Situation], ...] = (
    (Problem.DOWN, Situation.SOME_DOWN),
    (Problem.CIRCUIT_OPEN, Situation.CIRCUIT_OPEN),
    (Problem.ERROR_SPIKE, Situation.ERROR_SPIKE),
    (Problem.HIGH_LATENCY, Situation.HIGH_LATENCY),
)


class Thresholds(BaseModel):
    error_rate: float = Field(0.05, description="Share of 5xx answers past which errors spike.")
    p99_s: float = Field(2.0, description="p99 latency past which a service is slow, seconds.")


class ServiceSignals(BaseModel):
    """Everything the sweep observed about one service."""

    service: str
    url: str
    up: bool
    health: str = Field(description="What its health endpoint said, in words.")
    open_breakers: list[str] = Field(default_factory=list)
    error_rate: float | None = Field(None, description="5xx share of its requests; None: unknown.")
    p99_s: float | None = Field(None, description="p99 request latency, seconds; None: unknown.")
    alerts: list[str] = Field(default_factory=list, description="Its firing alerts, described.")
    instances: Instances | None = Field(
        None, description="What the platform shows of its instances; None: no platform given."
    )
    instances_seen: str | None = Field(
        None, description="Its instances as the platform shows them, in words."
    )


class Decision(BaseModel):
    situation: Situation
    severity: str
    advice: str
    services: list[str] = Field(description="The services the situation names.")
    problems: dict[str, list[Problem]] = Field(
        description="Every service's problems (empty: healthy), in precedence order."
    )
    also: list[str] = Field(
        default_factory=list, description="Problems of lower precedence, left to a later look."
    )

    def describe(self) -> str:
        if self.situation is Situation.HEALTHY:
            return f"{len(self.problems)} service(s) healthy"
        return f"{self.situation.value}: {', '.join(self.services)} ({self.advice})"


def open_breakers(health: ServiceHealth) -> list[str]:
    """Names of the breakers an actuator health answer shows open, e.g. ``inventory`` from
    ``circuitBreakers/inventory CIRCUIT_OPEN``."""
    found = []
    for component in health.degraded_components:
        path, _, status = component.rpartition(" ")
        if status == BREAKER_OPEN:
            found.append(path.rsplit("/", 1)[-1])
    return found


def actuator_base(url: str) -> str | None:
    """The actuator base URL of a ``.../actuator/health`` endpoint; None for any other URL."""
    path = url.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    if path.endswith(ACTUATOR_HEALTH_SUFFIX):
        return path[: -len("/health")]
    return None


def instances_verdict(status: WorkloadStatus) -> Instances:
    """The platform's view of one service in one word: crash-looping (an instance in a
    crash-loop state, or down after restarts) before none running, before some not running or
    not ready (fewer than wanted, too)."""
    if not status.exists:
        return Instances.NOT_FOUND
    if any(
        i.state.lower() in CRASH_LOOP_STATES or (not i.running and i.restarts > 0)
        for i in status.instances
    ):
        return Instances.CRASH_LOOPING
    if not status.running:
        return Instances.NONE_RUNNING
    wanted = status.desired_replicas
    if any(not i.running or i.ready is False for i in status.instances) or (
        wanted is not None and len(status.running) < wanted
    ):
        return Instances.PARTLY
    return Instances.RUNNING


def handoff_blocked(s: ServiceSignals) -> str | None:
    """Why a runbook acting on the service's workload cannot take it; None: it can."""
    if s.instances is Instances.NOT_FOUND:
        return (
            f"the platform does not know {s.service}: check that the swept service is named as "
            "the platform names it"
        )
    return None


def problems_of(s: ServiceSignals, t: Thresholds) -> list[Problem]:
    """One service's problems in precedence order; a down service is only down (its metrics and
    breakers say nothing more)."""
    if not s.up:
        return [Problem.DOWN]
    found = []
    if s.open_breakers:
        found.append(Problem.CIRCUIT_OPEN)
    if s.error_rate is not None and s.error_rate > t.error_rate:
        found.append(Problem.ERROR_SPIKE)
    if s.p99_s is not None and s.p99_s > t.p99_s:
        found.append(Problem.HIGH_LATENCY)
    if s.instances in (Instances.CRASH_LOOPING, Instances.NONE_RUNNING):
        found.append(Problem.INSTANCES_FAILING)
    return found


def decide(signals: list[ServiceSignals], t: Thresholds) -> Decision:
    """The one situation the sweep responds to (see the module's precedence)."""
    problems = {s.service: problems_of(s, t) for s in signals}
    if len(signals) >= 2 and all(Problem.DOWN in p for p in problems.values()):
        return _decision(Situation.ALL_DOWN, list(problems), problems, set())
    for problem, situation in PRECEDENCE:
        named = [name for name, found in problems.items() if problem in found]
        if named:
            return _decision(situation, named, problems, {problem})
    return _decision(Situation.HEALTHY, [], problems, set())


def _decision(
    situation: Situation,
    services: list[str],
    problems: dict[str, list[Problem]],
    handled: set[Problem],
) -> Decision:
    severity, advice = RESPONSES[situation]
    also = [
        f"{name}: {p.value}"
        for name, found in problems.items()
        for p in found
        if p not in handled and situation is not Situation.ALL_DOWN
    ]
    return Decision(
        situation=situation,
        severity=severity,
        advice=advice,
        services=services,
        problems=problems,
        also=also,
    )


def show_rate(value: float | None) -> str:
    return "no data" if value is None else f"{value * 100:.3g}%"


def show_latency(value: float | None) -> str:
    return "no data" if value is None else f"{value * 1000:.0f} ms"


def values_by_service(samples: list[Sample], label: str) -> dict[str, float | None]:
    """A ``by (service)`` query's samples as service -> value; series without the label (a query
    that forgot its ``by``) match no service."""
    found: dict[str, float | None] = {}
    for sample in samples:
        name = sample.label(label)
        if name and name not in found:
            found[name] = sample.value
    return found
