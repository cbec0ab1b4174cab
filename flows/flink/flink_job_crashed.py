"""Runbook "P2 Flink Job Crashed" (seed 000): restore the job from its latest checkpoint.

Symptoms: consumer lag growing on ``match-events-raw``, no new events on the enriched topic, the
Flink job FAILED. Response: check the job and why it failed, verify the last successful
checkpoint, run the job again from it (``flink run -s <checkpoint-path> enrichment-job.jar``),
then watch consumer lag until it is back to normal. Checkpoints carry all keyed state (scores,
cards...), so a restore loses no data; match state accuracy is still left as a follow-up.
"""

from prefect import flow
from pydantic import BaseModel, Field

from blocks.flink import FlinkCluster
from blocks.kafka import KafkaCluster
from flows.flink.common import FlinkJobParams, job_target
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard
from runbooks.waiting import poll_until
from tasks.flink import (
    find_job,
    get_failure_cause,
    get_job_progress,
    get_job_state,
    get_latest_checkpoint,
    get_restored_checkpoint,
    get_slot_capacity,
    resubmit_from_checkpoint,
)
from tasks.flink_decisions import (
    GLOBALLY_TERMINAL,
    RESTORABLE,
    SETTLING,
    Action,
    Checkpoint,
    Decision,
    FlinkJob,
    LagTrend,
    Resubmission,
    SlotCapacity,
    assess_lag,
    decide_action,
    decide_slots,
    same_checkpoint_path,
    slots_needed,
    tasks_running,
)
from tasks.kafka_lag import get_consumer_lag

RUNBOOK = "flink-job-crashed"

# A job that crashes again after every restore has a bug a restore won't fix: after this many
# resubmissions of one job, a human looks.
RESUBMIT_BUDGET = Budget(max_actions=3, window_s=3600)
# how long a dead job's in-progress checkpoint may take to complete or abort
CHECKPOINT_SETTLE_S = 10


class FlinkJobCrashedParams(FlinkJobParams):
    """Run form of the flink-job-crashed runbook."""

    parallelism: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Job parallelism; empty keeps the failed job's parallelism (Flink rescales "
        "keyed state from a checkpoint to any parallelism up to the job's max parallelism).",
    )
    jar_file: str | None = Field(
        None,
        description="Path of the job's jar on the worker, uploaded when the cluster lacks the jar "
        "(a restarted or failed-over JobManager forgets uploaded jars). Empty: escalate instead.",
    )
    slot_wait_s: float = Field(
        300,
        ge=0,
        le=3600,
        description="How long to wait for a TaskManager with enough free slots before "
        "resubmitting (a lost TaskManager is usually replaced by its supervisor or Kubernetes); "
        "then escalate 'no TaskManager'. In seconds.",
    )
    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    topic: str | None = Field(
        "match-events-raw",
        description="Topic the job consumes; its lag is watched. Empty: the job reads no Kafka "
        "topic, the lag checks are skipped (the restore is verified by the job's tasks running "
        "and the checkpoint it restored from).",
    )
    consumer_group: str | None = Field(
        None, description="Consumer group of the job's Kafka source; empty means the job name."
    )
    lag_threshold: int = Field(
        1000,
        ge=0,
        description="Total lag (records) at or under which consumption is back to normal.",
    )
    running_deadline_s: float = Field(
        120, gt=0, le=3600, description="How long a job may take to reach RUNNING, in seconds."
    )
    lag_deadline_s: float = Field(
        900,
        gt=0,
        le=4 * 3600,
        description="How long lag may take to get under the threshold after the restore, in seconds. "
        "Flink commits source offsets only on completed checkpoints: allow several checkpoint intervals.",
    )
    poll_interval_s: float = Field(
        5, gt=0, le=300, description="Pause between two checks of job state or lag, in seconds."
    )
    accept_falling_lag: bool = Field(
        False,
        description="At the lag deadline, count lag that is still above the threshold but fell "
        "steadily across every sample as recovered (a big backlog that is draining).",
    )
    offer_start_without_state: bool = Field(
        False,
        description="When a dead job has no checkpoint or savepoint to restore: pause and ask a "
        "human (in the run's resume form) whether to start it again WITHOUT its state, instead "
        "of escalating right away. Its keyed state (scores, cards...) is lost.",
    )


