"""Runbook "P2 High End-to-End Latency", Flink stage (seed 000): the job runs but is too slow.

The seed says "If Flink: check backpressure, state size" and lists the Flink checkpoint duration
among the latency stages. This runbook reads, per vertex, how backpressured, busy and idle it is,
finds the bottleneck (the busy vertex below the backpressured ones), reads the checkpoint history
(duration and state size trend, failures) and the cluster's free slots, and decides:
- nothing backpressured, checkpoints healthy: nothing to do;
- nothing backpressured but checkpoints slow, growing or failing: a state problem, escalated
  (more parallelism does not make state smaller);
- backpressured, room in the cluster: take a savepoint (safe, the job keeps running), then, with
  a human's approval, stop the job with a savepoint and run it again from that savepoint at a
  higher parallelism; verify it RUNNING, restored from that savepoint, and no longer
  backpressured;
- backpressured, no free slot: escalated (add TaskManagers or slots).
"""

from prefect import flow
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from blocks.flink import FlinkCluster
from flows.flink.common import FlinkJobParams, job_target
from runbooks.errors import Escalation, VerificationFailed
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.results import ChangeSet
from runbooks.safety import Budget, Guard
from tasks.flink import (
    find_job,
    get_job_state,
    get_slot_capacity,
)
from tasks.flink_decisions import GLOBALLY_TERMINAL, same_checkpoint_path
from tasks.flink_degraded_decisions import (
    CheckpointHealth,
    DegradedAction,
    assess_checkpoints,
    backpressure_cleared,
    decide_degraded,
    find_bottleneck,
    job_slots,
    max_backpressure,
)
from tasks.flink_metrics import (
    CheckpointHistory,
    JobLoad,
    get_checkpoint_history,
    get_job_load,
)
from tasks.flink_rescale import (
    SavepointResult,
    resubmit_with_parallelism,
    stop_with_savepoint,
    trigger_id_for,
    trigger_savepoint,
)

RUNBOOK = "flink-job-degraded"

# A savepoint is cheap and safe, but one taken on every alert re-fire is noise in the storage.
SAVEPOINT_BUDGET = Budget(max_actions=6, window_s=3600)
# A job that stays backpressured after rescales needs a person, not a wider job: rescales of one
# job per day.
RESCALE_BUDGET = Budget(max_actions=3, window_s=86400)


class FlinkJobDegradedParams(FlinkJobParams):
    """Run form of the flink-job-degraded runbook."""

    backpressure_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A vertex blocked on full output buffers for more than this share of the "
        "time is backpressured (Flink's own 'high' level starts at 0.5).",
    )
    cleared_threshold: float = Field(
        0.2,
        gt=0,
        le=1,
        description="After the rescale, backpressure counts as cleared when every vertex is at "
        "or under this share.",
    )
    scale_factor: float = Field(
        2.0, gt=1, le=16, description="Multiply the bottleneck's parallelism by this much."
    )
    max_parallelism: int = Field(
        32, ge=1, le=10_000, description="Never rescale the job beyond this parallelism."
    )
    checkpoint_slow_s: float = Field(
        60, gt=0, description="A completed checkpoint that took longer than this is slow."
    )
    checkpoint_growth_factor: float = Field(
        1.5,
        gt=1,
        description="Checkpoint durations or state sizes whose newer half averages more than "
        "this many times the older half are growing.",
    )
    max_failed_checkpoints: int = Field(
        1, ge=1, description="This many failed checkpoints in the history make them failing."
    )
    savepoint_dir: str | None = Field(
        None,
        description="Where savepoints go, e.g. 's3://flink-savepoints/enrichment'; empty uses "
        "the cluster's state.savepoints.dir.",
    )
    savepoint_reuse_s: float = Field(
        300,
        ge=0,
        description="A savepoint of the job younger than this is reused instead of taking "
        "another one (a re-run or an approval that resumed the run).",
    )
    savepoint_deadline_s: float = Field(
        300, gt=0, le=3600, description="How long a savepoint or a stop may take, in seconds."
    )
    running_deadline_s: float = Field(
        120, gt=0, le=3600, description="How long the new job may take to reach RUNNING."
    )
    verify_deadline_s: float = Field(
        180,
        gt=0,
        le=3600,
        description="How long backpressure may take to clear after the rescale (a restored job "
        "first catches up on what arrived while it was stopped).",
    )
    clear_samples: int = Field(
        3, ge=1, le=100, description="Consecutive samples at or under the cleared threshold."
    )
    poll_interval_s: float = Field(
        5, gt=0, le=300, description="Pause between two samples of job state or backpressure."
    )


