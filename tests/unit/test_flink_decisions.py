"""Flink runbook decisions as data tables: which job, which checkpoint, what to do, is lag normal."""

from __future__ import annotations

import re

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from blocks.flink import FlinkCluster
from tasks.flink_decisions import (
    NOT_ADDRESSABLE,
    Action,
    Checkpoint,
    FlinkJob,
    JarFile,
    LagTrend,
    SlotCapacity,
    assess_lag,
    choose_checkpoint,
    choose_jar,
    choose_job,
    decide_action,
    decide_slots,
    flink_error_summary,
    job_progress,
    restore_job_id,
    root_cause,
    same_checkpoint_path,
    slots_needed,
    tasks_running,
)


def job(jid: str, state: str, start: int, name: str = "enrichment-job", end: int = -1) -> FlinkJob:
    return FlinkJob(jid=jid, name=name, state=state, start_time=start, end_time=end)


# --- which job ------------------------------------------------------------------------------

CHOOSE_JOB = [
    # (jobs, expected jid, why)
    ([], None, "no job at all"),
    ([job("a", "FAILED", 1, name="other-job")], None, "only other names"),
    ([job("a", "FAILED", 1)], "a", "single failed job"),
    ([job("a", "FAILED", 1), job("b", "FAILED", 5)], "b", "newest of two failed"),
    ([job("a", "CANCELED", 9), job("b", "FAILED", 5)], "a", "newest is canceled"),
    ([job("a", "RUNNING", 1), job("b", "FAILED", 5)], "a", "live copy beats newer dead one"),
    ([job("a", "RESTARTING", 1), job("b", "FAILED", 5)], "a", "restarting copy is live"),
    ([job("a", "RUNNING", 1), job("b", "RUNNING", 5)], "b", "newest of two live"),
    ([job("a", "FINISHED", 7), job("b", "FAILED", 5)], "a", "finished is terminal, newest wins"),
    ([job("a", "FAILED", 5, end=6), job("b", "FAILED", 5, end=9)], "b", "same start: later end"),
    ([job("a", "INITIALIZING", -1), job("b", "FAILED", 5)], "a", "not yet started but live"),
    ([job("a", "SUSPENDED", 1), job("b", "CANCELED", 5)], "a", "suspended is not terminal"),
    ([job("a", "FAILED", 1), job("b", "RUNNING", 3, name="other-job")], "a", "other name ignored"),
]


@pytest.mark.parametrize(("jobs", "expected", "why"), CHOOSE_JOB, ids=[r[2] for r in CHOOSE_JOB])
def test_choose_job(jobs: list[FlinkJob], expected: str | None, why: str) -> None:
    chosen = choose_job(jobs, "enrichment-job")
    assert (chosen.jid if chosen else None) == expected


# --- which checkpoint -----------------------------------------------------------------------


def cp(
    cid: int,
    kind: str = "checkpoint",
    path: str | None = "s3://ckpt/chk-{id}",
    ts: int | None = 0,
    discarded: bool = False,
) -> Checkpoint:
    return Checkpoint(
        id=cid,
        kind=kind,
        external_path=path.format(id=cid) if path else path,
        timestamp_ms=ts,
        discarded=discarded,
    )


CHOOSE_CHECKPOINT = [
    ([], None, "nothing at all"),
    ([cp(41)], 41, "one completed checkpoint"),
    ([cp(41), cp(38, "savepoint")], 41, "checkpoint newer than savepoint"),
    ([cp(41), cp(45, "savepoint")], 45, "savepoint newer than checkpoint"),
    ([cp(41, path=None), cp(38, "savepoint")], 38, "checkpoint without path"),
    ([cp(41, path=NOT_ADDRESSABLE), cp(38, "savepoint")], 38, "checkpoint only in JM memory"),
    ([cp(41, path=""), cp(38, "savepoint", path=None)], None, "no usable path anywhere"),
    ([cp(41, discarded=True), cp(38, "savepoint")], 38, "discarded checkpoint is gone"),
    ([cp(12, "restored")], 12, "crashed before its first checkpoint: its restore point"),
    ([cp(15), cp(12, "restored")], 15, "own checkpoint newer than restore point"),
    ([cp(15, path=NOT_ADDRESSABLE), cp(12, "restored")], 12, "own checkpoint not retained"),
    ([cp(41, ts=5), cp(41, "savepoint", path="s3://sp/{id}", ts=9)], 41, "same id: later ack"),
]


