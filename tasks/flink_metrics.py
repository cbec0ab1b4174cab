"""Flink reads for the flink-job-degraded runbook: backpressure and load per vertex, checkpoint
history, parallelism and free slots. Only reads; every call through ``tasks.flink._call`` (the
block's timeout, transient errors raised as ``FlinkUnavailable`` and retried, 4xx not).

Endpoints (JobManager REST API, Flink 1.13+ including 2.x):
- ``GET /jobs/:id``: vertices with ``parallelism`` and ``maxParallelism``; ``plan.nodes[].inputs``
  gives the edges (``GET /jobs/:id/plan`` when the job details carry no plan).
- ``GET /jobs/:id/vertices/:vid/backpressure``: ``status`` ``ok`` with ``backpressure-level`` (2.3
  also writes ``backpressureLevel``) and per subtask ``ratio``, ``busyRatio``, ``idleRatio``
  (``"NaN"``, a string, where unknown); ``deprecated`` while the JobManager has not fetched the
  vertex's metrics yet (seen for up to ~10 s, the metric fetcher's interval, after a job
  starts); HTTP 500 while only some subtasks have reported.
- ``GET /jobs/:id/vertices/:vid/subtasks/metrics?get=...``: min/max/avg/sum/skew over subtasks
  of ``backPressuredTimeMsPerSecond``, ``busyTimeMsPerSecond``, ``idleTimeMsPerSecond`` (an empty
  list until the metric fetcher has them; each a 60 s average in the task). Sources that cannot
  measure busy time report ``"NaN"``.
- ``GET /jobs/:id/checkpoints``: ``counts``, ``history`` (newest first), ``latest``.
- free slots: ``tasks.flink.get_slot_capacity`` (``GET /overview``, ``/taskmanagers``).
"""

from __future__ import annotations

import math
import time
from typing import Any
from urllib.parse import quote

import httpx
from prefect import task
from pydantic import BaseModel, Field

from blocks.flink import FlinkCluster
from runbooks.retry import runbook_task_options
from tasks.flink import (
    FlinkRequestError,
    FlinkUnavailable,
    _call,
)
from tasks.flink_degraded_decisions import (
    CheckpointSample,
    VertexLoad,
    ratio,
    topological_order,
)

_READ = runbook_task_options(FlinkUnavailable)

LOAD_METRICS = ("backPressuredTimeMsPerSecond", "busyTimeMsPerSecond", "idleTimeMsPerSecond")
# the JobManager fetches metrics from the TaskManagers on demand: the first request of a vertex
# may find none; ask again after a short pause, a bounded number of times
METRIC_ATTEMPTS = 3
METRIC_PAUSE_S = 2.0


class JobLoad(BaseModel):
    """A job's vertices in topological order, with their load, at one moment."""

    job_id: str
    name: str
    state: str
    vertices: list[VertexLoad] = Field(default_factory=list)
    measured_at_ms: int = 0

    def vertex_named(self, name: str) -> VertexLoad | None:
        return next((v for v in self.vertices if v.name == name), None)


class CheckpointHistory(BaseModel):
    job_id: str
    enabled: bool
    counts: dict[str, int] = Field(default_factory=dict)
    history: list[CheckpointSample] = Field(default_factory=list, description="Oldest first.")
    latest_savepoint_path: str | None = None
    latest_savepoint_ms: int | None = None
    restored_path: str | None = Field(
        None, description="external_path of the checkpoint or savepoint the job started from."
    )
    restored_id: int | None = None


