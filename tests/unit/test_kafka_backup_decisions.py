"""Pure decisions of Kafka topic backups: ranges to back up, where a backup resumes, which
backup a run continues, whether a manifest holds, how much a resumed restore skips; the segment
format round trip."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime

import pytest

from tasks.kafka_backup_format import (
    BackupPlan,
    Manifest,
    SegmentInfo,
    SegmentKey,
    SegmentWriter,
    backup_to_resume,
    check_manifest,
    compress,
    config_drift,
    configs_to_keep,
    decompress,
    is_backup_id,
    iter_segment,
    iter_sendable,
    parse_segment_key,
    plan_ranges,
    record_content,
    restore_skip,
    resume_point,
    segment_key,
    summarize,
)

BOUNDS = {0: (0, 100), 1: (10, 50), 2: (0, 0)}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {0: (0, 100), 1: (10, 50)}),  # everything; an empty partition left out
        ({"from_offset": 20}, {0: (20, 100), 1: (20, 50)}),
        ({"from_offset": 5}, {0: (5, 100), 1: (10, 50)}),  # not below the earliest kept
        ({"to_offset": 30}, {0: (0, 30), 1: (10, 30)}),
        ({"from_offset": 60, "to_offset": 80}, {0: (60, 80)}),
        ({"to_offset": 200}, {0: (0, 100), 1: (10, 50)}),  # not past the end
        ({"time_starts": {0: 90, 1: None}}, {0: (90, 100)}),  # none that late in 1
        ({"time_ends": {0: 5, 1: None}}, {0: (0, 5), 1: (10, 50)}),  # None: all up to now
        ({"time_starts": {0: 40, 1: 40}, "time_ends": {0: 60, 1: 45}}, {0: (40, 60), 1: (40, 45)}),
        ({"from_offset": 45, "time_starts": {0: 40, 1: 20}}, {0: (45, 100), 1: (45, 50)}),
    ],
)
def test_plan_ranges(kwargs: dict, expected: dict) -> None:
    assert plan_ranges(BOUNDS, **kwargs) == expected


def _keys(*segs: tuple[int, int, int]) -> tuple[list[SegmentKey], dict[SegmentKey, str]]:
    found = [SegmentKey(0, seq, first, last) for seq, first, last in segs]
    return found, {k: segment_key(*k) for k in found}


@pytest.mark.parametrize(
    ("segs", "seq", "offset", "done", "stray"),
    [
        ([], 0, 0, False, []),  # nothing there yet
        ([(0, 0, 9), (1, 10, 19)], 2, 20, False, []),
        ([(0, 0, 9), (1, 12, 29)], 2, 30, False, []),  # offset gaps (compaction) are fine
        ([(0, 0, 9), (1, 10, 19), (2, 20, 99)], 3, 100, True, []),  # complete
        ([(0, 0, 9), (2, 20, 29)], 1, 10, False, [(2, 20, 29)]),  # 1 lost between parallel puts
        ([(1, 10, 19)], 0, 0, False, [(1, 10, 19)]),
    ],
)
def test_resume_point(segs: list, seq: int, offset: int, done: bool, stray: list) -> None:
    found, keys = _keys(*segs)
    got = resume_point(0, 100, found, keys)
    assert (got.seq, got.offset, got.done) == (seq, offset, done)
    assert got.stray == [segment_key(0, *s) for s in stray]


@pytest.mark.parametrize(
    ("found", "selection", "expected"),
    [
        ([], {"a": 1}, None),
        ([("20260101T000000Z", False, {"a": 1})], {"a": 1}, "20260101T000000Z"),
        ([("20260101T000000Z", False, {"a": 2})], {"a": 1}, None),  # another range
        ([("20260101T000000Z", True, {"a": 1})], {"a": 1}, None),  # complete: a new one
        # a newer complete backup: the older unfinished one is abandoned
        (
            [("20260101T000000Z", False, {"a": 1}), ("20260108T000000Z", True, {"a": 1})],
            {"a": 1},
            None,
        ),
        # the newest unfinished one of the same range
        (
            [
                ("20260101T000000Z", False, {"a": 1}),
                ("20260108T000000Z", False, {"a": 1}),
                ("20260109T000000Z", False, {"a": 2}),
            ],
            {"a": 1},
            "20260108T000000Z",
        ),
        ([("20260101T000000Z", False, None)], {"a": 1}, None),  # no plan: not resumable
    ],
)
def test_backup_to_resume(found: list, selection: dict, expected: str | None) -> None:
    assert backup_to_resume(found, selection) == expected


@pytest.mark.parametrize(("restored", "backed_up", "skip"), [(0, 10, 0), (4, 10, 4), (10, 10, 10)])
def test_restore_skip(restored: int, backed_up: int, skip: int) -> None:
    assert restore_skip(restored, backed_up) == skip


def test_restore_skip_refuses_more_than_backed_up() -> None:
    with pytest.raises(ValueError, match="something else writes"):
        restore_skip(11, 10)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("20260105T030000Z", True),
        ("20990101T000000Z-clean", True),
        ("../x", False),
        ("20260105", False),
        ("20260105T030000Z/..", False),
    ],
)
def test_backup_ids(value: str, ok: bool) -> None:
    assert is_backup_id(value) is ok


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("None", None),
        ("20260105T030000Z", "20260105T030000Z"),
        ("../x", ValueError),
        ("20260105", ValueError),
    ],
)
@pytest.mark.parametrize("runbook", ["backup", "restore"])
def test_backup_id_parameter(runbook: str, value: str | None, expected: object) -> None:
    from pydantic import ValidationError

    from flows.kafka.kafka_topic_backup import KafkaTopicBackupParams
    from flows.kafka.kafka_topic_restore import KafkaTopicRestoreParams

    params = {"backup": KafkaTopicBackupParams, "restore": KafkaTopicRestoreParams}[runbook]
    if expected is ValueError:
        with pytest.raises(ValidationError, match="a backup id looks like 20260105T030000Z"):
            params(backup_id=value)
    else:
        assert params(backup_id=value).backup_id == expected


def test_segment_keys_round_trip_and_sort_in_order() -> None:
    keys = [segment_key(3, seq, seq * 10, seq * 10 + 9) for seq in (0, 1, 10, 2)]
    assert [parse_segment_key(k) for k in keys][0] == SegmentKey(3, 0, 0, 9)
    assert sorted(keys) == [segment_key(3, s, s * 10, s * 10 + 9) for s in (0, 1, 2, 10)]
    assert parse_segment_key("manifest.json") is None
    assert parse_segment_key("p00003/x.seg.gz") is None


RECORDS = [
    (0, 1_700_000_000_000, 1, b"k", b"v", [("h", b"1"), ("h", None), ("ü", b"")]),
    (1, 1_700_000_000_001, 1, None, b"only value", []),
    (5, -1, 0, b"key only", None, [("x", b"\x00\xff")]),
    (6, 2, 2, b"", b"", []),  # empty is not null
]


def test_segment_round_trip_keeps_every_field_and_the_digest() -> None:
    writer = SegmentWriter()
    for offset, ts, ts_type, key, value, headers in RECORDS:
        writer.add(offset, ts, ts_type, record_content(key, value, headers))
    raw = decompress(compress(writer.body(), 1))
    decoded = list(iter_segment(raw))
    assert [tuple(r) for r, _ in decoded] == [
        (o, ts, tt, k, v, [tuple(h) for h in hs]) for o, ts, tt, k, v, hs in RECORDS
    ]
    digest = hashlib.sha256(b"".join(content for _, content in decoded)).hexdigest()
    assert digest == writer.digest()
    assert (writer.first, writer.last, writer.records) == (0, 6, 4)


def test_sendable_records_are_the_segment_records() -> None:
    """The restore's fast decoder gives what iter_segment gives (timestamp, key, value, headers;
    no headers: None), and refuses a truncated segment."""
    writer = SegmentWriter()
    for offset, ts, ts_type, key, value, headers in RECORDS:
        writer.add(offset, ts, ts_type, record_content(key, value, headers))
    raw = writer.body()
    assert list(iter_sendable(raw)) == [
        (r.timestamp, r.key, r.value, r.headers or None) for r, _ in iter_segment(raw)
    ]
    for cut in (raw[:-1], raw[:30]):
        with pytest.raises((ValueError, struct.error)):
            list(iter_segment(cut))
        with pytest.raises((ValueError, struct.error)):
            list(iter_sendable(cut))


# (name, value, source, read-only, sensitive); source 1 = DYNAMIC_TOPIC_CONFIG, 5 = DEFAULT_CONFIG
_OVERRIDE, _DEFAULT, _BROKER = 1, 5, 4


@pytest.mark.parametrize(
    ("entries", "configs", "which"),
    [
        # Apache Kafka: every config, overrides marked: only those
        (
            [
                ("retention.ms", "3600000", _OVERRIDE, False, False),
                ("cleanup.policy", "delete", _DEFAULT, False, False),
                ("segment.bytes", "1048576", _BROKER, False, False),
            ],
            {"retention.ms": "3600000"},
            "overrides",
        ),
        # tansu: only what was set at creation, reported as defaults: all of it
        (
            [
                ("retention.ms", "123456789", _DEFAULT, False, False),
                ("cleanup.policy", "compact", _DEFAULT, False, False),
            ],
            {"cleanup.policy": "compact", "retention.ms": "123456789"},
            "reported",
        ),
        ([], {}, "reported"),  # nothing set, nothing reported
        # never read-only, sensitive or valueless entries
        (
            [
                ("retention.ms", "1", _OVERRIDE, False, False),
                ("message.format.version", "3.0", _OVERRIDE, True, False),
                ("sasl.jaas.config", None, _OVERRIDE, False, True),
                ("x.secret", "s", _OVERRIDE, False, True),
                ("unset", None, _OVERRIDE, False, False),
            ],
            {"retention.ms": "1"},
            "overrides",
        ),
    ],
)
def test_configs_to_keep(entries: list, configs: dict, which: str) -> None:
    kept = configs_to_keep(entries)
    assert (kept.configs, kept.which) == (configs, which)


@pytest.mark.parametrize(
    ("backed_up", "target", "drift"),
    [
        ({"retention.ms": "1"}, {"retention.ms": "1", "other": "x"}, []),
        (
            {"retention.ms": "1"},
            {"retention.ms": "2"},
            ["retention.ms: 2 in the target, 1 in the backup"],
        ),
        (
            {"cleanup.policy": "compact"},
            {},
            ["cleanup.policy: not set (broker default) in the target, compact in the backup"],
        ),
        ({}, {"retention.ms": "2"}, []),
    ],
)
def test_config_drift(backed_up: dict, target: dict, drift: list) -> None:
    assert config_drift(backed_up, target) == drift


def test_null_and_empty_differ_in_the_digest() -> None:
    assert record_content(None, b"v", []) != record_content(b"", b"v", [])
    assert record_content(b"k", None, []) != record_content(b"k", b"", [])
    assert record_content(b"k", b"v", [("h", None)]) != record_content(b"k", b"v", [("h", b"")])


def _manifest(segments: list[tuple[int, int, int, int, int]]) -> Manifest:
    """segments: (partition, seq, first, last, records)."""
    infos = [
        SegmentInfo(
            key=segment_key(p, seq, first, last),
            partition=p,
            seq=seq,
            first_offset=first,
            last_offset=last,
            records=n,
            size=100 + seq,
            sha256="0" * 64,
            records_sha256=hashlib.sha256(f"{p}/{seq}".encode()).hexdigest(),
        )
        for p, seq, first, last, n in segments
    ]
    now = datetime(2026, 1, 5, tzinfo=UTC)
    plan = BackupPlan(
        topic="t",
        backup_id="20260105T000000Z",
        created_at=now,
        ranges={0: (0, 100), 1: (0, 50)},
        segment_bytes=1000,
        compress_level=1,
    )
    return Manifest(
        topic="t",
        backup_id=plan.backup_id,
        created_at=now,
        completed_at=now,
        plan=plan,
        partitions=summarize(plan, infos),
        segments=infos,
        records=sum(s.records for s in infos),
        bytes=sum(s.size for s in infos),
    )


GOOD = [(0, 0, 0, 49, 50), (0, 1, 50, 99, 50), (1, 0, 0, 49, 50)]


def _objects(m: Manifest) -> dict[str, int]:
    return {s.key: s.size for s in m.segments}


def _problems_after(change) -> list[str]:
    m = _manifest(GOOD)
    objects = _objects(m)
    change(m, objects)
    return check_manifest(m, objects)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m, o: None, None),
        (lambda m, o: o.pop(m.segments[1].key), "is missing"),
        (lambda m, o: o.__setitem__(m.segments[0].key, 7), "is 7 bytes"),
        (lambda m, o: o.__setitem__(segment_key(0, 9, 200, 201), 5), "not in the manifest"),
        (lambda m, o: setattr(m.partitions[0], "records", 99), "0: 99 records"),
        (lambda m, o: setattr(m.partitions[1], "checksum", "f" * 64), "checksum does not match"),
        (lambda m, o: setattr(m.segments[1], "seq", 2), "segment numbers"),
        (lambda m, o: setattr(m.segments[1], "first_offset", 40), "overlaps"),
        (lambda m, o: setattr(m.segments[1], "last_offset", 100), "past the planned end"),
        (lambda m, o: setattr(m, "records", 1), "total records"),
    ],
)
def test_check_manifest(change, problem: str | None) -> None:
    problems = _problems_after(change)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems
