"""flink-job-degraded end to end on a real Flink 2.3 session cluster (tests/flink_cluster.py).

The CountingJob runs at parallelism 1 with a source of 2,000 records/s and a 1 ms sleep per
record in the keyed counter: the counter is busy all the time and the source backpressured (its
backPressuredTimeMsPerSecond is a 60 s average: about 20-30 s after the start it passes 500).
The runbook must name the counter as the bottleneck, take a savepoint and, once approved, stop
the job with a savepoint and run it again from there at parallelism 4 (x4, capped by the 3 free
slots + the 1 it holds): the
keyed counters continue (1, 2, 3... per key, nothing repeated or restarted) and the source is no
longer backpressured. Dry-run and a rejected approval leave the job as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.states import State
from pydantic import BaseModel

from blocks.flink import FlinkCluster
from flows.flink.flink_job_degraded import (
    FlinkDegradedResult,
    FlinkJobDegradedParams,
    flink_job_degraded,
)
from runbooks.errors import ApprovalRejected, BudgetSpent, Escalation
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.flink_rescale import resubmit_with_parallelism, stop_with_savepoint, trigger_id_for
from tests.approvals import Approver
from tests.conftest import read_actions_table, read_incident_report, unique
from tests.flink_cluster import (
    COUNTING_JOB_CLASS,
    TERMINAL,
    FlinkTestCluster,
    counting_args,
    read_counts,
)

pytestmark = pytest.mark.integration

RATE = 2000  # records/s of the whole source
SINK_DELAY_MS = 1  # per record in the counter: about 900 records/s per counter subtask
KEYS = 64  # enough keys to spread evenly over the rescaled subtasks
SOURCE = "Source: keys"
COUNTER = "counter -> discard: Writer"


@dataclass
class SlowJob:
    cluster: FlinkTestCluster
    name: str
    job_id: str
    jar_id: str
    args: list[str]
    out: Path
    block: str

    def params(self, **overrides: Any) -> FlinkJobDegradedParams:
        fields: dict[str, Any] = {
            "flink_block": self.block,
            "job_name": self.name,
            "jar": self.jar_id,
            "entry_class": COUNTING_JOB_CLASS,
            "program_args": self.args,
            # x4, capped by the free slots: 3 free + the 1 the job holds
            "scale_factor": 4,
            "savepoint_deadline_s": 120,
            "running_deadline_s": 60,
            "verify_deadline_s": 120,
            "clear_samples": 3,
            "poll_interval_s": 3,
            # savepoints go to the cluster's execution.checkpointing.savepoint-dir
            "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
        }
        fields.update(overrides)
        return FlinkJobDegradedParams(**fields)

    def live_jobs(self) -> list[dict[str, Any]]:
        return [
            j for j in self.cluster.jobs() if j["name"] == self.name and j["state"] not in TERMINAL
        ]


def vertex_ratio(cluster: FlinkTestCluster, job_id: str, vertex: str, metric: str) -> float | None:
    """A vertex's metric (max over subtasks) as a 0..1 ratio, read straight from the REST API."""
    (vid,) = [v["id"] for v in cluster.job(job_id)["vertices"] if v["name"] == vertex]
    rows = cluster.get(f"/jobs/{job_id}/vertices/{vid}/subtasks/metrics?get={metric}")
    value = rows[0]["max"] if rows else None
    return None if value in (None, "NaN") else float(value) / 1000


def start_slow_job(
    cluster: FlinkTestCluster, out: Path, *, parallelism: int = 1, rate: int = RATE
) -> SlowJob:
    """A RUNNING CountingJob whose source Flink reports backpressured (the caller cancels it)."""
    name = unique("degraded")
    jar_id = cluster.counting_jar()
    args = counting_args(name, out, rate=rate, keys=KEYS, sink_delay_ms=SINK_DELAY_MS)
    block = unique("flink")
    FlinkCluster(rest_url=cluster.rest_url, request_timeout_s=10).save(block, overwrite=True)
    job_id = cluster.submit(jar_id, args, parallelism=parallelism)
    cluster.wait_for_state(job_id, "RUNNING")
    cluster.wait_for(
        lambda: vertex_ratio(cluster, job_id, SOURCE, "backPressuredTimeMsPerSecond"),
        lambda r: r is not None and r >= 0.6,
        timeout_s=150,
        interval_s=2,
        what="the source backpressured",
    )
    return SlowJob(cluster, name, job_id, jar_id, args, out, block)


