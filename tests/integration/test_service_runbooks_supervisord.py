"""The service runbooks end to end on a real supervisord running real programs (issue #12):
service-not-responding restarts a hung program and nothing else, dry-run changes nothing,
rollback-bad-deploy escalates ("no revision history"), consumers-too-slow scales a real consumer
group whose lag on the real broker then falls."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from blocks.kafka import KafkaCluster
from flows.services.consumers_too_slow import (
    ConsumersTooSlowParams,
    ScaleAction,
    consumers_too_slow,
)
from flows.services.rollback_bad_deploy import RollbackBadDeployParams, rollback_bad_deploy
from flows.services.service_not_responding import (
    ServiceNotRespondingParams,
    Verdict,
    service_not_responding,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kafka_lag import get_all_group_lag, get_consumer_lag
from tests.conftest import create_topic, read_incident_report, unique
from tests.supervisor_server import PROGRAMS, SupervisorServer

pytestmark = pytest.mark.integration

QUIET = SafetyParams(escalation_block=None)


@pytest.fixture
def sv(supervisord: SupervisorServer) -> Iterator[tuple[SupervisorServer, str]]:
    """The session's supervisord saved as a Supervisor block; programs put back afterwards."""
    name = unique("sv")
    supervisord.block().save(name, overwrite=True)
    yield supervisord, f"supervisord/{name}"
    supervisord.reset()


def hang_health(server: SupervisorServer) -> int:
    pid = server.pids()["health:health"]
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"http://127.0.0.1:{server.health_port}/health", timeout=1)
    return pid


def not_responding(
    platform: str, server: SupervisorServer, **overrides: object
) -> ServiceNotRespondingParams:
    values: dict[str, object] = {
        "platform": platform,
        "service": "health",
        "health_url": f"http://127.0.0.1:{server.health_port}/health",
        "health_timeout_s": 1,
        "ready_timeout_s": 30,
        "poll_interval_s": 0.5,
        "log_lines": 5,
        "safety": QUIET,
    }
    return ServiceNotRespondingParams(**{**values, **overrides})


def test_hung_program_is_restarted_and_answers_the_other_untouched(
    sv: tuple[SupervisorServer, str],
) -> None:
    server, platform = sv
    other = server.pids()["other:other"]
    hung = hang_health(server)

    dry = service_not_responding(not_responding(platform, server, dry_run=True))
    assert dry.outcome is Outcome.PLANNED, dry.report
    assert dry.diagnosis is not None and dry.diagnosis.verdict is Verdict.RESTART
    assert server.pids()["health:health"] == hung, "a dry run restarts nothing"

    result = service_not_responding(not_responding(platform, server))
    assert result.outcome is Outcome.RESOLVED, result.report
    assert result.restarted == ["health:health"]
    pids = server.pids()
    assert pids["health:health"] != hung
    assert pids["other:other"] == other, "the other program is untouched"
    answer = httpx.get(f"http://127.0.0.1:{server.health_port}/health", timeout=2)
    assert answer.status_code == 200 and f"pid={pids['health:health']}" in answer.text
    assert "| health endpoint answers | FAILING |" in result.report
    assert "| service answers after the restart | OK |" in result.report
    assert "last 5 log lines of health" in result.report

    again = service_not_responding(not_responding(platform, server))
    assert again.outcome is Outcome.NO_ACTION_NEEDED, "healthy now: nothing restarted twice"
    assert server.pids()["health:health"] == pids["health:health"]


def test_program_that_will_not_stay_up_escalates_with_its_logs(
    sv: tuple[SupervisorServer, str],
) -> None:
    server, platform = sv
    server.exit_file.touch()  # health exits with status 3, at start too
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pids()["health:health"], signal.SIGKILL)
    state = service_not_responding(
        not_responding(platform, server, ready_timeout_s=4), return_state=True
    )
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**FAILED**" in report  # verification failed: escalated as such
    # supervisord reaps a child that dies at start up to a second late: EXITED or FATAL
    assert re.search(r"health \((EXITED|FATAL|BACKOFF), not ready", report)
    assert "still not responding" in report and "last log lines are in the evidence" in report