def _num(value: Any) -> float | None:
    """A number from Flink's JSON, which writes NaN as the string "NaN" (sources that cannot
    measure busy time); NaN and non-numbers are None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _edges(client: httpx.Client, job_id: str, details: dict[str, Any]) -> dict[str, list[str]]:
    plan = details.get("plan")
    if not isinstance(plan, dict) or not plan.get("nodes"):
        plan = (_call(client, "GET", f"/jobs/{quote(job_id)}/plan") or {}).get("plan") or {}
    return {
        node["id"]: [i["id"] for i in node.get("inputs") or [] if i.get("id")]
        for node in plan.get("nodes") or []
    }


def _aggregated(client: httpx.Client, job_id: str, vertex_id: str) -> dict[str, dict[str, Any]]:
    path = (
        f"/jobs/{quote(job_id)}/vertices/{quote(vertex_id)}/subtasks/metrics"
        f"?get={','.join(LOAD_METRICS)}"
    )
    for attempt in range(METRIC_ATTEMPTS):
        rows = _call(client, "GET", path) or []
        if rows:
            return {row["id"]: row for row in rows if "id" in row}
        if attempt + 1 < METRIC_ATTEMPTS:
            time.sleep(METRIC_PAUSE_S)
    return {}


def _backpressure(client: httpx.Client, job_id: str, vertex_id: str) -> dict[str, Any]:
    """The backpressure endpoint's answer, best effort (the aggregated metrics, read just before
    from the same JobManager, are the primary source): ``{}`` when it fails. Flink 2.3 answers
    HTTP 500 (NoSuchElementException in JobVertexBackPressureHandler.getMaxBackPressureRatio)
    for a vertex of a job that has just started, while some subtask has reported no metric yet."""
    path = f"/jobs/{quote(job_id)}/vertices/{quote(vertex_id)}/backpressure"
    data: dict[str, Any] = {}
    for attempt in range(METRIC_ATTEMPTS):
        try:
            data = _call(client, "GET", path) or {}
        except FlinkUnavailable:
            return {}
        if data.get("status") == "ok":
            return data
        if attempt + 1 < METRIC_ATTEMPTS:
            time.sleep(METRIC_PAUSE_S)
    return data


def _load(
    client: httpx.Client, job_id: str, vertex: dict[str, Any], inputs: list[str]
) -> VertexLoad:
    vid = vertex["id"]
    metrics = _aggregated(client, job_id, vid)
    pressure = _backpressure(client, job_id, vid)
    subtasks = pressure.get("subtasks") or []

    def worst(metric: str, field: str) -> float | None:
        # the aggregated metric first; the backpressure endpoint's per-subtask ratios otherwise
        value = ratio(_num((metrics.get(metric) or {}).get("max")))
        if value is None and subtasks:
            known = [n for n in (_num(s.get(field)) for s in subtasks) if n is not None]
            value = max(known) if known else None
        return value

    return VertexLoad(
        id=vid,
        name=vertex.get("name") or vid,
        parallelism=int(vertex.get("parallelism") or 1),
        max_parallelism=vertex.get("maxParallelism") or None,
        inputs=inputs,
        backpressured=worst("backPressuredTimeMsPerSecond", "ratio"),
        busy=worst("busyTimeMsPerSecond", "busyRatio"),
        idle=worst("idleTimeMsPerSecond", "idleRatio"),
        level=pressure.get("backpressure-level") if pressure.get("status") == "ok" else None,
    )


@task(**_READ)
def get_job_load(cluster: FlinkCluster, job_id: str) -> JobLoad:
    """Every vertex of the job with its parallelism, inputs and load (backpressured, busy, idle)."""
    with cluster.get_client() as client:
        details = _call(client, "GET", f"/jobs/{quote(job_id)}")
        edges = _edges(client, job_id, details)
        vertices = [
            _load(client, job_id, v, edges.get(v["id"], [])) for v in details.get("vertices") or []
        ]
    return JobLoad(
        job_id=job_id,
        name=details.get("name", ""),
        state=details.get("state", ""),
        vertices=topological_order(vertices),
        measured_at_ms=details.get("now") or int(time.time() * 1000),
    )


def _sample(raw: dict[str, Any]) -> CheckpointSample:
    return CheckpointSample(
        id=raw["id"],
        status=raw.get("status", ""),
        is_savepoint=bool(raw.get("is_savepoint")),
        trigger_timestamp=raw.get("trigger_timestamp") or 0,
        duration_ms=raw.get("end_to_end_duration"),
        state_size=raw.get("state_size"),
        checkpointed_size=raw.get("checkpointed_size"),
        failure_message=raw.get("failure_message"),
    )


def read_checkpoint_history(client: httpx.Client, job_id: str) -> CheckpointHistory:
    try:
        data = _call(client, "GET", f"/jobs/{quote(job_id)}/checkpoints")
    except FlinkRequestError as exc:
        if exc.status != 404:  # "Checkpointing has not been enabled."
            raise
        return CheckpointHistory(job_id=job_id, enabled=False)
    latest = data.get("latest") or {}
    savepoint = latest.get("savepoint") or {}
    restored = latest.get("restored") or {}
    return CheckpointHistory(
        job_id=job_id,
        enabled=True,
        counts=data.get("counts") or {},
        history=sorted((_sample(h) for h in data.get("history") or []), key=lambda s: s.id),
        latest_savepoint_path=savepoint.get("external_path"),
        latest_savepoint_ms=savepoint.get("latest_ack_timestamp"),
        restored_path=restored.get("external_path"),
        restored_id=restored.get("id"),
    )


@task(**_READ)
def get_checkpoint_history(cluster: FlinkCluster, job_id: str) -> CheckpointHistory:
    """Checkpoint counts and history (durations, sizes, failures), latest savepoint, restore."""
    with cluster.get_client() as client:
        return read_checkpoint_history(client, job_id)
