"""Flink: the REST API's shapes as typed models and the pure decisions over them (which job,
which checkpoint, which jar, restore or escalate, lag trend, slots, error text), unit-tested with
data tables in tests/unit/test_flink_decisions.py. The tasks that call the API are in tasks.flink.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runbooks.results import ChangeSet

# Flink's JobStatus values that end a job for good; every other state is a live copy of it.
GLOBALLY_TERMINAL = frozenset({"FAILED", "CANCELED", "FINISHED"})
RESTORABLE = frozenset({"FAILED", "CANCELED"})
# Flink itself is moving the job between states (its restart strategy, HA failover, a cancel).
SETTLING = frozenset(
    {"INITIALIZING", "CREATED", "RESTARTING", "RECONCILING", "SUSPENDED", "FAILING", "CANCELLING"}
)
# external_path Flink reports for a checkpoint kept only in JobManager memory
NOT_ADDRESSABLE = "<checkpoint-not-externally-addressable>"


def root_cause(stacktrace: str) -> str:
    """The innermost cause of a Java stack trace: its last ``Caused by:`` line, else its first line.

    Flink wraps what went wrong in layers ("Could not execute application." ... "Recovery is
    suppressed by NoRestartBackoffTimeStrategy"); the message a person needs is the deepest one.
    """
    lines = [line.strip() for line in stacktrace.splitlines() if line.strip()]
    causes = [
        line.removeprefix("Caused by:").strip() for line in lines if line.startswith("Caused by:")
    ]
    if causes:
        return causes[-1]
    return lines[0] if lines else ""


def flink_error_summary(errors: Sequence[object]) -> str:
    """One line per entry of Flink's ``{"errors": [...]}``: a Java stack trace (what Flink 2.x
    sends for a failed job submission, thousands of characters) becomes its first line and its
    innermost cause; plain messages stay as they are."""
    parts = []
    for error in errors:
        text = str(error)
        head = (
            text.strip().splitlines()[0].removeprefix("Caused by:").strip() if text.strip() else ""
        )
        cause = root_cause(text)
        parts.append(head if cause == head else f"{head} (cause: {cause})")
    return "; ".join(parts)


# --- models ---------------------------------------------------------------------------------


class FlinkJob(BaseModel):
    """One job as listed by ``GET /jobs/overview``."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    jid: str = Field(description="Flink job id (32 hex digits).")
    name: str
    state: str = Field(description="Flink JobStatus, e.g. RUNNING, FAILED, RESTARTING.")
    start_time: int = Field(-1, alias="start-time", description="Epoch ms; -1 if not started.")
    end_time: int = Field(-1, alias="end-time", description="Epoch ms; -1 while not ended.")


class Checkpoint(BaseModel):
    """A checkpoint or savepoint a job can be restored from."""

    id: int
    kind: Literal["checkpoint", "savepoint", "restored"] = Field(
        description="Latest completed checkpoint, latest savepoint, or the one the job started from."
    )
    external_path: str | None = Field(
        description="Where the state lives; what `flink run -s` takes."
    )
    timestamp_ms: int | None = Field(
        description="Last acknowledgement (or restore) time, epoch ms."
    )
    discarded: bool = Field(False, description="Flink deleted its files (subsumed or cleaned up).")

    @property
    def usable(self) -> bool:
        return (
            bool(self.external_path)
            and self.external_path != NOT_ADDRESSABLE
            and not self.discarded
        )


class CheckpointLookup(BaseModel):
    """What ``GET /jobs/:jobid/checkpoints`` says about a job's restore points."""

    job_id: str
    checkpointing_enabled: bool
    counts: dict[str, int] = Field(default_factory=dict)
    candidates: list[Checkpoint] = Field(default_factory=list)
    latest: Checkpoint | None = Field(
        None, description="The restore point chosen, if any is usable."
    )

    def describe(self) -> str:
        if self.latest is not None:
            return f"{self.latest.kind} {self.latest.id} at {self.latest.external_path}"
        if not self.checkpointing_enabled:
            return "checkpointing not enabled"
        return f"none usable among {len(self.candidates)} candidate(s)"


class JarFile(BaseModel):
    """An uploaded jar as listed by ``GET /jars``."""

    id: str = Field(
        description="Jar id used in /jars/:jarid/run, e.g. '<uuid>_enrichment-job.jar'."
    )
    name: str = Field(description="Original file name, e.g. 'enrichment-job.jar'.")
    uploaded: int = Field(0, description="Upload time, epoch ms.")
    entry_classes: list[str] = Field(default_factory=list)


class FailureCause(BaseModel):
    """The newest root exception of a job: the 'check the TaskManager logs' step."""

    exception: str
    timestamp_ms: int | None = None
    task: str | None = None
    stacktrace_head: str = Field("", description="First lines of the stack trace.")
    root_cause: str | None = Field(
        None,
        description="Innermost cause (the last 'Caused by:'), e.g. the TaskManager that was lost; "
        "Flink 2.x reports 'Recovery is suppressed by NoRestartBackoffTimeStrategy' on top.",
    )
    concurrent: list[str] = Field(
        default_factory=list,
        description="Root causes of the failures that happened at the same time (other tasks).",
    )


