"""flink-job-crashed against a fake Flink REST API, for what a real cluster cannot be made to produce.

The runbook's main paths run against a real Flink 2.3 cluster in test_flink_real.py (restore from
the latest checkpoint with keyed state continuing, dry-run, TaskManager lost, a job that never
checkpointed, a restored job that fails again and the budget, a running or unknown job, a missing
jar). This fake serves the documented JSON of the endpoints the tasks call, records every request,
and stays for the cases the test cluster cannot produce: an auth proxy in front of the REST API
(bearer, basic, wrong credentials), a response lost after the submission was applied, 5xx answers
and a hung JobManager (retries and timeouts), a concurrent run winning the same job id,
checkpoints kept only in JobManager memory or checkpointing turned off (the cluster's
configuration retains checkpoints externally; the approval to start without state hangs on it),
Flink's own restart strategy moving a job through RESTARTING (the cluster runs restart strategy
none), and lag verdicts that need exact control of when the backlog drains. A real consumer on a
real broker drains the backlog when the restored job starts.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from confluent_kafka import TopicPartition
from prefect import flow
from prefect.settings import PREFECT_API_URL
from prefect.states import State
from pydantic import SecretStr

from blocks.flink import FlinkCluster
from blocks.kafka import KafkaCluster
from flows.flink.flink_job_crashed import FlinkJobCrashedParams, flink_job_crashed
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.flink import (
    FlinkRequestError,
    find_job,
    resubmit_from_checkpoint,
)
from tasks.flink_decisions import (
    NOT_ADDRESSABLE,
    Checkpoint,
    restore_job_id,
)
from tasks.kafka_lag import get_consumer_lag
from tests.approvals import Approver
from tests.conftest import create_topic, produce_one_per_batch, unique
from tests.fakes.flink_rest import (
    FakeFlink,
    FakeJob,
    checkpoint_stats,
    completed_checkpoint,
    exception_entry,
    failed_checkpoint,
    now_ms,
)
from tests.servers import KafkaBroker

pytestmark = pytest.mark.integration

JOB = "enrichment-job"
JAR = "enrichment-job.jar"
ENTRY = "com.example.enrich.EnrichmentJob"
TOKEN = "flink-test-token-7f3a"
CHECKPOINT_41 = "s3://flink-checkpoints/enrichment/4b1c/chk-41"
SAVEPOINT_38 = "s3://flink-savepoints/enrichment/savepoint-4b1c-38"
BACKLOG = 24  # records produced, 12 per partition
COMMITTED = {0: 2, 1: 1}  # what the crashed job had committed before it died
UNPROCESSED = BACKLOG - sum(COMMITTED.values())


@pytest.fixture
def fake_flink() -> Iterator[FakeFlink]:
    with FakeFlink(required_auth=f"Bearer {TOKEN}") as fake:
        fake.add_jar(JAR, job_name=JOB, entry_class=ENTRY)
        fake.new_job_delay_s = 0.3
        yield fake


@dataclass
class Backlog:
    cluster: KafkaCluster
    topic: str
    group: str

    def lag(self) -> int:
        return get_consumer_lag.fn(self.cluster, self.group, self.topic).total_lag


@pytest.fixture
def backlog(kafka_broker: KafkaBroker) -> Backlog:
    """match-events-raw with records the crashed job never processed: the group has lag."""
    cluster = KafkaCluster(bootstrap_servers=kafka_broker.bootstrap, request_timeout_s=5)
    topic = create_topic(kafka_broker.bootstrap, unique("match-events-raw"), partitions=2)
    for partition in (0, 1):
        values = [f"goal-{partition}-{i}".encode() for i in range(BACKLOG // 2)]
        produce_one_per_batch(kafka_broker.bootstrap, topic, values, partition=partition)
    group = unique("enrichment-job")
    consumer = cluster.get_consumer(group, **{"enable.auto.commit": False})
    consumer.commit(
        offsets=[TopicPartition(topic, p, o) for p, o in COMMITTED.items()], asynchronous=False
    )
    consumer.close()
    return Backlog(cluster, topic, group)


class Drainer:
    """Consumes and commits the backlog the way the restored job would, in its own thread."""

    def __init__(self, backlog: Backlog, pace_s: float = 0.1) -> None:
        self.backlog = backlog
        self.pace_s = pace_s
        self.consumed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self, _job: FakeJob | None = None) -> None:
        self.thread.start()

    def _run(self) -> None:
        consumer = self.backlog.cluster.get_consumer(
            self.backlog.group, **{"enable.auto.commit": False, "auto.offset.reset": "earliest"}
        )
        # no offsets given: resume from the group's committed offsets, like a restored source
        consumer.assign([TopicPartition(self.backlog.topic, p) for p in COMMITTED])
        deadline = time.monotonic() + 20
        while self.consumed < UNPROCESSED and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            self.consumed += 1
            # commit record by record, paced, so the flow sees the lag fall over several samples
            consumer.commit(message=msg, asynchronous=False)
            time.sleep(self.pace_s)
        consumer.close()


def add_crashed_job(fake: FakeFlink, **overrides: object) -> FakeJob:
    """An older canceled run and the newest run that FAILED with checkpoints and a root exception."""
    t = now_ms()
    fake.add_job(
        JOB,
        "CANCELED",
        started_ago_s=86_400,
        checkpoints=checkpoint_stats(
            completed=completed_checkpoint(7, "s3://old/chk-7", t - 80_000_000)
        ),
    )
    kwargs = {
        "checkpoints": checkpoint_stats(
            completed=completed_checkpoint(41, CHECKPOINT_41, t - 120_000),
            savepoint=completed_checkpoint(38, SAVEPOINT_38, t - 1_800_000, savepoint=True),
            failed=failed_checkpoint(42, t - 60_000, "Checkpoint expired before completing."),
        ),
        "exceptions": [
            exception_entry(
                "java.lang.NullPointerException", "team lookup returned null", t - 61_000
            ),
            exception_entry("java.net.SocketTimeoutException", "schema registry", t - 900_000),
        ],
    }
    kwargs.update(overrides)
    return fake.add_job(JOB, "FAILED", started_ago_s=3600, **kwargs)


def save_blocks(fake: FakeFlink, backlog: Backlog, token: str = TOKEN) -> tuple[str, str]:
    flink_name, kafka_name = unique("flink"), unique("kafka")
    FlinkCluster(rest_url=fake.url, token=SecretStr(token), request_timeout_s=5).save(
        flink_name, overwrite=True
    )
    backlog.cluster.save(kafka_name, overwrite=True)
    return flink_name, kafka_name


def params_for(fake: FakeFlink, backlog: Backlog, **overrides: object) -> FlinkJobCrashedParams:
    flink_name, kafka_name = save_blocks(fake, backlog)
    fields = {
        "flink_block": flink_name,
        "kafka_block": kafka_name,
        "entry_class": ENTRY,
        "program_args": ["--source-topic", backlog.topic],
        "parallelism": 4,
        "topic": backlog.topic,
        "consumer_group": backlog.group,
        "lag_threshold": 0,
        "running_deadline_s": 10,
        "lag_deadline_s": 30,
        "poll_interval_s": 0.3,
        # a fake's URL can come back in a later test: the budget has its own test
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    fields.update(overrides)
    return FlinkJobCrashedParams(**fields)


def published_report(state: State) -> str:
    """The incident report artifact the run left in Prefect."""
    # Prefect 3.8.8's client sends null filters that this endpoint rejects: ask the REST API
    response = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={
            "artifacts": {
                "flow_run_id": {"any_": [str(state.state_details.flow_run_id)]},
                "key": {"any_": ["incident-flink-job-crashed"]},
            },
            # a run that paused for approval published it before pausing, too
            "sort": "CREATED_DESC",
        },
        timeout=10,
    )
    response.raise_for_status()
    artifact, *_earlier = response.json()
    return artifact["data"]


# --- the runbook ----------------------------------------------------------------------------


NO_CHECKPOINT = {
    "checkpointing off": None,
    "only in JobManager memory": checkpoint_stats(
        completed=completed_checkpoint(41, NOT_ADDRESSABLE, now_ms() - 60_000)
    ),
}


@pytest.mark.parametrize("stats", NO_CHECKPOINT.values(), ids=NO_CHECKPOINT.keys())
def test_no_restorable_checkpoint_escalates(
    fake_flink: FakeFlink, backlog: Backlog, stats: dict | None
) -> None:
    add_crashed_job(fake_flink, checkpoints=stats)

    state = flink_job_crashed(params=params_for(fake_flink, backlog), return_state=True)

    assert state.is_failed()
    with pytest.raises(Escalation, match="no completed checkpoint or savepoint"):
        state.result()
    assert fake_flink.runs() == []
    report = published_report(state)
    assert "**ESCALATED**" in report and "| last successful checkpoint | FAILING |" in report


@pytest.mark.parametrize("approve", [False, True], ids=["rejected", "approved"])
def test_start_without_state_needs_approval(
    fake_flink: FakeFlink, backlog: Backlog, approve: bool
) -> None:
    failed = add_crashed_job(fake_flink, checkpoints=None)  # checkpointing was off
    fake_flink.on_job_start = Drainer(backlog).start
    answer = {"approve": approve, "approver": "bob", "reason": "state rebuilt from the feed"}
    approver = Approver("flink-job-crashed", answer)
    approver.start()

    state = flink_job_crashed(
        params=params_for(fake_flink, backlog, offer_start_without_state=True), return_state=True
    )

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert f"{JOB} without state" in approver.description
    assert "starts with empty state" in approver.description
    report = published_report(state)
    if not approve:
        assert state.is_failed()
        assert "rejected by bob: state rebuilt from the feed" in state.message
        # nothing was submitted: the failed job is the newest, nothing else runs
        assert fake_flink.runs() == []
        assert fake_flink.jobs[failed.jid].state == "FAILED"
        assert [j.state for j in fake_flink.jobs_named(JOB)] == ["CANCELED", "FAILED"]
        assert "**ESCALATED**" in report and "| rejected | bob |" in report
        return
    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    [run] = fake_flink.runs()
    assert "savepointPath" not in run.body and run.body["jobId"] == restore_job_id(failed.jid, None)
    assert fake_flink.jobs[run.body["jobId"]].state == "RUNNING"
    assert "| approved | bob |" in report and "started without state" in report


def test_lag_that_does_not_fall_is_not_verified(fake_flink: FakeFlink, backlog: Backlog) -> None:
    add_crashed_job(fake_flink)  # the restored job starts, but nothing consumes the backlog

    state = flink_job_crashed(
        params=params_for(fake_flink, backlog, lag_deadline_s=2), return_state=True
    )

    assert state.is_failed()
    with pytest.raises(VerificationFailed, match=r"lag \d+ above threshold 0 \(flat.*is RUNNING"):
        state.result()
    assert len(fake_flink.runs()) == 1


def test_draining_lag_can_be_accepted_at_the_deadline(
    fake_flink: FakeFlink, backlog: Backlog
) -> None:
    add_crashed_job(fake_flink)
    drainer = Drainer(backlog, pace_s=0.2)  # slower than the deadline allows
    fake_flink.on_job_start = drainer.start

    state = flink_job_crashed(
        params=params_for(fake_flink, backlog, lag_deadline_s=3, accept_falling_lag=True),
        return_state=True,
    )

    assert state.is_completed(), state.message
    result = state.result()
    assert result.outcome is Outcome.RESOLVED
    assert 0 < result.lag_after < UNPROCESSED
    assert "(falling) at the deadline" in result.report_markdown
    drainer.thread.join(10)
    assert backlog.lag() == 0


def test_restarting_job_that_recovers_itself_is_left_alone(
    fake_flink: FakeFlink, backlog: Backlog
) -> None:
    restarting = fake_flink.add_job(JOB, "RESTARTING", started_ago_s=600)
    fake_flink.set_state_after_reads(restarting.jid, "RUNNING", reads=2)
    fake_flink.on_job_start = Drainer(backlog).start

    state = flink_job_crashed(params=params_for(fake_flink, backlog), return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result.outcome is Outcome.NO_ACTION_NEEDED and result.lag_after == 0
    assert "Flink restarted" in result.report_markdown
    assert fake_flink.runs() == []


def test_restarting_job_that_ends_failed_is_restored(
    fake_flink: FakeFlink, backlog: Backlog
) -> None:
    crashed = add_crashed_job(fake_flink)
    crashed.state = "RESTARTING"
    fake_flink.set_state_after_reads(crashed.jid, "FAILED", reads=2)
    fake_flink.on_job_start = Drainer(backlog).start

    state = flink_job_crashed(params=params_for(fake_flink, backlog), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().outcome is Outcome.RESOLVED
    [run] = fake_flink.runs()
    assert run.body["savepointPath"] == CHECKPOINT_41


# --- the tasks against HTTP failures ------------------------------------------------------------


def cluster_for(fake: FakeFlink, token: str = TOKEN, timeout_s: float = 5) -> FlinkCluster:
    return FlinkCluster(rest_url=fake.url, token=SecretStr(token), request_timeout_s=timeout_s)


CHECKPOINT = Checkpoint(id=41, kind="checkpoint", external_path=CHECKPOINT_41, timestamp_ms=1)


def resubmit(cluster: FlinkCluster, failed_jid: str, dry_run: bool = False):
    @flow
    def run_once():
        return resubmit_from_checkpoint(
            cluster,
            job_name=JOB,
            failed_job_id=failed_jid,
            checkpoint=CHECKPOINT,
            jar=JAR,
            entry_class=None,
            program_args=[],
            parallelism=None,
            dry_run=dry_run,
        )

    return run_once(return_state=True)


def test_lost_response_is_retried_without_a_second_job(fake_flink: FakeFlink) -> None:
    failed = add_crashed_job(fake_flink)
    # the POST is applied but its answer is a 503, as if the response got lost
    fake_flink.fail_next("POST", "/jars/", 503, apply_first=True)

    state = resubmit(cluster_for(fake_flink), failed.jid)

    assert state.is_completed(), state.message
    result = state.result()
    new_jid = restore_job_id(failed.jid, 41)
    assert result.job_id == new_jid and result.changed
    assert "earlier attempt" in result.notes[0]
    # the submission its lost answer hid is the "after": the job as Flink lists it
    [after] = result.applied
    assert after.detail["job_id"] == new_jid
    assert after.detail["state"] in ("INITIALIZING", "RUNNING")
    assert len(fake_flink.runs()) == 1  # the retry looked before posting again
    assert len(fake_flink.calls_to("GET", "/jobs/overview")) == 2
    assert [j.jid for j in fake_flink.jobs_named(JOB) if j.state not in {"FAILED", "CANCELED"}] == [
        new_jid
    ]


def test_same_restore_again_finds_the_earlier_job_by_its_id(fake_flink: FakeFlink) -> None:
    failed = add_crashed_job(fake_flink)
    first = resubmit(cluster_for(fake_flink), failed.jid)
    assert first.is_completed(), first.message
    fake_flink.jobs[first.result().job_id].state = "FAILED"  # died again, no live copy left

    second = resubmit(cluster_for(fake_flink), failed.jid)

    assert second.is_completed(), second.message
    assert second.result().job_id == first.result().job_id
    assert len(fake_flink.runs()) == 1  # the same restore is never posted twice


def test_duplicate_rejected_by_flink_counts_as_submitted(fake_flink: FakeFlink) -> None:
    failed = add_crashed_job(fake_flink)
    # a concurrent run got the same job id in first: Flink answers 400 DuplicateJobSubmission
    fake_flink.fail_next("POST", "/jars/", 400, apply_first=True)

    state = resubmit(cluster_for(fake_flink), failed.jid)

    assert state.is_completed(), state.message
    assert state.result().job_id == restore_job_id(failed.jid, 41)
    assert len(fake_flink.runs()) == 1
    assert len(fake_flink.calls_to("GET", "/jobs/overview")) == 2  # before posting, after the 400


def test_client_error_is_not_retried(fake_flink: FakeFlink) -> None:
    failed = add_crashed_job(fake_flink)
    fake_flink.fail_next("POST", "/jars/", 400)

    state = resubmit(cluster_for(fake_flink), failed.jid)

    assert state.is_failed()
    with pytest.raises(FlinkRequestError, match="HTTP 400"):
        state.result()
    assert len(fake_flink.runs()) == 1
    assert len(fake_flink.jobs_named(JOB)) == 2  # no job was created


def test_server_error_is_retried(fake_flink: FakeFlink) -> None:
    add_crashed_job(fake_flink)
    fake_flink.fail_next("GET", "/jobs/overview", 503)

    @flow
    def look():
        return find_job(cluster_for(fake_flink), JOB)

    assert look().state == "FAILED"
    assert len(fake_flink.calls_to("GET", "/jobs/overview")) == 2


def test_hung_jobmanager_times_out_and_is_retried(fake_flink: FakeFlink) -> None:
    add_crashed_job(fake_flink)
    fake_flink.stall_next("GET", "/jobs/overview", 20)

    @flow
    def look():
        return find_job(cluster_for(fake_flink, timeout_s=0.5), JOB)

    started = time.monotonic()
    assert look().state == "FAILED"
    # the 20 s stall was not waited for (the bound leaves room for a loaded machine)
    assert time.monotonic() - started < 15
    assert len(fake_flink.calls_to("GET", "/jobs/overview")) == 2


def test_basic_auth_reaches_flink(fake_flink: FakeFlink) -> None:
    fake_flink.required_auth = "Basic " + base64.b64encode(b"ops:s3cr3t").decode()
    add_crashed_job(fake_flink)
    cluster = FlinkCluster(rest_url=fake_flink.url, username="ops", password=SecretStr("s3cr3t"))

    @flow
    def look():
        return find_job(cluster, JOB)

    assert look().state == "FAILED"


def test_wrong_credentials_fail_fast(fake_flink: FakeFlink) -> None:
    add_crashed_job(fake_flink)

    @flow
    def look():
        return find_job(cluster_for(fake_flink, token="wrong"), JOB)

    state = look(return_state=True)

    assert state.is_failed()
    with pytest.raises(FlinkRequestError, match="HTTP 401"):
        state.result()
    assert len(fake_flink.calls) == 1