@pytest.fixture
def slow_job(flink_cluster: FlinkTestCluster, tmp_path: Path) -> Iterator[SlowJob]:
    """A RUNNING CountingJob at parallelism 1 whose source Flink reports backpressured."""
    try:
        yield start_slow_job(flink_cluster, tmp_path / "out")
    finally:
        flink_cluster.cancel_all(timeout_s=60)


def savepoints_on_disk(cluster: FlinkTestCluster) -> set[str]:
    return {p.name for p in cluster.savepoint_dir.glob("savepoint-*")}


def run(params: FlinkJobDegradedParams) -> tuple[State, float]:
    started = time.monotonic()
    state = flink_job_degraded(params=params, return_state=True)
    return state, time.monotonic() - started


def result_of(state: State) -> FlinkDegradedResult:
    result = state.result()
    assert isinstance(result, BaseModel)
    return FlinkDegradedResult.model_validate(result.model_dump())


def test_dry_run_plans_the_rescale_and_changes_nothing(slow_job: SlowJob) -> None:
    cluster = slow_job.cluster
    before_disk = savepoints_on_disk(cluster)

    state, elapsed = run(slow_job.params(dry_run=True))

    assert state.is_completed(), state.message
    result = result_of(state)
    assert result.outcome is Outcome.PLANNED
    assert result.bottleneck == COUNTER
    assert result.backpressure_before is not None and result.backpressure_before >= 0.5
    assert result.parallelism_before == 1
    report = result.report_markdown
    assert "trigger_savepoint" in report and "stop_with_savepoint" in report
    assert "run_jar_from_savepoint" in report and "parallelism 4" in report
    # planned only: no outcome event ever comes; the planned changes' events the run's table
    # lists are awaited
    rows = read_actions_table(state.state_details.flow_run_id)
    assert {r["action"] for r in rows} == {
        "trigger_savepoint",
        "stop_with_savepoint",
        "run_jar_from_savepoint",
    }
    assert {r["status"] for r in rows} == {"planned"}
    # the world is as it was: the same job, RUNNING at parallelism 1, no savepoint taken
    (live,) = slow_job.live_jobs()
    assert live["jid"] == slow_job.job_id and live["state"] == "RUNNING"
    assert [v["parallelism"] for v in cluster.job(slow_job.job_id)["vertices"]] == [1, 1]
    assert cluster.checkpoints(slow_job.job_id)["latest"]["savepoint"] is None
    assert savepoints_on_disk(cluster) == before_disk
    print(f"dry-run took {elapsed:.1f}s")


