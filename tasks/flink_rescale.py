"""Flink changes of the flink-job-degraded runbook: savepoint, stop-with-savepoint, resubmit wider.

Every task takes ``dry_run`` and returns a ``ChangeSet``; every one is idempotent:
- a savepoint is not taken again while the job's latest one is younger than ``reuse_within_s``,
  and a retried trigger carries the same ``triggerId`` (Flink answers it with the first trigger's
  operation instead of starting another);
- a job that is already stopped is not stopped again: its savepoint is looked up instead;
- a job is resubmitted with a deterministic job id, never while a live job of that name exists,
  and a job already RUNNING at the target parallelism means there is nothing to do.

Endpoints: ``POST /jobs/:id/savepoints`` (``target-directory``, ``cancel-job``, ``triggerId``),
``POST /jobs/:id/stop`` (``targetDirectory``, ``drain``, ``triggerId``), both answered with a
``request-id`` polled at ``GET /jobs/:id/savepoints/:triggerid`` until ``status.id`` is
COMPLETED (``operation.location`` or ``operation.failure-cause``); ``POST /jars/:jarid/run``
with ``savepointPath`` and ``parallelism``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import quote

import httpx
from prefect import task
from pydantic import Field

from blocks.flink import FlinkCluster
from runbooks.errors import Escalation
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.flink import (
    FlinkRequestError,
    FlinkUnavailable,
    _call,
    _list_jars,
    _list_jobs,
)
from tasks.flink_decisions import (
    GLOBALLY_TERMINAL,
    FlinkJob,
    Resubmission,
    choose_jar,
)
from tasks.flink_metrics import read_checkpoint_history

_CHANGE = runbook_task_options(FlinkUnavailable)


class SavepointFailed(RuntimeError):
    """Flink could not complete the savepoint (its failure cause is the message)."""


class SavepointResult(ChangeSet):
    savepoint_path: str | None = Field(None, description="Where the savepoint lives.")
    trigger_id: str | None = None


def trigger_id_for(*parts: str) -> str:
    """A Flink trigger id (32 hex digits) that is the same for the same parts: a retried trigger
    is recognized by Flink as the first one."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:32]


def rescaled_job_id(old_job_id: str, parallelism: int) -> str:
    """Deterministic job id of 'this job, rescaled to this parallelism'."""
    return hashlib.sha256(f"{old_job_id}/rescale/{parallelism}".encode()).hexdigest()[:32]


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return _call(client, "GET", f"/jobs/{quote(job_id)}")


def _operation(client: httpx.Client, job_id: str, trigger_id: str) -> dict[str, Any] | None:
    """The savepoint or stop operation's status, or None when Flink does not know the trigger."""
    try:
        return _call(client, "GET", f"/jobs/{quote(job_id)}/savepoints/{quote(trigger_id)}")
    except FlinkRequestError as exc:
        if exc.status == 404:
            return None
        raise


def _wait_for_operation(
    client: httpx.Client, job_id: str, trigger_id: str, deadline_s: float, what: str
) -> str:
    deadline = time.monotonic() + deadline_s
    while True:
        status = _operation(client, job_id, trigger_id)
        if status and (status.get("status") or {}).get("id") == "COMPLETED":
            operation = status.get("operation") or {}
            if operation.get("location"):
                return operation["location"]
            cause = operation.get("failure-cause") or {}
            trace = (cause.get("stack-trace") or cause.get("class") or "unknown cause").strip()
            raise SavepointFailed(f"{what} of job {job_id} failed: {trace.splitlines()[0][:300]}")
        if time.monotonic() >= deadline:
            raise SavepointFailed(
                f"{what} of job {job_id} (trigger {trigger_id}) not completed after "
                f"{deadline_s:.0f}s"
            )
        time.sleep(0.5)


@task(**_CHANGE)
def trigger_savepoint(
    cluster: FlinkCluster,
    *,
    job_id: str,
    job_name: str,
    target_directory: str | None,
    trigger_id: str,
    reuse_within_s: float,
    deadline_s: float,
    dry_run: bool,
) -> SavepointResult:
    """Take a savepoint of the running job (it keeps running): the state is safe before anything
    else happens. A savepoint younger than ``reuse_within_s`` is reused instead."""
    with cluster.get_client() as client:
        history = read_checkpoint_history(client, job_id)
        if (
            history.latest_savepoint_path
            and history.latest_savepoint_ms
            and time.time() * 1000 - history.latest_savepoint_ms <= reuse_within_s * 1000
        ):
            age = time.time() - history.latest_savepoint_ms / 1000
            return SavepointResult(
                dry_run=dry_run,
                savepoint_path=history.latest_savepoint_path,
                notes=[
                    f"savepoint {history.latest_savepoint_path} of {job_id} is {age:.0f}s old: "
                    "reused, no new one taken"
                ],
            )
        change = Change(
            action="trigger_savepoint",
            target=f"{job_name} ({job_id})",
            detail={
                "job_id": job_id,
                "target_directory": target_directory,
                "trigger_id": trigger_id,
            },
        )
        result = SavepointResult(dry_run=dry_run, planned=[change], trigger_id=trigger_id)
        if dry_run:
            return result
        body: dict[str, Any] = {"cancel-job": False, "triggerId": trigger_id}
        if target_directory:
            body["target-directory"] = target_directory
        request = _call(client, "POST", f"/jobs/{quote(job_id)}/savepoints", body)
        request_id = request.get("request-id") or trigger_id
        path = _wait_for_operation(client, job_id, request_id, deadline_s, "savepoint")
    result.savepoint_path = path
    result.applied.append(change.model_copy(update={"detail": {"savepoint_path": path}}))
    return result


