"""Spark tasks: find the driver of a streaming application on a standalone master, read its
query's progress from the checkpoint, kill a stalled driver, resubmit the application.

Speaks the standalone master's REST submission protocol (``spark.master.rest.enabled``, the one
``spark-submit --deploy-mode cluster`` uses against ``spark://host:6066``): ``POST
/v1/submissions/create``, ``POST /v1/submissions/kill/:id``, ``GET /v1/submissions/status/:id``,
and the master web UI's ``GET /json/`` (workers, drivers, applications). Progress comes from the
query's checkpoint: ``offsets/<batch>`` is written when a batch is planned, ``commits/<batch>``
when it completed; ``metadata`` holds the query id.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import httpx
from prefect import task
from pydantic import BaseModel, Field

from blocks.spark import SparkCluster
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.spark_decisions import (
    LIVE_DRIVER,
    CheckpointProgress,
    SparkApp,
    SparkDriver,
    choose_driver,
)

SPARK_CLIENT_VERSION = "3.5.0"  # the protocol is unchanged since 1.3; the server only logs it
# the newest committed batch ids kept in a CheckpointProgress
KEEP_COMMITS = 50


class SparkUnavailable(RuntimeError):
    """The master did not answer usefully (connect error, timeout, 5xx): worth retrying."""


class SparkRequestError(RuntimeError):
    """The master refused the request (4xx, or ``success: false``): retrying cannot help."""


_READ = runbook_task_options(SparkUnavailable)


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    return str(data.get("message") or data)[:500] if isinstance(data, dict) else str(data)[:500]


def _call(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        response = client.request(method, path, json=body)
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise SparkUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500:
        raise SparkUnavailable(
            f"{method} {path}: HTTP {response.status_code}: {_message(response)}"
        )
    if not response.is_success:
        raise SparkRequestError(
            f"{method} {path}: HTTP {response.status_code}: {_message(response)}"
        )
    try:
        return response.json()
    except ValueError as exc:  # a proxy's HTML page
        raise SparkUnavailable(f"{method} {path}: not JSON: {response.text[:200]}") from exc


# --- the master ------------------------------------------------------------------------------


class MasterState(BaseModel):
    """The master's ``/json/``: its URL, workers, drivers and applications."""

    url: str = Field(description="The master's spark:// URL.")
    status: str
    alive_workers: int = 0
    cores_free: int = 0
    memory_free_mb: int = 0
    drivers: list[SparkDriver] = Field(default_factory=list)
    apps: list[SparkApp] = Field(default_factory=list)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_master_json(data: dict[str, Any]) -> MasterState:
    drivers = [
        SparkDriver(
            id=d["id"],
            state=d.get("state", "UNKNOWN"),
            start_ms=_int(d.get("starttime")),
            main_class=d.get("mainclass") or "",
            worker=d.get("worker"),
        )
        for d in [*data.get("activedrivers", []), *data.get("completeddrivers", [])]
    ]
    apps = [
        SparkApp(
            id=a["id"],
            name=a.get("name", ""),
            state=a.get("state", "UNKNOWN"),
            start_ms=_int(a.get("starttime")),
        )
        for a in [*data.get("activeapps", []), *data.get("completedapps", [])]
    ]
    alive = [w for w in data.get("workers", []) if w.get("state") == "ALIVE"]
    return MasterState(
        url=data.get("url", ""),
        status=data.get("status", "UNKNOWN"),
        alive_workers=_int(data.get("aliveworkers", len(alive))),
        cores_free=sum(_int(w.get("coresfree")) for w in alive),
        memory_free_mb=sum(_int(w.get("memoryfree")) for w in alive),
        drivers=drivers,
        apps=apps,
    )


def _master_state(cluster: SparkCluster) -> MasterState:
    with cluster.get_ui_client() as client:
        return parse_master_json(_call(client, "GET", "/json/"))


@task(**_READ)
def get_master_state(cluster: SparkCluster) -> MasterState:
    """Workers, drivers and applications the master knows (its web UI's ``/json/``)."""
    return _master_state(cluster)


class DriverStatus(BaseModel):
    """``GET /v1/submissions/status/:id``."""

    driver_id: str
    state: str = Field(description="DriverState, or NOT_FOUND when the master does not know it.")
    worker: str | None = None
    message: str | None = None


def _status(client: httpx.Client, driver_id: str) -> DriverStatus:
    data = _call(client, "GET", f"/v1/submissions/status/{quote(driver_id)}")
    if not data.get("success"):
        return DriverStatus(driver_id=driver_id, state="NOT_FOUND", message=data.get("message"))
    return DriverStatus(
        driver_id=driver_id,
        state=data.get("driverState", "UNKNOWN"),
        worker=data.get("workerHostPort"),
        message=data.get("message"),
    )


@task(**_READ)
def get_driver_status(cluster: SparkCluster, driver_id: str) -> DriverStatus:
    """The driver's state from the REST submission server."""
    with cluster.get_client() as client:
        return _status(client, driver_id)


# --- the checkpoint --------------------------------------------------------------------------


def checkpoint_path(location: str) -> Path:
    return Path(urlparse(location).path if location.startswith("file://") else location)