class FlinkDegradedResult(BaseModel):
    """What a flink-job-degraded run found and did."""

    outcome: Outcome
    job_name: str
    job_id: str | None = None
    bottleneck: str | None = None
    backpressure_before: float | None = None
    parallelism_before: int | None = None
    parallelism_after: int | None = None
    savepoint_path: str | None = Field(None, description="The safety savepoint (job kept running).")
    stop_savepoint_path: str | None = Field(
        None, description="The stop's savepoint the rescaled job restored from."
    )
    new_job_id: str | None = None
    backpressure_samples: list[float | None] = Field(
        default_factory=list,
        description="Highest vertex backpressure of the new job, oldest first.",
    )
    report_markdown: str = ""


class RescaleResult(ChangeSet):
    savepoint_path: str | None = None
    new_job_id: str | None = None


@flow(
    name=RUNBOOK,
    description="P2 latency, Flink stage: find the backpressure bottleneck and checkpoint trend; "
    "savepoint, then (approval) stop-with-savepoint and resubmit at a higher parallelism.",
)
@ends_as_reported
def flink_job_degraded(params: FlinkJobDegradedParams) -> FlinkDegradedResult:
    """Check backpressure and checkpoints of the job; rescale its bottleneck when there is room."""
    flink = FlinkCluster.load(params.flink_block)
    summary = FlinkDegradedResult(outcome=Outcome.FAILED, job_name=params.job_name)
    with incident_report(
        runbook=RUNBOOK,
        title="Flink Job Degraded (backpressure, checkpoints)",
        severity="P2",
        params=params,
    ) as report:
        # the same target as flink-job-crashed: the two never act on one job at once
        target = job_target(flink, params.job_name)
        with report.guard(target) as guard:
            return _run(flink, params, report, guard, summary)
    return _summarize(summary, report)


