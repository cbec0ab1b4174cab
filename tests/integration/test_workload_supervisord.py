"""The supervisord backend against a real supervisord running real programs (tests/programs).

A program that was killed or hangs is restarted through the workload tasks (new pid, its health
endpoint answers again) while the other program keeps its pid; a dry run changes nothing; the
consumer group is scaled on a real topic and its lag, read from the real broker, falls faster.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from uuid import uuid4

import httpx
import pytest

from blocks.kafka import KafkaCluster
from tasks.kafka_lag import get_consumer_lag
from tasks.supervisord import SupervisorBackend
from tasks.workloads import (
    Capability,
    Unsupported,
    WorkloadRef,
    is_transient,
    restart_workload,
    scale_workload,
    workload_events,
    workload_logs,
    workload_status,
)
from tests.conftest import create_topic
from tests.supervisor_server import CONSUMERS, PROGRAMS, SupervisorServer

pytestmark = [
    pytest.mark.integration,
    # the workload tasks run here as a runbook's flow would call them, but outside a flow run
    pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted:UserWarning"),
]

HEALTH = WorkloadRef(name="health")
CONSUMER = WorkloadRef(name="consumer")
FACTS = ("statename", "pid", "start", "stop", "exitstatus", "spawnerr")


@pytest.fixture
def sv(supervisord: SupervisorServer) -> Iterator[SupervisorServer]:
    """The session's supervisord, put back as configured after the test."""
    yield supervisord
    supervisord.reset()


@pytest.fixture
def backend(sv: SupervisorServer) -> SupervisorBackend:
    return SupervisorBackend(sv.block())


def health(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)


