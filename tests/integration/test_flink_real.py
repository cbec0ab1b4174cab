"""flink-job-crashed against a real Flink 2.3 session cluster (tests/flink_cluster.py).

The job is the CountingJob (tests/programs/flink/CountingJob.java): a throttled source, a counter
per key in keyed state, every count appended to part files the test reads. It is made to fail
for real (its fail file, or SIGKILL of the TaskManager; restart strategy none keeps it FAILED),
the runbook restores it, and the test checks the world: the new job's tasks run, Flink says it
restored from the failed job's latest completed checkpoint, and the counters continued from the
checkpointed counts instead of starting again at 1.

Consumer lag: the CountingJob has no Kafka source. Where lag matters, a real consumer of a real
backlog on the test broker stands in for the restored job (it starts draining once the new job
runs), so the runbook's lag watch is exercised for real; the TaskManager test runs with no topic,
which is how a job without a Kafka source is configured (the lag checks are skipped, and said so).

What stays on the HTTP fake (tests/integration/test_flink_job_crashed.py), because a real
cluster cannot be made to produce it here: auth proxies in front of the REST API (bearer, basic,
wrong credentials), a lost response to an applied submission and 5xx/hung JobManager retries,
a concurrent run winning the same job id, checkpoints kept only in JobManager memory or
checkpointing off, Flink's own restart strategy moving a job through RESTARTING, and the
approval/budget/lag-verdict paths that need exact control of timing and state.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blocks.flink import FlinkCluster
from flows.flink.flink_job_crashed import FlinkJobCrashedParams, FlinkRecovery, flink_job_crashed
from runbooks.errors import BudgetSpent, Escalation, VerificationFailed
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.flink_decisions import restore_job_id
from tests.conftest import read_actions_table, unique
from tests.flink_cluster import (
    COUNTING_JOB_CLASS,
    FlinkTestCluster,
    build_counting_job,
    counting_args,
    part_offsets,
    read_counts,
)
from tests.integration.test_flink_job_crashed import (  # noqa: F401  (backlog is a fixture)
    UNPROCESSED,
    Backlog,
    Drainer,
    backlog,
    published_report,
)

pytestmark = pytest.mark.integration


@dataclass
class CountingJob:
    """One CountingJob on the real cluster, and what it had counted when it failed."""

    cluster: FlinkTestCluster
    base: Path
    name: str = field(default_factory=lambda: unique("enrichment"))
    jid: str = ""
    checkpoint_path: str = ""
    checkpoint_id: int = 0
    counted: dict[int, int] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.base / "out"

    @property
    def fail_file(self) -> Path:
        return self.base / "fail"

    @property
    def args(self) -> list[str]:
        return counting_args(self.name, self.out, rate=40, keys=4, fail_file=self.fail_file)

    def start(self, parallelism: int = 2) -> None:
        self.jid = self.cluster.submit(self.cluster.counting_jar(), self.args, parallelism)
        self.cluster.wait_for_state(self.jid, "RUNNING")
        self.cluster.wait_for_checkpoints(self.jid, completed=2)

    def wait_failed(self) -> None:
        """Once it FAILED: its latest completed checkpoint and the counts it had written."""
        self.cluster.wait_for_state(self.jid, "FAILED", timeout_s=30)
        # a checkpoint all tasks acknowledged may complete after the job turned FAILED
        stats = self.cluster.wait_for(
            lambda: self.cluster.checkpoints(self.jid),
            lambda c: c["counts"]["in_progress"] == 0,
            timeout_s=15,
            what="no checkpoint in progress",
        )
        completed = stats["latest"]["completed"]
        self.checkpoint_path, self.checkpoint_id = completed["external_path"], completed["id"]
        self.counted = {k: max(v) for k, v in read_counts(self.out).items()}
        self.offsets = part_offsets(self.out)
        assert set(self.counted) == {0, 1, 2, 3}

    def crash(self) -> None:
        """Fail it through its fail file (its counter throws), then remove the file."""
        self.fail_file.touch()
        self.wait_failed()
        self.fail_file.unlink()

    def assert_counters_continued(self) -> None:
        """Every key counts on from the checkpointed count, not again from 1."""
        after = self.cluster.wait_for(
            lambda: read_counts(self.out, self.offsets),
            lambda c: (
                set(c) == set(self.counted)
                and all(max(c[k]) > self.counted[k] for k in self.counted)
            ),
            timeout_s=30,
            what="counts past the failed job's",
        )
        for key, before in self.counted.items():
            first = after[key][0]
            # restored state: the count at the checkpoint (at most what was written before the
            # failure: records after the checkpoint are counted again) plus one
            assert 1 < first <= before + 1, (key, first, before)
            assert after[key] == list(range(first, first + len(after[key])))

    def jobs_named(self) -> list[dict]:
        return [j for j in self.cluster.jobs() if j["name"] == self.name]


@pytest.fixture
def counting_job(flink_cluster: FlinkTestCluster, tmp_path: Path):
    job = CountingJob(flink_cluster, tmp_path)
    yield job
    if flink_cluster.taskmanager is None or flink_cluster.taskmanager.poll() is not None:
        flink_cluster.start_taskmanager()
    flink_cluster.cancel_all()


def params_for(
    cluster: FlinkTestCluster, job: CountingJob, backlog: Backlog | None = None, **overrides: object
) -> FlinkJobCrashedParams:
    flink_block = unique("flink")
    FlinkCluster(rest_url=cluster.rest_url, request_timeout_s=10).save(flink_block, overwrite=True)
    fields: dict[str, object] = {
        "flink_block": flink_block,
        "job_name": job.name,
        "jar": build_counting_job().name,
        "entry_class": COUNTING_JOB_CLASS,
        "program_args": job.args,
        "topic": None,
        "running_deadline_s": 60,
        "lag_deadline_s": 30,
        "poll_interval_s": 0.5,
        "slot_wait_s": 30,
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    if backlog is not None:
        kafka_block = unique("kafka")
        backlog.cluster.save(kafka_block, overwrite=True)
        fields.update(
            kafka_block=kafka_block,
            topic=backlog.topic,
            consumer_group=backlog.group,
            lag_threshold=0,
        )
    fields.update(overrides)
    return FlinkJobCrashedParams(**fields)


def drain_when_restored(job: CountingJob, drainer: Drainer) -> threading.Thread:
    """Start the stand-in consumer once a new copy of the job runs (as its Kafka source would)."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(j["jid"] != job.jid and j["state"] == "RUNNING" for j in job.jobs_named()):
                drainer.start()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def assert_restored(job: CountingJob, result: FlinkRecovery) -> str:
    new_jid = restore_job_id(job.jid, job.checkpoint_id)
    assert (result.failed_job_id, result.restored_job_id) == (job.jid, new_jid)
    assert result.checkpoint is not None and result.checkpoint.id == job.checkpoint_id
    detail = job.cluster.job(new_jid)
    assert detail["state"] == "RUNNING"
    assert all(v["status"] == "RUNNING" for v in detail["vertices"])
    # the failed job ran at parallelism 2 and the run named none: kept
    assert [v["parallelism"] for v in detail["vertices"]] == [2, 2]
    restored = job.cluster.checkpoints(new_jid)["latest"]["restored"]
    assert restored["external_path"] == job.checkpoint_path
    assert restored["id"] == job.checkpoint_id
    # one copy running, the failed one still listed as FAILED
    states = {j["jid"]: j["state"] for j in job.jobs_named()}
    assert states == {job.jid: "FAILED", new_jid: "RUNNING"}
    job.assert_counters_continued()
    return new_jid