@pytest.mark.parametrize(
    ("candidates", "expected", "why"), CHOOSE_CHECKPOINT, ids=[r[2] for r in CHOOSE_CHECKPOINT]
)
def test_choose_checkpoint(candidates: list[Checkpoint], expected: int | None, why: str) -> None:
    chosen = choose_checkpoint(candidates)
    assert (chosen.id if chosen else None) == expected
    if chosen is not None:
        assert chosen.usable


def test_same_id_prefers_later_acknowledgement() -> None:
    chosen = choose_checkpoint([cp(41, ts=5), cp(41, "savepoint", path="s3://sp/{id}", ts=9)])
    assert chosen is not None and chosen.external_path == "s3://sp/41"


# --- which jar ------------------------------------------------------------------------------

JARS = [
    JarFile(id="aaa_enrichment-job.jar", name="enrichment-job.jar", uploaded=100),
    JarFile(id="bbb_enrichment-job.jar", name="enrichment-job.jar", uploaded=300),
    JarFile(id="ccc_other.jar", name="other.jar", uploaded=500),
]

CHOOSE_JAR = [
    ("enrichment-job.jar", "bbb_enrichment-job.jar", "newest upload of that name"),
    ("aaa_enrichment-job.jar", "aaa_enrichment-job.jar", "exact id wins"),
    ("other.jar", "ccc_other.jar", "single upload"),
    ("missing.jar", None, "not uploaded"),
    ("enrichment-job", None, "name must match exactly"),
]


@pytest.mark.parametrize(("wanted", "expected", "why"), CHOOSE_JAR, ids=[r[2] for r in CHOOSE_JAR])
def test_choose_jar(wanted: str, expected: str | None, why: str) -> None:
    chosen = choose_jar(JARS, wanted)
    assert (chosen.id if chosen else None) == expected


# --- what to do -----------------------------------------------------------------------------

GOOD = cp(41)

DECIDE = [
    # (state or None for "no job", checkpoint, expected action, text the reason must contain)
    (None, GOOD, Action.ESCALATE, "no job"),
    ("RUNNING", None, Action.NOTHING, "RUNNING"),
    ("RUNNING", GOOD, Action.NOTHING, "RUNNING"),
    ("FAILED", GOOD, Action.RESTORE, "s3://ckpt/chk-41"),
    ("CANCELED", GOOD, Action.RESTORE, "checkpoint 41"),
    ("FAILED", None, Action.ESCALATE, "no completed checkpoint"),
    ("CANCELED", None, Action.ESCALATE, "lose its state"),
    ("RESTARTING", None, Action.OBSERVE, "RESTARTING"),
    ("RESTARTING", GOOD, Action.OBSERVE, "settle"),
    ("INITIALIZING", None, Action.OBSERVE, "INITIALIZING"),
    ("CREATED", None, Action.OBSERVE, "CREATED"),
    ("FAILING", GOOD, Action.OBSERVE, "FAILING"),
    ("CANCELLING", None, Action.OBSERVE, "CANCELLING"),
    ("SUSPENDED", GOOD, Action.OBSERVE, "SUSPENDED"),
    ("RECONCILING", None, Action.OBSERVE, "RECONCILING"),
    ("FINISHED", GOOD, Action.ESCALATE, "did not crash"),
    ("EXPLODED", GOOD, Action.ESCALATE, "unknown state"),
]


