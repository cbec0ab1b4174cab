"""service-health-sweep against real services: HTTP health endpoints the test stops to make a
service down, the actuator service with a real circuit breaker, the session's real supervisord
running the programs whose instances the sweep reads, the session's real Prometheus
(series with known error rates and latency) and a real Alertmanager. Hand-offs are asserted as
the runs they created on the Prefect test server (deployments applied, not served)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import pytest

from blocks.prometheus import AlertmanagerServer, PrometheusServer
from blocks.supervisor import SupervisorHost
from flows.observability.service_health_sweep import (
    ServiceHealthSweepParams,
    SweepSummary,
    service_health_sweep,
)
from flows.services.circuit_breaker_open import CircuitBreakerOpenParams
from flows.services.rollback_bad_deploy import RollbackBadDeployParams
from flows.services.service_not_responding import ServiceNotRespondingParams
from runbooks.report import Outcome
from tasks.sweep_decisions import Instances, Situation
from tests.actuator_app import ActuatorService, HttpService
from tests.alertmanager import firing, running_alertmanager
from tests.conftest import read_incident_report, runs_of, unique
from tests.servers import free_port
from tests.supervisor_server import SupervisorServer

pytestmark = pytest.mark.integration


@pytest.fixture
def services() -> Iterator[dict[str, HttpService]]:
    """Three services with plain /health endpoints, up; a test stops some to make them down."""
    started = {unique(name): HttpService().start() for name in ("orders", "payments", "search")}
    yield started
    for service in started.values():
        service.stop()


def endpoints(services: dict[str, HttpService]) -> list[dict]:
    return [
        {"service": name, "url": f"{s.url}/health", "timeout_s": 2} for name, s in services.items()
    ]


def new_runs(deployment_id: str, before: set[str]) -> list[dict]:
    return [r for r in runs_of(deployment_id) if r["id"] not in before]


def ids(deployment_id: str) -> set[str]:
    return {r["id"] for r in runs_of(deployment_id)}


def test_one_service_down_is_told_from_all_down(
    services: dict[str, HttpService], deployment_ids: dict[str, str]
) -> None:
    orders, payments, search = services
    not_responding = deployment_ids["service-not-responding"]
    before = ids(not_responding)
    services[payments].stop()

    one = service_health_sweep(
        ServiceHealthSweepParams(
            endpoints=endpoints(services), platform="kubernetes/prod", namespace="shop"
        )
    )

    assert one.decision.situation is Situation.SOME_DOWN
    assert one.decision.services == [payments]
    assert one.outcome is Outcome.HANDED_OFF
    (handed,) = new_runs(not_responding, before)
    got = handed["parameters"]["params"]
    assert {k: got[k] for k in ("platform", "service", "namespace", "health_url", "dry_run")} == {
        "platform": "kubernetes/prod",
        "service": payments,
        "namespace": "shop",
        "health_url": f"{services[payments].url}/health",
        "dry_run": False,
    }
    ServiceNotRespondingParams.model_validate(got)  # the run it starts accepts them
    assert "handed-off" in handed["tags"]
    assert "handed to service-not-responding, " in one.report and handed["id"] in one.report
    assert f"{payments} down (no answer" in one.report
    assert f"| {orders} health | OK |" in one.report

    services[orders].stop()
    services[search].stop()
    before = ids(not_responding)
    state = service_health_sweep(
        ServiceHealthSweepParams(endpoints=endpoints(services), platform="kubernetes/prod"),
        return_state=True,
    )

    assert state.is_failed()
    assert "All 3 services are down" in state.message
    assert "check infrastructure (Docker, network)" in state.message
    assert "No service was restarted" in state.message
    assert new_runs(not_responding, before) == []  # no per-service hand-offs in an outage
    report = read_incident_report(state.state_details.flow_run_id)
    assert "ESCALATED" in report
    assert (
        "| Severity | P1 (complete outage); raised to the situation's: ALL SERVICES DOWN |"
        in report
    )
    for name in services:
        assert f"| {name} health | FAILING |" in report


def test_dry_run_is_carried_to_the_hand_off(
    services: dict[str, HttpService], deployment_ids: dict[str, str]
) -> None:
    _, payments, _ = services
    not_responding = deployment_ids["service-not-responding"]
    before = ids(not_responding)
    services[payments].stop()

    result = service_health_sweep(
        ServiceHealthSweepParams(
            endpoints=endpoints(services), platform="docker/default", dry_run=True
        )
    )

    assert result.decision.situation is Situation.SOME_DOWN
    (handed,) = new_runs(not_responding, before)
    assert handed["parameters"]["params"]["dry_run"] is True
    assert handed["parameters"]["params"]["service"] == payments
    assert "DRY-RUN (nothing changed)" in result.report


def test_a_down_service_without_a_platform_is_escalated_by_name(
    services: dict[str, HttpService], deployment_ids: dict[str, str]
) -> None:
    orders, payments, _ = services
    not_responding = deployment_ids["service-not-responding"]
    before = ids(not_responding)
    services[orders].stop()

    state = service_health_sweep(
        ServiceHealthSweepParams(endpoints=endpoints(services)), return_state=True
    )

    assert state.is_failed()
    assert state.message.startswith(f"Escalated to a human: SERVICE DOWN: {orders} down (no answer")
    assert payments not in state.message
    assert "no platform given" in state.message
    assert new_runs(not_responding, before) == []
    report = read_incident_report(state.state_details.flow_run_id)
    assert "P2 (major degradation)" in report


@pytest.fixture
def prom_block(prometheus) -> str:
    name = unique("prom")
    PrometheusServer(url=prometheus.url, timeout_s=5).save(name)
    return name


def serve_requests(prometheus, service: str, *, errors_per_s: float, p99_s: float) -> None:
    e, mine = prometheus.exporter, {"service": service}
    e.set_rate("http_requests_total", mine | {"status": "200"}, 100.0 - errors_per_s)
    e.set_rate("http_requests_total", mine | {"status": "500"}, errors_per_s)
    e.set_latency("http_request_duration_seconds", mine, p99_s)


def test_an_error_spike_from_prometheus_is_named_and_handed_to_rollback(
    services: dict[str, HttpService], prometheus, prom_block: str, deployment_ids: dict[str, str]
) -> None:
    orders, payments, search = services
    serve_requests(prometheus, orders, errors_per_s=0.0, p99_s=0.1)
    serve_requests(prometheus, payments, errors_per_s=20.0, p99_s=0.1)  # 20% 5xx
    serve_requests(prometheus, search, errors_per_s=0.0, p99_s=4.0)  # slow, not failing
    ratio = (
        f'sum(rate(http_requests_total{{service="{payments}",status=~"5.."}}[5s])) '
        f'/ sum(rate(http_requests_total{{service="{payments}"}}[5s]))'
    )
    prometheus.wait_for(ratio, lambda r: bool(r) and abs(float(r[0]["value"][1]) - 0.2) < 0.02)
    prometheus.wait_for(
        f'histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{{service="{search}"}}[5s])))',
        lambda r: bool(r) and float(r[0]["value"][1]) > 2.0,
    )
    rollback = deployment_ids["rollback-bad-deploy"]
    before = ids(rollback)

    result = service_health_sweep(
        ServiceHealthSweepParams(
            endpoints=endpoints(services),
            prometheus_block=prom_block,
            window="5s",
            platform="kubernetes/prod",
        )
    )

    assert result.decision.situation is Situation.ERROR_SPIKE, result.report
    assert result.decision.services == [payments]
    by = {s.service: s for s in result.services}
    assert by[payments].error_rate == pytest.approx(0.2, abs=0.02)
    assert by[orders].error_rate == pytest.approx(0.0, abs=0.001)
    assert by[search].p99_s == pytest.approx(3.96, abs=0.2)  # just under its 4 s bucket
    (handed,) = new_runs(rollback, before)
    got = handed["parameters"]["params"]
    assert (got["platform"], got["service"]) == ("kubernetes/prod", payments)
    RollbackBadDeployParams.model_validate(got)
    assert f"| {payments} errors and latency | FAILING | 5xx 20" in result.report
    assert f"{search}: high latency" in result.report  # lower precedence: an action item
    assert "handed to rollback-bad-deploy" in result.report


def test_high_latency_alone_is_escalated_with_the_seeds_advice(
    services: dict[str, HttpService], prometheus, prom_block: str
) -> None:
    orders, payments, search = services
    for name in services:
        serve_requests(prometheus, name, errors_per_s=0.0, p99_s=3.0 if name == search else 0.2)
    prometheus.wait_for(
        "histogram_quantile(0.99, sum by (le) "
        f'(rate(http_request_duration_seconds_bucket{{service="{search}"}}[5s])))',
        lambda r: bool(r) and float(r[0]["value"][1]) > 2.0,
    )

    state = service_health_sweep(
        ServiceHealthSweepParams(
            endpoints=endpoints(services), prometheus_block=prom_block, window="5s"
        ),
        return_state=True,
    )

    assert state.is_failed()
    assert f"HIGH LATENCY: {search} up (HTTP 200" in state.message
    assert "p99 2994 ms" in state.message or "p99 2990 ms" in state.message, state.message
    assert "check database connections, resource usage" in state.message
    assert orders not in state.message and payments not in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "P3 (minor degradation)" in report


def test_a_refused_query_is_said_and_the_other_one_still_measured(
    services: dict[str, HttpService], prometheus, prom_block: str
) -> None:
    orders = next(iter(services))
    serve_requests(prometheus, orders, errors_per_s=0.0, p99_s=0.5)
    prometheus.wait_for(
        "histogram_quantile(0.99, sum by (le) "
        f'(rate(http_request_duration_seconds_bucket{{service="{orders}"}}[5s])))',
        lambda r: bool(r) and r[0]["value"][1] != "NaN",
    )

    result = service_health_sweep(
        ServiceHealthSweepParams(
            endpoints=endpoints(services),
            prometheus_block=prom_block,
            window="5s",
            error_rate_query="sum by (service) (rate(http_requests_total[{window}]) +",
        )
    )

    assert result.decision.situation is Situation.HEALTHY
    assert "| error rate query | FAILING | refused: bad_data:" in result.report
    assert "Fix the error rate query" in result.report
    by = {s.service: s for s in result.services}
    assert by[orders].error_rate is None and by[orders].p99_s is not None
    assert f"| {orders} errors and latency | OK | 5xx no data (threshold 5%), p99 " in result.report
    assert f"No error rate or p99 for {orders}" in result.report


def test_prometheus_configured_but_down_still_reports_health(
    services: dict[str, HttpService],
) -> None:
    orders, payments, _ = services
    dead_prometheus, dead_alertmanager = unique("prom-dead"), unique("am-dead")
    PrometheusServer(url=f"http://127.0.0.1:{free_port()}", timeout_s=2).save(dead_prometheus)
    AlertmanagerServer(url=f"http://127.0.0.1:{free_port()}", timeout_s=2).save(dead_alertmanager)
    services[payments].stop()

    state = service_health_sweep(
        ServiceHealthSweepParams(
            endpoints=endpoints(services),
            prometheus_block=dead_prometheus,
            alertmanager_block=dead_alertmanager,
        ),
        return_state=True,
    )

    assert state.is_failed()
    assert f"SERVICE DOWN: {payments} down" in state.message  # the sweep went on
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| Prometheus | FAILING | does not answer (" in report
    assert "this sweep saw no error rates or latency" in report
    assert "| Alertmanager | FAILING | does not answer (" in report
    assert f"| {orders} health | OK |" in report


def test_a_firing_alert_from_alertmanager_is_shown(services: dict[str, HttpService]) -> None:
    orders, payments, _ = services
    config = {"route": {"receiver": "null", "group_wait": "1s"}, "receivers": [{"name": "null"}]}
    with running_alertmanager(config) as am:
        am.post_alerts(
            [
                firing(
                    {"alertname": "OrdersSlowCheckout", "service": orders, "severity": "warning"}
                ),
                firing({"alertname": "DiskFilling", "instance": "db-1", "severity": "warning"}),
            ]
        )
        block = unique("am")
        AlertmanagerServer(url=am.url, timeout_s=5).save(block)

        result: SweepSummary = service_health_sweep(
            ServiceHealthSweepParams(endpoints=endpoints(services), alertmanager_block=block)
        )

    assert result.decision.situation is Situation.HEALTHY
    assert result.outcome is Outcome.NO_ACTION_NEEDED
    by = {s.service: s for s in result.services}
    assert by[orders].alerts == [f"OrdersSlowCheckout [warning] (service={orders})"]
    assert by[payments].alerts == []
    assert f"alerts still firing for {orders}" in result.report
    assert "errors and latency not measured" in result.report
    assert "| firing alerts | FAILING | " in result.report
    assert (
        "1 firing alert(s) name no swept service: DiskFilling [warning] (instance=db-1)"
        in result.report
    )


def test_an_open_breaker_is_handed_to_circuit_breaker_open(deployment_ids: dict[str, str]) -> None:
    dependency = HttpService()  # down: the breaker opens
    app = ActuatorService(dependency_url=f"{dependency.url}/health", wait_open_s=120).start()
    try:
        app.wait_for_state("OPEN")
        dependency.start()  # back: the service is UP, its breaker stays OPEN for a while
        breakers = deployment_ids["circuit-breaker-open"]
        before = ids(breakers)
        name = unique("orders")

        result = service_health_sweep(
            ServiceHealthSweepParams(
                endpoints=[
                    {"service": name, "url": f"{app.actuator_url}/health", "style": "actuator"}
                ]
            )
        )
    finally:
        app.stop()
        dependency.stop()

    assert result.decision.situation is Situation.CIRCUIT_OPEN, result.report
    assert result.services[0].up and result.services[0].open_breakers == ["inventory"]
    (handed,) = new_runs(breakers, before)
    got = handed["parameters"]["params"]
    assert (got["actuator_url"], got["breaker"]) == (app.actuator_url, "inventory")
    CircuitBreakerOpenParams.model_validate(got)
    assert result.outcome is Outcome.HANDED_OFF


# seed 002 "Check container status": the services' instances where they run, read from the
# session's real supervisord (tests/supervisor_server.py: programs `health` and `other`)


@pytest.fixture
def sv(supervisord: SupervisorServer) -> Iterator[tuple[SupervisorServer, str]]:
    """The session's supervisord saved as a Supervisor block; programs put back afterwards."""
    name = unique("sv")
    supervisord.block().save(name, overwrite=True)
    yield supervisord, f"supervisord/{name}"
    supervisord.reset()