class FlinkRecovery(BaseModel):
    """What a flink-job-crashed run found and did."""

    outcome: Outcome
    job_name: str
    failed_job_id: str | None = None
    checkpoint: Checkpoint | None = None
    restored_job_id: str | None = None
    lag_before: int | None = None
    lag_after: int | None = None
    lag_samples: list[int] = Field(
        default_factory=list, description="Total lag seen while verifying recovery, oldest first."
    )
    report_markdown: str = ""


@flow(name=RUNBOOK, description="P2 Flink Job Crashed: restore the job from its latest checkpoint.")
@ends_as_reported
def flink_job_crashed(params: FlinkJobCrashedParams) -> FlinkRecovery:
    """Find the job; if it is dead, run it again from its newest checkpoint and verify recovery."""
    flink = FlinkCluster.load(params.flink_block)
    # a job without a Kafka source (topic empty) needs no Kafka block
    kafka = KafkaCluster.load(params.kafka_block) if params.topic else None
    group = params.consumer_group or params.job_name
    summary = FlinkRecovery(outcome=Outcome.FAILED, job_name=params.job_name)
    with incident_report(
        runbook=RUNBOOK, title="Flink Job Crashed", severity="P2", params=params
    ) as report:
        target = job_target(flink, params.job_name)
        with report.guard(target) as guard:
            return _run(flink, kafka, group, params, report, guard, summary)
    # another run held the job: the report says so, nothing was changed
    return _summarize(summary, report)


