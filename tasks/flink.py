"""Flink tasks: find a crashed job and its latest checkpoint, run it again from there, watch it.

Speaks the JobManager REST API as documented at
https://nightlies.apache.org/flink/flink-docs-stable/docs/ops/rest_api/ : ``GET /jobs/overview``,
``/jobs/:jobid``, ``/jobs/:jobid/checkpoints``, ``/jobs/:jobid/exceptions``, ``/jars`` and
``POST /jars/:jarid/run``. The pure decision helpers sit beside the tasks.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from blocks.flink import FlinkCluster
from runbooks.addresses import resolve_host
from runbooks.errors import Escalation
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options

# Flink's JobStatus values that end a job for good; every other state is a live copy of it.
GLOBALLY_TERMINAL = frozenset({"FAILED", "CANCELED", "FINISHED"})
RESTORABLE = frozenset({"FAILED", "CANCELED"})
# Flink itself is moving the job between states (its restart strategy, HA failover, a cancel).
SETTLING = frozenset(
    {"INITIALIZING", "CREATED", "RESTARTING", "RECONCILING", "SUSPENDED", "FAILING", "CANCELLING"}
)
# external_path Flink reports for a checkpoint kept only in JobManager memory
NOT_ADDRESSABLE = "<checkpoint-not-externally-addressable>"


class FlinkUnavailable(RuntimeError):
    """The REST API did not answer usefully (connect error, timeout, 5xx): worth retrying."""


class FlinkRequestError(RuntimeError):
    """Flink refused the request (4xx): retrying the same request cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Reads are polled in verification loops: a cached result would freeze a loop on its first
# answer (Prefect caches by inputs once result persistence is on).
_READ = runbook_task_options(FlinkUnavailable)


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


def _errors(response: httpx.Response) -> str:
    """Flink's ``{"errors": [...]}`` body, or the raw text of a proxy's error page; shortened."""
    try:
        data = response.json()
    except ValueError:
        data = None
    errors = data.get("errors") if isinstance(data, dict) else None
    return (flink_error_summary(errors) if errors else response.text)[:1000]