def programs(server: SupervisorServer, *extra: tuple[str, str]) -> list[dict]:
    """The supervised programs' health endpoints, named as supervisord names them."""
    return [
        {"service": name, "url": f"http://127.0.0.1:{port}/health", "timeout_s": 1}
        for name, port in (("health", server.health_port), ("other", server.other_port))
    ] + [{"service": name, "url": url, "timeout_s": 1} for name, url in extra]


def test_instances_are_read_beside_health_a_stopped_program_and_an_unknown_one_named(
    sv: tuple[SupervisorServer, str], deployment_ids: dict[str, str]
) -> None:
    server, platform = sv

    healthy = service_health_sweep(
        ServiceHealthSweepParams(endpoints=programs(server), platform=platform)
    )

    assert healthy.decision.situation is Situation.HEALTHY, healthy.report
    for name in ("health", "other"):
        assert (
            f"| {name} instances | OK | every instance running on {platform}: "
            f"{name} (RUNNING, ready)" in healthy.report
        )
    by = {s.service: s for s in healthy.services}
    assert by["health"].instances is Instances.RUNNING

    with server.rpc() as rpc:
        rpc.supervisor.stopProcess("health:health", True)
    ghost = unique("ghost")
    not_responding = deployment_ids["service-not-responding"]
    before = ids(not_responding)

    state = service_health_sweep(
        ServiceHealthSweepParams(
            endpoints=programs(server, (ghost, f"http://127.0.0.1:{free_port()}/health")),
            platform=platform,
        ),
        return_state=True,
    )

    assert state.is_failed()
    # the stopped program: its state next to its failing endpoint, and handed off as such
    assert state.message.startswith(
        f"Escalated to a human: SERVICE DOWN: {ghost} down (no answer"
    ), state.message
    assert f"instances: {platform} does not know {ghost}" in state.message
    assert f"the platform does not know {ghost}" in state.message
    assert "Handed off: health" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert re.search(r"\| health health \| FAILING \| .*\n\| other health \| OK \|", report), report
    assert (
        f"| health instances | FAILING | no instance running on {platform}: "
        "health (STOPPED, not ready" in report
    ), report
    assert (
        f"| other instances | OK | every instance running on {platform}: other (RUNNING, ready)"
        in report
    )
    assert f"| {ghost} instances | FAILING | {platform} does not know {ghost} |" in report
    assert "health (service down, no instance running): handed to service-not-responding" in report
    (handed,) = new_runs(not_responding, before)  # the stopped one; the unknown one is not
    assert handed["parameters"]["params"]["service"] == "health"
    assert handed["parameters"]["params"]["platform"] == platform
    assert server.infos()["health:health"]["statename"] == "STOPPED", "the sweep changes nothing"