def _run(
    flink: FlinkCluster,
    params: FlinkJobDegradedParams,
    report: IncidentReport,
    guard: Guard,
    summary: FlinkDegradedResult,
) -> FlinkDegradedResult:
    job = find_job(flink, params.job_name)
    report.check(
        "flink job running",
        job is not None and job.state == "RUNNING",
        f"{job.name} {job.jid}: {job.state}" if job else f"no job named {params.job_name!r}",
    )
    if job is None or job.state != "RUNNING":
        decision = decide_degraded(
            job_state=job.state if job else None,
            bottleneck=None,
            checkpoints=None,
            job_slots=0,
            free_slots=0,
        )
        raise Escalation(f"{params.job_name}: {decision.reason}")
    summary.job_id = job.jid

    load = get_job_load(flink, job.jid)
    report.evidence("vertices (topological order)", _vertex_rows(load))
    bottleneck = find_bottleneck(load.vertices, params.backpressure_threshold)
    summary.backpressure_before = max_backpressure(load.vertices)
    report.check(
        "backpressure",
        bottleneck is None,
        bottleneck.reason
        if bottleneck
        else f"highest {_pct(summary.backpressure_before)} (threshold "
        f"{_pct(params.backpressure_threshold)})",
    )
    if bottleneck is not None:
        summary.bottleneck = bottleneck.vertex.name

    history = get_checkpoint_history(flink, job.jid)
    health = _checkpoint_health(history, params)
    report.evidence("checkpoints", _checkpoint_evidence(history, health))
    report.check("checkpoints", not health.unhealthy, health.reason)

    slots = get_slot_capacity(flink)
    report.evidence("cluster slots", slots)
    held = job_slots(load.vertices)
    decision = decide_degraded(
        job_state=job.state,
        bottleneck=bottleneck,
        checkpoints=health,
        job_slots=held,
        free_slots=slots.slots_available,
        factor=params.scale_factor,
        max_parallelism=params.max_parallelism,
        backpressured=[
            v.name
            for v in load.vertices
            if v.backpressured is not None and v.backpressured >= params.backpressure_threshold
        ],
    )
    report.step(f"decision: {decision.action.value}: {decision.reason}")
    summary.parallelism_before = decision.current_parallelism
    if decision.action is DegradedAction.NOTHING:
        report.finish(
            Outcome.NO_ACTION_NEEDED, f"{params.job_name} ({job.jid}): {decision.reason}."
        )
        return _summarize(summary, report)
    if decision.action is DegradedAction.ESCALATE:
        raise Escalation(f"{params.job_name} ({job.jid}): {decision.reason}")

    assert decision.new_parallelism is not None and bottleneck is not None
    target_p = decision.new_parallelism
    run_key = _run_key()
    old_jid = job.jid

    savepoint: SavepointResult = guard.act(
        "savepoint before rescaling",
        lambda dry_run: trigger_savepoint(
            flink,
            job_id=old_jid,
            job_name=params.job_name,
            target_directory=params.savepoint_dir,
            trigger_id=trigger_id_for(run_key, old_jid, "savepoint"),
            reuse_within_s=params.savepoint_reuse_s,
            deadline_s=params.savepoint_deadline_s,
            dry_run=dry_run,
        ),
        budget=SAVEPOINT_BUDGET,
    )
    summary.savepoint_path = savepoint.savepoint_path

    def rescale(dry_run: bool) -> RescaleResult:
        stop = stop_with_savepoint(
            flink,
            job_id=old_jid,
            job_name=params.job_name,
            target_directory=params.savepoint_dir,
            trigger_id=trigger_id_for(run_key, old_jid, "stop"),
            deadline_s=params.savepoint_deadline_s,
            dry_run=dry_run,
        )
        run = resubmit_with_parallelism(
            flink,
            job_name=params.job_name,
            old_job_id=old_jid,
            savepoint_path=stop.savepoint_path,
            jar=params.jar,
            entry_class=params.entry_class,
            program_args=params.program_args,
            parallelism=target_p,
            dry_run=dry_run,
        )
        return RescaleResult(
            dry_run=dry_run,
            planned=[*stop.planned, *run.planned],
            applied=[*stop.applied, *run.applied],
            notes=[*stop.notes, *run.notes],
            savepoint_path=stop.savepoint_path,
            new_job_id=run.job_id,
        )

    rescaled: RescaleResult = guard.act(
        f"stop with savepoint and resubmit at parallelism {target_p}",
        rescale,
        budget=RESCALE_BUDGET,
        approval=lambda plan: (
            f"stopping {params.job_name} pauses processing until the new job has restored from "
            f"the stop's savepoint (latency rises meanwhile); the job is then resubmitted at "
            f"parallelism {target_p} (was {decision.current_parallelism}) and takes "
            f"{target_p - held} more slot(s) of the cluster's {slots.slots_available} free"
        ),
    )
    if params.dry_run:
        report.finish(
            Outcome.PLANNED,
            f"Would take a savepoint of {params.job_name} ({old_jid}), then (with approval) stop it "
            f"with a savepoint and run {params.jar} from it at parallelism {target_p} "
            f"(bottleneck {bottleneck.vertex.name}), and verify backpressure clears.",
        )
        return _summarize(summary, report)

    new_jid = rescaled.new_job_id
    assert new_jid is not None
    summary.new_job_id = new_jid
    summary.stop_savepoint_path = rescaled.savepoint_path
    summary.parallelism_after = target_p
    _verify_running(flink, new_jid, params, guard)
    _verify_restored(flink, new_jid, rescaled.savepoint_path, params, guard)
    summary.backpressure_samples = _verify_backpressure(
        flink, new_jid, bottleneck.vertex.name, params, report, guard
    )
    report.follow_ups += [
        f"Find out why {bottleneck.vertex.name} could not keep up at parallelism "
        f"{decision.current_parallelism} (input rate, a slow external call, skewed keys).",
        f"Set the job's default parallelism to {target_p} where it is deployed, so the next "
        "deployment does not undo the rescale.",
    ]
    done = "rescaled" if rescaled.changed else "found already rescaled"
    report.finish(
        Outcome.RESOLVED if rescaled.changed else Outcome.NO_ACTION_NEEDED,
        f"{params.job_name} {done}: {old_jid} -> {new_jid} at parallelism {target_p}, restored "
        f"from {rescaled.savepoint_path}; backpressure cleared "
        f"(highest {_pct(summary.backpressure_samples[-1] if summary.backpressure_samples else None)}).",
    )
    return _summarize(summary, report)


def _run_key() -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else "no-run"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def _vertex_rows(load: JobLoad) -> list[dict[str, object]]:
    return [
        {
            "vertex": v.name,
            "parallelism": v.parallelism,
            "backpressured": _pct(v.backpressured),
            "busy": _pct(v.busy),
            "idle": _pct(v.idle),
            "level": v.level,
        }
        for v in load.vertices
    ]


