"""The service health sweep's "decide" (seed 002 OODA): one situation from every service's
signals, by a fixed precedence."""

from __future__ import annotations

import pytest

from tasks.health_endpoints_decisions import HealthStyle, ServiceHealth
from tasks.prometheus import Sample
from tasks.sweep_decisions import (
    Instances,
    Problem,
    ServiceSignals,
    Situation,
    Thresholds,
    actuator_base,
    decide,
    handoff_blocked,
    instances_verdict,
    open_breakers,
    values_by_service,
)
from tasks.workloads import Instance, WorkloadStatus

T = Thresholds(error_rate=0.05, p99_s=2.0)
UP, DOWN = "up", "down"


def svc(
    name: str,
    health: str = UP,
    *,
    breakers: tuple[str, ...] = (),
    errors: float | None = None,
    p99: float | None = None,
    instances: Instances | None = None,
) -> ServiceSignals:
    return ServiceSignals(
        service=name,
        url=f"http://{name}:8080/actuator/health",
        up=health == UP,
        health=f"{name} {health}",
        open_breakers=list(breakers),
        error_rate=errors,
        p99_s=p99,
        instances=instances,
    )


# (case, services, situation, services named, severity, problems left for later)
CASES = [
    ("nothing wrong", [svc("a"), svc("b")], Situation.HEALTHY, [], "P4", []),
    ("no metrics is not a problem", [svc("a", errors=None, p99=None)], Situation.HEALTHY, [], "P4", []),
    ("every service down", [svc("a", DOWN), svc("b", DOWN), svc("c", DOWN)],
     Situation.ALL_DOWN, ["a", "b", "c"], "P1", []),
    ("the only service down is one service down, not all", [svc("a", DOWN)],
     Situation.SOME_DOWN, ["a"], "P2", []),
    ("one of two down", [svc("a", DOWN), svc("b")], Situation.SOME_DOWN, ["a"], "P2", []),
    ("two of three down", [svc("a", DOWN), svc("b"), svc("c", DOWN)],
     Situation.SOME_DOWN, ["a", "c"], "P2", []),
    ("down before everything else", [svc("a", DOWN), svc("b", breakers=("x",), errors=0.5, p99=9)],
     Situation.SOME_DOWN, ["a"], "P2",
     ["b: circuit breaker open", "b: error spike", "b: high latency"]),
    ("a down service's metrics say nothing more", [svc("a", DOWN, errors=1.0, p99=30), svc("b")],
     Situation.SOME_DOWN, ["a"], "P2", []),
    ("breaker open", [svc("a", breakers=("inventory",)), svc("b")],
     Situation.CIRCUIT_OPEN, ["a"], "P2", []),
    ("an open breaker explains the errors", [svc("a", breakers=("x",), errors=0.5), svc("b", errors=0.2)],
     Situation.CIRCUIT_OPEN, ["a"], "P2", ["a: error spike", "b: error spike"]),
    ("error spike", [svc("a", errors=0.06), svc("b", errors=0.01)],
     Situation.ERROR_SPIKE, ["a"], "P2", []),
    ("errors at the threshold are not a spike", [svc("a", errors=0.05)], Situation.HEALTHY, [], "P4", []),
    ("errors before latency", [svc("a", p99=3.0), svc("b", errors=0.1, p99=5.0)],
     Situation.ERROR_SPIKE, ["b"], "P2", ["a: high latency", "b: high latency"]),
    ("high latency", [svc("a", p99=2.5), svc("b", p99=0.3)], Situation.HIGH_LATENCY, ["a"], "P3", []),
    ("latency at the threshold is fine", [svc("a", p99=2.0)], Situation.HEALTHY, [], "P4", []),
    # the platform's view of the instances: health decides whether a service is up
    ("down while every instance runs is still down (hung)",
     [svc("a", DOWN, instances=Instances.RUNNING), svc("b", instances=Instances.RUNNING)],
     Situation.SOME_DOWN, ["a"], "P2", []),
    ("down with no instance running is down", [svc("a", DOWN, instances=Instances.NONE_RUNNING), svc("b")],
     Situation.SOME_DOWN, ["a"], "P2", []),
    ("down and crash-looping is down", [svc("a", DOWN, instances=Instances.CRASH_LOOPING), svc("b")],
     Situation.SOME_DOWN, ["a"], "P2", []),
    ("down and unknown to the platform is down", [svc("a", DOWN, instances=Instances.NOT_FOUND), svc("b")],
     Situation.SOME_DOWN, ["a"], "P2", []),
    ("a platform not read changes nothing",
     [svc("a", DOWN, instances=Instances.UNREAD), svc("b", DOWN, instances=Instances.UNREAD)],
     Situation.ALL_DOWN, ["a", "b"], "P1", []),
    ("answering while crash-looping is reported, not acted on",
     [svc("a", instances=Instances.CRASH_LOOPING), svc("b", instances=Instances.RUNNING)],
     Situation.HEALTHY, [], "P4", ["a: answers, but its instances fail on the platform"]),
    ("answering with no instance running is reported",
     [svc("a", instances=Instances.NONE_RUNNING)],
     Situation.HEALTHY, [], "P4", ["a: answers, but its instances fail on the platform"]),
    ("some instances not ready while it answers is no problem",
     [svc("a", instances=Instances.PARTLY)], Situation.HEALTHY, [], "P4", []),
    ("failing instances come after a situation that acts",
     [svc("a", errors=0.5, instances=Instances.CRASH_LOOPING)],
     Situation.ERROR_SPIKE, ["a"], "P2", ["a: answers, but its instances fail on the platform"]),
]


