"""Consumer lag decisions as data: two samples of a group -> caught up, missing consumers, stuck
or slow; and which of those escalate."""

from __future__ import annotations

import pytest

from tasks.kafka_lag import GroupLag, LagVerdict, classify_group, needs_escalation, partition_lag

CAUGHT_UP = LagVerdict.CAUGHT_UP
MISSING = LagVerdict.MISSING_CONSUMERS
STUCK = LagVerdict.STUCK
SLOW = LagVerdict.SLOW


def sample(state: str, members: int | None, *parts: tuple[int | None, int]) -> GroupLag:
    """A group on topic 'orders'; each part is (committed, end offset) of partition 0, 1, ..."""
    return GroupLag(
        group="billing",
        state=state,
        members=members,
        partitions=[partition_lag("orders", i, c, e) for i, (c, e) in enumerate(parts)],
    )


# (case, first sample, last sample, threshold, verdict, partitions named as not moving)
CASES = [
    ("no lag", sample("STABLE", 2, (10, 10)), sample("STABLE", 2, (20, 20)), 0, CAUGHT_UP, []),
    (
        "lag within the threshold",
        sample("EMPTY", 0, (0, 100)),
        sample("EMPTY", 0, (0, 100)),
        100,
        CAUGHT_UP,
        [],
    ),
    (
        "empty group with lag",
        sample("EMPTY", 0, (0, 50)),
        sample("EMPTY", 0, (0, 60)),
        10,
        MISSING,
        ["orders[0]"],
    ),
    (
        "dead group with lag",
        sample("DEAD", 0, (5, 50)),
        sample("DEAD", 0, (5, 50)),
        10,
        MISSING,
        ["orders[0]"],
    ),
    (
        "members, committed offset not moving",
        sample("STABLE", 1, (5, 50), (50, 50)),
        sample("STABLE", 1, (5, 80), (60, 60)),
        10,
        STUCK,
        ["orders[0]"],
    ),
    (
        "active but broker lists no member: not missing",
        sample("STABLE", None, (5, 50)),
        sample("STABLE", None, (5, 50)),
        10,
        STUCK,
        ["orders[0]"],
    ),
    (
        "never committed an assigned partition, still not",
        sample("STABLE", 1, (None, 50)),
        sample("STABLE", 1, (None, 70)),
        10,
        STUCK,
        ["orders[0]"],
    ),
    (
        "moving but falling behind",
        sample("STABLE", 2, (100, 200), (100, 200)),
        sample("STABLE", 2, (150, 300), (150, 300)),
        10,
        SLOW,
        [],
    ),
    (
        "moving and catching up",
        sample("STABLE", 2, (100, 300)),
        sample("STABLE", 2, (250, 320)),
        10,
        SLOW,
        [],
    ),
    (
        "partition new since the first sample is not called stuck",
        sample("STABLE", 1, (100, 300)),
        sample("STABLE", 1, (200, 300), (0, 40)),
        10,
        SLOW,
        [],
    ),
]


@pytest.mark.parametrize(
    ("first", "last", "threshold", "verdict", "not_moving"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_classify_group(
    first: GroupLag, last: GroupLag, threshold: int, verdict: LagVerdict, not_moving: list[str]
) -> None:
    finding = classify_group(first, last, threshold, interval_s=30)
    assert finding.verdict is verdict
    if verdict is not CAUGHT_UP:
        assert finding.not_moving == not_moving
    assert finding.total_lag == last.total_lag
    assert finding.lag_change == last.total_lag - first.total_lag
    assert bool(finding.action) == (verdict is not CAUGHT_UP)


# (case, first sample, last sample, words the recommended action must contain)
ACTIONS = [
    (
        "missing consumers",
        sample("EMPTY", 0, (0, 50)),
        sample("EMPTY", 0, (0, 60)),
        ["start the consumers"],
    ),
    (
        "stuck",
        sample("STABLE", 1, (5, 50)),
        sample("STABLE", 1, (5, 60)),
        ["restart the consumer", "orders[0]"],
    ),
    (
        "slow, fewer consumers than partitions",
        sample("STABLE", 1, (0, 50), (0, 50), (0, 50)),
        sample("STABLE", 1, (10, 70), (10, 70), (10, 70)),
        ["scale its consumers up", "one per partition: 3"],
    ),
    (
        "slow, one consumer per partition already",
        sample("STABLE", 2, (0, 50), (0, 50)),
        sample("STABLE", 2, (10, 70), (10, 70)),
        ["add partitions"],
    ),
    (
        "slow but falling",
        sample("STABLE", 1, (0, 50)),
        sample("STABLE", 1, (30, 60)),
        ["working off its backlog"],
    ),
]


@pytest.mark.parametrize(
    ("first", "last", "words"), [a[1:] for a in ACTIONS], ids=[a[0] for a in ACTIONS]
)
def test_recommended_action(first: GroupLag, last: GroupLag, words: list[str]) -> None:
    finding = classify_group(first, last, threshold=0, interval_s=30)
    for word in words:
        assert word in finding.action, (word, finding.action)


# (case, lag, lag change, verdict, escalate over, escalates)
ESCALATIONS = [
    ("over and growing", 20_000, +500, STUCK, 10_000, True),
    ("over and flat", 20_000, 0, MISSING, 10_000, True),
    ("over but falling", 20_000, -500, SLOW, 10_000, False),
    ("under the escalation threshold", 9_000, +500, SLOW, 10_000, False),
    ("exactly at the threshold", 10_000, +1, SLOW, 10_000, False),
    ("caught up", 20_000, +1, CAUGHT_UP, 10_000, False),
]


@pytest.mark.parametrize(
    ("lag", "change", "verdict", "over", "escalates"),
    [e[1:] for e in ESCALATIONS],
    ids=[e[0] for e in ESCALATIONS],
)
def test_needs_escalation(
    lag: int, change: int, verdict: LagVerdict, over: int, escalates: bool
) -> None:
    finding = classify_group(sample("STABLE", 1, (0, 0)), sample("STABLE", 1, (0, 0)), 0, 30)
    finding = finding.model_copy(
        update={"total_lag": lag, "lag_change": change, "verdict": verdict}
    )
    assert needs_escalation(finding, over) is escalates


def test_unattended_group_is_called_out() -> None:
    assert sample("EMPTY", 0, (0, 5)).unattended
    assert not sample("STABLE", 1, (0, 5)).unattended
    assert not sample("EMPTY", 0, (5, 5)).unattended


def test_kafka_tasks_pickle_for_a_served_run() -> None:
    """A served run gets its flow, and the tasks it calls, pickled by value into a fresh process;
    librdkafka's own types cannot be, so no task body may name them."""
    import pickle

    import cloudpickle

    from tasks import kafka_dlq, kafka_dlq_replay, kafka_lag

    for task in (
        kafka_lag.get_consumer_lag,
        kafka_lag.get_all_group_lag,
        kafka_dlq.peek_dlq,
        kafka_dlq_replay.replay_dlq,
    ):
        assert pickle.loads(cloudpickle.dumps(task)).name == task.name