def _call(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One REST call; raises FlinkUnavailable for transient failures, FlinkRequestError for 4xx."""
    try:
        response = client.request(method, path, json=body)
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise FlinkUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500:
        raise FlinkUnavailable(f"{method} {path}: HTTP {response.status_code}: {_errors(response)}")
    if not response.is_success:
        raise FlinkRequestError(
            response.status_code,
            f"{method} {path}: HTTP {response.status_code}: {_errors(response)}",
        )
    return response.json()


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


# --- tasks ----------------------------------------------------------------------------------


def _list_jobs(client: httpx.Client) -> list[FlinkJob]:
    return [FlinkJob.model_validate(j) for j in _call(client, "GET", "/jobs/overview")["jobs"]]


@task(**_READ)
def get_jobmanager_address(cluster: FlinkCluster) -> str:
    """The JobManager's REST endpoint as ``scheme://address:port/path``, its host name resolved
    (runbooks.addresses), so blocks naming one JobManager differently agree.

    Flink's REST API reports no cluster id (``/config`` and ``/overview`` carry versions and
    counts; ``high-availability.cluster-id`` is set only with HA), so the resolved address is
    the JobManager's identity; the path stays, since one proxy may front several clusters.
    """
    url = httpx.URL(cluster.rest_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        address = resolve_host(url.host, port, cluster.request_timeout_s)
    except TimeoutError as exc:
        raise FlinkUnavailable(f"resolving {url.host}: {exc}") from exc
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # the resolver is busy or unreachable: try again
            raise FlinkUnavailable(f"resolving {url.host}: {exc}") from exc
        raise ValueError(f"Flink host {url.host!r} does not resolve: {exc}") from exc
    host = f"[{address}]" if ":" in address else address
    return f"{url.scheme}://{host}:{port}{url.path.rstrip('/')}"


@task(**_READ)
def find_job(cluster: FlinkCluster, job_name: str) -> FlinkJob | None:
    """The job named ``job_name`` that matters now (see ``choose_job``), or None."""
    with cluster.get_client() as client:
        return choose_job(_list_jobs(client), job_name)


@task(**_READ)
def get_job_state(cluster: FlinkCluster, job_id: str) -> str:
    """Current JobStatus of one job, e.g. 'RUNNING'."""
    with cluster.get_client() as client:
        return _call(client, "GET", f"/jobs/{quote(job_id)}")["state"]


def _checkpoint(raw: dict[str, Any] | None, kind: str) -> Checkpoint | None:
    if not raw:
        return None
    return Checkpoint(
        id=raw["id"],
        kind=kind,
        external_path=raw.get("external_path"),
        timestamp_ms=raw.get("latest_ack_timestamp", raw.get("restore_timestamp")),
        discarded=raw.get("discarded", False),
    )


@task(**_READ)
def get_latest_checkpoint(cluster: FlinkCluster, job_id: str) -> CheckpointLookup:
    """The job's newest restorable checkpoint or savepoint (``latest`` is None if there is none).

    Candidates are the latest completed checkpoint, the latest savepoint and the checkpoint the
    job was itself restored from (a job that crashed before its first checkpoint still has that).
    """
    with cluster.get_client() as client:
        try:
            data = _call(client, "GET", f"/jobs/{quote(job_id)}/checkpoints")
        except FlinkRequestError as exc:
            # Flink answers 404 "Checkpointing has not been enabled." for such jobs
            if exc.status != 404:
                raise
            return CheckpointLookup(job_id=job_id, checkpointing_enabled=False)
    latest = data.get("latest") or {}
    candidates = [
        c
        for c in (
            _checkpoint(latest.get("completed"), "checkpoint"),
            _checkpoint(latest.get("savepoint"), "savepoint"),
            _checkpoint(latest.get("restored"), "restored"),
        )
        if c is not None
    ]
    return CheckpointLookup(
        job_id=job_id,
        checkpointing_enabled=True,
        counts=data.get("counts") or {},
        candidates=candidates,
        latest=choose_checkpoint(candidates),
    )


@task(**_READ)
def get_failure_cause(cluster: FlinkCluster, job_id: str) -> FailureCause | None:
    """The job's newest root exception from ``GET /jobs/:jobid/exceptions``, if it recorded one."""
    with cluster.get_client() as client:
        data = _call(client, "GET", f"/jobs/{quote(job_id)}/exceptions")
    entries = (data.get("exceptionHistory") or {}).get("entries") or []
    if entries:
        newest = max(entries, key=lambda e: e.get("timestamp") or 0)
        trace = newest.get("stacktrace") or ""
        concurrent = [
            root_cause(c.get("stacktrace") or c.get("exceptionName") or "")
            for c in newest.get("concurrentExceptions") or []
        ]
        return FailureCause(
            exception=newest.get("exceptionName") or trace.split("\n", 1)[0],
            timestamp_ms=newest.get("timestamp"),
            task=newest.get("taskName"),
            stacktrace_head="\n".join(trace.splitlines()[:8])[:2000],
            root_cause=root_cause(trace) or None,
            concurrent=sorted(set(filter(None, concurrent)))[:10],
        )
    # Flink before 1.13 only has the flat root exception (removed in 2.0)
    root = data.get("root-exception")
    if not root:
        return None
    return FailureCause(
        exception=root.split("\n", 1)[0],
        timestamp_ms=data.get("timestamp"),
        stacktrace_head="\n".join(root.splitlines()[:8])[:2000],
        root_cause=root_cause(root) or None,
    )


@task(**_READ)
def get_job_progress(cluster: FlinkCluster, job_id: str) -> JobProgress:
    """State, parallelism and task states of one job (``GET /jobs/:jobid``)."""
    with cluster.get_client() as client:
        return job_progress(_call(client, "GET", f"/jobs/{quote(job_id)}"))


