"""Runbook "Spark streaming job failed" (seed 004 §4.2; §4.1 "restart producer and Spark
processor"; §4.5 "lag increasing: restart Spark processor"): bring a dead or stalled Structured
Streaming query back from its checkpoint.

Symptoms: the streaming job's driver died (machine lost, OOM, an exception) or it runs but its
query commits no batch (stuck executors, a hung sink); consumer lag grows. Response: find the
driver of the application on the standalone master, read the query's progress from its
checkpoint (``offsets/`` planned, ``commits/`` done), check its dependencies (Kafka, MySQL), kill
a stalled driver, resubmit the application with the same checkpoint location, and verify the new
driver runs and commits the next batch after the last committed one: no batch from scratch, none
skipped. A resubmission without a checkpoint would reprocess or skip data: a human approves it.
"""

import time

from prefect import flow
from pydantic import BaseModel, Field

from blocks.kafka import KafkaCluster
from blocks.mysql import MySQLDatabase
from blocks.spark import SparkCluster
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, OptionalBlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard, Target
from runbooks.waiting import poll_until
from tasks.kafka import check_isr
from tasks.mysql import probe_server
from tasks.spark import (
    DriverStatus,
    MasterState,
    Resubmission,
    get_checkpoint_progress,
    get_driver_status,
    get_master_state,
    kill_driver,
    resubmit_application,
)
from tasks.spark_decisions import (
    DEAD_DRIVER,
    SETTLING_DRIVER,
    Action,
    CheckpointProgress,
    Continuation,
    Decision,
    DriverMatch,
    Progress,
    assess_progress,
    check_continuation,
    choose_driver,
    decide_action,
)

RUNBOOK = "spark-streaming-job-failed"

# A query that dies (or stalls) again after every resubmission has a bug or a poisoned batch a
# restart won't fix: after this many resubmissions of one application per hour, a human looks. A
# stalled driver's kill is part of its resubmission and counts with it.
RESUBMIT_BUDGET = Budget(max_actions=3, window_s=3600)


class SparkStreamingJobFailedParams(RunbookParams):
    """Run form of the spark-streaming-job-failed runbook."""

    spark_block: BlockName = Field(
        "default",
        description="Name of the Runbooks Spark Cluster block (master, application, checkpoint).",
    )
    driver_id: str | None = Field(
        None,
        description="The driver (submission id) the alert names, if any; empty: found from the "
        "application's name on the master.",
    )
    stall_after_s: float = Field(
        300,
        gt=0,
        le=24 * 3600,
        description="A planned batch not committed for this long is a stalled query, in seconds. "
        "Keep it well above the trigger interval and the slowest normal batch.",
    )
    idle_is_stalled: bool = Field(
        False,
        description="Also treat a query that planned no batch for stall_after_s as stalled. Off: "
        "Spark plans no batch while its source has no new data, which is not a fault.",
    )
    kafka_block: OptionalBlockName = Field(
        None, description="Kafka cluster the query reads (checked reachable before a restart)."
    )
    mysql_block: OptionalBlockName = Field(
        None,
        description="MySQL / MariaDB the query writes to (checked reachable before a restart).",
    )
    running_deadline_s: float = Field(
        180,
        gt=0,
        le=3600,
        description="How long a new driver may take to reach RUNNING, in seconds.",
    )
    progress_deadline_s: float = Field(
        300,
        gt=0,
        le=4 * 3600,
        description="How long the restarted query may take to commit its next batches, in seconds.",
    )
    min_new_batches: int = Field(
        2,
        ge=1,
        le=100,
        description="Batches the restarted query must commit to count as recovered.",
    )
    poll_interval_s: float = Field(
        5,
        gt=0,
        le=300,
        description="Pause between two checks of driver state or progress, in seconds.",
    )