def test_a_hung_program_whose_process_runs_is_still_down(
    sv: tuple[SupervisorServer, str], deployment_ids: dict[str, str]
) -> None:
    server, platform = sv
    os.kill(server.pids()["health:health"], signal.SIGSTOP)
    not_responding = deployment_ids["service-not-responding"]
    before = ids(not_responding)

    result = service_health_sweep(
        ServiceHealthSweepParams(endpoints=programs(server), platform=platform)
    )

    assert result.decision.situation is Situation.SOME_DOWN, result.report
    assert result.decision.services == ["health"]
    assert "| health health | FAILING |" in result.report
    assert (
        f"| health instances | OK | every instance running on {platform}: health (RUNNING, ready)"
        in result.report
    )
    assert "health (service down): handed to service-not-responding" in result.report
    (handed,) = new_runs(not_responding, before)
    assert handed["parameters"]["params"]["service"] == "health"


@pytest.mark.parametrize("platform_is", ["not saved", "down"])
def test_a_platform_that_cannot_be_read_is_said_and_health_still_decides(
    platform_is: str, services: dict[str, HttpService], deployment_ids: dict[str, str]
) -> None:
    orders, payments, _ = services
    name = unique("sv-dead")
    if platform_is == "down":
        SupervisorHost(url=f"http://127.0.0.1:{free_port()}/RPC2", request_timeout_s=1).save(name)
    not_responding = deployment_ids["service-not-responding"]
    before = ids(not_responding)
    services[payments].stop()

    result = service_health_sweep(
        ServiceHealthSweepParams(endpoints=endpoints(services), platform=f"supervisord/{name}")
    )

    assert result.decision.situation is Situation.SOME_DOWN, result.report
    assert result.decision.services == [payments]
    expected = "its block is not saved" if platform_is == "not saved" else "Error"
    assert re.search(
        rf"\| platform \| FAILING \| supervisord/{name} not read: [^|]*{expected}", result.report
    ), result.report
    assert f"this sweep saw no instances of {orders}, {payments}" in result.report
    assert f"| {orders} health | OK |" in result.report
    assert all(s.instances is Instances.UNREAD for s in result.services)
    (handed,) = new_runs(not_responding, before)  # the runbook handed to reads the platform itself
    assert handed["parameters"]["params"]["service"] == payments