def test_approved_rescale_restores_from_the_savepoint_and_clears_backpressure(
    slow_job: SlowJob,
) -> None:
    cluster = slow_job.cluster
    counted_before = {k: c[-1] for k, c in read_counts(slow_job.out).items()}
    approver = Approver(
        "flink-job-degraded",
        {"approve": True, "approver": "alice", "reason": "match day, latency over 3 s"},
        wait_s=180,
    )
    approver.start()

    state, elapsed = run(slow_job.params())

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert "stop_with_savepoint" in approver.description
    assert "parallelism 4" in approver.description
    assert state.is_completed(), state.message
    result = result_of(state)
    assert result.outcome is Outcome.RESOLVED, result.report_markdown
    assert result.bottleneck == COUNTER and result.backpressure_before >= 0.5

    # the old job stopped with a savepoint, a new one runs at parallelism 4 restored from it
    assert cluster.job(slow_job.job_id)["state"] == "FINISHED"
    (live,) = slow_job.live_jobs()
    new_id = live["jid"]
    assert new_id == result.new_job_id and new_id != slow_job.job_id
    assert live["state"] == "RUNNING"
    assert [v["parallelism"] for v in cluster.job(new_id)["vertices"]] == [4, 4]
    stop_path = cluster.checkpoints(slow_job.job_id)["latest"]["savepoint"]["external_path"]
    assert result.stop_savepoint_path == stop_path
    restored = cluster.checkpoints(new_id)["latest"]["restored"]
    assert restored["is_savepoint"] is True and restored["external_path"] == stop_path
    # the safety savepoint was taken first, while the job kept running
    assert result.savepoint_path and result.savepoint_path != stop_path
    assert Path(result.savepoint_path.removeprefix("file:")).is_dir()

    # the keyed counters continued from the savepoint: per key 1, 2, 3... with no restart
    cluster.wait_for(
        lambda: read_counts(slow_job.out),
        lambda counts: all(counts[k][-1] > counted_before[k] + 50 for k in counted_before),
        timeout_s=30,
        what="every key counted by the rescaled job",
    )
    for key, counts in read_counts(slow_job.out).items():
        assert counts == list(range(1, len(counts) + 1)), f"key {key} restarted or repeated"

    # backpressure measurably lower: the flow's own samples and the REST API now
    assert result.backpressure_samples and result.backpressure_samples[-1] <= 0.2
    after = vertex_ratio(cluster, new_id, SOURCE, "backPressuredTimeMsPerSecond")
    assert after is not None and after <= 0.2 < result.backpressure_before

    report = read_incident_report(state.state_details.flow_run_id)
    assert "| approved | alice |" in report
    rows = {r["action"]: r for r in read_actions_table(state.state_details.flow_run_id)}
    assert {a: r["status"] for a, r in rows.items()} == {
        "trigger_savepoint": "applied",
        "stop_with_savepoint": "applied",
        "run_jar_from_savepoint": "applied",
    }
    print(f"approved rescale took {elapsed:.1f}s (approval included)")

    # the changes again, by hand, as a retry after a lost answer would make them: the stopped
    # job is not stopped twice (its stop savepoint is found), nothing is submitted twice
    flink = FlinkCluster.load(slow_job.block)
    stop_again = stop_with_savepoint.fn(
        flink,
        job_id=slow_job.job_id,
        job_name=slow_job.name,
        target_directory=None,
        trigger_id=trigger_id_for("another-run", slow_job.job_id, "stop"),
        deadline_s=30,
        dry_run=False,
    )
    assert not stop_again.planned and not stop_again.applied
    assert stop_again.savepoint_path == stop_path
    submit_again = resubmit_with_parallelism.fn(
        flink,
        job_name=slow_job.name,
        old_job_id=slow_job.job_id,
        savepoint_path=stop_path,
        jar=slow_job.jar_id,
        entry_class=COUNTING_JOB_CLASS,
        program_args=slow_job.args,
        parallelism=4,
        dry_run=False,
    )
    assert not submit_again.applied and submit_again.job_id == new_id
    assert "already RUNNING" in submit_again.notes[0]

    # a re-run finds the job healthy at parallelism 4: no second stop, no second job
    again, _ = run(slow_job.params())
    assert result_of(again).outcome is Outcome.NO_ACTION_NEEDED, result_of(again).report_markdown
    assert [j["jid"] for j in slow_job.live_jobs()] == [new_id]


def test_rejected_rescale_keeps_the_savepoint_and_leaves_the_job_alone(
    slow_job: SlowJob,
) -> None:
    cluster = slow_job.cluster
    approver = Approver(
        "flink-job-degraded",
        {"approve": False, "approver": "bob", "reason": "final whistle in 5 minutes"},
        wait_s=180,
    )
    approver.start()

    state, _ = run(slow_job.params())

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert state.is_failed()
    with pytest.raises(ApprovalRejected, match="bob"):
        state.result()
    # the safety savepoint exists; the job is the same one, RUNNING at parallelism 1
    savepoint = cluster.checkpoints(slow_job.job_id)["latest"]["savepoint"]
    assert savepoint is not None and savepoint["checkpoint_type"] != "SYNC_SAVEPOINT"
    assert Path(savepoint["external_path"].removeprefix("file:")).is_dir()
    (live,) = slow_job.live_jobs()
    assert live["jid"] == slow_job.job_id and live["state"] == "RUNNING"
    assert [v["parallelism"] for v in cluster.job(slow_job.job_id)["vertices"]] == [1, 1]
    rows = {r["action"]: r["status"] for r in read_actions_table(state.state_details.flow_run_id)}
    assert rows["trigger_savepoint"] == "applied"
    assert rows["stop_with_savepoint"] != "applied" and rows["run_jar_from_savepoint"] != "applied"
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| rejected | bob |" in report

    # the alert fires again: with a budget of one savepoint per hour (one taken above) and no
    # reuse, the run stops before taking another one and escalates; nothing changes
    on_disk = savepoints_on_disk(cluster)
    again, _ = run(
        slow_job.params(
            savepoint_reuse_s=0, safety=SafetyParams(budget_max_actions=1, approval_poll_s=1)
        )
    )
    assert again.is_failed()
    with pytest.raises(BudgetSpent, match="savepoint before rescaling"):
        again.result()
    assert savepoints_on_disk(cluster) == on_disk
    (live,) = slow_job.live_jobs()
    assert live["jid"] == slow_job.job_id and live["state"] == "RUNNING"