@pytest.mark.parametrize(("state", "checkpoint", "action", "reason"), DECIDE)
def test_decide_action(
    state: str | None, checkpoint: Checkpoint | None, action: Action, reason: str
) -> None:
    the_job = job("f" * 32, state, 1) if state else None
    decision = decide_action(the_job, checkpoint)
    assert decision.action is action
    assert reason in decision.reason


# --- is lag back to normal ------------------------------------------------------------------

LAG = [
    # (samples oldest first, threshold, recovered, trend)
    ([], 10, False, LagTrend.UNKNOWN),
    ([5], 10, True, LagTrend.UNKNOWN),
    ([50], 10, False, LagTrend.UNKNOWN),
    ([10], 10, True, LagTrend.UNKNOWN),
    ([100, 60, 20, 5], 10, True, LagTrend.FALLING),
    ([100, 60, 20], 10, False, LagTrend.FALLING),
    ([100, 100, 60, 60, 20, 20], 10, False, LagTrend.FALLING),  # steps: commits per checkpoint
    ([100, 120, 90, 130, 70], 10, False, LagTrend.FALLING),  # new events arrive while draining
    ([100, 50, 50, 50, 50, 50], 10, False, LagTrend.FLAT),  # drained once, then stalled
    ([100, 100, 100], 10, False, LagTrend.FLAT),
    ([100, 40, 100], 10, False, LagTrend.FLAT),
    ([20, 60, 100], 10, False, LagTrend.RISING),
    ([20, 20, 100], 10, False, LagTrend.RISING),
    ([50, 10, 10, 10, 40, 80], 10, False, LagTrend.RISING),  # consumer stopped again
    ([0, 0], 0, True, LagTrend.FLAT),
    ([30, 0], 0, True, LagTrend.FALLING),
    ([0, 3], 5, True, LagTrend.RISING),  # under threshold counts even if creeping up
]


@pytest.mark.parametrize(("samples", "threshold", "recovered", "trend"), LAG)
def test_assess_lag(samples: list[int], threshold: int, recovered: bool, trend: LagTrend) -> None:
    verdict = assess_lag(samples, threshold)
    assert verdict.recovered is recovered
    assert verdict.trend is trend
    assert verdict.latest == (samples[-1] if samples else None)
    assert str(threshold) in verdict.reason


# --- restore job id -------------------------------------------------------------------------

RESTORE_IDS = [
    ("a" * 32, 41),
    ("a" * 32, 42),
    ("b" * 32, 41),
    ("0123456789abcdef0123456789abcdef", 1),
]


@pytest.mark.parametrize(("failed", "checkpoint_id"), RESTORE_IDS)
def test_restore_job_id_is_a_stable_flink_job_id(failed: str, checkpoint_id: int) -> None:
    jid = restore_job_id(failed, checkpoint_id)
    assert re.fullmatch(r"[0-9a-f]{32}", jid)  # Flink's JobID.fromHexString format
    assert jid == restore_job_id(failed, checkpoint_id)
    others = {restore_job_id(f, c) for f, c in RESTORE_IDS if (f, c) != (failed, checkpoint_id)}
    assert jid not in others


# --- what the real REST API says: failure causes, error bodies ----------------------------------