@task(**_CHANGE)
def stop_with_savepoint(
    cluster: FlinkCluster,
    *,
    job_id: str,
    job_name: str,
    target_directory: str | None,
    trigger_id: str,
    deadline_s: float,
    dry_run: bool,
) -> SavepointResult:
    """Stop the job gracefully with a final savepoint (``flink stop``), the state the rescaled
    job starts from. A job already stopped (an earlier attempt) is not stopped again."""
    with cluster.get_client() as client:
        state = _job(client, job_id)["state"]
        change = Change(
            action="stop_with_savepoint",
            target=f"{job_name} ({job_id})",
            detail={"job_id": job_id, "state": state, "target_directory": target_directory},
        )
        if state in GLOBALLY_TERMINAL:
            known = _operation(client, job_id, trigger_id)
            location = ((known or {}).get("operation") or {}).get("location")
            if state == "FINISHED" and not location:
                location = read_checkpoint_history(client, job_id).latest_savepoint_path
            if state != "FINISHED" or not location:
                raise Escalation(
                    f"{job_name} ({job_id}) is {state} and has no stop savepoint: not resubmitting "
                    "it at a new parallelism (flink-job-crashed restores a crashed job)"
                )
            return SavepointResult(
                dry_run=dry_run,
                savepoint_path=location,
                trigger_id=trigger_id,
                notes=[f"{job_name} ({job_id}) already stopped with savepoint {location}"],
            )
        if state != "RUNNING":
            raise Escalation(
                f"{job_name} ({job_id}) is {state}: not stopping a job that is not RUNNING"
            )
        result = SavepointResult(dry_run=dry_run, planned=[change], trigger_id=trigger_id)
        if dry_run:
            return result
        body: dict[str, Any] = {"drain": False, "triggerId": trigger_id}
        if target_directory:
            body["targetDirectory"] = target_directory
        request = _call(client, "POST", f"/jobs/{quote(job_id)}/stop", body)
        request_id = request.get("request-id") or trigger_id
        path = _wait_for_operation(client, job_id, request_id, deadline_s, "stop-with-savepoint")
    result.savepoint_path = path
    result.applied.append(
        change.model_copy(update={"detail": {"savepoint_path": path, "state": "FINISHED"}})
    )
    return result


def job_parallelism(details: dict[str, Any]) -> int:
    """A job's parallelism as its slots see it: the highest of its vertices."""
    return max((int(v.get("parallelism") or 0) for v in details.get("vertices") or []), default=0)


@task(**_CHANGE)
def resubmit_with_parallelism(
    cluster: FlinkCluster,
    *,
    job_name: str,
    old_job_id: str,
    savepoint_path: str | None,
    jar: str,
    entry_class: str | None,
    program_args: list[str],
    parallelism: int,
    dry_run: bool,
) -> Resubmission:
    """Run the job's jar again from ``savepoint_path`` with ``parallelism`` (``flink run -s <path>
    -p <n>``). Nothing happens while a live job of that name runs (in dry-run the old job still
    runs: it is stopped first); a job already RUNNING at the target parallelism is the result."""
    with cluster.get_client() as client:
        jars = _list_jars(client)
        jar_file = choose_jar(jars, jar)
        if jar_file is None:
            raise Escalation(
                f"jar {jar!r} is not uploaded to the Flink cluster (it has: "
                f"{', '.join(sorted(j.name for j in jars)) or 'none'}): upload it, then run again"
            )
        job_id = rescaled_job_id(old_job_id, parallelism)
        change = Change(
            action="run_jar_from_savepoint",
            # the same target in the plan (made before the stop, no savepoint path yet) and
            # after the stop: the guard matches what was applied with what was planned by it
            target=f"{job_name} at parallelism {parallelism} from the stop savepoint",
            detail={
                "jar_id": jar_file.id,
                "new_job_id": job_id,
                "replaces_job_id": old_job_id,
                "savepoint_path": savepoint_path,
                "parallelism": parallelism,
                "entry_class": entry_class,
            },
        )
        live = [
            j
            for j in _list_jobs(client)
            if j.jid == job_id or (j.name == job_name and j.state not in GLOBALLY_TERMINAL)
        ]
        for job in live:
            if job.jid == old_job_id:
                continue
            current = job_parallelism(_job(client, job.jid))
            if job.state == "RUNNING" and current >= parallelism:
                return Resubmission(
                    dry_run=dry_run,
                    jar_id=jar_file.id,
                    job_id=job.jid,
                    notes=[
                        f"{job_name} already RUNNING as {job.jid} at parallelism {current}: "
                        "nothing to resubmit"
                    ],
                )
            if not dry_run:
                raise Escalation(
                    f"{job_name} already runs as {job.jid} ({job.state}, parallelism {current}): "
                    "not starting a second copy"
                )
        result = Resubmission(dry_run=dry_run, planned=[change], jar_id=jar_file.id, job_id=job_id)
        if dry_run:
            return result
        if any(j.jid == old_job_id for j in live):
            raise Escalation(f"{job_name} ({old_job_id}) still runs: not starting a second copy")
        if not savepoint_path:
            raise ValueError("resubmitting at a new parallelism needs the stop's savepoint")
        body: dict[str, Any] = {
            "savepointPath": savepoint_path,
            "allowNonRestoredState": False,
            "parallelism": parallelism,
            "programArgsList": program_args,
            "jobId": job_id,
        }
        if entry_class:
            body["entryClass"] = entry_class
        response = _call(client, "POST", f"/jars/{quote(jar_file.id)}/run", body)
        result.job_id = response["jobid"]
        started = FlinkJob.model_validate(_job(client, result.job_id))
    result.applied.append(
        change.model_copy(update={"detail": {"job_id": started.jid, "state": started.state}})
    )
    return result