@pytest.mark.parametrize(
    ("case", "services", "situation", "named", "severity", "also"), CASES, ids=[c[0] for c in CASES]
)
def test_decide(
    case: str,
    services: list[ServiceSignals],
    situation: Situation,
    named: list[str],
    severity: str,
    also: list[str],
) -> None:
    decision = decide(services, T)
    assert (decision.situation, decision.services, decision.severity, decision.also) == (
        situation,
        named,
        severity,
        also,
    )


ADVICE = [
    (Situation.ALL_DOWN, "check infrastructure (Docker, network)"),
    (Situation.ERROR_SPIKE, "check application logs for stack traces"),
    (Situation.HIGH_LATENCY, "check database connections, resource usage"),
]


@pytest.mark.parametrize(("situation", "advice"), ADVICE)
def test_the_seeds_advice(situation: Situation, advice: str) -> None:
    services = {
        Situation.ALL_DOWN: [svc("a", DOWN), svc("b", DOWN)],
        Situation.ERROR_SPIKE: [svc("a", errors=0.9)],
        Situation.HIGH_LATENCY: [svc("a", p99=9.0)],
    }[situation]
    assert decide(services, T).advice == advice


def test_every_services_problems_are_kept() -> None:
    decision = decide([svc("a", DOWN), svc("b", p99=3.0), svc("c")], T)
    assert decision.problems == {"a": [Problem.DOWN], "b": [Problem.HIGH_LATENCY], "c": []}


def health(degraded: list[str]) -> ServiceHealth:
    return ServiceHealth(
        service="orders", url="http://x/actuator/health", style=HealthStyle.ACTUATOR, up=True,
        status="UP", degraded_components=degraded,
    )


