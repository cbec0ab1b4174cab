"""e2e-latency-high's decision: which stage is slow, with its share of the end-to-end p99."""

from __future__ import annotations

import pytest

from tasks.latency_decisions import LatencyVerdict, Stage, StageReading, decide_slow_stage

THRESHOLDS = {Stage.GATEWAY: 1.0, Stage.KAFKA: 0.5, Stage.FLINK: 2.0, Stage.NOTIFICATION: 1.0}
G, K, F, N = Stage.GATEWAY, Stage.KAFKA, Stage.FLINK, Stage.NOTIFICATION


def readings(**p99: float | None) -> list[StageReading]:
    return [StageReading(stage=s, p99_s=p99.get(s.value), threshold_s=THRESHOLDS[s]) for s in Stage]


# (stage p99s, end-to-end p99, verdict, slow stage, words in the reason)
CASES = [
    (dict(gateway=2.5, kafka=0.1, flink=0.5, notification=0.2), 3.4, LatencyVerdict.SLOW_STAGE, G, "gateway latency"),
    (dict(gateway=0.2, kafka=1.9, flink=0.5, notification=0.2), 3.2, LatencyVerdict.SLOW_STAGE, K, "Kafka latency"),
    (dict(gateway=0.2, kafka=0.1, flink=6.0, notification=0.2), 3.5, LatencyVerdict.SLOW_STAGE, F, "checkpoint"),
    (dict(gateway=0.2, kafka=0.1, flink=0.5, notification=2.8), 3.3, LatencyVerdict.SLOW_STAGE, N, "notification"),
    # two over: the one furthest over its own threshold (kafka 3x, gateway 1.5x)
    (dict(gateway=1.5, kafka=1.5, flink=0.5, notification=0.2), 3.4, LatencyVerdict.SLOW_STAGE, K, "also over: gateway"),
    # a stage over is named even when others gave no data
    (dict(gateway=None, kafka=None, flink=None, notification=4.0), None, LatencyVerdict.SLOW_STAGE, N, "not measured"),
    (dict(gateway=0.2, kafka=0.1, flink=0.5, notification=0.2), 0.9, LatencyVerdict.ALL_FAST, None, "every measured stage"),
    (dict(gateway=0.2, kafka=0.1, flink=0.5, notification=0.2), None, LatencyVerdict.ALL_FAST, None, "not measured"),
    (dict(gateway=0.2, kafka=0.1, flink=0.5, notification=0.2), 3.6, LatencyVerdict.BETWEEN_STAGES, None, "outside the measured"),
    (dict(gateway=0.2, kafka=None, flink=0.5, notification=0.2), 3.6, LatencyVerdict.PARTLY_UNKNOWN, None, "kafka gave no data"),
    (dict(gateway=0.2, kafka=None, flink=0.5, notification=0.2), 0.8, LatencyVerdict.ALL_FAST, None, "no data from kafka"),
    ({}, 3.6, LatencyVerdict.NO_DATA, None, "no stage's query returned data"),
    ({}, None, LatencyVerdict.NO_DATA, None, "no stage's query"),
    # histogram_quantile answers +Inf when observations are past the last bucket
    (dict(gateway=0.2, kafka=float("inf"), flink=0.5, notification=0.2), None, LatencyVerdict.SLOW_STAGE, K, "inf"),
]  # fmt: skip


@pytest.mark.parametrize(("p99", "e2e", "verdict", "stage", "words"), CASES)
def test_decide_slow_stage(
    p99: dict, e2e: float | None, verdict: LatencyVerdict, stage: Stage | None, words: str
) -> None:
    decision = decide_slow_stage(readings(**p99), e2e, 3.0)
    assert (decision.verdict, decision.stage) == (verdict, stage), decision.reason
    assert words in decision.reason


# (stage p99s, end-to-end p99, expected share of each measured stage)
SHARE_CASES = [
    (dict(gateway=2.4, kafka=0.3, flink=0.6, notification=0.3), 4.0, {G: 0.6, K: 0.075, F: 0.15, N: 0.075}),
    # without an end-to-end p99: share of the stages' sum
    (dict(gateway=1.0, kafka=1.0, flink=None, notification=2.0), None, {G: 0.25, K: 0.25, N: 0.5}),
]  # fmt: skip


@pytest.mark.parametrize(("p99", "e2e", "shares"), SHARE_CASES)
def test_share_of_end_to_end(p99: dict, e2e: float | None, shares: dict) -> None:
    rows = {r.stage: r for r in decide_slow_stage(readings(**p99), e2e, 3.0).rows}
    assert {s: pytest.approx(v) for s, v in shares.items()} == {
        s: r.share_of_e2e for s, r in rows.items() if r.p99_s is not None
    }
    assert all(r.share_of_e2e is None for r in rows.values() if r.p99_s is None)