# as Flink 2.3 records a job that failed with restart strategy none (trimmed)
SUPPRESSED = (
    "org.apache.flink.runtime.JobException: Recovery is suppressed by NoRestartBackoffTimeStrategy\n"
    "\tat org.apache.flink.runtime.executiongraph.failover.ExecutionFailureHandler.handleFailure(X.java:213)\n"
    "Caused by: org.apache.flink.runtime.jobmaster.JobMasterException: TaskManager with id "
    "127.0.0.1:54823-74e6ec is no longer reachable.\n\tat org.apache.flink.Y.z(Y.java:1)\n"
)
SUBMIT_FAILED = (
    "org.apache.flink.runtime.rest.handler.RestHandlerException: Could not execute application.\n"
    "\tat org.apache.flink.runtime.webmonitor.handlers.JarRunHandler.lambda$handleRequest$1(J.java:114)\n"
    "Caused by: org.apache.flink.util.FlinkException: Failed to execute job 'x'.\n\t... 8 more\n"
    "Caused by: java.io.FileNotFoundException: Cannot find checkpoint or savepoint file/directory "
    "'file:/nonexistent/chk-1' on file system 'file'.\n\t... 5 more\n"
)
ROOT_CAUSE = [
    (
        SUPPRESSED,
        "org.apache.flink.runtime.jobmaster.JobMasterException: TaskManager with id "
        "127.0.0.1:54823-74e6ec is no longer reachable.",
        "innermost of a restart-none failure",
    ),
    (
        SUBMIT_FAILED,
        "java.io.FileNotFoundException: Cannot find checkpoint or savepoint "
        "file/directory 'file:/nonexistent/chk-1' on file system 'file'.",
        "deepest of several",
    ),
    (
        "java.lang.NullPointerException: team lookup\n\tat a.b(C.java:1)",
        "java.lang.NullPointerException: team lookup",
        "no cause: the first line",
    ),
    ("", "", "nothing recorded"),
]


@pytest.mark.parametrize(("trace", "expected", "why"), ROOT_CAUSE, ids=[r[2] for r in ROOT_CAUSE])
def test_root_cause(trace: str, expected: str, why: str) -> None:
    assert root_cause(trace) == expected


ERROR_SUMMARY = [
    (
        [SUBMIT_FAILED],
        "Could not execute application. (cause: java.io.FileNotFoundException",
        "stack trace: head and innermost cause",
    ),
    (["Jar file /tmp/x.jar does not exist"], "Jar file /tmp/x.jar does not exist", "plain message"),
    (
        [
            "Could not execute application.",
            "Caused by: x.DuplicateApplicationSubmissionException: "
            "Application has already been submitted.",
        ],
        "Could not execute application.; x.DuplicateApplicationSubmissionException",
        "split entries",
    ),
]


@pytest.mark.parametrize(
    ("errors", "expected", "why"), ERROR_SUMMARY, ids=[r[2] for r in ERROR_SUMMARY]
)
def test_flink_error_summary(errors: list[str], expected: str, why: str) -> None:
    summary = flink_error_summary(errors)
    assert expected in summary
    assert "\tat " not in summary and len(summary) < 400


# --- is the restored job running, are there slots for it ------------------------------------


def vertex(parallelism: int, **tasks: int) -> dict:
    return {"parallelism": parallelism, "status": "RUNNING", "tasks": tasks}


RUNNING = [
    # (state, vertices, running?, why)
    ("RUNNING", [vertex(2, RUNNING=2), vertex(2, RUNNING=2)], True, "every task running"),
    ("RUNNING", [vertex(2, SCHEDULED=2), vertex(2, SCHEDULED=2)], False, "waiting for slots"),
    ("RUNNING", [vertex(2, RUNNING=2), vertex(2, DEPLOYING=1, RUNNING=1)], False, "deploying"),
    (
        "RUNNING",
        [vertex(3, RUNNING=2, FINISHED=1), vertex(3, RUNNING=3)],
        True,
        "source subtask without a split finished after a rescale",
    ),
    ("RUNNING", [vertex(1, FINISHED=1)], False, "everything finished"),
    ("INITIALIZING", [], False, "not scheduled yet"),
    ("FAILED", [vertex(2, FAILED=1, CANCELED=1)], False, "failed again"),
    ("RUNNING", [], True, "no task details (older or proxied API): the state decides"),
]


@pytest.mark.parametrize(
    ("state", "vertices", "running", "why"), RUNNING, ids=[r[3] for r in RUNNING]
)
def test_tasks_running(state: str, vertices: list[dict], running: bool, why: str) -> None:
    progress = job_progress({"jid": "a" * 32, "state": state, "vertices": vertices})
    assert tasks_running(progress) is running
    assert progress.parallelism == (max(v["parallelism"] for v in vertices) if vertices else None)