def _checkpoint_health(
    history: CheckpointHistory, params: FlinkJobDegradedParams
) -> CheckpointHealth:
    if not history.enabled:
        return CheckpointHealth(reason="checkpointing not enabled")
    return assess_checkpoints(
        history.history,
        failed_total=history.counts.get("failed", 0),
        slow_ms=int(params.checkpoint_slow_s * 1000),
        growth_factor=params.checkpoint_growth_factor,
        max_failed=params.max_failed_checkpoints,
    )


def _checkpoint_evidence(history: CheckpointHistory, health: CheckpointHealth) -> dict[str, object]:
    return {
        "counts": history.counts,
        "durations_ms": health.durations_ms,
        "state_sizes_bytes": health.state_sizes,
        "failed_in_history": health.failed_recent,
        "latest_failure": health.latest_failure,
        "latest_savepoint": history.latest_savepoint_path,
        "verdict": health.reason,
    }


def _summarize(summary: FlinkDegradedResult, report: IncidentReport) -> FlinkDegradedResult:
    assert report.outcome is not None
    return summary.model_copy(
        update={"outcome": report.outcome, "report_markdown": report.to_markdown()}
    )


def _verify_running(
    flink: FlinkCluster, job_id: str, params: FlinkJobDegradedParams, guard: Guard
) -> None:
    running = guard.verify(
        "rescaled job running",
        lambda: get_job_state(flink, job_id),
        lambda state: state == "RUNNING",
        timeout_s=params.running_deadline_s,
        interval_s=min(params.poll_interval_s, 2),
        describe=lambda state: f"{job_id}: {state}",
        give_up=lambda state: state in GLOBALLY_TERMINAL,
    )
    if not running.ok:
        raise VerificationFailed(
            f"rescaled job {job_id} is {running.last}, not RUNNING, {running.elapsed_s:.0f}s after "
            f"submission (deadline {params.running_deadline_s:.0f}s)"
        )


def _verify_restored(
    flink: FlinkCluster,
    job_id: str,
    savepoint_path: str | None,
    params: FlinkJobDegradedParams,
    guard: Guard,
) -> None:
    restored = guard.verify(
        "restored from the stop savepoint",
        lambda: get_checkpoint_history(flink, job_id).restored_path,
        lambda path: same_checkpoint_path(path, savepoint_path),
        timeout_s=params.running_deadline_s,
        interval_s=min(params.poll_interval_s, 2),
        describe=lambda path: f"{job_id} restored from {path} (expected {savepoint_path})",
    )
    if not restored.ok:
        raise VerificationFailed(
            f"rescaled job {job_id} did not restore from {savepoint_path}: Flink reports "
            f"{restored.last or 'no restore'}; its state may be lost"
        )


def _verify_backpressure(
    flink: FlinkCluster,
    job_id: str,
    bottleneck: str,
    params: FlinkJobDegradedParams,
    report: IncidentReport,
    guard: Guard,
) -> list[float | None]:
    samples: list[float | None] = []
    busy: list[float | None] = []

    def probe() -> list[float | None]:
        load = get_job_load(flink, job_id)
        samples.append(max_backpressure(load.vertices))
        vertex = load.vertex_named(bottleneck)
        busy.append(vertex.busy if vertex else None)
        return list(samples)

    cleared = guard.verify(
        "backpressure cleared",
        probe,
        lambda seen: backpressure_cleared(seen, params.cleared_threshold, params.clear_samples),
        timeout_s=params.verify_deadline_s,
        interval_s=params.poll_interval_s,
        describe=lambda seen: (
            f"highest vertex backpressure {_pct(seen[-1] if seen else None)} "
            f"(cleared at or under {_pct(params.cleared_threshold)} for {params.clear_samples} samples)"
        ),
    )
    report.evidence(
        "after the rescale",
        {
            "highest_backpressure": [_pct(s) for s in samples],
            f"{bottleneck} busy": [_pct(b) for b in busy],
        },
    )
    if not cleared.ok:
        raise VerificationFailed(
            f"{params.job_name} ({job_id}) still backpressured {params.verify_deadline_s:.0f}s after "
            f"the rescale: samples {[_pct(s) for s in samples]}; more parallelism did not help, a "
            "human must look"
        )
    return samples