# --- the runbook on a real cluster ------------------------------------------------------------


def test_restores_failed_job_from_its_latest_checkpoint(
    flink_cluster: FlinkTestCluster, counting_job: CountingJob, backlog: Backlog
) -> None:
    counting_job.start()
    counting_job.crash()
    drainer = Drainer(backlog)
    watcher = drain_when_restored(counting_job, drainer)
    assert backlog.lag() == UNPROCESSED

    state = flink_job_crashed(
        params=params_for(flink_cluster, counting_job, backlog), return_state=True
    )

    assert state.is_completed(), state.message
    result: FlinkRecovery = state.result()
    assert result.outcome is Outcome.RESOLVED
    new_jid = assert_restored(counting_job, result)
    # the lag watch saw the stand-in consumer drain the backlog
    assert result.lag_before == UNPROCESSED and result.lag_after == 0
    watcher.join(5)
    drainer.thread.join(10)
    assert backlog.lag() == 0
    report = published_report(state)
    assert "**RESOLVED**" in report and counting_job.checkpoint_path in report
    # the root cause under Flink's "Recovery is suppressed by NoRestartBackoffTimeStrategy"
    assert "failing on purpose" in report
    assert "| restored from checkpoint | OK |" in report
    [row] = read_actions_table(state.state_details.flow_run_id)
    assert row["before"]["replaces_job_id"] == counting_job.jid
    assert row["after"]["job_id"] == new_jid