SLOTS_NEEDED = [
    (None, None, 1, "nothing known: one slot"),
    (None, 2, 2, "the failed job's parallelism"),
    (4, 2, 4, "the run's parallelism wins"),
]


@pytest.mark.parametrize(
    ("param", "failed", "needed", "why"), SLOTS_NEEDED, ids=[r[3] for r in SLOTS_NEEDED]
)
def test_slots_needed(param: int | None, failed: int | None, needed: int, why: str) -> None:
    assert slots_needed(param, failed) == needed


DECIDE_SLOTS = [
    # (taskmanagers, total, available, needed, ready, reason)
    (0, 0, 0, 2, False, "no TaskManager registered"),
    (1, 4, 1, 2, False, "1 of 4 slot(s) free: the job needs 2"),
    (1, 4, 2, 2, True, "2 of 4 slot(s) free"),
    (2, 8, 8, 4, True, "2 TaskManager(s)"),
    (1, 4, 0, 1, False, "other jobs hold the slots"),
]


@pytest.mark.parametrize(("tms", "total", "available", "needed", "ready", "reason"), DECIDE_SLOTS)
def test_decide_slots(
    tms: int, total: int, available: int, needed: int, ready: bool, reason: str
) -> None:
    capacity = SlotCapacity(taskmanagers=tms, slots_total=total, slots_available=available)
    decision = decide_slots(capacity, needed)
    assert decision.ready is ready
    assert reason in decision.reason


SAME_PATH = [
    ("file:/tmp/c/abc/chk-3", "file:/tmp/c/abc/chk-3", True, "identical"),
    ("file:/tmp/c/abc/chk-3", "file:///tmp/c/abc/chk-3", True, "file: forms"),
    ("s3://b/abc/chk-3/", "s3://b/abc/chk-3", True, "trailing slash"),
    ("file:/tmp/c/abc/chk-3", "file:/tmp/c/abc/chk-4", False, "another checkpoint"),
    ("s3://b/abc/chk-3", "s3a://b/abc/chk-3", False, "another file system"),
    (None, "file:/tmp/c/abc/chk-3", False, "restored from nothing"),
]


@pytest.mark.parametrize(("a", "b", "same", "why"), SAME_PATH, ids=[r[3] for r in SAME_PATH])
def test_same_checkpoint_path(a: str | None, b: str | None, same: bool, why: str) -> None:
    assert same_checkpoint_path(a, b) is same
    assert same_checkpoint_path(b, a) is same


# --- block ----------------------------------------------------------------------------------

BLOCK_INVALID = [
    ({"username": "ops"}, "both username and password"),
    ({"password": SecretStr("pw")}, "both username and password"),
    ({"username": "ops", "password": SecretStr("pw"), "token": SecretStr("t")}, "not both"),
    ({"request_timeout_s": 0}, "greater than 0"),
    ({"request_timeout_s": 301}, "less than or equal to 300"),
]


@pytest.mark.parametrize(("fields", "message"), BLOCK_INVALID)
def test_block_rejects_bad_settings(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FlinkCluster(rest_url="http://flink:8081", **fields)


def test_block_client_carries_url_timeout_and_auth() -> None:
    basic = FlinkCluster(
        rest_url="https://flink:8081/",
        username="ops",
        password=SecretStr("pw"),
        request_timeout_s=7,
    )
    with basic.get_client() as client:
        assert str(client.base_url) == "https://flink:8081"
        assert client.timeout == httpx.Timeout(7)
        request = client.build_request("GET", "/jobs/overview")
        assert str(request.url) == "https://flink:8081/jobs/overview"
        assert isinstance(client.auth, httpx.BasicAuth)
    bearer = FlinkCluster(rest_url="http://flink:8081", token=SecretStr("tok-123"))
    with bearer.get_client() as client:
        assert client.headers["Authorization"] == "Bearer tok-123"
    assert "tok-123" not in repr(bearer) and "pw" not in repr(basic.password)