class Resubmission(ChangeSet):
    """Result of running the job's jar again from a checkpoint."""

    jar_id: str | None = Field(None, description="The uploaded jar that was (or would be) run.")
    job_id: str | None = Field(
        None,
        description="Id of the restored job: submitted now, found from an earlier attempt, or planned.",
    )


# --- pure decision helpers ------------------------------------------------------------------


class Action(StrEnum):
    NOTHING = "nothing"
    OBSERVE = "observe"
    RESTORE = "restore"
    ESCALATE = "escalate"


class Decision(BaseModel):
    action: Action
    reason: str


def choose_job(jobs: Sequence[FlinkJob], name: str) -> FlinkJob | None:
    """The job that represents ``name`` now: a live copy if any, else the newest one.

    A live copy wins over a newer dead one so that the runbook never starts a second copy.
    """
    same = [j for j in jobs if j.name == name]
    live = [j for j in same if j.state not in GLOBALLY_TERMINAL]
    pool = live or same
    return max(pool, key=lambda j: (j.start_time, j.end_time)) if pool else None


def choose_checkpoint(candidates: Sequence[Checkpoint]) -> Checkpoint | None:
    """The newest restore point that still exists at an external path.

    Checkpoints and savepoints share one id counter, and a restored job continues it, so the
    highest id is the newest state, whichever kind it is.
    """
    usable = [c for c in candidates if c.usable]
    return max(usable, key=lambda c: (c.id, c.timestamp_ms or 0)) if usable else None


def choose_jar(files: Sequence[JarFile], name_or_id: str) -> JarFile | None:
    """The jar with that id, else the most recently uploaded jar with that file name."""
    by_id = [f for f in files if f.id == name_or_id]
    if by_id:
        return by_id[0]
    by_name = [f for f in files if f.name == name_or_id]
    return max(by_name, key=lambda f: f.uploaded) if by_name else None


def restore_job_id(failed_job_id: str, checkpoint_id: int | None) -> str:
    """Deterministic Flink job id for 'restore this job from this checkpoint'.

    ``checkpoint_id`` None: start it again without state. Flink's dispatcher rejects a job id it
    already knows, so a retried or repeated submission of the same restore cannot start a
    second copy.
    """
    which = "no-state" if checkpoint_id is None else checkpoint_id
    return hashlib.sha256(f"{failed_job_id}/{which}".encode()).hexdigest()[:32]


def decide_action(job: FlinkJob | None, checkpoint: Checkpoint | None) -> Decision:
    """What the runbook does about the job, given its state and its newest usable restore point."""
    if job is None:
        return Decision(
            action=Action.ESCALATE,
            reason="no job with that name is known to the cluster: nothing to restore from",
        )
    if job.state == "RUNNING":
        return Decision(action=Action.NOTHING, reason=f"job {job.jid} is RUNNING")
    if job.state in SETTLING:
        return Decision(
            action=Action.OBSERVE,
            reason=f"job {job.jid} is {job.state}: Flink is moving it itself, wait for it to settle",
        )
    if job.state in RESTORABLE:
        if checkpoint is None:
            return Decision(
                action=Action.ESCALATE,
                reason=(
                    f"job {job.jid} is {job.state} and has no completed checkpoint or savepoint at an "
                    "external path (checkpointing off, or checkpoints not retained): a restart would "
                    "lose its state, a human must decide"
                ),
            )
        return Decision(
            action=Action.RESTORE,
            reason=f"job {job.jid} is {job.state}: restore from {checkpoint.kind} {checkpoint.id} "
            f"at {checkpoint.external_path}",
        )
    if job.state == "FINISHED":
        return Decision(
            action=Action.ESCALATE,
            reason=f"job {job.jid} FINISHED on its own (it did not crash): a human must decide "
            "whether it should run again",
        )
    return Decision(
        action=Action.ESCALATE, reason=f"job {job.jid} is in unknown state {job.state!r}"
    )


class LagTrend(StrEnum):
    FALLING = "falling"
    RISING = "rising"
    FLAT = "flat"
    UNKNOWN = "unknown"


class LagVerdict(BaseModel):
    recovered: bool = Field(description="The newest sample is at or under the threshold.")
    trend: LagTrend
    latest: int | None
    reason: str


