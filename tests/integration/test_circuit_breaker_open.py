"""circuit-breaker-open against a real service with a real breaker over a real dependency.

The service (tests/programs/actuator_service.py) calls its dependency every 0.2 s through a
Resilience4j-like breaker (open at 50% failures over 5+ calls, 5 s in OPEN, 3 trial calls in
HALF_OPEN) and serves the actuator's circuitbreakers, circuitbreakerevents and health endpoints.
The dependency is an HTTP server the test stops and starts on its port.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from flows.services.circuit_breaker_open import (
    CircuitBreakerOpenParams,
    CircuitBreakerOpenResult,
    circuit_breaker_open,
)
from runbooks.report import Outcome
from tasks.circuit_breakers_decisions import BreakerState, WatchVerdict
from tests.actuator_app import ActuatorService, HttpService, text_handler
from tests.conftest import read_incident_report
from tests.servers import free_port

pytestmark = pytest.mark.integration

REFUSED = "java.net.ConnectException: Connection refused"


@pytest.fixture
def dependency() -> Iterator[HttpService]:
    """The dependency, down: the test starts it when the dependency recovers."""
    service = HttpService()
    yield service
    service.stop()


@pytest.fixture
def tripped(dependency: HttpService) -> Iterator[ActuatorService]:
    """The service, its breaker just opened because the dependency does not answer."""
    app = ActuatorService(
        dependency_url=f"{dependency.url}/health", extra=["--idle-breaker", "pricing"]
    ).start()
    app.wait_for_state("OPEN")
    yield app
    app.stop()


def params(app: ActuatorService, dependency: HttpService, **overrides) -> CircuitBreakerOpenParams:
    fields = {
        "actuator_url": app.actuator_url,
        "breaker": "inventory",
        "dependency_health": {
            "inventory": {"service": "inventory-api", "url": f"{dependency.url}/health"}
        },
        "wait_timeout_s": 20,
        "poll_interval_s": 0.5,
        "http_timeout_s": 2,
    }
    return CircuitBreakerOpenParams(**(fields | overrides))


def test_breaker_closes_in_time_when_the_dependency_recovers(
    tripped: ActuatorService, dependency: HttpService
) -> None:
    # the breaker stays OPEN for 5 s whatever the dependency does: the run sees it open, and
    # its trial calls in HALF_OPEN find the dependency back
    dependency.start()
    started = time.monotonic()
    state = circuit_breaker_open(params=params(tripped, dependency), return_state=True)
    took = time.monotonic() - started

    assert state.is_completed(), state.message
    result: CircuitBreakerOpenResult = state.result()
    assert result.outcome is Outcome.RESOLVED
    (watch,) = result.watched
    assert watch.breaker.name == "inventory" and watch.breaker.state is BreakerState.OPEN
    assert watch.breaker.failure_rate == 100.0 and watch.breaker.failure_rate_threshold == 50.0
    assert watch.errors[0].message == REFUSED and watch.errors[0].count >= 5
    assert watch.dependency_before is not None and watch.dependency_before.up
    assert watch.verdict is WatchVerdict.CLOSED and watch.last.state is BreakerState.CLOSED
    assert watch.transitions == ["OPEN_TO_HALF_OPEN", "HALF_OPEN_TO_CLOSED"]
    assert watch.path() == "OPEN -> HALF_OPEN -> CLOSED"
    assert took < 15
    assert tripped.breaker()["state"] == "CLOSED"  # the world agrees

    report = read_incident_report(state.state_details.flow_run_id)
    assert "RESOLVED" in report
    assert "inventory closed again" in report
    assert "OPEN_TO_HALF_OPEN, HALF_OPEN_TO_CLOSED" in report
    assert "inventory: OPEN_TO_HALF_OPEN at " in report  # in the timeline, as it happened
    assert "failure rate 100% (threshold 50%)" in report
    assert REFUSED in report


def test_breaker_that_reopens_is_escalated_with_the_evidence(
    tripped: ActuatorService, dependency: HttpService
) -> None:
    # the dependency stays down: the trial calls fail and the breaker goes back to OPEN
    state = circuit_breaker_open(params=params(tripped, dependency), return_state=True)

    assert state.is_failed()
    message = state.message
    assert (
        "inventory went back to OPEN: its HALF_OPEN trial calls failed again "
        "(OPEN -> HALF_OPEN -> OPEN)" in message
    )
    assert REFUSED in message
    assert "dependency inventory-api down (no answer: ConnectError" in message
    assert "Nothing was changed" in message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "ESCALATED" in report
    assert "HALF_OPEN_TO_OPEN" in report
    assert "dependency of inventory healthy (inventory-api)" in report
    assert tripped.breaker()["state"] in ("OPEN", "HALF_OPEN")  # nobody forced it closed


def test_breaker_still_open_at_the_deadline_is_escalated(
    tripped: ActuatorService, dependency: HttpService
) -> None:
    p = params(tripped, dependency, wait_timeout_s=1.5, dependency_health={})
    state = circuit_breaker_open(params=p, return_state=True)

    assert state.is_failed()
    assert "inventory is still OPEN after 2s (OPEN)" in state.message
    assert REFUSED in state.message


def test_actuator_that_dies_while_waiting_is_escalated(
    tripped: ActuatorService, dependency: HttpService
) -> None:
    # the runbook probes the dependency's health after reading the breaker and its events: the
    # service is killed right then, so the wait finds nothing to read
    probed = threading.Event()
    base = text_handler(503, "unhealthy")

    class Probe(base):
        def do_GET(self) -> None:  # noqa: N802
            probed.set()
            super().do_GET()

    health = HttpService(handler=Probe).start()

    def kill_when_probed() -> None:
        if probed.wait(30):
            tripped.stop()

    threading.Thread(target=kill_when_probed, daemon=True).start()
    p = params(
        tripped,
        dependency,
        wait_timeout_s=2,
        dependency_health={"inventory": {"service": "inventory-api", "url": health.url}},
    )
    try:
        state = circuit_breaker_open(params=p, return_state=True)
    finally:
        health.stop()

    assert probed.is_set()
    assert state.is_failed()
    assert "inventory is still OPEN after 2s" in state.message
    assert "its state could not be read at the end" in state.message
    assert "ConnectError" in state.message
    assert "dependency inventory-api down (HTTP 503" in state.message


def test_all_tripped_breakers_are_found_without_a_name(
    tripped: ActuatorService, dependency: HttpService
) -> None:
    p = params(tripped, dependency, breaker=None, wait_timeout_s=1, dependency_health={})
    state = circuit_breaker_open(params=p, return_state=True)

    assert state.is_failed()
    assert "inventory is still OPEN" in state.message and "pricing" not in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "breaker pricing closed" in report and "breaker inventory closed" in report


def test_forced_open_breaker_is_escalated_at_once(dependency: HttpService) -> None:
    dependency.start()  # healthy: only a person's transition closes a forced breaker
    app = ActuatorService(
        dependency_url=f"{dependency.url}/health", extra=["--forced-open"]
    ).start()
    try:
        started = time.monotonic()
        state = circuit_breaker_open(params=params(app, dependency), return_state=True)
        took = time.monotonic() - started
        assert app.breaker()["state"] == "FORCED_OPEN"  # left as it was
    finally:
        app.stop()
    assert state.is_failed()
    assert "inventory was forced open (FORCED_OPEN)" in state.message
    assert "dependency inventory-api up (HTTP 200" in state.message
    assert took < 10  # no wait for a recovery that cannot come


def test_closed_breaker_needs_nothing(dependency: HttpService) -> None:
    dependency.start()
    app = ActuatorService(dependency_url=f"{dependency.url}/health").start()
    try:
        state = circuit_breaker_open(params=params(app, dependency), return_state=True)
    finally:
        app.stop()
    assert state.is_completed(), state.message
    result: CircuitBreakerOpenResult = state.result()
    assert result.outcome is Outcome.NO_ACTION_NEEDED
    assert not result.watched
    assert "No breaker open at" in result.report and "inventory CLOSED" in result.report


def test_unknown_breaker_name_is_escalated(
    tripped: ActuatorService, dependency: HttpService
) -> None:
    state = circuit_breaker_open(
        params=params(tripped, dependency, breaker="payments"), return_state=True
    )
    assert state.is_failed()
    assert "no circuit breaker named 'payments' (it has: inventory, pricing)" in state.message


def test_unreachable_actuator_is_escalated(dependency: HttpService) -> None:
    nothing = f"http://127.0.0.1:{free_port()}/actuator"
    state = circuit_breaker_open(
        params=CircuitBreakerOpenParams(actuator_url=nothing, breaker="inventory"),
        return_state=True,
    )
    assert state.is_failed()
    assert "the breakers could not be read" in state.message
    assert "ConnectError" in state.message and nothing in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "actuator answers" in report and "service-not-responding" in report


def test_actuator_without_the_endpoint_is_escalated(dependency: HttpService) -> None:
    dependency.start()  # any path answers 200 "ok": not the Resilience4j JSON
    state = circuit_breaker_open(
        params=CircuitBreakerOpenParams(actuator_url=dependency.url, breaker="inventory"),
        return_state=True,
    )
    assert state.is_failed()
    assert "the answer is not JSON" in state.message
