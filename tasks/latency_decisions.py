"""e2e-latency-high's decision: which stage of the event pipeline makes events late (pure).

The pipeline's stages, in the order an event passes them: the edge gateway (occurred_at ->
received_at), Kafka (received_at -> published_at), Flink (its checkpoint duration: aligned
checkpoints hold records back while they run) and the notification send. Each stage's p99 is
compared with its own threshold; the stage furthest over its threshold is the slow one.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class Stage(StrEnum):
    GATEWAY = "gateway"
    KAFKA = "kafka"
    FLINK = "flink"
    NOTIFICATION = "notification"


STAGE_WHAT = {
    Stage.GATEWAY: "gateway latency (occurred_at -> received_at)",
    Stage.KAFKA: "Kafka latency (received_at -> published_at)",
    Stage.FLINK: "Flink checkpoint duration",
    Stage.NOTIFICATION: "notification send latency",
}

# what a stage's number is: Flink's is its longest checkpoint in the window, not a percentile
STAGE_MEASURE = {
    Stage.GATEWAY: "p99",
    Stage.KAFKA: "p99",
    Stage.FLINK: "longest checkpoint",
    Stage.NOTIFICATION: "p99",
}

# the runbook that checks each stage further, as the seed's response says
STAGE_RUNBOOK = {
    Stage.GATEWAY: "stadium-network-flap",
    Stage.KAFKA: "kafka-consumer-lag-high",
    Stage.FLINK: "flink-job-degraded",
    Stage.NOTIFICATION: "push-delivery-degraded",
}


class StageReading(BaseModel):
    """One stage's p99 over the window (None: its query returned no data) and its threshold."""

    stage: Stage
    p99_s: float | None = Field(description="None: no data in the window.")
    threshold_s: float = Field(gt=0)

    @property
    def over(self) -> bool:
        return self.p99_s is not None and self.p99_s > self.threshold_s

    @property
    def ratio(self) -> float | None:
        return None if self.p99_s is None else self.p99_s / self.threshold_s


class StageRow(BaseModel):
    """A stage as the report shows it."""

    stage: Stage
    p99_s: float | None
    threshold_s: float
    over: bool
    share_of_e2e: float | None = Field(
        description="p99 over the end-to-end p99 (or, without that, the sum of the stages' p99s)."
    )

    def describe(self) -> str:
        if self.p99_s is None:
            return f"{self.stage.value}: no data"
        share = f", {self.share_of_e2e:.0%} of end-to-end" if self.share_of_e2e is not None else ""
        verdict = "OVER" if self.over else "within"
        return (
            f"{self.stage.value}: {STAGE_MEASURE[self.stage]} {self.p99_s:.3g}s {verdict} its "
            f"{self.threshold_s:g}s threshold{share}"
        )


class LatencyVerdict(StrEnum):
    SLOW_STAGE = "slow stage"  # a stage is over its threshold: hand it to its runbook
    ALL_FAST = "all fast"  # every stage measured and within its threshold, end-to-end too
    BETWEEN_STAGES = "between stages"  # end-to-end over, every stage within: outside the breakdown
    PARTLY_UNKNOWN = "partly unknown"  # no measured stage is over, but some gave no data
    NO_DATA = "no data"  # no stage gave data: the breakdown cannot be made


class LatencyDecision(BaseModel):
    verdict: LatencyVerdict
    stage: Stage | None = Field(None, description="The slow stage, when there is one.")
    reason: str
    rows: list[StageRow]
    e2e_p99_s: float | None
    e2e_threshold_s: float
    missing: list[Stage] = Field(default_factory=list, description="Stages without data.")


def stage_rows(readings: list[StageReading], e2e_p99_s: float | None) -> list[StageRow]:
    """Each stage with its share of the end-to-end p99 (or of the stages' sum without one)."""
    measured = [r.p99_s for r in readings if r.p99_s is not None]
    whole = e2e_p99_s if e2e_p99_s else (sum(measured) or None)
    return [
        StageRow(
            stage=r.stage,
            p99_s=r.p99_s,
            threshold_s=r.threshold_s,
            over=r.over,
            share_of_e2e=None if r.p99_s is None or not whole else r.p99_s / whole,
        )
        for r in readings
    ]


def decide_slow_stage(
    readings: list[StageReading], e2e_p99_s: float | None, e2e_threshold_s: float
) -> LatencyDecision:
    """The stage furthest over its own threshold (p99 / threshold; ties: the larger p99), or why
    none can be named."""
    rows = stage_rows(readings, e2e_p99_s)
    missing = [r.stage for r in readings if r.p99_s is None]
    over = [r for r in readings if r.over]
    e2e = (
        "end-to-end p99 not measured"
        if e2e_p99_s is None
        else f"end-to-end p99 {e2e_p99_s:.3g}s against {e2e_threshold_s:g}s"
    )

    def decision(
        verdict: LatencyVerdict, reason: str, stage: Stage | None = None
    ) -> LatencyDecision:
        return LatencyDecision(
            verdict=verdict,
            stage=stage,
            reason=reason,
            rows=rows,
            e2e_p99_s=e2e_p99_s,
            e2e_threshold_s=e2e_threshold_s,
            missing=missing,
        )

    if over:
        slow = max(over, key=lambda r: (r.ratio, r.p99_s))
        row = next(r for r in rows if r.stage is slow.stage)
        others = [r.stage.value for r in over if r is not slow]
        also = f"; also over: {', '.join(others)}" if others else ""
        return decision(
            LatencyVerdict.SLOW_STAGE,
            f"the slowest stage is {STAGE_WHAT[slow.stage]}: {row.describe()} ({e2e}){also}",
            slow.stage,
        )
    if len(missing) == len(readings):
        return decision(
            LatencyVerdict.NO_DATA,
            f"no stage's query returned data in the window ({e2e}): the breakdown cannot be made",
        )
    e2e_over = e2e_p99_s is not None and e2e_p99_s > e2e_threshold_s
    if missing and (e2e_over or e2e_p99_s is None):
        names = ", ".join(s.value for s in missing)
        return decision(
            LatencyVerdict.PARTLY_UNKNOWN,
            f"no measured stage is over its threshold, but {names} gave no data ({e2e}): the slow "
            "stage may be one of those",
        )
    if e2e_over:
        return decision(
            LatencyVerdict.BETWEEN_STAGES,
            f"{e2e}, yet every stage is within its threshold: the time is spent outside the "
            "measured stages (e.g. Flink processing or backpressure, queues between stages)",
        )
    unmeasured = f"; no data from {', '.join(s.value for s in missing)}" if missing else ""
    return decision(
        LatencyVerdict.ALL_FAST,
        f"every measured stage is within its threshold ({e2e}){unmeasured}",
    )