class SparkRecovery(BaseModel):
    """What a spark-streaming-job-failed run found and did."""

    outcome: Outcome
    app_name: str
    driver_id: str | None = Field(None, description="The driver found (dead, stalled or running).")
    driver_state: str | None = None
    progress: Progress | None = None
    last_committed_batch: int | None = Field(None, description="Before the runbook acted.")
    killed_driver_id: str | None = None
    new_driver_id: str | None = None
    new_batches: list[int] = Field(
        default_factory=list, description="Batches the restarted query committed while verified."
    )
    report_markdown: str = ""


@flow(
    name=RUNBOOK,
    description="Spark streaming job failed: resubmit a dead or stalled query from its checkpoint.",
)
@ends_as_reported
def spark_streaming_job_failed(params: SparkStreamingJobFailedParams) -> SparkRecovery:
    """Find the driver and the query's progress; bring a dead or stalled query back, verified."""
    spark = SparkCluster.load(params.spark_block)
    summary = SparkRecovery(outcome=Outcome.FAILED, app_name=spark.app_name)
    with incident_report(
        runbook=RUNBOOK, title="Spark Streaming Job Failed", severity="P2", params=params
    ) as report:
        master = get_master_state(spark)
        report.evidence("spark master", master.model_dump(exclude={"drivers", "apps"}))
        target = Target(
            "spark-app",
            f"{spark.rest_url.rstrip('/')}/{spark.app_name}",
            f"{master.url} app {spark.app_name}",
        )
        with report.guard(target) as guard:
            return _run(spark, master, params, report, guard, summary)
    # another run held the application: the report says so, nothing was changed
    return _summarize(summary, report)


def _run(
    spark: SparkCluster,
    master: MasterState,
    params: SparkStreamingJobFailedParams,
    report: IncidentReport,
    guard: Guard,
    summary: SparkRecovery,
) -> SparkRecovery:
    match, progress, decision = _decide(spark, master, params, report)
    if decision.action is Action.WAIT:
        assert match.driver is not None
        _wait_until_settled(spark, match.driver.id, params, report)
        master = get_master_state(spark)
        match, progress, decision = _decide(spark, master, params, report)
    driver = match.driver
    summary.driver_id = driver.id if driver else None
    summary.driver_state = driver.state if driver else None
    summary.last_committed_batch = progress.last_commit_batch
    summary.progress = assess_progress(progress, time.time(), params.stall_after_s).progress

    if decision.action is Action.ESCALATE:
        raise Escalation(f"{spark.app_name}: {decision.reason}")
    if decision.action in (Action.NOTHING, Action.WAIT):
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            f"{spark.app_name}: {decision.reason}. If lag keeps growing, the query is slow rather "
            "than dead (see the latency runbooks).",
        )
        return _summarize(summary, report)

    _check_dependencies(params, report)
    if master.alive_workers == 0:
        raise Escalation(
            f"{spark.app_name}: the master {master.url} has no ALIVE worker: a resubmitted "
            "driver could not start; bring the workers back first"
        )

    replaced = driver.id if driver else None
    last = progress.last_commit_batch
    stalled = decision.action is Action.KILL_AND_RESUBMIT

    def restart(dry_run: bool) -> Resubmission:
        """Kill the stalled driver (if stalled), then resubmit: one action, one budget, so a
        stalled query is never killed when its resubmission is not allowed."""
        kill = (
            kill_driver(spark, replaced, decision.reason, dry_run=dry_run)
            if stalled and replaced
            else None
        )
        submitted = resubmit_application(
            spark, replaces_driver_id=replaced, last_committed_batch=last, dry_run=dry_run
        )
        if kill is None:
            return submitted
        return submitted.model_copy(
            update={
                "planned": kill.planned + submitted.planned,
                "applied": kill.applied + submitted.applied,
                "notes": kill.notes + submitted.notes,
            }
        )

    resubmission: Resubmission = guard.act(
        "start without checkpoint" if decision.without_checkpoint else "resubmit application",
        restart,
        budget=RESUBMIT_BUDGET,
        approval=_needs_approval,
    )
    if any(c.action == "kill_driver" for c in resubmission.applied):
        summary.killed_driver_id = replaced
    summary.new_driver_id = resubmission.driver_id
    source = (
        f"its checkpoint at {spark.checkpoint_location} (last committed batch {last})"
        if last is not None
        else f"NO checkpoint at {spark.checkpoint_location}"
    )
    if params.dry_run:
        what = "; ".join(c.describe() for c in resubmission.planned) or "; ".join(
            resubmission.notes
        )
        report.finish(
            Outcome.PLANNED if resubmission.planned else Outcome.NO_ACTION_NEEDED,
            f"Would {'kill the stalled driver and ' if stalled else ''}resubmit {spark.app_name} "
            f"from {source}: {what}",
        )
        return _summarize(summary, report)

    new_id = resubmission.driver_id
    assert new_id is not None  # a live submission always knows its driver
    _verify_running(spark, new_id, params, guard)
    continuation = _verify_continuation(spark, progress, params, guard, report)
    summary.new_batches = continuation.new_batches
    report.follow_ups.append(
        f"Find why driver {replaced or '(unknown)'} {'stalled' if stalled else 'died'}: the "
        "worker's driver log (work/<driver-id>/stderr) and the executors' logs."
    )
    if decision.without_checkpoint:
        report.follow_ups.append(
            f"{spark.app_name} started without a checkpoint: check the sink for reprocessed or "
            "skipped data, and keep the checkpoint location on durable storage."
        )
    started = "resubmitted" if resubmission.changed else "found already resubmitted"
    report.finish(
        Outcome.RESOLVED if resubmission.changed else Outcome.NO_ACTION_NEEDED,
        f"{spark.app_name} {started} as driver {new_id} from {source}; it is RUNNING and "
        f"committed {continuation.reason}.",
    )
    return _summarize(summary, report)


