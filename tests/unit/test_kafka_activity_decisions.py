"""Producer activity decisions as data: two offset samples of a topic plus its newest records ->
sending, quiet, idle, slow, stalled, empty or missing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.kafka_activity import (
    PROBLEMS,
    Activity,
    ExpectedTopic,
    LastRecord,
    TopicOffsets,
    classify_activity,
)

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
WATCH_S = 60.0


def offsets(*parts: tuple[int, int], at: float = 0.0, exists: bool = True) -> TopicOffsets:
    """Topic 'prices'; each part is (low, end) of partition 0, 1, ..."""
    return TopicOffsets(
        topic="prices",
        exists=exists,
        at=at,
        low={i: low for i, (low, _) in enumerate(parts)},
        end={i: end for i, (_, end) in enumerate(parts)},
    )


def later(*parts: tuple[int, int]) -> TopicOffsets:
    return offsets(*parts, at=WATCH_S)


def newest(*ages_s: float | None) -> dict[int, LastRecord]:
    """The newest record of partition 0, 1, ... this many seconds before NOW (None: no timestamp)."""
    return {
        p: LastRecord(
            partition=p,
            offset=9,
            timestamp=None if age is None else NOW - timedelta(seconds=age),
            timestamp_type="none" if age is None else "CreateTime",
        )
        for p, age in enumerate(ages_s)
    }


def expect(per_minute: float = 6, window_s: float = 300) -> ExpectedTopic:
    return ExpectedTopic(name="prices", min_per_minute=per_minute, window_s=window_s)


MISSING = offsets(exists=False)

# (case, expectation, first sample, last sample, newest records, activity, new records, silence)
CASES = [
    ("records arriving at the expected rate", expect(6), offsets((0, 10), (0, 10)),
     later((0, 14), (0, 13)), newest(1, 2), Activity.SENDING, 7, 1.0),
    ("records arriving on one partition only", expect(6), offsets((0, 10), (0, 10)),
     later((0, 20), (0, 10)), newest(1, 900), Activity.SENDING, 10, 1.0),
    ("records arriving, fewer than expected", expect(60), offsets((0, 10)),
     later((0, 12)), newest(5), Activity.SLOW, 2, 5.0),
    ("no new record, the last one older than the window", expect(6, 300), offsets((0, 10), (0, 4)),
     later((0, 10), (0, 4)), newest(600, 3600), Activity.STALLED, 0, 600.0),
    ("no new record, the last one within the window", expect(6, 300), offsets((0, 10)),
     later((0, 10)), newest(120), Activity.QUIET, 0, 120.0),
    ("no new record, records without timestamps", expect(6), offsets((0, 10)),
     later((0, 10)), newest(None), Activity.STALLED, 0, None),
    ("never received a record", expect(6), offsets((0, 0), (0, 0)),
     later((0, 0), (0, 0)), {}, Activity.EMPTY, 0, None),
    ("every record past retention", expect(6), offsets((50, 50)),
     later((50, 50)), {}, Activity.EMPTY, 0, None),
    ("not expected to receive data, receiving none", expect(0), offsets((0, 5)),
     later((0, 5)), newest(86400), Activity.IDLE, 0, 86400.0),
    ("not expected to receive data, receiving some", expect(0), offsets((0, 5)),
     later((0, 6)), newest(1), Activity.SENDING, 1, 1.0),
    ("a producer clock ahead of ours", expect(6), offsets((0, 5)),
     later((0, 5)), newest(-30), Activity.QUIET, 0, 0.0),
    ("the topic does not exist", expect(6), MISSING, MISSING, {}, Activity.MISSING, 0, None),
    ("a log end moving back (topic recreated) is no new record", expect(6), offsets((0, 500)),
     later((0, 3)), newest(400), Activity.STALLED, 0, 400.0),
]


@pytest.mark.parametrize(
    ("case", "want", "first", "last", "records", "activity", "moved", "silent"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_classify_activity(case, want, first, last, records, activity, moved, silent) -> None:
    found = classify_activity(want, first, last, records, NOW)
    assert found.activity is activity, found.reason
    assert found.new_records == moved
    assert found.silent_s == silent
    assert found.problem == (activity in PROBLEMS)
    if records and any(r.timestamp for r in records.values()):
        assert found.last_record_at == max(r.timestamp for r in records.values() if r.timestamp)


def test_reasons_name_the_evidence() -> None:
    stalled = classify_activity(
        expect(6, 300), offsets((0, 10)), later((0, 10)), newest(5400), NOW
    )
    assert stalled.reason == (
        "no new record in 60s; last record 90 min ago, longer than the 5 min window"
    )
    assert stalled.last_record_by_partition == {
        0: "offset 9 at 2026-11-22T01:30:00.000+00:00 (CreateTime)"
    }
    slow = classify_activity(expect(60), offsets((0, 10)), later((0, 12)), newest(5), NOW)
    assert slow.reason == "only 2 new record(s) in 60s (2.0/min), expected at least 60/min"
    never = classify_activity(expect(6), offsets((0, 0)), later((0, 0)), {}, NOW)
    assert never.reason == "no new record in 60s, and it has never received a record"
    assert PROBLEMS == {Activity.SLOW, Activity.STALLED, Activity.EMPTY, Activity.MISSING}


@pytest.mark.parametrize(
    ("topic", "topics", "checked"),
    [
        ("prices", [], [("prices", 1.0, 300.0)]),
        ("prices", [expect(60, 30)], [("prices", 60.0, 30.0)]),
        ("", [expect(60, 30)], [("prices", 60.0, 30.0)]),
        # a trigger renders an alert without a topic label as "None"
        ("None", [expect(60, 30)], [("prices", 60.0, 30.0)]),
        ("orders", [expect(60, 30)], [("orders", 1.0, 300.0)]),
    ],
)
def test_the_alerts_topic_with_its_expectation(topic, topics, checked) -> None:
    from flows.kafka.producer_not_sending import ProducerNotSendingParams

    params = ProducerNotSendingParams(topic=topic, topics=topics)
    assert [(t.name, t.min_per_minute, t.window_s) for t in params.expected()] == checked


@pytest.mark.parametrize(
    ("topic", "topics", "error"),
    [
        (None, [], "no topic to check"),
        ("prices; rm -rf /", [], "is not a Kafka topic name"),
        (None, [expect(), expect()], "listed more than once: prices"),
    ],
)
def test_params_refused(topic, topics, error) -> None:
    from pydantic import ValidationError

    from flows.kafka.producer_not_sending import ProducerNotSendingParams

    with pytest.raises(ValidationError, match=error):
        ProducerNotSendingParams(topic=topic, topics=topics)
