"""spark-streaming-job-failed end to end on a real Spark standalone cluster (tests/spark_cluster.py).

A Structured Streaming job (rate source: unique, gapless values -> JSON file sink, with a
checkpoint) runs as a cluster-mode Python driver submitted through the master's REST API; the
tests SIGKILL the driver's processes (a lost machine) or freeze its executor (a stalled query) and
run the runbook, then read the checkpoint's commit log and the sink's committed files.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blocks.kafka import KafkaCluster
from blocks.mysql import MySQLDatabase
from blocks.spark import SparkCluster
from flows.spark.spark_streaming_job_failed import (
    SparkRecovery,
    SparkStreamingJobFailedParams,
    spark_streaming_job_failed,
)
from runbooks.errors import ApprovalRejected, BudgetSpent, Escalation
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.spark import SparkUnavailable, resubmit_application
from tests.approvals import Approver
from tests.conftest import read_incident_report, unique
from tests.servers import KafkaBroker, free_port
from tests.spark_cluster import SparkTestCluster, commits, sink_values

pytestmark = pytest.mark.integration


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not after {timeout_s}s")


@dataclass
class StreamingApp:
    cluster: SparkTestCluster
    name: str
    sink: Path
    checkpoint: Path
    block_name: str

    def submit(self) -> str:
        return self.cluster.submit(self.name, self.sink, self.checkpoint)

    def commits(self) -> list[int]:
        return commits(self.checkpoint)

    def drivers(self) -> list[dict[str, Any]]:
        master = self.cluster.master_json()
        return master.get("activedrivers", []) + master.get("completeddrivers", [])

    def params(self, **overrides: Any) -> SparkStreamingJobFailedParams:
        fields: dict[str, Any] = {
            "spark_block": self.block_name,
            "stall_after_s": 60,
            "running_deadline_s": 120,
            "progress_deadline_s": 180,
            "min_new_batches": 2,
            "poll_interval_s": 1,
            "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
        }
        fields.update(overrides)
        return SparkStreamingJobFailedParams(**fields)


def streaming_app(cluster: SparkTestCluster, *, checkpoint: Path | None = None) -> StreamingApp:
    name = unique("counts")
    data = cluster.workdir / "data" / name
    sink, ckpt = data / "sink", checkpoint or data / "checkpoint"
    sub = cluster.submission(name, sink, ckpt)
    block_name = unique("spark")
    SparkCluster(
        rest_url=cluster.rest_url,
        ui_url=cluster.ui_url,
        request_timeout_s=30,
        app_name=name,
        app_resource=sub["app_resource"],
        main_class=sub["main_class"],
        app_args=sub["app_args"],
        spark_properties=sub["spark_properties"],
        environment_variables=sub["environment_variables"],
        checkpoint_location=f"file://{ckpt}",
    ).save(block_name, overwrite=True)
    return StreamingApp(cluster, name, sink, ckpt, block_name)


@pytest.fixture
def app(spark_cluster: SparkTestCluster) -> Iterator[StreamingApp]:
    app = streaming_app(spark_cluster)
    yield app
    spark_cluster.kill_all_drivers()  # the worker holds one application at a time
    wait_for(
        "worker free again",
        lambda: not spark_cluster.master_json().get("activeapps"),
        timeout_s=60,
    )


def assert_exactly_once(app: StreamingApp) -> list[int]:
    values = sink_values(app.sink)
    assert values, "nothing committed to the sink"
    assert len(values) == len(set(values)), "duplicate rows in the sink"
    assert sorted(values) == list(range(max(values) + 1)), "rows missing from the sink"
    return values


def run(params: SparkStreamingJobFailedParams):
    return spark_streaming_job_failed(params=params, return_state=True)


def test_dead_driver_is_resubmitted_and_continues_with_the_next_batch(app: StreamingApp) -> None:
    cluster = app.cluster
    first = app.submit()
    wait_for("3 batches committed", lambda: len(app.commits()) >= 3, timeout_s=180)
    assert cluster.driver_state(first) == "RUNNING"

    cluster.kill_driver_process(first)
    wait_for("driver FAILED", lambda: cluster.driver_state(first) == "FAILED", timeout_s=30)
    last = max(app.commits())
    committed_before = app.commits()
    values_before = assert_exactly_once(app)
    drivers_before = {d["id"] for d in app.drivers()}

    # dry-run: plans the resubmission, submits nothing, commits nothing
    dry = run(app.params(dry_run=True))
    assert dry.is_completed(), dry.message
    planned: SparkRecovery = dry.result()
    assert planned.outcome is Outcome.PLANNED
    assert (planned.driver_id, planned.driver_state) == (first, "FAILED")
    assert planned.last_committed_batch == last
    assert "submit_application" in planned.report_markdown
    time.sleep(3)
    assert {d["id"] for d in app.drivers()} == drivers_before
    assert app.commits() == committed_before
    assert sink_values(app.sink) == values_before

    # the real run: resubmitted from the same checkpoint, next batch is last + 1
    state = run(app.params())
    assert state.is_completed(), state.message
    result: SparkRecovery = state.result()
    assert result.outcome is Outcome.RESOLVED, result.report_markdown
    assert result.driver_id == first and result.last_committed_batch == last
    new = result.new_driver_id
    assert new is not None and new not in drivers_before
    assert cluster.driver_state(new) == "RUNNING"
    assert result.new_batches[0] == last + 1
    after = app.commits()
    assert after == list(range(after[0], max(after) + 1)), "a batch id was skipped"
    assert [b for b in after if b > last][:2] == [last + 1, last + 2]
    values = assert_exactly_once(app)
    assert len(values) > len(values_before)
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**RESOLVED**" in report and new in report
    # exactly one new driver
    assert {d["id"] for d in app.drivers()} - drivers_before == {new}

    # a retried submission (its first response lost) finds the new driver and submits nothing
    retried = resubmit_application.fn(
        SparkCluster.load(app.block_name),
        replaces_driver_id=first,
        last_committed_batch=last,
        dry_run=False,
    )
    assert (retried.driver_id, retried.planned, retried.applied) == (new, [], [])
    assert {d["id"] for d in app.drivers()} - drivers_before == {new}

    # a run right after finds it running and progressing: nothing to do
    again = run(app.params())
    assert again.is_completed(), again.message
    assert again.result().outcome is Outcome.NO_ACTION_NEEDED
    assert {d["id"] for d in app.drivers()} - drivers_before == {new}

    # it dies again: with its budget (1 per hour) spent, the runbook escalates and submits nothing
    cluster.kill_driver_process(new)
    wait_for("driver FAILED", lambda: cluster.driver_state(new) == "FAILED", timeout_s=30)
    spent = run(app.params(safety=SafetyParams(budget_max_actions=1, approval_poll_s=1)))
    assert spent.is_failed()
    with pytest.raises(BudgetSpent, match="budget of 1 per 1h spent"):
        spent.result()
    time.sleep(2)
    assert {d["id"] for d in app.drivers()} - drivers_before == {new}
    assert not [d for d in app.drivers() if d["state"] in ("SUBMITTED", "RUNNING")]
    assert_exactly_once(app)


def test_stalled_query_is_killed_and_resubmitted(app: StreamingApp) -> None:
    cluster = app.cluster
    first = app.submit()
    wait_for("2 batches committed", lambda: len(app.commits()) >= 2, timeout_s=180)
    [active] = cluster.master_json()["activeapps"]
    executors = wait_for("executor", lambda: cluster.executor_pids(active["id"]), timeout_s=30)
    for pid in executors:  # the executor hangs: the driver runs on, its batches never finish
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            "a batch stuck in flight",
            lambda: (app.checkpoint / "offsets" / str(max(app.commits()) + 1)).exists(),
            timeout_s=30,
        )
        time.sleep(6)
        last = max(app.commits())

        state = run(app.params(stall_after_s=5))
    finally:
        for pid in executors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    assert state.is_completed(), state.message
    result: SparkRecovery = state.result()
    assert result.outcome is Outcome.RESOLVED, result.report_markdown
    assert result.killed_driver_id == first
    assert cluster.driver_state(first) == "KILLED"
    assert cluster.driver_state(result.new_driver_id) == "RUNNING"
    # the stuck batch is replayed by the new driver: the next committed batch is last + 1
    assert result.new_batches[0] == last + 1
    assert_exactly_once(app)


@pytest.fixture
def mysql_block(mariadb: Any) -> str:
    """A MySQL Database block for a login on the session's MariaDB (the query's sink store)."""
    user, password = unique("spark_rb").replace("-", "_")[:32], unique("pw")
    with mariadb.admin() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{user}`")
        cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
        cur.execute(f"GRANT SELECT ON `{user}`.* TO '{user}'@'%'")
    name = unique("mysql")
    MySQLDatabase(
        host=mariadb.host,
        port=mariadb.port,
        database=user,
        user=user,
        password=password,
        connect_timeout_s=3,
    ).save(name, overwrite=True)
    return name


@pytest.fixture
def kafka_block(kafka_broker: KafkaBroker) -> str:
    name = unique("kafka")
    KafkaCluster(bootstrap_servers=kafka_broker.bootstrap, request_timeout_s=5).save(name)
    return name


def test_no_checkpoint_needs_approval_and_a_rejection_submits_nothing(
    spark_cluster: SparkTestCluster, kafka_block: str, mysql_block: str
) -> None:
    app = streaming_app(spark_cluster)  # never ran: nothing at its checkpoint location
    drivers_before = {d["id"] for d in app.drivers()}
    approver = Approver(
        "spark-streaming-job-failed",
        {"approve": False, "approver": "bob", "reason": "replay from the topic instead"},
    )
    approver.start()

    state = run(app.params(kafka_block=kafka_block, mysql_block=mysql_block))

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert "no checkpoint at that location" in approver.description
    assert "reprocessed or skipped" in approver.description
    assert state.is_failed()
    with pytest.raises(ApprovalRejected, match="rejected by bob"):
        state.result()
    assert {d["id"] for d in app.drivers()} == drivers_before
    assert not app.checkpoint.exists() and not app.sink.exists()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| rejected | bob |" in report
    # its dependencies were checked, for real, before asking
    assert "| kafka reachable | OK |" in report and "| mysql reachable | OK |" in report


def test_unreachable_dependency_escalates_without_submitting(
    spark_cluster: SparkTestCluster, mysql_block: str
) -> None:
    app = streaming_app(spark_cluster)
    dead_kafka = unique("kafka")
    KafkaCluster(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_s=2).save(dead_kafka)
    drivers_before = {d["id"] for d in app.drivers()}

    state = run(app.params(kafka_block=dead_kafka, mysql_block=mysql_block))

    assert state.is_failed()
    with pytest.raises(Escalation, match="dependencies are down.*Kafka"):
        state.result()
    assert {d["id"] for d in app.drivers()} == drivers_before
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| kafka reachable | FAILING |" in report and "| mysql reachable | OK |" in report


def test_unreachable_master_is_retried_then_reported(spark_cluster: SparkTestCluster) -> None:
    app = streaming_app(spark_cluster)
    block = SparkCluster.load(app.block_name)
    block.ui_url, block.request_timeout_s = "http://127.0.0.1:9", 1  # nothing listens there
    block.save(app.block_name, overwrite=True)

    state = run(app.params())

    assert state.is_failed()
    with pytest.raises(SparkUnavailable, match=r"GET /json/: ConnectError"):
        state.result()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**FAILED**" in report or "**ESCALATED**" in report


def test_no_checkpoint_approved_starts_fresh_from_batch_zero(
    app: StreamingApp, kafka_block: str, mysql_block: str
) -> None:
    """The approved side of the question above: the job starts with an empty checkpoint."""
    cluster = app.cluster
    drivers_before = {d["id"] for d in app.drivers()}
    approver = Approver(
        "spark-streaming-job-failed",
        {"approve": True, "approver": "alice", "reason": "fresh start is fine, sink is empty"},
    )
    approver.start()

    state = run(app.params(kafka_block=kafka_block, mysql_block=mysql_block))

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert "no checkpoint at that location" in approver.description
    assert state.is_completed(), state.message
    result: SparkRecovery = state.result()
    assert result.outcome is Outcome.RESOLVED, result.report_markdown
    assert result.last_committed_batch is None
    new = result.new_driver_id
    assert new is not None and new not in drivers_before
    assert {d["id"] for d in app.drivers()} - drivers_before == {new}
    assert cluster.driver_state(new) == "RUNNING"
    # a fresh query: its first batches are 0, 1, ... in the checkpoint it created where asked
    assert result.new_batches[:2] == [0, 1]
    after = app.commits()
    assert after == list(range(max(after) + 1))
    assert_exactly_once(app)
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| approved | alice |" in report and "**RESOLVED**" in report and new in report