def _run(
    flink: FlinkCluster,
    kafka: KafkaCluster | None,
    group: str,
    params: FlinkJobCrashedParams,
    report: IncidentReport,
    guard: Guard,
    summary: FlinkRecovery,
) -> FlinkRecovery:
    job = find_job(flink, params.job_name)
    report.check(
        "flink job running",
        job is not None and job.state == "RUNNING",
        f"{job.name} {job.jid}: {job.state}" if job else f"no job named {params.job_name!r}",
    )
    if job is not None:
        report.evidence("flink job", job)
    if kafka is not None and params.topic:
        lag = get_consumer_lag(kafka, group, params.topic)
        report.check(
            "consumer lag",
            lag.total_lag <= params.lag_threshold,
            f"group {group} on {params.topic}: {lag.total_lag} (threshold {params.lag_threshold})",
        )
        report.evidence("consumer lag before", lag)
        summary.lag_before = lag.total_lag
    else:
        report.step("no topic configured: the job reads no Kafka topic, consumer lag not checked")

    decision, checkpoint = _decide(flink, job, report)
    observed = decision.action is Action.OBSERVE
    if observed:
        assert job is not None  # OBSERVE is only decided for an existing job
        job = _wait_until_settled(flink, job, params, report)
        decision, checkpoint = _decide(flink, job, report)
    without_state = (
        decision.action is Action.ESCALATE
        and params.offer_start_without_state
        and job is not None
        and job.state in RESTORABLE
        and checkpoint is None
    )
    if decision.action is Action.ESCALATE and not without_state:
        raise Escalation(f"{params.job_name}: {decision.reason}")

    if decision.action is Action.NOTHING and not observed:
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            f"{params.job_name} is RUNNING ({decision.reason}): nothing to restore. If lag keeps "
            "growing, the job is slow rather than crashed (see the high-latency runbook).",
        )
        return _summarize(summary, report)
    if decision.action is Action.NOTHING:
        assert job is not None
        # Flink's own restart strategy brought the job back: confirm it is consuming again
        summary.lag_samples = _watch_lag(kafka, flink, group, job.jid, params, report, guard)
        report.follow_ups.append(f"Find out why {params.job_name} ({job.jid}) restarted.")
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            f"Flink restarted {params.job_name} itself ({job.jid} RUNNING)"
            + (" and consumer lag is back to normal." if params.topic else "."),
        )
        return _summarize(summary, report)

    assert job is not None and (checkpoint is not None or without_state)
    summary.failed_job_id, summary.checkpoint = job.jid, checkpoint
    failed_jid = job.jid
    failed = get_job_progress(flink, failed_jid)
    # keep the failed job's parallelism unless the run says otherwise (the cluster default
    # would quietly shrink a job that ran wider)
    parallelism = params.parallelism or failed.parallelism
    needed = slots_needed(params.parallelism, failed.parallelism)
    if params.dry_run:
        capacity = get_slot_capacity(flink)
        report.evidence("task slots", capacity)
        slots = decide_slots(capacity, needed)
        report.check("free task slots", slots.ready, slots.reason)
    else:
        _wait_for_slots(flink, needed, params, report)
    resubmission: Resubmission = guard.act(
        "restore from checkpoint" if checkpoint else "start without state",
        lambda dry_run: resubmit_from_checkpoint(
            flink,
            job_name=params.job_name,
            failed_job_id=failed_jid,
            checkpoint=checkpoint,
            jar=params.jar,
            entry_class=params.entry_class,
            program_args=params.program_args,
            parallelism=parallelism,
            dry_run=dry_run,
            jar_file=params.jar_file,
        ),
        budget=RESUBMIT_BUDGET,
        approval=_needs_approval,
    )
    summary.restored_job_id = resubmission.job_id
    source = (
        f"{checkpoint.kind} {checkpoint.id} ({checkpoint.external_path})"
        if checkpoint
        else "no checkpoint (state lost)"
    )
    if params.dry_run and not resubmission.planned:
        report.finish(Outcome.NO_ACTION_NEEDED, "; ".join(resubmission.notes))
        return _summarize(summary, report)
    if params.dry_run:
        report.finish(
            Outcome.PLANNED,
            f"Would run {params.jar} as job {resubmission.job_id} from {source}, then watch lag.",
        )
        return _summarize(summary, report)

    new_jid = resubmission.job_id
    assert new_jid is not None  # a live submission always knows its job id
    _verify_running(flink, new_jid, params, guard)
    if checkpoint is not None:
        _verify_restored(flink, new_jid, checkpoint, report)
    summary.lag_samples = _watch_lag(kafka, flink, group, new_jid, params, report, guard)
    report.follow_ups += [
        "Verify match state accuracy after recovery (scores, cards) against the source feed.",
        f"Find the root cause of the crash of {job.jid} in the TaskManager logs.",
    ]
    if checkpoint is None:
        report.follow_ups.append(
            f"{params.job_name} started without state: rebuild or correct its state (scores, "
            "cards), and retain checkpoints externally (execution.checkpointing.externalized-"
            "checkpoint-retention: RETAIN_ON_CANCELLATION)."
        )
    started = "restored" if resubmission.changed else "found already restored"
    lag_note = (
        f" and consumer lag on {params.topic} is back to normal"
        if params.topic
        else " (no topic: lag not watched)"
    )
    report.finish(
        Outcome.RESOLVED if resubmission.changed else Outcome.NO_ACTION_NEEDED,
        f"{params.job_name} {started} as {new_jid} from {source}; all its tasks are RUNNING"
        f"{lag_note}.",
    )
    return _summarize(summary, report)


def _needs_approval(plan: Resubmission) -> str | None:
    """Starting the job without a checkpoint or savepoint throws its keyed state away."""
    stateless = [c.target for c in plan.planned if c.action == "run_jar_without_state"]
    if stateless:
        return (
            f"{', '.join(stateless)}: no checkpoint or savepoint to restore from, so the job "
            "starts with empty state (scores, cards and every other keyed state are lost)"
        )
    return None