@pytest.mark.parametrize(
    ("degraded", "breakers"),
    [
        ([], []),
        (["circuitBreakers/inventory CIRCUIT_OPEN"], ["inventory"]),
        (["circuitBreakers/inventory CIRCUIT_HALF_OPEN"], []),  # recovering
        (["circuitBreakers/a CIRCUIT_OPEN", "db/replica WARN", "circuitBreakers/b CIRCUIT_OPEN"], ["a", "b"]),
        (["breaker CIRCUIT_OPEN"], ["breaker"]),
    ],
)
def test_open_breakers(degraded: list[str], breakers: list[str]) -> None:
    assert open_breakers(health(degraded)) == breakers


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://orders:8082/actuator/health", "http://orders:8082/actuator"),
        ("http://orders:8082/actuator/health/", "http://orders:8082/actuator"),
        ("https://o.example/mgmt/actuator/health?x=1", "https://o.example/mgmt/actuator"),
        ("http://orders:8082/health", None),
        ("http://orders:8082/actuator/health/liveness", None),
        ("http://orders:8082/healthz", None),
    ],
)
def test_actuator_base(url: str, base: str | None) -> None:
    assert actuator_base(url) == base


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([], {}),
        ([Sample(labels={"service": "a"}, value=0.1), Sample(labels={"service": "b"}, value=None)],
         {"a": 0.1, "b": None}),
        ([Sample(labels={}, value=0.3)], {}),  # forgot its `by (service)`: matches no service
        ([Sample(labels={"job": "a"}, value=0.3)], {}),
    ],
)
def test_values_by_service(samples: list[Sample], expected: dict[str, float | None]) -> None:
    assert values_by_service(samples, "service") == expected


def inst(state: str, *, running: bool, ready: bool | None = None, restarts: int = 0) -> Instance:
    return Instance(
        id=state, name=f"x-{state}", state=state, running=running, ready=ready, restarts=restarts
    )


def status(*instances: Instance, exists: bool = True, wanted: int | None = None) -> WorkloadStatus:
    return WorkloadStatus(
        platform="docker", service="x", exists=exists, instances=list(instances),
        desired_replicas=wanted,
    )


RUNNING_K8S = inst("Running", running=True, ready=True)
# (case, status, verdict)
INSTANCE_CASES = [
    ("unknown to the platform", status(exists=False), Instances.NOT_FOUND),
    ("every instance running and ready", status(RUNNING_K8S, RUNNING_K8S, wanted=2), Instances.RUNNING),
    ("running without readiness (Docker without a healthcheck)",
     status(inst("running", running=True)), Instances.RUNNING),
    ("supervisord STOPPED", status(inst("STOPPED", running=False, ready=False), wanted=0),
     Instances.NONE_RUNNING),
    ("supervisord EXITED", status(inst("EXITED", running=False, ready=False), wanted=1),
     Instances.NONE_RUNNING),
    ("known but scaled to zero", status(wanted=0), Instances.NONE_RUNNING),
    ("Kubernetes CrashLoopBackOff beside a running pod",
     status(RUNNING_K8S, inst("CrashLoopBackOff", running=False, ready=False, restarts=7), wanted=2),
     Instances.CRASH_LOOPING),
    ("Docker restarting", status(inst("restarting", running=False, restarts=4)), Instances.CRASH_LOOPING),
    ("supervisord BACKOFF", status(inst("BACKOFF", running=False, ready=False)), Instances.CRASH_LOOPING),
    ("exited after restarts", status(inst("exited", running=False, restarts=2)), Instances.CRASH_LOOPING),
    ("running again after restarts is running", status(inst("Running", running=True, ready=True, restarts=3)),
     Instances.RUNNING),
    ("one not ready", status(RUNNING_K8S, inst("Running", running=True, ready=False)), Instances.PARTLY),
    ("fewer running than wanted", status(RUNNING_K8S, wanted=3), Instances.PARTLY),
    ("one of two exited", status(RUNNING_K8S, inst("exited", running=False)), Instances.PARTLY),
]


@pytest.mark.parametrize(
    ("case", "workload", "verdict"), INSTANCE_CASES, ids=[c[0] for c in INSTANCE_CASES]
)
def test_instances_verdict(case: str, workload: WorkloadStatus, verdict: Instances) -> None:
    assert instances_verdict(workload) is verdict


@pytest.mark.parametrize(
    ("instances", "blocked"),
    [
        (None, False),
        (Instances.UNREAD, False),  # not read is not unknown: the runbook handed to reads it
        (Instances.NONE_RUNNING, False),
        (Instances.CRASH_LOOPING, False),
        (Instances.NOT_FOUND, True),
    ],
)
def test_handoff_blocked(instances: Instances | None, blocked: bool) -> None:
    why = handoff_blocked(svc("a", DOWN, instances=instances))
    assert (why is not None) == blocked
    if blocked:
        assert why.startswith("the platform does not know a")