def _decide(
    spark: SparkCluster,
    master: MasterState,
    params: SparkStreamingJobFailedParams,
    report: IncidentReport,
) -> tuple[DriverMatch, CheckpointProgress, Decision]:
    match = choose_driver(
        master.drivers, master.apps, spark.app_name, spark.main_class, params.driver_id
    )
    driver = match.driver
    report.check(
        "spark driver running",
        driver is not None and driver.state == "RUNNING",
        f"{driver.id}: {driver.state} ({match.how})" if driver else match.how,
    )
    if driver is not None:
        status: DriverStatus = get_driver_status(spark, driver.id)
        report.evidence("driver status", status)
        # the REST status is the master's newest word on it
        if status.state != "NOT_FOUND" and status.state != driver.state:
            driver = driver.model_copy(update={"state": status.state})
            match = match.model_copy(update={"driver": driver})
    progress = get_checkpoint_progress(spark.checkpoint_location)
    verdict = assess_progress(progress, time.time(), params.stall_after_s)
    report.evidence("checkpoint progress", progress)
    report.check(
        "streaming query progressing",
        verdict.progress in (Progress.PROGRESSING, Progress.STARTING, Progress.IDLE),
        f"{verdict.progress.value}: {verdict.reason}",
    )
    decision = decide_action(driver, verdict, params.idle_is_stalled)
    report.step(f"decision: {decision.action.value}: {decision.reason}")
    return match, progress, decision


