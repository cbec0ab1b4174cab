"""Flink tasks: find a crashed job and its latest checkpoint, run it again from there, watch it.

Speaks the JobManager REST API as documented at
https://nightlies.apache.org/flink/flink-docs-stable/docs/ops/rest_api/ : ``GET /jobs/overview``,
``/jobs/:jobid``, ``/jobs/:jobid/checkpoints``, ``/jobs/:jobid/exceptions``, ``/jars`` and
``POST /jars/:jarid/run``. The models and pure decisions are in tasks.flink_decisions.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from prefect import task

from blocks.flink import FlinkCluster
from runbooks.addresses import resolve_host
from runbooks.errors import Escalation
from runbooks.results import Change
from runbooks.retry import runbook_task_options
from tasks.flink_decisions import (
    GLOBALLY_TERMINAL,
    Checkpoint,
    CheckpointLookup,
    FailureCause,
    FlinkJob,
    JarFile,
    JobProgress,
    Resubmission,
    SlotCapacity,
    TaskManagerSlots,
    choose_checkpoint,
    choose_jar,
    choose_job,
    flink_error_summary,
    job_progress,
    restore_job_id,
    root_cause,
)


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
