"""Decisions of the flink-job-degraded runbook: pure functions over what Flink's REST API reports.

Seed 000, P2 "High End-to-End Latency", Flink stage: "check backpressure, state size" and the
checkpoint duration. Flink's own vocabulary is used throughout: a vertex is *backpressured* when
its output buffers are full (``backPressuredTimeMsPerSecond``), *busy* when it is processing
(``busyTimeMsPerSecond``), *idle* when it waits for input. Backpressure is the symptom, the
bottleneck is the busy vertex below it: the first vertex downstream of a backpressured one that is
not backpressured itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

from pydantic import BaseModel, Field

# Flink's own levels (JobVertexBackPressureHandler): ratio <= 0.1 ok, <= 0.5 low, above high
FLINK_LOW = 0.1
FLINK_HIGH = 0.5


class VertexLoad(BaseModel):
    """One job vertex (a chain of operators) and how loaded it is, ratios in 0..1."""

    id: str
    name: str
    parallelism: int
    max_parallelism: int | None = Field(None, description="Highest parallelism its state allows.")
    inputs: list[str] = Field(default_factory=list, description="Ids of its upstream vertices.")
    backpressured: float | None = Field(
        None, description="Share of time blocked on full output buffers, max over subtasks."
    )
    busy: float | None = Field(None, description="Share of time processing, max over subtasks.")
    idle: float | None = Field(
        None, description="Share of time waiting for input, max over subtasks."
    )
    level: str | None = Field(None, description="Flink's backpressure level: ok, low or high.")

    def describe(self) -> str:
        return (
            f"{self.name} (p={self.parallelism}): backpressured {_pct(self.backpressured)}, "
            f"busy {_pct(self.busy)}, idle {_pct(self.idle)}"
        )


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.0f}%"


def ratio(ms_per_second: float | None) -> float | None:
    """A ``...TimeMsPerSecond`` metric as a 0..1 ratio; None when unknown (Flink reports NaN
    for sources that cannot measure busy time)."""
    if ms_per_second is None or math.isnan(ms_per_second):
        return None
    return max(0.0, min(1.0, ms_per_second / 1000.0))


def topological_order(vertices: Sequence[VertexLoad]) -> list[VertexLoad]:
    """Sources first, then each vertex after all of its inputs (ties keep Flink's order)."""
    by_id = {v.id: v for v in vertices}
    placed: list[VertexLoad] = []
    seen: set[str] = set()
    remaining = list(vertices)
    while remaining:
        ready = [v for v in remaining if all(i in seen or i not in by_id for i in v.inputs)]
        if not ready:  # a cycle (iterations): keep the rest in Flink's order
            ready = remaining[:1]
        for v in ready:
            placed.append(v)
            seen.add(v.id)
        remaining = [v for v in remaining if v.id not in seen]
    return placed


class Bottleneck(BaseModel):
    vertex: VertexLoad
    backpressured_upstream: list[str] = Field(
        description="Names of the backpressured vertices it holds back."
    )
    reason: str


def find_bottleneck(
    vertices: Sequence[VertexLoad], backpressure_threshold: float = FLINK_HIGH
) -> Bottleneck | None:
    """The busy vertex that backpressures the job, or None when no vertex is backpressured.

    From every backpressured vertex, walk downstream until a vertex that is not backpressured:
    that one cannot keep up. Several candidates (fan-out, several chains): the busiest one.
    A backpressured vertex whose downstream vertices are all backpressured too (up to the sinks)
    names no bottleneck: the sink's external system is the slow part.
    """
    ordered = topological_order(vertices)
    outputs: dict[str, list[VertexLoad]] = {v.id: [] for v in ordered}
    for v in ordered:
        for i in v.inputs:
            if i in outputs:
                outputs[i].append(v)

    def pressed(v: VertexLoad) -> bool:
        return v.backpressured is not None and v.backpressured >= backpressure_threshold

    sources = [v for v in ordered if pressed(v)]
    if not sources:
        return None
    candidates: dict[str, tuple[VertexLoad, set[str]]] = {}
    for start in sources:
        stack, visited = [start], {start.id}
        while stack:
            for down in outputs[stack.pop().id]:
                if down.id in visited:
                    continue
                visited.add(down.id)
                if pressed(down):
                    stack.append(down)
                else:
                    entry = candidates.setdefault(down.id, (down, set()))
                    entry[1].add(start.name)
    if not candidates:
        return None
    order = {v.id: n for n, v in enumerate(ordered)}
    vertex, upstream = max(candidates.values(), key=lambda c: (c[0].busy or 0.0, -order[c[0].id]))
    names = sorted(upstream)
    return Bottleneck(
        vertex=vertex,
        backpressured_upstream=names,
        reason=f"{', '.join(names)} backpressured by {vertex.name}, busy {_pct(vertex.busy)} "
        f"at parallelism {vertex.parallelism}",
    )


def max_backpressure(vertices: Sequence[VertexLoad]) -> float | None:
    """The highest backpressured ratio over the job's vertices (None: none reported yet)."""
    known = [v.backpressured for v in vertices if v.backpressured is not None]
    return max(known) if known else None


# --- checkpoints ----------------------------------------------------------------------------


class CheckpointSample(BaseModel):
    """One entry of ``GET /jobs/:id/checkpoints`` history."""

    id: int
    status: str = Field(description="COMPLETED, FAILED or IN_PROGRESS.")
    is_savepoint: bool = False
    trigger_timestamp: int = 0
    duration_ms: int | None = Field(None, description="end_to_end_duration.")
    state_size: int | None = Field(None, description="Full state size in bytes (state_size).")
    checkpointed_size: int | None = Field(
        None, description="Bytes written by this checkpoint (incremental size)."
    )
    failure_message: str | None = None


class CheckpointHealth(BaseModel):
    """The checkpoint trend of a job, oldest first."""

    durations_ms: list[int] = Field(default_factory=list)
    state_sizes: list[int] = Field(default_factory=list)
    completed: int = 0
    failed_recent: int = Field(0, description="Failed checkpoints in the history window.")
    failed_total: int = Field(0, description="Failed checkpoints since the job started.")
    slow: bool = False
    duration_growing: bool = False
    size_growing: bool = False
    failing: bool = False
    latest_failure: str | None = None
    reason: str = ""

    @property
    def unhealthy(self) -> bool:
        return self.slow or self.failing or self.duration_growing or self.size_growing


def growing(values: Sequence[float], factor: float, floor: float = 0) -> bool:
    """The newer half's mean is over ``factor`` times the older half's (at least 4 values) and
    at least ``floor``: 30 ms -> 70 ms is a ratio, not a problem."""
    if len(values) < 4:
        return False
    half = len(values) // 2
    older, newer = values[:half], values[len(values) - half :]
    before, after = sum(older) / len(older), sum(newer) / len(newer)
    return after > factor * max(before, 1) and after >= floor


def assess_checkpoints(
    history: Sequence[CheckpointSample],
    *,
    failed_total: int = 0,
    slow_ms: int = 60_000,
    growth_factor: float = 1.5,
    max_failed: int = 1,
    growing_floor_ms: int = 1_000,
) -> CheckpointHealth:
    """Slow (newest completed duration over ``slow_ms``), growing (duration or state size trend
    over ``growth_factor``; durations only once the newer ones average ``growing_floor_ms``: a
    job just restored or rescaled takes tens of milliseconds more per checkpoint while it warms
    up, which is no problem of its state) and failing (``max_failed`` or more failures in the history, or the
    newest finished one failed). Savepoints are left out: they are taken on demand, not on the
    job's own schedule."""
    finished = sorted(
        (s for s in history if s.status in ("COMPLETED", "FAILED") and not s.is_savepoint),
        key=lambda s: s.id,
    )
    completed = [s for s in finished if s.status == "COMPLETED"]
    failed = [s for s in finished if s.status == "FAILED"]
    durations = [s.duration_ms for s in completed if s.duration_ms is not None]
    sizes = [s.state_size for s in completed if s.state_size is not None]
    slow = bool(durations) and durations[-1] > slow_ms
    duration_growing = growing(durations, growth_factor, growing_floor_ms)
    size_growing = growing(sizes, growth_factor)
    newest_failed = bool(finished) and finished[-1].status == "FAILED"
    failing = len(failed) >= max_failed or newest_failed
    problems = []
    if slow:
        problems.append(f"newest took {durations[-1] / 1000:.1f}s (over {slow_ms / 1000:g}s)")
    if duration_growing:
        problems.append(f"durations growing ({_trend(durations, 'ms')})")
    if size_growing:
        problems.append(f"state size growing ({_trend(sizes, 'B')})")
    if failing:
        problems.append(
            f"{len(failed)} of the last {len(finished)} failed"
            + (
                f" (newest: {failed[-1].failure_message})"
                if failed and failed[-1].failure_message
                else ""
            )
        )
    if not finished:
        reason = "no finished checkpoint in the history"
    elif problems:
        reason = "; ".join(problems)
    else:
        last = f", newest {durations[-1]} ms" if durations else ""
        reason = f"{len(completed)} completed, none failed{last}"
    return CheckpointHealth(
        durations_ms=durations,
        state_sizes=sizes,
        completed=len(completed),
        failed_recent=len(failed),
        failed_total=failed_total,
        slow=slow,
        duration_growing=duration_growing,
        size_growing=size_growing,
        failing=failing,
        latest_failure=failed[-1].failure_message if failed else None,
        reason=reason,
    )


def _trend(values: Sequence[int], unit: str) -> str:
    return f"{values[0]} {unit} -> {values[-1]} {unit} over {len(values)}"


# --- the plan ---------------------------------------------------------------------------------


class DegradedAction(StrEnum):
    NOTHING = "nothing"
    RESCALE = "rescale"
    ESCALATE = "escalate"


class DegradedDecision(BaseModel):
    action: DegradedAction
    reason: str
    current_parallelism: int | None = None
    new_parallelism: int | None = None


def job_slots(vertices: Sequence[VertexLoad]) -> int:
    """Slots a job holds with Flink's default slot sharing: its highest vertex parallelism."""
    return max((v.parallelism for v in vertices), default=0)


def new_parallelism(
    current: int,
    *,
    job_slots: int,
    free_slots: int,
    factor: float = 2.0,
    max_parallelism: int = 128,
    state_max_parallelism: int | None = None,
) -> int:
    """The bottleneck's next parallelism: ``current * factor`` (at least one more), capped by the
    slots the job can have (the free ones plus its own, released when it stops), the runbook's
    ``max_parallelism`` and the state's max parallelism (keyed state cannot be spread wider).
    At or under ``current``: no room to scale."""
    wanted = max(current + 1, math.ceil(current * factor))
    caps = [wanted, max_parallelism, free_slots + job_slots]
    if state_max_parallelism:
        caps.append(state_max_parallelism)
    return min(caps)


def decide_degraded(
    *,
    job_state: str | None,
    bottleneck: Bottleneck | None,
    checkpoints: CheckpointHealth | None,
    job_slots: int,
    free_slots: int,
    factor: float = 2.0,
    max_parallelism: int = 128,
    backpressured: list[str] | None = None,
) -> DegradedDecision:
    """Rescale the bottleneck when there is room; escalate when there is none, or when the
    checkpoints are the problem and nothing is backpressured (state, not capacity).

    ``backpressured`` names the vertices over the threshold: backpressure without a bottleneck
    (every vertex below them backpressured too, or unknown to the plan) is escalated, never
    taken for a healthy job."""
    if job_state is None:
        return DegradedDecision(
            action=DegradedAction.ESCALATE,
            reason="no job with that name is known to the cluster",
        )
    if job_state != "RUNNING":
        return DegradedDecision(
            action=DegradedAction.ESCALATE,
            reason=f"the job is {job_state}, not RUNNING: a crashed job is flink-job-crashed's case",
        )
    if bottleneck is None and backpressured:
        return DegradedDecision(
            action=DegradedAction.ESCALATE,
            reason=f"{', '.join(backpressured)} backpressured but no vertex below them is free of "
            "backpressure: the slow part is outside the job's vertices (the system a sink "
            "writes to), which more parallelism may not fix",
        )
    if bottleneck is None:
        if checkpoints is not None and checkpoints.unhealthy:
            return DegradedDecision(
                action=DegradedAction.ESCALATE,
                reason=f"no vertex is backpressured but checkpoints are unhealthy "
                f"({checkpoints.reason}): a state problem (state size, TTL, the checkpoint "
                "storage), not a capacity one; more parallelism would not fix it",
            )
        return DegradedDecision(
            action=DegradedAction.NOTHING,
            reason="no vertex is backpressured and checkpoints are healthy"
            + (f" ({checkpoints.reason})" if checkpoints else ""),
        )
    vertex = bottleneck.vertex
    target = new_parallelism(
        vertex.parallelism,
        job_slots=job_slots,
        free_slots=free_slots,
        factor=factor,
        max_parallelism=max_parallelism,
        state_max_parallelism=vertex.max_parallelism,
    )
    if target <= vertex.parallelism:
        limits = (
            f"{free_slots} free slot(s), the job holds {job_slots}; max parallelism "
            f"{max_parallelism}"
            + (
                f", state max parallelism {vertex.max_parallelism}"
                if vertex.max_parallelism
                else ""
            )
        )
        return DegradedDecision(
            action=DegradedAction.ESCALATE,
            reason=f"{bottleneck.reason}; no room to scale it ({limits}): add TaskManagers or "
            "slots, or make the operator cheaper",
            current_parallelism=vertex.parallelism,
        )
    return DegradedDecision(
        action=DegradedAction.RESCALE,
        reason=f"{bottleneck.reason}: rescale from {vertex.parallelism} to {target} "
        f"({free_slots} free slot(s) + the {job_slots} the job holds)",
        current_parallelism=vertex.parallelism,
        new_parallelism=target,
    )


def backpressure_cleared(samples: Sequence[float | None], threshold: float, needed: int) -> bool:
    """The last ``needed`` samples of the job's highest backpressure all at or under ``threshold``."""
    recent = list(samples[-needed:])
    return len(recent) >= needed and all(s is not None and s <= threshold for s in recent)