def _check_dependencies(params: SparkStreamingJobFailedParams, report: IncidentReport) -> None:
    """A restarted query dies again at once if its source or sink is down: check them first."""
    down = []
    if params.kafka_block:
        health = check_isr(KafkaCluster.load(params.kafka_block))
        detail = (
            f"{len(health.broker_ids)} broker(s), cluster {health.cluster_id}"
            if health.reachable
            else f"unreachable: {health.error}"
        )
        report.check("kafka reachable", health.reachable, detail)
        if not health.reachable:
            down.append(f"Kafka ({params.kafka_block}) {detail}")
    if params.mysql_block:
        probe = probe_server(MySQLDatabase.load(params.mysql_block))
        detail = (
            f"{probe.hostname}:{probe.port} {probe.version}"
            if probe.reachable
            else f"unreachable: {probe.failure}: {probe.error}"
        )
        report.check("mysql reachable", probe.reachable, detail)
        if not probe.reachable:
            down.append(f"MySQL ({params.mysql_block}) {detail}")
    if down:
        raise Escalation(
            "the streaming query's dependencies are down, a restart would fail again: "
            + "; ".join(down)
        )


def _needs_approval(plan: Resubmission) -> str | None:
    """A query started without its checkpoint reprocesses or skips data."""
    fresh = [c.target for c in plan.planned if c.detail.get("checkpoint") is False]
    if fresh:
        return (
            f"{', '.join(fresh)}: no checkpoint at that location, so the query starts over "
            "(from its source's earliest or latest offsets): data is reprocessed or skipped"
        )
    return None


def _wait_until_settled(
    spark: SparkCluster,
    driver_id: str,
    params: SparkStreamingJobFailedParams,
    report: IncidentReport,
) -> None:
    outcome = poll_until(
        lambda: get_driver_status(spark, driver_id).state,
        lambda state: state not in SETTLING_DRIVER,
        timeout_s=params.running_deadline_s,
        interval_s=params.poll_interval_s,
    )
    if not outcome.ok:
        raise Escalation(
            f"driver {driver_id} still {outcome.last} after {params.running_deadline_s:.0f}s: "
            "the master cannot start it (no worker with enough memory or cores?)"
        )
    report.step(f"driver {driver_id} settled in {outcome.last} after {outcome.elapsed_s:.1f}s")


def _verify_running(
    spark: SparkCluster, driver_id: str, params: SparkStreamingJobFailedParams, guard: Guard
) -> None:
    running = guard.verify(
        "new driver running",
        lambda: get_driver_status(spark, driver_id).state,
        lambda state: state == "RUNNING",
        timeout_s=params.running_deadline_s,
        interval_s=params.poll_interval_s,
        describe=lambda state: f"{driver_id}: {state}",
        give_up=lambda state: state in DEAD_DRIVER,
    )
    if not running.ok:
        raise VerificationFailed(
            f"new driver {driver_id} is {running.last}, not RUNNING, {running.elapsed_s:.0f}s "
            f"after submission (deadline {params.running_deadline_s:.0f}s)"
        )


def _verify_continuation(
    spark: SparkCluster,
    before: CheckpointProgress,
    params: SparkStreamingJobFailedParams,
    guard: Guard,
    report: IncidentReport,
) -> Continuation:
    def probe() -> Continuation:
        now = get_checkpoint_progress(spark.checkpoint_location)
        return check_continuation(
            before.last_commit_batch,
            before.query_id,
            now.commit_batches,
            now.query_id,
            params.min_new_batches,
        )

    verified = guard.verify(
        "next batches committed after the last one",
        probe,
        lambda c: c.ok,
        timeout_s=params.progress_deadline_s,
        interval_s=params.poll_interval_s,
        describe=lambda c: c.reason,
        # skipped batches or a new query id do not mend by waiting
        give_up=lambda c: not c.ok and ("skipped" in c.reason or "started over" in c.reason),
    )
    last = verified.last
    if last is not None:
        report.evidence("batches after the restart", last)
    if not verified.ok or last is None or not last.ok:
        raise VerificationFailed(
            f"the restarted query of {spark.app_name} did not continue after batch "
            f"{before.last_commit_batch}: {last.reason if last else 'no reading'}"
        )
    return last


def _summarize(summary: SparkRecovery, report: IncidentReport) -> SparkRecovery:
    assert report.outcome is not None
    return summary.model_copy(
        update={"outcome": report.outcome, "report_markdown": report.to_markdown()}
    )
