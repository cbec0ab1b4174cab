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


def _errors(response: httpx.Response) -> str:
    """Flink's ``{"errors": [...]}`` body, or the raw text of a proxy's error page; shortened."""
    try:
        data = response.json()
    except ValueError:
        data = None
    errors = data.get("errors") if isinstance(data, dict) else None
    return ("; ".join(map(str, errors)) if errors else response.text)[:500]


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
        return FailureCause(
            exception=newest.get("exceptionName") or trace.split("\n", 1)[0],
            timestamp_ms=newest.get("timestamp"),
            task=newest.get("taskName"),
            stacktrace_head="\n".join(trace.splitlines()[:8])[:2000],
        )
    # Flink before 1.13 only has the flat root exception (removed in 2.0)
    root = data.get("root-exception")
    if not root:
        return None
    return FailureCause(
        exception=root.split("\n", 1)[0],
        timestamp_ms=data.get("timestamp"),
        stacktrace_head="\n".join(root.splitlines()[:8])[:2000],
    )


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
) -> Resubmission:
    """Run the job's uploaded jar again, restoring from ``checkpoint`` (``flink run -s <path>``).

    ``checkpoint`` None starts the job without state (``flink run``): its keyed state is lost,
    so the runbook only does that with a human's approval.

    Idempotent: nothing is submitted while a live job of that name exists, and the new job gets
    a deterministic id (``restore_job_id``), so a retry after a lost response finds the job its
    first attempt started instead of starting another. State that no longer maps to an operator
    fails the submission (allowNonRestoredState is false): silently dropping state is a human call.
    """
    if checkpoint is not None and not checkpoint.usable:
        raise ValueError(f"{checkpoint.kind} {checkpoint.id} has no usable external path")
    with cluster.get_client() as client:
        jars = _list_jars(client)
        jar_file = choose_jar(jars, jar)
        if jar_file is None:
            raise Escalation(
                f"jar {jar!r} is not uploaded to the Flink cluster (it has: "
                f"{', '.join(sorted(j.name for j in jars)) or 'none'}): upload it, then run again"
            )
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
                "jar_id": jar_file.id,
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
                    jar_id=jar_file.id,
                    job_id=job_id,
                    notes=[f"{job_name} was submitted as {job_id} by an earlier attempt"],
                )
            return Resubmission(
                dry_run=dry_run,
                jar_id=jar_file.id,
                job_id=job.jid,
                notes=[
                    f"{job_name} already started as {job.jid} ({job.state}): not submitting again"
                ],
            )

        if existing := _started_copy(client, job_name, job_id):
            return already(existing)
        result = Resubmission(dry_run=dry_run, planned=[change], jar_id=jar_file.id, job_id=job_id)
        if dry_run:
            return result
        try:
            response = _call(client, "POST", f"/jars/{quote(jar_file.id)}/run", body)
        except FlinkRequestError:
            # Flink refuses a job id it already knows (HTTP 400 DuplicateJobSubmissionException)
            if existing := _started_copy(client, job_name, job_id):
                return already(existing)
            raise
        result.job_id = response["jobid"]
        started = FlinkJob.model_validate(_call(client, "GET", f"/jobs/{quote(result.job_id)}"))
        result.applied.append(_started(change, started))
        return result


def _started(change: Change, job: FlinkJob) -> Change:
    """A resubmission's "after": the job Flink now runs in place of the failed one."""
    return change.model_copy(update={"detail": {"job_id": job.jid, "state": job.state}})