@task(**_READ)
def get_slot_capacity(cluster: FlinkCluster) -> SlotCapacity:
    """Registered TaskManagers and free slots (``GET /overview``, ``GET /taskmanagers``)."""
    with cluster.get_client() as client:
        overview = _call(client, "GET", "/overview")
        managers = _call(client, "GET", "/taskmanagers").get("taskmanagers") or []
    return SlotCapacity(
        taskmanagers=overview.get("taskmanagers", len(managers)),
        slots_total=overview.get("slots-total", 0),
        slots_available=overview.get("slots-available", 0),
        registered=[
            TaskManagerSlots(
                id=m.get("id", "?"),
                slots=m.get("slotsNumber", 0),
                free_slots=m.get("freeSlots", 0),
                # despite its name, the epoch ms of the last heartbeat
                last_heartbeat_ms=m.get("timeSinceLastHeartbeat"),
            )
            for m in managers
        ],
    )


@task(**_READ)
def get_restored_checkpoint(cluster: FlinkCluster, job_id: str) -> Checkpoint | None:
    """The checkpoint or savepoint the job started from (``latest.restored``), if any."""
    with cluster.get_client() as client:
        try:
            data = _call(client, "GET", f"/jobs/{quote(job_id)}/checkpoints")
        except FlinkRequestError as exc:
            if exc.status != 404:
                raise
            return None
    return _checkpoint((data.get("latest") or {}).get("restored"), "restored")


def _list_jars(client: httpx.Client) -> list[JarFile]:
    return [
        JarFile(
            id=f["id"],
            name=f["name"],
            uploaded=f.get("uploaded") or 0,
            entry_classes=[e["name"] for e in f.get("entry") or [] if e.get("name")],
        )
        for f in _call(client, "GET", "/jars").get("files") or []
    ]


def _started_copy(client: httpx.Client, job_name: str, job_id: str) -> FlinkJob | None:
    """A job that makes submitting redundant: our own earlier submission, or any live copy."""
    for job in _list_jobs(client):
        if job.jid == job_id or (job.name == job_name and job.state not in GLOBALLY_TERMINAL):
            return job
    return None