def test_backpressured_job_in_a_full_cluster_is_escalated_untouched(
    flink_cluster: FlinkTestCluster, tmp_path: Path
) -> None:
    """At parallelism 4 the job holds every slot of the cluster and is still too slow (8,000
    records/s for 4 x ~900): no room to scale, so the run escalates with the evidence and
    changes nothing."""
    try:
        job = start_slow_job(flink_cluster, tmp_path / "out", parallelism=4, rate=8000)
        assert flink_cluster.get("/overview")["slots-available"] == 0

        state, _ = run(job.params())

        assert state.is_failed()
        with pytest.raises(
            Escalation, match=r"no room to scale it \(0 free slot\(s\), the job holds 4"
        ):
            state.result()
        report = read_incident_report(state.state_details.flow_run_id)
        assert COUNTER in report and "add TaskManagers" in report
        (live,) = job.live_jobs()
        assert live["jid"] == job.job_id and live["state"] == "RUNNING"
        assert flink_cluster.checkpoints(job.job_id)["latest"]["savepoint"] is None
        assert read_actions_table(state.state_details.flow_run_id, timeout_s=3) == []
    finally:
        flink_cluster.cancel_all(timeout_s=60)


@pytest.mark.timeout(900)
def test_deployed_run_suspends_and_resumes_without_a_second_savepoint(
    slow_job: SlowJob, tmp_path: Path
) -> None:
    """As served by `runbooks up`: the run takes its safety savepoint, then suspends for the
    approval (its process ends); the approval resumes the run from the deployment, which runs the
    flow again from the top (that a suspended approval survives SIGKILL and restart of every
    process of ours is tests/integration/test_crash_safety.py's). It must reuse the savepoint it took before suspending (not take a second one), stop
    the job with a savepoint and resubmit it at parallelism 4: one safety savepoint and one stop
    savepoint in all."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.up import RunbooksUp

    cluster = slow_job.cluster
    up = RunbooksUp(home=tmp_path / "prefect-home")
    try:
        up.start(deployment="flink-job-degraded")
        with temporary_settings(updates={PREFECT_API_URL: up.api}):
            FlinkCluster(rest_url=cluster.rest_url, request_timeout_s=10).save(
                slow_job.block, overwrite=True
            )
        on_disk = savepoints_on_disk(cluster)
        params = slow_job.params().model_dump(mode="json")
        params["safety"] = {"approval_poll_s": 1, "escalation_block": None}
        run_id = up.start_run(params, deployment="flink-job-degraded")
        up.wait_suspended(run_id)

        # suspended after the safety savepoint, before any change to the job
        (safety_savepoint,) = savepoints_on_disk(cluster) - on_disk
        (live,) = slow_job.live_jobs()
        assert live["jid"] == slow_job.job_id and live["state"] == "RUNNING"
        state = up.run(run_id)["state"]
        assert (state["type"], state["name"]) == ("PAUSED", "Suspended"), state

        resumed = httpx.post(
            f"{up.api}/flow_runs/{run_id}/resume",
            timeout=10,
            json={"run_input": {"approve": True, "approver": "erin", "reason": "match day"}},
        )
        assert resumed.json().get("status") == "ACCEPT", resumed.text
        final = up.wait_final(run_id, timeout_s=300)
        assert final["state"]["type"] == "COMPLETED", final["state"]["message"]

        # stopped with a savepoint, running again at parallelism 4 from it
        assert cluster.job(slow_job.job_id)["state"] == "FINISHED"
        (live,) = slow_job.live_jobs()
        new_id = live["jid"]
        assert new_id != slow_job.job_id and live["state"] == "RUNNING"
        assert [v["parallelism"] for v in cluster.job(new_id)["vertices"]] == [4, 4]
        stop_path = cluster.checkpoints(slow_job.job_id)["latest"]["savepoint"]["external_path"]
        restored = cluster.checkpoints(new_id)["latest"]["restored"]
        assert restored["is_savepoint"] is True and restored["external_path"] == stop_path
        # the resumed run reused the savepoint taken before it suspended: two in all, not three
        assert savepoints_on_disk(cluster) - on_disk == {safety_savepoint, Path(stop_path).name}
        report = up.report(run_id)
        assert "| approved | erin | match day |" in report and "**RESOLVED**" in report
        assert safety_savepoint in report
    finally:
        up.stop()
        print("runbooks up output (shown by pytest when the test failed):\n" + up.log_tail())