def assess_lag(samples: Sequence[int], threshold: int) -> LagVerdict:
    """Judge consumer lag samples (oldest first) against a threshold.

    Falling means the newest sample is below every sample of the older half: lag reached a new
    low recently. Flink commits source offsets only when a checkpoint completes, so lag drops in
    steps with flat stretches between them, and new events keep arriving during a match; a
    sample-to-sample rule would misread both. Rising is the mirror; anything else is flat.
    """
    if not samples:
        return LagVerdict(
            recovered=False,
            trend=LagTrend.UNKNOWN,
            latest=None,
            reason=f"no lag sample to compare with threshold {threshold}",
        )
    first, latest = samples[0], samples[-1]
    older = samples[: max(1, len(samples) // 2)]
    if len(samples) < 2:
        trend = LagTrend.UNKNOWN
    elif latest < min(older):
        trend = LagTrend.FALLING
    elif latest > max(older):
        trend = LagTrend.RISING
    else:
        trend = LagTrend.FLAT
    recovered = latest <= threshold
    relation = "at or under" if recovered else "above"
    return LagVerdict(
        recovered=recovered,
        trend=trend,
        latest=latest,
        reason=f"lag {latest} {relation} threshold {threshold} ({trend.value} over "
        f"{len(samples)} sample(s), from {first})",
    )


# --- the cluster's capacity and the restored job, as the REST API shows them ----------------


class JobProgress(BaseModel):
    """One job's state and its tasks' states, from ``GET /jobs/:jobid``.

    Flink reports a job RUNNING as soon as it schedules it, while its tasks may still wait for
    slots (SCHEDULED) or deploy: only tasks in RUNNING process records.
    """

    jid: str
    state: str
    parallelism: int | None = Field(None, description="Highest parallelism among its vertices.")
    tasks: dict[str, int] = Field(
        default_factory=dict, description="Task count per ExecutionState, over all vertices."
    )

    @property
    def total_tasks(self) -> int:
        return sum(self.tasks.values())

    def describe(self) -> str:
        busy = {k: v for k, v in sorted(self.tasks.items()) if v}
        counts = ", ".join(f"{v} {k}" for k, v in busy.items())
        return f"{self.jid}: {self.state}" + (f" ({counts})" if counts else "")


def job_progress(data: dict[str, Any]) -> JobProgress:
    """A ``GET /jobs/:jobid`` body as a JobProgress."""
    tasks: dict[str, int] = {}
    parallelisms = []
    for vertex in data.get("vertices") or []:
        parallelisms.append(vertex.get("parallelism") or 0)
        for status, count in (vertex.get("tasks") or {}).items():
            tasks[status] = tasks.get(status, 0) + (count or 0)
    return JobProgress(
        jid=data["jid"],
        state=data["state"],
        parallelism=max(parallelisms) if parallelisms else None,
        tasks=tasks,
    )


def tasks_running(progress: JobProgress) -> bool:
    """The job runs for real: state RUNNING and every task RUNNING (or FINISHED, like a source
    subtask that got no split after a rescale). A job without task details counts by its state."""
    if progress.state != "RUNNING":
        return False
    if not progress.total_tasks:
        return True
    running = progress.tasks.get("RUNNING", 0)
    return running > 0 and running + progress.tasks.get("FINISHED", 0) == progress.total_tasks


class TaskManagerSlots(BaseModel):
    id: str
    slots: int
    free_slots: int
    last_heartbeat_ms: int | None = None


class SlotCapacity(BaseModel):
    """What ``GET /overview`` and ``GET /taskmanagers`` say about free task slots."""

    taskmanagers: int
    slots_total: int
    slots_available: int
    registered: list[TaskManagerSlots] = Field(default_factory=list)

    def describe(self) -> str:
        return (
            f"{self.taskmanagers} TaskManager(s), {self.slots_available} of {self.slots_total} "
            "slot(s) free"
        )


class SlotDecision(BaseModel):
    ready: bool
    reason: str


def slots_needed(parallelism: int | None, failed_parallelism: int | None) -> int:
    """Slots a resubmission needs: with Flink's default slot sharing, one per parallel
    instance of the widest vertex (the run's parallelism, else the failed job's, else 1)."""
    return max(1, parallelism or failed_parallelism or 1)


def decide_slots(capacity: SlotCapacity, needed: int) -> SlotDecision:
    """Whether the job can be scheduled now, or must wait for a TaskManager (or free slots)."""
    if capacity.taskmanagers == 0:
        return SlotDecision(
            ready=False,
            reason=f"no TaskManager registered with the JobManager (needs {needed} slot(s))",
        )
    if capacity.slots_available < needed:
        return SlotDecision(
            ready=False,
            reason=f"{capacity.describe()}: the job needs {needed} (lost TaskManager not "
            "replaced yet, or other jobs hold the slots)",
        )
    return SlotDecision(ready=True, reason=f"{capacity.describe()}: the job needs {needed}")


def same_checkpoint_path(a: str | None, b: str | None) -> bool:
    """Whether two external paths name the same checkpoint directory. Flink reports local
    paths as ``file:/x`` while people write ``file:///x``; a trailing slash changes nothing."""
    if not a or not b:
        return False

    def norm(path: str) -> str:
        path = path.rstrip("/")
        if path.startswith("file:"):
            return "file:/" + path.removeprefix("file:").lstrip("/")
        return path

    return norm(a) == norm(b)