def test_rollback_on_supervisord_escalates_no_revision_history(
    sv: tuple[SupervisorServer, str],
) -> None:
    server, platform = sv
    hung = hang_health(server)
    params = RollbackBadDeployParams(
        platform=platform,
        service="health",
        health_url=f"http://127.0.0.1:{server.health_port}/health",
        health_timeout_s=1,
        safety=QUIET,
    )
    state = rollback_bad_deploy(params, return_state=True)
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "keeps no revision history" in report and "nothing was rolled back" in report
    assert server.pids()["health:health"] == hung, "nothing restarted"


def test_slow_consumers_are_scaled_and_the_lag_falls(
    sv: tuple[SupervisorServer, str], kafka_cluster: KafkaCluster
) -> None:
    server, platform = sv
    bootstrap = kafka_cluster.bootstrap_servers
    create_topic(bootstrap, server.scaler_topic, partitions=3)
    produce = [
        sys.executable,
        str(PROGRAMS / "kafka_producer.py"),
        "--bootstrap",
        bootstrap,
        "--topic",
        server.scaler_topic,
        "--count",
        "3000",
        "--partitions",
        "3",
    ]
    subprocess.run(produce, check=True, timeout=60, capture_output=True)
    with server.rpc() as rpc:
        rpc.supervisor.startProcess("scaler:scaler_00", True)
    kafka = unique("kafka")
    kafka_cluster.save(kafka, overwrite=True)
    deadline = time.monotonic() + 30  # the consumer joined and committed: the broker knows the group
    while get_all_group_lag.fn(kafka_cluster, [server.scaler_group])[0].state == "NOT_FOUND":
        assert time.monotonic() < deadline, "the consumer never committed"
        time.sleep(0.5)
    before = get_consumer_lag.fn(kafka_cluster, server.scaler_group, server.scaler_topic).total_lag
    assert before > 1000

    params = ConsumersTooSlowParams(
        platform=platform,
        service="scaler",
        kafka_block=kafka,
        group=server.scaler_group,
        lag_threshold=100,
        max_drain_s=1,  # one consumer works it off too slowly for this test's taste
        sample_interval_s=2,
        verify_window_s=30,
        max_replicas=4,
        safety=QUIET,
    )
    dry = consumers_too_slow(params.model_copy(update={"dry_run": True}))
    assert dry.outcome is Outcome.PLANNED, dry.report
    running = {n for n, i in server.infos().items() if i["statename"] == "RUNNING"}
    assert {n for n in running if n.startswith("scaler:")} == {"scaler:scaler_00"}

    result = consumers_too_slow(params)
    assert result.outcome is Outcome.RESOLVED, result.report
    assert result.plan is not None and result.plan.action is ScaleAction.SCALE
    # tansu lists no group members: the consumers counted are the running processes
    assert (result.plan.consumers, result.plan.partitions, result.plan.target) == (1, 3, 2)
    states = {n: i["statename"] for n, i in server.infos().items() if n.startswith("scaler:")}
    assert [n for n, s in sorted(states.items()) if s == "RUNNING"] == [
        "scaler:scaler_00",
        "scaler:scaler_01",
    ]
    assert result.lag_after is not None and result.lag_before is not None
    assert result.lag_after < result.lag_before
    assert get_consumer_lag.fn(kafka_cluster, server.scaler_group, server.scaler_topic).total_lag < before


def test_a_program_that_keeps_hanging_spends_the_budget_and_escalates(
    sv: tuple[SupervisorServer, str],
) -> None:
    server, platform = sv
    # one restart per window for this test (the runbook's own budget is 3 an hour)
    budget = SafetyParams(escalation_block=None, budget_max_actions=1, budget_window_s=3600)
    # budgets are kept per target in the session's Prefect server, and other tests restart
    # `health` too: a namespace (ignored by supervisord, part of the target) makes this test's own
    params = not_responding(platform, server, safety=budget, namespace=unique("budget"))
    hang_health(server)
    first = service_not_responding(params)
    assert first.outcome is Outcome.RESOLVED, first.report

    restarted = hang_health(server)
    state = service_not_responding(params, return_state=True)
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "budget of 1 per" in report and "spent" in report
    assert server.pids()["health:health"] == restarted, "no second restart within the budget"