def test_dry_run_changes_nothing_then_the_run_uploads_the_missing_jar(
    flink_cluster: FlinkTestCluster, counting_job: CountingJob
) -> None:
    counting_job.start()
    counting_job.crash()
    # the JobManager lost its uploaded jars (a restart or failover does that)
    flink_cluster.cancel_all(delete_jars=True)
    jar = build_counting_job()
    jobs_before = {j["jid"]: j["state"] for j in flink_cluster.jobs()}
    assert flink_cluster.jars() == []

    dry = flink_job_crashed(
        params=params_for(flink_cluster, counting_job, dry_run=True, jar_file=str(jar)),
        return_state=True,
    )

    assert dry.is_completed(), dry.message
    assert dry.result().outcome is Outcome.PLANNED
    assert {j["jid"]: j["state"] for j in flink_cluster.jobs()} == jobs_before
    assert flink_cluster.jars() == []
    report = published_report(dry)
    assert "| upload_jar |" in report and "| run_jar_from_checkpoint |" in report
    assert counting_job.checkpoint_path in report

    state = flink_job_crashed(
        params=params_for(flink_cluster, counting_job, jar_file=str(jar)), return_state=True
    )

    assert state.is_completed(), state.message
    result = state.result()
    assert result.outcome is Outcome.RESOLVED
    assert [j["name"] for j in flink_cluster.jars()] == [jar.name]
    assert_restored(counting_job, result)
    assert "no topic configured" in result.report_markdown


def test_taskmanager_killed_waits_for_a_slot_or_escalates(
    flink_cluster: FlinkTestCluster, counting_job: CountingJob
) -> None:
    counting_job.start()
    flink_cluster.kill_taskmanager()
    counting_job.wait_failed()
    jobs_before = {j["jid"]: j["state"] for j in flink_cluster.jobs()}

    # no TaskManager comes back within the wait: escalate with what was seen, submit nothing
    lost = flink_job_crashed(
        params=params_for(flink_cluster, counting_job, slot_wait_s=3), return_state=True
    )

    assert lost.is_failed()
    with pytest.raises(Escalation, match=r"no TaskManager with 2 free slot\(s\) after waiting 3s"):
        lost.result()
    assert {j["jid"]: j["state"] for j in flink_cluster.jobs()} == jobs_before
    report = published_report(lost)
    assert "no TaskManager registered" in report and "| free task slots | FAILING |" in report
    assert "is no longer reachable" in report  # the failure's root cause, as Flink recorded it

    # the TaskManager comes back a few seconds into the run: the runbook waits, then restores
    restart = threading.Timer(4, flink_cluster.start_taskmanager, kwargs={"wait": False})
    restart.start()
    started = time.monotonic()
    state = flink_job_crashed(
        params=params_for(flink_cluster, counting_job, slot_wait_s=60), return_state=True
    )
    restart.join()

    assert state.is_completed(), state.message
    result = state.result()
    assert result.outcome is Outcome.RESOLVED
    assert time.monotonic() - started > 4
    assert_restored(counting_job, result)
    assert "| free task slots | OK |" in result.report_markdown
    assert "(waited " in result.report_markdown