def kill(sv: SupervisorServer, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    sv.wait_state("health:health", {"EXITED"})
    with pytest.raises(httpx.ConnectError):
        health(sv.health_port)


def hang(sv: SupervisorServer, pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(httpx.ReadTimeout):
        health(sv.health_port)
    assert sv.infos()["health:health"]["statename"] == "RUNNING"  # supervisord sees nothing


@pytest.mark.parametrize("break_it", [kill, hang], ids=["killed", "hung"])
def test_broken_program_restarted_other_untouched(
    sv: SupervisorServer, backend: SupervisorBackend, break_it: Callable
) -> None:
    before = sv.pids()
    break_it(sv, before["health:health"])
    broken = sv.infos()["health:health"]
    since = datetime.now(UTC)

    plan = restart_workload(backend, HEALTH, since=since, dry_run=True)
    assert [(c.action, c.target) for c in plan.planned] == [("restart_process", "health:health")]
    assert not plan.applied
    # the dry run changed nothing: same process, same state, same start, still broken
    unchanged = sv.infos()["health:health"]
    assert {k: unchanged[k] for k in FACTS} == {k: broken[k] for k in FACTS}
    assert sv.pids() == {**before, "health:health": broken["pid"]}

    done = restart_workload(backend, HEALTH, since=since, dry_run=False)
    assert done.planned == plan.planned, "the dry run planned what the run did"
    assert [(c.action, c.target) for c in done.applied] == [("restart_process", "health:health")]
    new_pid = done.applied[0].detail["pid"]
    assert new_pid not in (before["health:health"], 0)
    assert sv.infos()["health:health"]["statename"] == "RUNNING"
    answer = health(sv.health_port)
    assert answer.status_code == 200 and answer.text == f"ok health pid={new_pid}"
    after = sv.pids()
    assert after["other:other"] == before["other:other"], "the other program was not touched"
    assert after["health:health"] == new_pid

    # the same `since` again (a retried task, a re-run flow): nothing restarts twice
    again = restart_workload(backend, HEALTH, since=since, dry_run=False)
    assert not again.planned and not again.applied
    assert "restarted already" in again.notes[0]
    assert sv.pids() == after

    status = workload_status(backend, HEALTH)
    assert status.exists and [i.pid for i in status.instances] == [new_pid]
    assert status.instances[0].ready and status.capabilities == []


def test_exit_is_an_event(sv: SupervisorServer, backend: SupervisorBackend) -> None:
    since = datetime.now(UTC)
    kill(sv, sv.pids()["health:health"])
    events = workload_events(backend, HEALTH, since=since)
    assert [(e.reason, e.message, e.instance) for e in events] == [
        ("EXITED", "killed by a signal; Bad exit code -1", "health")
    ]
    status = workload_status(backend, HEALTH)
    assert status.instances[0].exit_code == -1 and not status.instances[0].running
    assert status.desired_replicas == 1, "killed, not stopped on purpose: still wanted"


def test_restart_that_does_not_stay_up_is_not_applied(
    sv: SupervisorServer, backend: SupervisorBackend
) -> None:
    """Planned, stopped and started, but the process dies at start: not applied, with why,
    and what it printed is in its logs."""
    sv.exit_file.touch()
    failed = restart_workload(backend, HEALTH, since=datetime.now(UTC), dry_run=False)
    assert len(failed.planned) == 1 and not failed.applied
    # supervisord counts a death within startsecs as BACKOFF then FATAL, but it reaps a child
    # up to a second after its output ends, so a loaded machine sees a RUNNING process exit
    assert re.match(r"health:health not restarted: did not stay up: (BACKOFF|FATAL|EXITED)",
                    failed.notes[0]), failed.notes
    sv.wait_state("health:health", {"FATAL", "EXITED"})
    assert not workload_status(backend, HEALTH).running
    assert "exit file" in workload_logs(backend, HEALTH, lines=5)["health"]
    with pytest.raises(httpx.ConnectError):
        health(sv.health_port)


def test_fatal_program_is_started(sv: SupervisorServer, backend: SupervisorBackend) -> None:
    flaky = WorkloadRef(name="flaky")
    status = workload_status(backend, flaky)
    assert [(i.state, i.running, i.pid) for i in status.instances] == [("FATAL", False, None)]
    events = workload_events(backend, flaky, since=datetime.fromtimestamp(0, UTC))
    assert [e.reason for e in events] == ["FATAL"]
    assert events[0].message.startswith("can't find command")

    sv.write_flaky_command()  # the cause fixed
    since = datetime.now(UTC)
    plan = restart_workload(backend, flaky, since=since, dry_run=True)
    assert [c.detail["step"] for c in plan.planned] == ["start"]
    assert sv.infos()["flaky:flaky"]["statename"] == "FATAL"
    started = restart_workload(backend, flaky, since=since, dry_run=False)
    assert [c.target for c in started.applied] == ["flaky:flaky"]
    pid = started.applied[0].detail["pid"]
    answer = httpx.get(f"http://127.0.0.1:{sv.flaky_port}/health", timeout=2)
    assert answer.text == f"ok flaky pid={pid}"
    assert [e.reason for e in workload_events(backend, flaky, since=since)] == ["STARTED"]


def consumer_lag(cluster: KafkaCluster, sv: SupervisorServer) -> int:
    return get_consumer_lag.fn(cluster, sv.group, sv.topic).total_lag


def lag_rate(cluster: KafkaCluster, sv: SupervisorServer, window_s: float) -> float:
    """Records a second the group consumed over the window, from its lag on the broker."""
    start, begun = consumer_lag(cluster, sv), time.monotonic()
    time.sleep(window_s)
    end = consumer_lag(cluster, sv)
    assert end > 0, "the backlog ran out during the measurement"
    return (start - end) / (time.monotonic() - begun)


def wait_assigned(sv: SupervisorServer, consumers: int, timeout_s: float = 30) -> None:
    """Until the first ``consumers`` consumers each hold partitions after the last rebalance
    (the lines they print on assignment; tansu lists no members of a group)."""
    logs = [sv.home / f"consumer_{n:02d}.out" for n in range(consumers)]
    deadline = time.monotonic() + timeout_s
    while True:
        last = []
        for log in logs:
            lines = log.read_text().splitlines() if log.exists() else []
            moves = [line for line in lines if line.startswith(("assigned", "revoked"))]
            last.append(moves[-1] if moves else "")
        if all(re.match(r"assigned [1-9]", line) for line in last):
            return
        assert time.monotonic() < deadline, f"not all assigned: {last}"
        time.sleep(0.2)


def test_scaling_consumers_makes_the_lag_fall_faster(
    sv: SupervisorServer, backend: SupervisorBackend, kafka_cluster: KafkaCluster
) -> None:
    bootstrap = kafka_cluster.bootstrap_servers
    create_topic(bootstrap, sv.topic, partitions=3)
    produce = [sys.executable, str(PROGRAMS / "kafka_producer.py"), "--bootstrap", bootstrap,
               "--topic", sv.topic, "--count", "2100", "--partitions", "3"]
    subprocess.run(produce, check=True, timeout=60, capture_output=True)
    assert consumer_lag(kafka_cluster, sv) == 2100

    status = workload_status(backend, CONSUMER)
    assert status.can(Capability.SCALE) and status.desired_replicas == 0
    assert len(status.instances) == CONSUMERS

    one = scale_workload(backend, CONSUMER, 1, dry_run=False)
    assert [c.target for c in one.applied] == ["consumer:consumer_00"]
    wait_assigned(sv, 1)
    slow = lag_rate(kafka_cluster, sv, 2.5)
    assert slow > 0, "one consumer consumes"

    pids = sv.pids()
    plan = scale_workload(backend, CONSUMER, 3, dry_run=True)
    assert [(c.action, c.target) for c in plan.planned] == [
        ("start_process", "consumer:consumer_01"), ("start_process", "consumer:consumer_02")
    ]
    assert sv.pids() == pids, "a dry run starts nothing"
    three = scale_workload(backend, CONSUMER, 3, dry_run=False)
    assert three.planned == plan.planned and len(three.applied) == 2
    states = {n: i["statename"] for n, i in sv.infos().items() if n.startswith("consumer:")}
    assert states == {"consumer:consumer_00": "RUNNING", "consumer:consumer_01": "RUNNING",
                      "consumer:consumer_02": "RUNNING", "consumer:consumer_03": "STOPPED"}
    assert workload_status(backend, CONSUMER).desired_replicas == 3
    assert not scale_workload(backend, CONSUMER, 3, dry_run=False).planned, "already 3: no-op"

    wait_assigned(sv, 3)
    fast = lag_rate(kafka_cluster, sv, 2.5)
    # each consumer takes ~20 ms a record: three on three partitions go about three times as fast
    assert fast > 2 * slow, f"lag fell {fast:.0f}/s with 3 consumers, {slow:.0f}/s with 1"


def test_scale_beyond_numprocs_refused(sv: SupervisorServer, backend: SupervisorBackend) -> None:
    pids = sv.pids()
    with pytest.raises(Unsupported, match=f"configure numprocs={CONSUMERS + 1}"):
        scale_workload(backend, CONSUMER, CONSUMERS + 1, dry_run=False)
    with pytest.raises(Unsupported, match="configure numprocs"):
        scale_workload(backend, HEALTH, 2, dry_run=False)
    with pytest.raises(Unsupported, match="configure numprocs"):
        scale_workload(backend, WorkloadRef(name="consumer:consumer_00"), 1, dry_run=False)
    assert sv.pids() == pids


def test_logs_are_the_lines_the_program_printed(
    sv: SupervisorServer, backend: SupervisorBackend
) -> None:
    marks = [f"line-{n}-{uuid4().hex[:6]}" for n in range(6)]
    for mark in marks:
        httpx.get(f"http://127.0.0.1:{sv.health_port}/say", params={"line": mark}, timeout=2)
    error = f"oops-{uuid4().hex[:6]}"
    httpx.get(f"http://127.0.0.1:{sv.health_port}/say", params={"line": error, "stream": "stderr"},
              timeout=2)
    logs = workload_logs(backend, HEALTH, lines=3)
    assert list(logs) == ["health"]
    out, err = logs["health"].split("\n--- stderr ---\n")
    assert out.splitlines() == marks[-3:]
    assert err.splitlines()[-1] == error


def test_unix_socket_and_missing_service(sv: SupervisorServer) -> None:
    over_socket = SupervisorBackend(sv.block(url=f"unix://{sv.socket_path}"))
    assert over_socket.status(WorkloadRef(name="other")).instances[0].pid == sv.pids()["other:other"]

    missing = over_socket.status(WorkloadRef(name="no-such-program"))
    assert not missing.exists and missing.instances == []
    with pytest.raises(LookupError, match="no program or group 'no-such-program'"):
        over_socket.restart(WorkloadRef(name="no-such-program"), since=datetime.now(UTC),
                            dry_run=True)


def test_errors_are_classified_and_never_show_the_password(sv: SupervisorServer) -> None:
    wrong = SupervisorBackend(sv.block(password="not-the-password"))
    with pytest.raises(xmlrpc.client.ProtocolError) as refused:
        wrong.status(HEALTH)
    assert refused.value.errcode == 401 and not is_transient(refused.value)
    for text in (str(refused.value), repr(refused.value)):
        assert sv.password not in text and "not-the-password" not in text

    closed = SupervisorBackend(sv.block(url="http://127.0.0.1:9/RPC2"))
    with pytest.raises(ConnectionRefusedError) as down:
        closed.status(HEALTH)
    assert is_transient(down.value)

    # a hung supervisord: the call ends at the block's timeout, as a transient error
    assert sv.proc is not None
    hung = SupervisorBackend(sv.block(request_timeout_s=0.5))
    sv.proc.send_signal(signal.SIGSTOP)
    try:
        begun = time.monotonic()
        with pytest.raises(TimeoutError) as slow:
            hung.status(HEALTH)
        assert time.monotonic() - begun < 3
    finally:
        sv.proc.send_signal(signal.SIGCONT)
    assert is_transient(slow.value) and sv.password not in str(slow.value)
    assert hung.status(HEALTH).exists, "answers again once supervisord does"