@task(**runbook_task_options(FlinkUnavailable))
def resubmit_from_checkpoint(
    cluster: FlinkCluster,
    *,
    job_name: str,
    failed_job_id: str,
    checkpoint: Checkpoint | None,
    jar: str,
    entry_class: str | None,
    program_args: list[str],
    parallelism: int | None,
    dry_run: bool,
    jar_file: str | None = None,
) -> Resubmission:
    """Run the job's uploaded jar again, restoring from ``checkpoint`` (``flink run -s <path>``).

    ``checkpoint`` None starts the job without state (``flink run``): its keyed state is lost,
    so the runbook only does that with a human's approval.

    Idempotent: nothing is submitted while a live job of that name exists, and the new job gets
    a deterministic id (``restore_job_id``), so a retry after a lost response finds the job its
    first attempt started instead of starting another. State that no longer maps to an operator
    fails the submission (allowNonRestoredState is false): silently dropping state is a human call.

    ``jar_file``: a local path of the job's jar, uploaded (``POST /jars/upload``) when the
    cluster does not have the jar (a JobManager that restarted or failed over forgets uploads).
    """
    if checkpoint is not None and not checkpoint.usable:
        raise ValueError(f"{checkpoint.kind} {checkpoint.id} has no usable external path")
    with cluster.get_client() as client:
        jars = _list_jars(client)
        local_name = Path(jar_file).name if jar_file else None
        found = choose_jar(jars, jar) or (choose_jar(jars, local_name) if local_name else None)
        upload: Change | None = None
        if found is None and not jar_file:
            raise Escalation(
                f"jar {jar!r} is not uploaded to the Flink cluster (it has: "
                f"{', '.join(sorted(j.name for j in jars)) or 'none'}): upload it, then run again"
            )
        if found is None:
            assert jar_file is not None and local_name is not None
            if not Path(jar_file).is_file():
                raise Escalation(
                    f"jar {jar!r} is not uploaded to the Flink cluster and {jar_file} is not a "
                    "file on this worker: upload the job's jar, then run again"
                )
            upload = Change(
                action="upload_jar",
                target=local_name,
                detail={"path": jar_file, "bytes": Path(jar_file).stat().st_size},
            )
        jar_id = found.id if found is not None else None
        job_id = restore_job_id(failed_job_id, checkpoint.id if checkpoint else None)
        body: dict[str, Any] = {"programArgsList": program_args, "jobId": job_id}
        if checkpoint is not None:
            body = {
                "savepointPath": checkpoint.external_path,
                "allowNonRestoredState": False,
                **body,
            }
        if entry_class:
            body["entryClass"] = entry_class
        if parallelism:
            body["parallelism"] = parallelism
        change = Change(
            action="run_jar_from_checkpoint" if checkpoint else "run_jar_without_state",
            target=f"{job_name} from {checkpoint.external_path}"
            if checkpoint
            else f"{job_name} without state",
            detail={
                "jar_id": jar_id or f"(uploaded from {jar_file})",
                "new_job_id": job_id,
                "checkpoint_id": checkpoint.id if checkpoint else None,
                "checkpoint_kind": checkpoint.kind if checkpoint else None,
                "replaces_job_id": failed_job_id,
                "entry_class": entry_class,
                "parallelism": parallelism,
            },
        )

        def already(job: FlinkJob) -> Resubmission:
            if job.jid == job_id and not dry_run:
                # our deterministic id: an earlier attempt got through, its response was lost
                return Resubmission(
                    dry_run=dry_run,
                    planned=[change],
                    applied=[_started(change, job)],
                    jar_id=jar_id,
                    job_id=job_id,
                    notes=[f"{job_name} was submitted as {job_id} by an earlier attempt"],
                )
            return Resubmission(
                dry_run=dry_run,
                jar_id=jar_id,
                job_id=job.jid,
                notes=[
                    f"{job_name} already started as {job.jid} ({job.state}): not submitting again"
                ],
            )

        if existing := _started_copy(client, job_name, job_id):
            return already(existing)
        planned = [upload, change] if upload else [change]
        result = Resubmission(dry_run=dry_run, planned=planned, jar_id=jar_id, job_id=job_id)
        if dry_run:
            return result
        if upload is not None:
            assert jar_file is not None
            jar_id = _upload_jar(client, jar_file, max(cluster.request_timeout_s, 120))
            result.jar_id = jar_id
            result.applied.append(upload.model_copy(update={"detail": {"jar_id": jar_id}}))
        assert jar_id is not None
        try:
            response = _call(client, "POST", f"/jars/{quote(jar_id)}/run", body)
        except FlinkRequestError:
            # Flink refuses a job id it already knows (HTTP 400 DuplicateJobSubmissionException)
            if existing := _started_copy(client, job_name, job_id):
                return already(existing)
            raise
        result.job_id = response["jobid"]
        started = FlinkJob.model_validate(_call(client, "GET", f"/jobs/{quote(result.job_id)}"))
        result.applied.append(_started(change, started))
        return result


def _upload_jar(client: httpx.Client, path: str, timeout_s: float) -> str:
    """``POST /jars/upload`` (multipart ``jarfile``); returns the new jar's id."""
    try:
        with open(path, "rb") as f:
            response = client.post(
                "/jars/upload",
                files={"jarfile": (Path(path).name, f, "application/x-java-archive")},
                timeout=timeout_s,
            )
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise FlinkUnavailable(f"POST /jars/upload: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500:
        raise FlinkUnavailable(
            f"POST /jars/upload: HTTP {response.status_code}: {_errors(response)}"
        )
    if not response.is_success:
        raise FlinkRequestError(
            response.status_code,
            f"POST /jars/upload: HTTP {response.status_code}: {_errors(response)}",
        )
    # {"filename": "/tmp/flink-web-upload/<uuid>_name.jar", "status": "success"}
    return Path(response.json()["filename"]).name


def _started(change: Change, job: FlinkJob) -> Change:
    """A resubmission's "after": the job Flink now runs in place of the failed one."""
    return change.model_copy(update={"detail": {"job_id": job.jid, "state": job.state}})