def test_running_job_needs_nothing_and_an_unknown_job_escalates(
    flink_cluster: FlinkTestCluster, counting_job: CountingJob
) -> None:
    counting_job.start()
    jars_before = flink_cluster.jars()

    state = flink_job_crashed(params=params_for(flink_cluster, counting_job), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.NO_ACTION_NEEDED
    assert [j["jid"] for j in counting_job.jobs_named()] == [counting_job.jid]

    unknown = flink_job_crashed(
        params=params_for(flink_cluster, counting_job, job_name=unique("nobody")),
        return_state=True,
    )

    assert unknown.is_failed()
    with pytest.raises(Escalation, match="no job with that name"):
        unknown.result()
    assert flink_cluster.jars() == jars_before
    assert [j["jid"] for j in counting_job.jobs_named()] == [counting_job.jid]


def test_job_that_fails_before_its_first_checkpoint_escalates(
    flink_cluster: FlinkTestCluster, counting_job: CountingJob
) -> None:
    counting_job.fail_file.touch()  # its first record fails it: no checkpoint ever completes
    counting_job.jid = flink_cluster.submit(flink_cluster.counting_jar(), counting_job.args, 2)
    flink_cluster.wait_for_state(counting_job.jid, "FAILED", timeout_s=30)
    assert flink_cluster.checkpoints(counting_job.jid)["counts"]["completed"] == 0

    state = flink_job_crashed(params=params_for(flink_cluster, counting_job), return_state=True)

    assert state.is_failed()
    with pytest.raises(Escalation, match="no completed checkpoint or savepoint"):
        state.result()
    assert [j["jid"] for j in counting_job.jobs_named()] == [counting_job.jid]
    assert "| last successful checkpoint | FAILING |" in published_report(state)


def test_restored_job_that_fails_again_is_not_verified_then_the_budget_stops(
    flink_cluster: FlinkTestCluster, counting_job: CountingJob
) -> None:
    counting_job.start()
    counting_job.fail_file.touch()
    counting_job.wait_failed()  # the fail file stays: the restored job fails on its first record
    params = params_for(
        flink_cluster, counting_job, safety=SafetyParams(budget_max_actions=1, approval_poll_s=1)
    )

    first = flink_job_crashed(params=params, return_state=True)

    assert first.is_failed()
    with pytest.raises(VerificationFailed, match="is FAILED, not RUNNING"):
        first.result()
    restored = restore_job_id(counting_job.jid, counting_job.checkpoint_id)
    assert flink_cluster.job(restored)["state"] == "FAILED"

    again = flink_job_crashed(params=params, return_state=True)

    assert again.is_failed()
    with pytest.raises(BudgetSpent, match="budget of 1 per 1h spent"):
        again.result()
    assert {j["jid"] for j in counting_job.jobs_named()} == {counting_job.jid, restored}


def test_missing_jar_without_a_file_escalates_and_submits_nothing(
    flink_cluster: FlinkTestCluster, counting_job: CountingJob
) -> None:
    counting_job.start()
    counting_job.crash()
    flink_cluster.cancel_all(delete_jars=True)

    state = flink_job_crashed(params=params_for(flink_cluster, counting_job), return_state=True)

    assert state.is_failed()
    with pytest.raises(Escalation, match="is not uploaded to the Flink cluster"):
        state.result()
    assert [j["jid"] for j in counting_job.jobs_named()] == [counting_job.jid]
    assert flink_cluster.jars() == []