def _batches(directory: Path) -> list[tuple[int, float]]:
    """(batch id, mtime) of a checkpoint log directory, oldest first (temp files skipped)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.isdigit() and entry.is_file():
            try:
                found.append((int(entry.name), entry.stat().st_mtime))
            except FileNotFoundError:  # compacted away meanwhile
                continue
    return sorted(found)


def read_progress(location: str) -> CheckpointProgress:
    root = checkpoint_path(location)
    offsets, commits = _batches(root / "offsets"), _batches(root / "commits")
    query_id = None
    try:
        query_id = json.loads((root / "metadata").read_text().splitlines()[0]).get("id")
    except (FileNotFoundError, IndexError, ValueError, AttributeError):
        pass
    return CheckpointProgress(
        location=location,
        exists=query_id is not None or bool(offsets),
        query_id=query_id,
        last_offset_batch=offsets[-1][0] if offsets else None,
        last_offset_mtime=offsets[-1][1] if offsets else None,
        last_commit_batch=commits[-1][0] if commits else None,
        last_commit_mtime=commits[-1][1] if commits else None,
        commit_batches=[b for b, _ in commits[-KEEP_COMMITS:]],
    )


@task(**runbook_task_options(OSError))
def get_checkpoint_progress(location: str) -> CheckpointProgress:
    """The query's planned and committed batches, from its checkpoint directory."""
    return read_progress(location)


# --- changes ---------------------------------------------------------------------------------


class DriverKill(ChangeSet):
    """Result of killing a driver."""


@task(**runbook_task_options(SparkUnavailable))
def kill_driver(cluster: SparkCluster, driver_id: str, reason: str, dry_run: bool) -> DriverKill:
    """``POST /v1/submissions/kill/:id``, then wait (up to the block's timeout) until the master
    reports it ended. Idempotent: a driver already ended is not killed again."""
    with cluster.get_client() as client:
        before = _status(client, driver_id)
        if before.state not in LIVE_DRIVER:
            return DriverKill(
                dry_run=dry_run, notes=[f"driver {driver_id} is already {before.state}"]
            )
        change = Change(
            action="kill_driver",
            target=f"{cluster.app_name} driver {driver_id}",
            detail={"driver_id": driver_id, "state": before.state, "reason": reason},
        )
        result = DriverKill(dry_run=dry_run, planned=[change])
        if dry_run:
            return result
        answer = _call(client, "POST", f"/v1/submissions/kill/{quote(driver_id)}")
        deadline = time.monotonic() + cluster.request_timeout_s
        after = _status(client, driver_id)
        while after.state in LIVE_DRIVER and time.monotonic() < deadline:
            time.sleep(0.5)
            after = _status(client, driver_id)
        if after.state in LIVE_DRIVER:
            raise SparkUnavailable(
                f"driver {driver_id} still {after.state} after the kill "
                f"({answer.get('message') or 'no message'})"
            )
        result.applied.append(
            change.model_copy(update={"detail": {"driver_id": driver_id, "state": after.state}})
        )
        return result


class Resubmission(ChangeSet):
    """Result of submitting the application again."""

    driver_id: str | None = Field(
        None, description="The new driver: submitted now, found from an earlier attempt."
    )


def submission_request(cluster: SparkCluster, master_url: str) -> dict[str, Any]:
    """The CreateSubmissionRequest of the block's application (cluster deploy mode)."""
    properties = {
        "spark.master": master_url,
        **cluster.spark_properties,
        "spark.app.name": cluster.app_name,
        "spark.submit.deployMode": "cluster",
    }
    properties.setdefault("spark.driver.supervise", "false")
    return {
        "action": "CreateSubmissionRequest",
        "clientSparkVersion": SPARK_CLIENT_VERSION,
        "appResource": cluster.app_resource,
        "mainClass": cluster.main_class,
        "appArgs": list(cluster.app_args),
        "environmentVariables": dict(cluster.environment_variables),
        "sparkProperties": properties,
    }


@task(**runbook_task_options(SparkUnavailable))
def resubmit_application(
    cluster: SparkCluster,
    *,
    replaces_driver_id: str | None,
    last_committed_batch: int | None,
    dry_run: bool,
) -> Resubmission:
    """Submit the block's application again (``POST /v1/submissions/create``); its query picks up
    its checkpoint (the same ``checkpoint_location``) and continues with the next batch.

    Idempotent: when a live driver of the application exists (one this task started before a
    lost response, or anyone's), nothing is submitted and that driver is returned.
    """
    state = _master_state(cluster)
    current = choose_driver(state.drivers, state.apps, cluster.app_name, cluster.main_class)
    change = Change(
        action="submit_application",
        target=f"{cluster.app_name} from {cluster.checkpoint_location}",
        detail={
            "app_resource": cluster.app_resource,
            "main_class": cluster.main_class,
            "checkpoint_location": cluster.checkpoint_location,
            "checkpoint": last_committed_batch is not None,
            "last_committed_batch": last_committed_batch,
            "replaces_driver_id": replaces_driver_id,
        },
    )
    live = current.driver
    if live is not None and live.state in LIVE_DRIVER and live.id != replaces_driver_id:
        return Resubmission(
            dry_run=dry_run,
            driver_id=live.id,
            notes=[
                f"{cluster.app_name} already runs as driver {live.id} ({live.state}): "
                "not submitting again"
            ],
        )
    result = Resubmission(dry_run=dry_run, planned=[change])
    if dry_run:
        return result
    if live is not None and live.state in LIVE_DRIVER:
        raise SparkRequestError(
            f"driver {live.id} of {cluster.app_name} is still {live.state}: kill it first"
        )
    with cluster.get_client() as client:
        answer = _call(
            client, "POST", "/v1/submissions/create", submission_request(cluster, state.url)
        )
        if not answer.get("success"):
            raise SparkRequestError(f"submission refused: {answer.get('message') or answer}")
        driver_id = answer["submissionId"]
        status = _status(client, driver_id)
    result.driver_id = driver_id
    result.applied.append(
        change.model_copy(update={"detail": {"driver_id": driver_id, "state": status.state}})
    )
    return result
