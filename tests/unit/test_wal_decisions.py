"""Pure decisions of the WAL runbook, as data tables."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.wal import (
    DrainConflict,
    KafkaUnavailable,
    WalAction,
    _check_each,
    advance_marker,
    check_sequences,
    decide,
    deletable_segments,
    describe_damage,
    quarantined_positions,
    to_ranges,
)
from tasks.wal_format import WalDamage, segment_name
from tasks.wal_topic import TopicRecord, compare_delivery, kafka_failure

WAIT, ESCALATE, DRAIN, NOTHING = (
    WalAction.WAIT_FOR_NETWORK,
    WalAction.INVESTIGATE,
    WalAction.DRAIN,
    WalAction.NOTHING_PENDING,
)


@pytest.mark.parametrize(
    ("pending", "threshold", "reachable", "expected", "damaged"),
    [
        (0, 5000, False, NOTHING, 0),
        (0, 5000, True, NOTHING, 0),
        (0, 0, False, NOTHING, 0),
        (1, 5000, False, WAIT, 0),
        (50, 5000, False, WAIT, 0),  # the seed's 30-second blip
        (4999, 5000, False, WAIT, 0),
        (
            5000,
            5000,
            False,
            WAIT,
            0,
        ),  # "if > 5,000: investigate": 5,000 itself is still self-healing
        (5001, 5000, False, ESCALATE, 0),
        (9999, 5000, False, ESCALATE, 0),
        (12000, 5000, False, ESCALATE, 0),  # past capacity: still the human's call
        (1, 0, False, ESCALATE, 0),
        (1, 5000, True, DRAIN, 0),
        (5000, 5000, True, DRAIN, 0),
        (5001, 5000, True, DRAIN, 0),  # network is back: drain, whatever the size
        (10000, 5000, True, DRAIN, 0),
        (3, 2, True, DRAIN, 0),
        # damage after the marker needs a drain even with no intact event pending: it is
        # quarantined and escalated; it holds no event, or its events count as pending
        (0, 5000, True, DRAIN, 1),
        (0, 5000, False, WAIT, 1),
        (1, 5000, True, DRAIN, 1),
    ],
)
def test_decide(
    pending: int, threshold: int, reachable: bool, expected: WalAction, damaged: int
) -> None:
    assert decide(pending, threshold, reachable, damaged) is expected


@pytest.mark.parametrize(
    ("next_position", "confirmed", "expected"),
    [
        (0, [], 0),
        (0, [0], 1),
        (0, [0, 1, 2], 3),
        (0, [2, 1, 0], 3),  # reports out of order
        (0, [1, 2, 3], 0),  # position 0 unconfirmed holds everything back
        (0, [0, 2, 3], 1),
        (10, [10, 11, 13, 14], 12),
        (10, [3, 4, 5], 10),  # stale reports below the marker change nothing
        (10, [9, 10, 11], 12),
        (5, [7, 6, 5, 9, 8], 10),  # partitions report in any order
        (5, range(5, 1005), 1005),
        (100, [100] * 3, 101),  # duplicate reports
    ],
)
def test_advance_marker(next_position: int, confirmed: list[int], expected: int) -> None:
    assert advance_marker(next_position, confirmed) == expected


@pytest.mark.parametrize(
    ("bases", "next_position", "expected"),
    [
        ([], 100, []),
        ([0], 100, []),  # never the newest segment: the gateway writes into it
        ([0, 50], 49, []),
        ([0, 50], 50, [0]),
        ([0, 50, 90], 89, [0]),
        ([0, 50, 90], 90, [0, 50]),
        ([0, 50, 90], 1000, [0, 50]),
        ([200, 300], 250, []),
        ([200, 300, 400], 300, [200]),
    ],
)
def test_deletable_segments(bases: list[int], next_position: int, expected: list[int]) -> None:
    assert deletable_segments(bases, next_position) == expected


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        ([], []),
        ([5], ["5"]),
        ([1, 2, 3], ["1-3"]),
        ([3, 1, 2, 2], ["1-3"]),
        ([1, 2, 3, 7, 9, 10], ["1-3", "7", "9-10"]),
    ],
)
def test_to_ranges(numbers: list[int], expected: list[str]) -> None:
    assert [str(r) for r in to_ranges(numbers)] == expected


def _events(spec: str) -> list[tuple[str, int]]:
    """'a1 a2 b1' -> [('a', 1), ('a', 2), ('b', 1)]."""
    return [(tok[0], int(tok[1:])) for tok in spec.split()]


@pytest.mark.parametrize(
    ("events", "baseline", "expected_problems"),
    [
        ("a1 a2 a3 b1 b2", None, []),
        ("a1 b1 a2 b2 a3", None, []),  # interleaved sources are fine
        ("a7 a8 a9", None, []),  # no baseline: the first sequence seen starts the range
        ("a1 a2 a5", None, ["source a: gap, missing seq 3-4 (2 event(s))"]),
        ("a1 a3 a5 a9", None, ["source a: gap, missing seq 2, 4, 6-8 (5 event(s))"]),
        ("a11 a12", {"a": 10}, []),  # continues the previous drain
        ("a13 a14", {"a": 10}, ["source a: gap, missing seq 11-12 (2 event(s))"]),
        ("a1 a2 a2 a3", None, ["source a: duplicate seq 2"]),
        ("a10 a11", {"a": 10}, ["source a: duplicate seq 10"]),  # already acknowledged before
        ("a1 a3 a2", None, ["source a: out of order seq 2"]),  # late arrival fills its gap
        ("a1 a4 a3 a2 a5", None, ["source a: out of order seq 2-3"]),
        (
            "a1 a2 b1 b4 c1 c1",
            {"b": 0},
            ["source b: gap, missing seq 2-3 (2 event(s))", "source c: duplicate seq 1"],
        ),
        ("b5 b6", {"a": 3}, []),  # a baseline for another source says nothing about b
        ("", None, []),
    ],
)
def test_check_sequences(
    events: str, baseline: dict[str, int] | None, expected_problems: list[str]
) -> None:
    report = check_sequences(_events(events), baseline)
    assert report.problems() == expected_problems
    assert report.ok is (not expected_problems)


def test_check_sequences_counts_per_source() -> None:
    report = check_sequences(_events("a1 b1 a2 a4 b2"))
    a = report.sources["a"]
    assert (a.count, a.first, a.last, [str(g) for g in a.gaps]) == (3, 1, 4, ["3"])
    assert report.sources["b"].count == 2 and report.sources["b"].gaps == []


def _found(spec: str) -> list[TopicRecord]:
    """'0:a1@p0 0:a2@p1' -> records in topic order: partition 0, source a, seq, position."""
    out = []
    for offset, tok in enumerate(spec.split()):
        part, rest = tok.split(":")
        src_seq, pos = rest.split("@p")
        out.append(
            TopicRecord(
                partition=int(part),
                offset=offset,
                position=int(pos),
                source=src_seq[0],
                seq=int(src_seq[1:]),
            )
        )
    return out


@pytest.mark.parametrize(
    ("found", "start", "end", "missing", "duplicated", "reordered"),
    [
        ("0:a1@p0 1:b1@p1 0:a2@p2", 0, 3, [], [], []),
        ("0:a1@p0 0:a2@p2", 0, 3, ["1"], [], []),
        ("0:a1@p0 1:b1@p1 0:a1@p0 0:a2@p2", 0, 3, [], [0], []),
        ("0:a2@p2 0:a1@p0 1:b1@p1", 0, 3, [], [], [0]),  # a's order broken in its partition
        ("1:b1@p1 0:a1@p0 0:a2@p2", 0, 3, [], [], []),  # across partitions order is free
        ("0:a1@p0 0:a2@p1 0:a3@p2", 1, 3, [], [], []),  # records outside the range are ignored
        ("", 5, 9, ["5-8"], [], []),
        ("0:a1@p5 0:a2@p6", 5, 5, [], [], []),  # empty range
    ],
)
def test_compare_delivery(
    found: str,
    start: int,
    end: int,
    missing: list[str],
    duplicated: list[int],
    reordered: list[int],
) -> None:
    report = compare_delivery("t", _found(found), start, end)
    assert [str(m) for m in report.missing] == missing
    assert report.duplicated == duplicated
    assert report.reordered == reordered
    assert report.ok is (not (missing or duplicated or reordered))


@pytest.mark.parametrize(
    ("found", "quarantined", "missing", "expected", "delivered"),
    [
        ("0:a1@p0 0:a3@p2", [1], [], 2, 2),  # the damaged position is not expected
        ("0:a1@p0", [1], ["2"], 2, 1),  # but the others still are
        ("0:a1@p0 0:a2@p1 0:a3@p2", [1], [], 2, 2),  # found anyway (sent before the damage)
        ("", [0, 1, 2], [], 0, 0),
        ("0:a1@p0 0:a3@p2", [5, 9], ["1"], 3, 2),  # quarantined elsewhere: no effect here
    ],
)
def test_compare_delivery_with_quarantined_positions(
    found: str, quarantined: list[int], missing: list[str], expected: int, delivered: int
) -> None:
    report = compare_delivery("t", _found(found), 0, 3, quarantined=quarantined)
    assert [str(m) for m in report.missing] == missing
    assert (report.expected, report.delivered) == (expected, delivered)
    assert report.ok is (not missing)


def _damage(first: int, positions: int) -> WalDamage:
    return WalDamage(
        segment=segment_name(0),
        offset=7 * first,
        length=40,
        first_position=first,
        positions=positions,
        reason="crc mismatch",
        sha256="0" * 64,
    )


@pytest.mark.parametrize(
    ("damage", "positions", "described"),
    [
        ([], set(), "0 damaged region(s) holding 0 event(s): "),
        (
            [(3, 1)],
            {3},
            "1 damaged region(s) holding 1 event(s): 00000000000000000000.wal byte 21 "
            "(40 bytes, position 3): crc mismatch",
        ),
        (
            [(3, 2), (9, 0)],
            {3, 4},
            "2 damaged region(s) holding 2 event(s): 00000000000000000000.wal "
            "byte 21 (40 bytes, position 3..4): crc mismatch; 00000000000000000000.wal byte 63 (40 bytes, "
            "no position (before 9)): crc mismatch",
        ),
        ([(1, 1), (2, 1), (3, 1), (4, 1)], {1, 2, 3, 4}, "; and 1 more"),
    ],
)
def test_quarantined_positions_and_description(
    damage: list[tuple[int, int]], positions: set[int], described: str
) -> None:
    regions = [_damage(first, n) for first, n in damage]
    assert quarantined_positions(regions) == positions
    text = describe_damage(regions)
    assert text.startswith(described) or text.endswith(described)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KafkaError(KafkaError._TIMED_OUT), KafkaUnavailable),
        (KafkaError(KafkaError._TRANSPORT), KafkaUnavailable),
        (KafkaError(KafkaError._ALL_BROKERS_DOWN), KafkaUnavailable),
        (KafkaError(KafkaError._MSG_TIMED_OUT), KafkaUnavailable),
        (KafkaError(KafkaError.REQUEST_TIMED_OUT), KafkaUnavailable),
        (KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, retriable=True), KafkaUnavailable),
        (KafkaError(KafkaError.INVALID_TXN_STATE, txn_requires_abort=True), KafkaUnavailable),
        (KafkaError(KafkaError.PRODUCER_FENCED, fatal=True), DrainConflict),
        (KafkaError(KafkaError._FENCED, fatal=True), DrainConflict),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), RuntimeError),
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), RuntimeError),
    ],
)
def test_kafka_failure_classifies_transient_errors(error: KafkaError, expected: type) -> None:
    mapped = kafka_failure(KafkaException(error), "draining")
    assert type(mapped) is expected
    assert str(mapped).startswith("draining: ")


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 12)), max_size=40),
    baseline=st.dictionaries(st.sampled_from("abc"), st.integers(0, 12), max_size=3),
    continuous=st.booleans(),
)
def test_check_sequences_shortcut_agrees_with_checking_each_event(
    events: list[tuple[str, int]], baseline: dict[str, int], continuous: bool
) -> None:
    """The shortcut for sources that count up by one gives the same report as the full check."""
    if continuous:  # the common case the shortcut serves: each source counts up from its baseline
        next_seq = {s: baseline.get(s, 5) + 1 for s in "abc"}
        events = [
            (s, next_seq.__setitem__(s, next_seq[s] + 1) or next_seq[s] - 1) for s, _ in events
        ]
    assert check_sequences(events, baseline) == _check_each(events, baseline)
