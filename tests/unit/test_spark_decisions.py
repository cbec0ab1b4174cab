"""Spark runbook decisions as data tables: which driver, is the query progressing, what to do,
did the restarted query continue."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from blocks.spark import SparkCluster
from tasks.spark import parse_master_json, submission_request
from tasks.spark_decisions import (
    Action,
    CheckpointProgress,
    Progress,
    ProgressVerdict,
    SparkApp,
    SparkDriver,
    assess_progress,
    check_continuation,
    choose_driver,
    decide_action,
)

PY = "org.apache.spark.deploy.PythonRunner"
JAR = "com.example.Enrich"


def drv(id_: str, state: str, start: int, main: str = PY) -> SparkDriver:
    return SparkDriver(id=id_, state=state, start_ms=start, main_class=main)


def app(id_: str, name: str, start: int, state: str = "RUNNING") -> SparkApp:
    return SparkApp(id=id_, name=name, state=state, start_ms=start)


# --- which driver ----------------------------------------------------------------------------

CHOOSE = [
    # (drivers, apps, driver_id given, expected driver id, why)
    ([], [], None, None, "nothing on the master"),
    ([drv("d1", "RUNNING", 10)], [app("a1", "counts", 15)], None, "d1", "its app names it"),
    (
        [drv("d1", "RUNNING", 10), drv("d2", "RUNNING", 20)],
        [app("a1", "other", 15), app("a2", "counts", 25)],
        None,
        "d2",
        "each app has its own driver",
    ),
    (
        [drv("d1", "RUNNING", 10), drv("d2", "RUNNING", 20)],
        [app("a1", "counts", 15), app("a2", "other", 25)],
        None,
        "d1",
        "the newer driver belongs to the other app",
    ),
    (
        [drv("d1", "FAILED", 10), drv("d2", "FAILED", 30)],
        [app("a1", "counts", 15, "FINISHED"), app("a2", "counts", 35, "FINISHED")],
        None,
        "d2",
        "newest run of the app",
    ),
    (
        [drv("d1", "FAILED", 10), drv("d2", "SUBMITTED", 30)],
        [app("a1", "counts", 15, "FINISHED")],
        None,
        "d2",
        "a resubmitted driver not yet registered wins over the dead one",
    ),
    (
        [drv("d1", "FAILED", 10), drv("d2", "RUNNING", 30, main=JAR)],
        [app("a1", "counts", 15, "FINISHED")],
        None,
        "d1",
        "an unregistered driver of another main class is not ours",
    ),
    (
        [drv("d1", "RUNNING", 10)],
        [app("a1", "other", 15)],
        None,
        None,
        "only another app's driver",
    ),
    ([drv("d1", "SUBMITTED", 10)], [], None, "d1", "no app yet: the unregistered live driver"),
    ([drv("d1", "FAILED", 10)], [], None, None, "no app, dead unregistered driver: unknown"),
    (
        [drv("d1", "RUNNING", 10), drv("d7", "FAILED", 5)],
        [app("a1", "counts", 15)],
        "d7",
        "d7",
        "the alert's driver id wins",
    ),
    (
        [drv("d1", "RUNNING", 10)],
        [app("a1", "counts", 15)],
        "d9",
        "d1",
        "an unknown alert driver id falls back to the name",
    ),
]


@pytest.mark.parametrize(
    ("drivers", "apps", "given", "expected", "why"), CHOOSE, ids=[c[-1] for c in CHOOSE]
)
def test_choose_driver(drivers, apps, given, expected, why) -> None:
    match = choose_driver(drivers, apps, "counts", PY, given)
    assert (match.driver.id if match.driver else None) == expected, match.how


def test_master_json_is_parsed_as_spark_writes_it() -> None:
    # shapes as Spark 4.3's master answered in the integration tests (trimmed)
    data = {
        "url": "spark://127.0.0.1:41241",
        "workers": [{"state": "ALIVE", "coresfree": 0, "memoryfree": 512}],
        "aliveworkers": 1,
        "activeapps": [
            {"id": "app-1", "starttime": 1796108943843, "name": "counts", "state": "RUNNING"}
        ],
        "completedapps": [],
        "activedrivers": [
            {"id": "driver-1", "starttime": "1796108937705", "state": "RUNNING", "mainclass": PY}
        ],
        "completeddrivers": [],
        "status": "ALIVE",
    }
    state = parse_master_json(data)
    assert (state.url, state.alive_workers, state.memory_free_mb) == (data["url"], 1, 512)
    assert state.drivers[0].start_ms == 1796108937705
    assert choose_driver(state.drivers, state.apps, "counts", PY).driver.id == "driver-1"


# --- progress --------------------------------------------------------------------------------

NOW = 1_000_000.0


def cp(
    offset=None, offset_age=None, commit=None, commit_age=None, exists=True
) -> CheckpointProgress:
    return CheckpointProgress(
        location="/ckpt",
        exists=exists,
        query_id="q" if exists else None,
        last_offset_batch=offset,
        last_offset_mtime=None if offset_age is None else NOW - offset_age,
        last_commit_batch=commit,
        last_commit_mtime=None if commit_age is None else NOW - commit_age,
    )


PROGRESS = [
    # (checkpoint, expected, why)
    (cp(exists=False), Progress.NO_CHECKPOINT, "nothing at the location"),
    (cp(), Progress.STARTING, "metadata only"),
    (cp(0, 5), Progress.STARTING, "first batch in flight"),
    (cp(0, 500), Progress.STALLED, "first batch never committed"),
    (cp(7, 2, 7, 2), Progress.PROGRESSING, "last batch committed just now"),
    (cp(8, 1, 7, 3), Progress.PROGRESSING, "next batch in flight briefly"),
    (cp(8, 400, 7, 401), Progress.STALLED, "batch in flight past the window"),
    (cp(7, 400, 7, 400), Progress.IDLE, "all committed, nothing new: a quiet source"),
    (cp(8, 299, 7, 400), Progress.PROGRESSING, "in flight just under the window"),
]


@pytest.mark.parametrize(("checkpoint", "expected", "why"), PROGRESS, ids=[p[-1] for p in PROGRESS])
def test_assess_progress(checkpoint, expected, why) -> None:
    assert assess_progress(checkpoint, NOW, stall_after_s=300).progress is expected


def test_in_flight_is_the_planned_uncommitted_batch() -> None:
    assert cp(8, 1, 7, 3).in_flight == 8
    assert cp(7, 1, 7, 3).in_flight is None
    assert cp(0, 1).in_flight == 0


# --- what to do ------------------------------------------------------------------------------


def verdict(progress: Progress) -> ProgressVerdict:
    return ProgressVerdict(progress=progress, reason=progress.value)


DECIDE = [
    # (driver, progress, idle_is_stalled, action, without checkpoint, why)
    (None, Progress.PROGRESSING, False, Action.RESUBMIT, False, "no driver, checkpoint there"),
    (None, Progress.NO_CHECKPOINT, False, Action.RESUBMIT, True, "no driver, no checkpoint"),
    (drv("d", "FAILED", 1), Progress.STALLED, False, Action.RESUBMIT, False, "dead driver"),
    (drv("d", "KILLED", 1), Progress.IDLE, False, Action.RESUBMIT, False, "killed driver"),
    (drv("d", "ERROR", 1), Progress.PROGRESSING, False, Action.RESUBMIT, False, "launch error"),
    (drv("d", "FAILED", 1), Progress.NO_CHECKPOINT, False, Action.RESUBMIT, True, "dead, no ckpt"),
    (drv("d", "FINISHED", 1), Progress.IDLE, False, Action.ESCALATE, False, "stopped on purpose"),
    (drv("d", "SUBMITTED", 1), Progress.STALLED, False, Action.WAIT, False, "being scheduled"),
    (
        drv("d", "RELAUNCHING", 1),
        Progress.STALLED,
        False,
        Action.WAIT,
        False,
        "supervised relaunch",
    ),
    (drv("d", "RUNNING", 1), Progress.PROGRESSING, False, Action.NOTHING, False, "healthy"),
    (drv("d", "RUNNING", 1), Progress.STARTING, False, Action.NOTHING, False, "starting"),
    (drv("d", "RUNNING", 1), Progress.IDLE, False, Action.NOTHING, False, "quiet source"),
    (drv("d", "RUNNING", 1), Progress.IDLE, True, Action.KILL_AND_RESUBMIT, False, "idle=stall"),
    (drv("d", "RUNNING", 1), Progress.STALLED, False, Action.KILL_AND_RESUBMIT, False, "stalled"),
    (drv("d", "RUNNING", 1), Progress.NO_CHECKPOINT, False, Action.ESCALATE, False, "wrong path"),
    (drv("d", "WEIRD", 1), Progress.PROGRESSING, False, Action.ESCALATE, False, "unknown state"),
]


@pytest.mark.parametrize(
    ("driver", "progress", "idle", "action", "fresh", "why"), DECIDE, ids=[d[-1] for d in DECIDE]
)
def test_decide_action(driver, progress, idle, action, fresh, why) -> None:
    decision = decide_action(driver, verdict(progress), idle)
    assert (decision.action, decision.without_checkpoint) == (action, fresh)


# --- did it continue -------------------------------------------------------------------------

CONTINUE = [
    # (last before, qid before, commits now, qid now, min new, ok, why)
    (7, "q", [5, 6, 7, 8, 9], "q", 2, True, "8 and 9 follow 7"),
    (7, "q", [5, 6, 7, 8], "q", 2, False, "one batch only so far"),
    (7, "q", [5, 6, 7], "q", 1, False, "nothing new yet"),
    (7, "q", [7, 9, 10], "q", 2, False, "batch 8 skipped"),
    (7, "q", [8, 10], "q", 2, False, "gap after the first"),
    (7, "q", [0, 1], "q2", 1, False, "started over: new query id"),
    (None, None, [0, 1], "q", 2, True, "no checkpoint before: from batch 0"),
    (None, None, [3, 4], "q", 2, False, "no checkpoint before, yet not from 0"),
]


@pytest.mark.parametrize(
    ("last", "qid", "commits", "qid_now", "min_new", "ok", "why"),
    CONTINUE,
    ids=[c[-1] for c in CONTINUE],
)
def test_check_continuation(last, qid, commits, qid_now, min_new, ok, why) -> None:
    assert check_continuation(last, qid, commits, qid_now, min_new).ok is ok


# --- the submission ----------------------------------------------------------------------------

SUBMISSION = [
    # (block's spark_properties, expected properties subset, why)
    ({}, {"spark.master": "spark://m:7077", "spark.driver.supervise": "false"}, "defaults"),
    (
        {"spark.master": "spark://m-a:7077,m-b:7077"},
        {"spark.master": "spark://m-a:7077,m-b:7077"},
        "an HA master list from the block wins over the master's own URL",
    ),
    (
        {"spark.app.name": "other", "spark.submit.deployMode": "client"},
        {"spark.app.name": "counts", "spark.submit.deployMode": "cluster"},
        "the block's app name and cluster mode always apply",
    ),
    ({"spark.driver.supervise": "true"}, {"spark.driver.supervise": "true"}, "supervise kept"),
]


@pytest.mark.parametrize(("props", "expected", "why"), SUBMISSION, ids=[s[-1] for s in SUBMISSION])
def test_submission_request(props: dict, expected: dict, why: str) -> None:
    block = SparkCluster(
        rest_url="http://m:6066",
        ui_url="http://m:8080",
        app_name="counts",
        app_resource="/apps/counts.py",
        app_args=["/apps/counts.py", "", "--out", "/sink"],
        spark_properties=props,
        environment_variables={"PYSPARK_PYTHON": "python3"},
        checkpoint_location="/ckpt/counts",
    )
    body = submission_request(block, "spark://m:7077")
    assert body["action"] == "CreateSubmissionRequest"
    assert (body["appResource"], body["mainClass"]) == ("/apps/counts.py", PY)
    assert body["appArgs"] == ["/apps/counts.py", "", "--out", "/sink"]
    assert body["environmentVariables"] == {"PYSPARK_PYTHON": "python3"}
    assert expected.items() <= body["sparkProperties"].items()
    assert body["sparkProperties"]["spark.app.name"] == "counts"


CHECKPOINT_LOCATIONS = [
    ("/data/ckpt", True),
    ("file:///data/ckpt", True),
    ("s3a://bucket/ckpt", False),
    ("hdfs://nn/ckpt", False),
]


@pytest.mark.parametrize(("location", "ok"), CHECKPOINT_LOCATIONS)
def test_checkpoint_location_must_be_readable_here(location: str, ok: bool) -> None:
    fields = {
        "rest_url": "http://m:6066",
        "ui_url": "http://m:8080",
        "app_name": "counts",
        "app_resource": "/apps/counts.py",
        "checkpoint_location": location,
    }
    if ok:
        assert SparkCluster(**fields).checkpoint_location == location
    else:
        with pytest.raises(ValidationError, match="path the runbook can read"):
            SparkCluster(**fields)