def _summarize(summary: FlinkRecovery, report: IncidentReport) -> FlinkRecovery:
    assert report.outcome is not None
    return summary.model_copy(
        update={
            "outcome": report.outcome,
            "lag_after": summary.lag_samples[-1] if summary.lag_samples else None,
            "report_markdown": report.to_markdown(),
        }
    )


def _decide(
    flink: FlinkCluster, job: FlinkJob | None, report: IncidentReport
) -> tuple[Decision, Checkpoint | None]:
    """Gather what the decision needs (restore point, failure cause of a dead job) and decide."""
    checkpoint = None
    if job is not None and job.state in RESTORABLE:
        cause = get_failure_cause(flink, job.jid)
        report.evidence("failure cause", cause or "none recorded")
        if cause is not None and cause.root_cause:
            report.step(f"{job.jid} failed: {cause.root_cause}")
        # a checkpoint every task acknowledged is still finalized after the job turned FAILED:
        # wait (briefly) until none is in progress, or the restore takes the one before it
        settled = poll_until(
            lambda: get_latest_checkpoint(flink, job.jid),
            lambda lookup: not lookup.counts.get("in_progress"),
            timeout_s=CHECKPOINT_SETTLE_S,
            interval_s=0.5,
        )
        lookup = settled.last
        assert lookup is not None
        report.evidence("checkpoints", lookup)
        checkpoint = lookup.latest
        report.check("last successful checkpoint", checkpoint is not None, lookup.describe())
    decision = decide_action(job, checkpoint)
    report.step(f"decision: {decision.action.value}: {decision.reason}")
    return decision, checkpoint


def _wait_until_settled(
    flink: FlinkCluster, job: FlinkJob, params: FlinkJobCrashedParams, report: IncidentReport
) -> FlinkJob:
    """Wait for Flink to finish moving the job (restart, failover, cancel) and return it settled."""
    outcome = poll_until(
        lambda: get_job_state(flink, job.jid),
        lambda state: state not in SETTLING,
        timeout_s=params.running_deadline_s,
        interval_s=params.poll_interval_s,
    )
    if not outcome.ok:
        raise Escalation(
            f"{params.job_name} ({job.jid}) still {outcome.last} after {params.running_deadline_s:.0f}s: "
            "Flink cannot settle it (restart loop?), a human must look"
        )
    report.step(f"{job.jid} settled in {outcome.last} after {outcome.elapsed_s:.1f}s")
    return job.model_copy(update={"state": outcome.last})


def _wait_for_slots(
    flink: FlinkCluster, needed: int, params: FlinkJobCrashedParams, report: IncidentReport
) -> SlotCapacity:
    """Wait (bounded by slot_wait_s) for a TaskManager with ``needed`` free slots.

    A job submitted without them is reported RUNNING by Flink while its tasks wait SCHEDULED,
    and fails after ``slot.request.timeout``: resubmitting into an empty cluster only burns
    the budget. A lost TaskManager is typically replaced by its supervisor or Kubernetes.
    """
    seen: dict[str, int] = {}

    def probe() -> SlotCapacity:
        capacity = get_slot_capacity(flink)
        seen.update({tm.id: tm.slots for tm in capacity.registered})
        return capacity

    outcome = poll_until(
        probe,
        lambda capacity: decide_slots(capacity, needed).ready,
        timeout_s=params.slot_wait_s,
        interval_s=params.poll_interval_s,
    )
    assert outcome.last is not None
    verdict = decide_slots(outcome.last, needed)
    report.evidence(
        "task slots",
        {**outcome.last.model_dump(mode="json"), "taskmanagers_seen_while_waiting": seen},
    )
    waited = f" (waited {outcome.elapsed_s:.1f}s)" if outcome.attempts > 1 else ""
    report.check("free task slots", verdict.ready, verdict.reason + waited)
    if not outcome.ok:
        seen_text = ", ".join(f"{tm} ({n} slots)" for tm, n in sorted(seen.items())) or "none"
        raise Escalation(
            f"{params.job_name}: no TaskManager with {needed} free slot(s) after waiting "
            f"{params.slot_wait_s:.0f}s: {verdict.reason}; TaskManagers seen while waiting: "
            f"{seen_text}. The job was not resubmitted: bring TaskManagers back (or lower the "
            "parallelism), then run again"
        )
    return outcome.last


