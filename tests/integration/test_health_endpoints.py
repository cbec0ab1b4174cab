"""tasks/health_endpoints.py against real HTTP services: a Spring-style actuator (the circuit
breaker test service), Go-style /healthz endpoints, a plain one, a port with nothing behind it,
and services that accept the request and never answer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from prefect import flow

from tasks.health_endpoints import HealthEndpoint, ServiceHealth, probe_endpoints
from tests.actuator_app import ActuatorService, HttpService, silent_service, text_handler
from tests.servers import free_port

pytestmark = pytest.mark.integration


@flow
def sweep(endpoints: list[HealthEndpoint]) -> list[ServiceHealth]:
    """The endpoints as a flow parameter (what a sweep runbook takes), probed in one task."""
    return probe_endpoints(endpoints)


@pytest.fixture
def services() -> Iterator[dict[str, str]]:
    dependency = HttpService().start()
    down_dependency = HttpService()  # never started: refused
    healthy_app = ActuatorService(dependency_url=f"{dependency.url}/health").start()
    broken_app = ActuatorService(dependency_url=f"{down_dependency.url}/health").start()
    go_ok = HttpService(handler=text_handler(200, "ok\n")).start()
    go_json = HttpService(
        handler=text_handler(503, json.dumps({"status": "fail"}), "application/json")
    ).start()
    hung = [silent_service() for _ in range(4)]
    urls = {
        "plain": f"{dependency.url}/health",
        "actuator-up": f"{healthy_app.actuator_url}/health",
        "actuator-down": f"{broken_app.actuator_url}/health",
        "go-ok": f"{go_ok.url}/healthz",
        "go-json": f"{go_json.url}/health",
        "refused": f"http://127.0.0.1:{free_port()}/health",
        **{f"hung-{i}": f"{h.url}/healthz" for i, h in enumerate(hung)},
    }
    broken_app.wait_for_state("OPEN")  # its breaker's component shows up degraded
    yield urls
    for s in [dependency, go_ok, go_json, *hung]:
        s.stop()
    healthy_app.stop()
    broken_app.stop()


def test_sweep_reads_each_style_and_runs_side_by_side(services: dict[str, str]) -> None:
    endpoints = [
        HealthEndpoint(service="inventory", url=services["plain"]),
        HealthEndpoint(service="orders", url=services["actuator-up"], style="actuator"),
        HealthEndpoint(service="payments", url=services["actuator-down"], style="actuator"),
        HealthEndpoint(service="ingest", url=services["go-ok"], style="go"),
        HealthEndpoint(service="notifier", url=services["go-json"], style="go"),
        HealthEndpoint(service="ghost", url=services["refused"], style="go"),
    ] + [
        HealthEndpoint(service=f"stuck-{i}", url=services[f"hung-{i}"], style="go", timeout_s=1)
        for i in range(4)
    ]
    started = time.monotonic()
    found = sweep(endpoints)
    took = time.monotonic() - started

    by = {h.service: h for h in found}
    assert [h.service for h in found] == [e.service for e in endpoints]  # order kept
    assert by["inventory"].up and by["inventory"].status == "HTTP 200"
    assert by["orders"].up and by["orders"].status == "UP" and not by["orders"].down_components
    payments = by["payments"]
    assert not payments.up and payments.status == "DOWN" and payments.http_status == 503
    assert payments.down_components == ["dependency"]
    assert payments.degraded_components == ["circuitBreakers/inventory CIRCUIT_OPEN"]
    assert payments.detail == "dependency: java.net.ConnectException: Connection refused"
    assert by["ingest"].up and by["ingest"].status == "ok"
    assert not by["notifier"].up and by["notifier"].status == "fail"
    ghost = by["ghost"]
    assert not ghost.up and ghost.status == "no answer" and "ConnectError" in ghost.error
    for i in range(4):
        stuck = by[f"stuck-{i}"]
        assert not stuck.up and stuck.status == "no answer"
        assert stuck.error.startswith("ReadTimeout")
    # four endpoints that each take their whole 1 s timeout, probed side by side
    assert took < 3.5, took
    assert payments.describe().startswith("payments down (DOWN, HTTP 503, ")


def test_no_endpoints_no_probes() -> None:
    assert sweep([]) == []