def _verify_running(
    flink: FlinkCluster, job_id: str, params: FlinkJobCrashedParams, guard: Guard
) -> None:
    running = guard.verify(
        "restored job running",
        lambda: get_job_progress(flink, job_id),
        tasks_running,
        timeout_s=params.running_deadline_s,
        interval_s=params.poll_interval_s,
        describe=lambda progress: progress.describe(),
        # a job that failed again will not come back by waiting: fail now, not at the deadline
        give_up=lambda progress: progress.state in GLOBALLY_TERMINAL,
    )
    if not running.ok:
        last = running.last.describe() if running.last else "unknown"
        state = running.last.state if running.last else "unknown"
        raise VerificationFailed(
            f"restored job {job_id} is {state}, not RUNNING with all its tasks ({last}), "
            f"{running.elapsed_s:.0f}s after submission (deadline {params.running_deadline_s:.0f}s)"
        )


def _verify_restored(
    flink: FlinkCluster, job_id: str, checkpoint: Checkpoint, report: IncidentReport
) -> None:
    """The new job restored the state it was given (``latest.restored``), not started empty."""
    restored = get_restored_checkpoint(flink, job_id)
    found = restored.external_path if restored else None
    ok = same_checkpoint_path(found, checkpoint.external_path)
    report.check(
        "restored from checkpoint",
        ok,
        f"{job_id} restored from {found or 'nothing'} (expected {checkpoint.external_path})",
    )
    if not ok:
        raise VerificationFailed(
            f"restored job {job_id} did not start from {checkpoint.kind} {checkpoint.id} "
            f"({checkpoint.external_path}): Flink reports it restored from {found or 'nothing'}"
        )


def _watch_lag(
    kafka: KafkaCluster | None,
    flink: FlinkCluster,
    group: str,
    job_id: str,
    params: FlinkJobCrashedParams,
    report: IncidentReport,
    guard: Guard,
) -> list[int]:
    """Poll consumer lag until it is at or under the threshold; VerificationFailed at the deadline.

    Returns the total lag samples, oldest first.
    """
    samples: list[int] = []
    if kafka is None or not params.topic:
        return samples

    def probe() -> int:
        samples.append(get_consumer_lag(kafka, group, params.topic).total_lag)
        return samples[-1]

    normal = guard.verify(
        "consumer lag back to normal",
        probe,
        lambda lag: lag <= params.lag_threshold,
        timeout_s=params.lag_deadline_s,
        interval_s=params.poll_interval_s,
        describe=lambda lag: f"lag {lag} (threshold {params.lag_threshold})",
    )
    verdict = assess_lag(samples, params.lag_threshold)
    report.evidence(
        "consumer lag samples", {"group": group, "topic": params.topic, "samples": samples}
    )
    if normal.ok:
        return samples
    if params.accept_falling_lag and verdict.trend is LagTrend.FALLING:
        report.check("consumer lag falling (accepted)", True, verdict.reason)
        report.follow_ups.append(
            f"Lag on {params.topic} was still {verdict.latest} (falling) at the deadline: "
            "confirm it reaches the threshold."
        )
        return samples
    state = get_job_state(flink, job_id)
    raise VerificationFailed(
        f"consumer lag of {group} on {params.topic} not back to normal after "
        f"{params.lag_deadline_s:.0f}s: {verdict.reason}; job {job_id} is {state}"
    )
