"""Torn writes and damaged records, on WAL files written byte by byte (docs/wal-format.md).

A torn write (the record the gateway was writing when it crashed) is ignored by readers and
truncated by the writer, which says how many bytes it cut. Damage (a record whose bytes are
all there but wrong, or are gone from the middle of the log) is skipped by readers, which
resynchronise on the next valid record, kept in place by the writer, and quarantined.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from pathlib import Path

import pytest

from tasks.wal_format import (
    META_FILE,
    QUARANTINE_FILE,
    WalCorruption,
    WalReader,
    WalWriter,
    encode_record,
    list_segments,
    mark_reported,
    quarantine_damage,
    read_quarantine,
    scan_segment,
    segment_name,
    torn_tail,
    unreported_damage,
)

HEADER = 12


def rec(position: int, value: bytes = b"event") -> bytes:
    """The bytes of one record: source 'cam', seq = position + 1."""
    return encode_record(position, "cam", position + 1, 1_700_000_000_000 + position, value)


def recs(first: int, n: int) -> bytes:
    return b"".join(rec(p) for p in range(first, first + n))


def make_wal(directory: Path, segments: dict[int, bytes]) -> None:
    """A WAL written byte by byte: wal.json and one file per segment base."""
    (directory / META_FILE).write_text('{"format": 1, "wal_id": "w1"}')
    for base, data in segments.items():
        (directory / segment_name(base)).write_bytes(data)


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def with_length(data: bytes, delta: int) -> bytes:
    length = int.from_bytes(data[4:8], "big") + delta
    return data[:4] + length.to_bytes(4, "big") + data[8:]


def overlong_source_length(record: bytes) -> bytes:
    """Valid CRC, but the source id length points past the payload (a foreign writer's bug)."""
    payload = bytearray(record[HEADER:])
    payload[24:26] = (300).to_bytes(2, "big")
    return record[:8] + zlib.crc32(payload).to_bytes(4, "big") + bytes(payload)


GOOD = recs(0, 3)  # positions 0, 1, 2
LAST = rec(3)  # the record a case damages or tears at the end of the newest segment

TORN_TAILS = {
    "W": b"W",
    "WR": b"WR",
    "WR-then-zero-blocks": b"WR" + bytes(4094),  # issue 9: only WR reached disk
    "WR-version-then-zero-blocks": b"WR\x01" + bytes(4093),
    "half-header-then-zero-blocks": LAST[:7] + bytes(4089),
    "header-minus-one": LAST[: HEADER - 1],
    "header-only": LAST[:HEADER],
    "header-then-zero-blocks": LAST[:HEADER] + bytes(4084),
    "payload-cut": LAST[: HEADER + 9],
    "payload-minus-one": LAST[:-1],
    "zero-blocks": bytes(4096),
}

# the length says the record is complete (all its bytes are in the file), yet it is wrong
CORRUPT_LAST = {
    "value-bit": (flip(LAST, -1), "crc mismatch"),
    "seq-bit": (flip(LAST, HEADER + 15), "crc mismatch"),
    "crc-bit": (flip(LAST, 11), "crc mismatch"),
    "magic": (flip(LAST, 0), "bad magic"),
    "version": (flip(LAST, 2), "unsupported record version 0"),
    "reserved": (flip(LAST, 3), "reserved byte is 1, not 0"),
    "length-one-longer": (with_length(LAST, +1), "incomplete record"),
    "length-one-shorter": (with_length(LAST, -1), "crc mismatch"),
    "length-huge": (flip(LAST, 4, 0x80), "payload length"),
    "value-bit-then-zero-blocks": (flip(LAST, -1) + bytes(4096), "crc mismatch"),
    "overlong-source-length-valid-crc": (overlong_source_length(LAST), "source id length 300"),
}


def _positions(directory: Path) -> list[int]:
    return [r.position for r in WalReader(directory).scan().records]


@pytest.mark.parametrize("tail", TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_torn_tail_is_ignored_then_truncated_and_reported(
    tmp_path: Path, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    make_wal(tmp_path, {0: GOOD + tail})
    segment = tmp_path / segment_name(0)

    scan = WalReader(tmp_path).scan()
    assert [r.position for r in scan.records] == [0, 1, 2]
    assert scan.damage == [] and scan.torn and scan.torn_bytes == len(tail)
    assert scan.end_position == 3

    with caplog.at_level(logging.WARNING, logger="tasks.wal_format"):
        with WalWriter(tmp_path) as wal:
            assert wal.torn_bytes == len(tail) and wal.damage == []
            assert segment.stat().st_size == len(GOOD)
            assert wal.append("cam", 4, b"rewritten") == 3
    assert f"truncated a torn last write of {len(tail)} byte(s) at byte {len(GOOD)}" in caplog.text
    assert list_segments(tmp_path) == [(0, segment)]
    assert [r.value for r in WalReader(tmp_path).records()][-1] == b"rewritten"


@pytest.mark.parametrize(("tail", "reason"), CORRUPT_LAST.values(), ids=CORRUPT_LAST.keys())
def test_corrupt_complete_last_record_is_kept_and_reported(
    tmp_path: Path, tail: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a torn write: the event may have been acknowledged. Nothing is cut, nothing is silent."""
    make_wal(tmp_path, {0: GOOD + tail})
    segment = tmp_path / segment_name(0)

    scan = WalReader(tmp_path).scan()
    assert [r.position for r in scan.records] == [0, 1, 2]
    assert scan.torn is None and scan.torn_bytes == 0
    [damage] = scan.damage
    assert (damage.segment, damage.offset, damage.length) == (segment.name, len(GOOD), len(tail))
    assert (damage.first_position, damage.positions) == (3, 1)
    assert reason in damage.reason
    with pytest.raises(WalCorruption, match="position 3"):
        WalReader(tmp_path).records()

    with caplog.at_level(logging.WARNING, logger="tasks.wal_format"):
        with WalWriter(tmp_path) as wal:
            assert wal.torn_bytes == 0 and wal.damage == [damage]
            # new records never follow the damage: a new segment at the position after it
            assert wal.append("cam", 5, b"after restart") == 4
    assert "kept damaged bytes for the drain to quarantine" in caplog.text
    assert segment.read_bytes() == GOOD + tail
    assert [base for base, _ in list_segments(tmp_path)] == [0, 4]
    scan = WalReader(tmp_path).scan()
    assert [r.position for r in scan.records] == [0, 1, 2, 4]
    assert [(d.first_position, d.positions, d.length) for d in scan.damage] == [(3, 1, len(tail))]


@pytest.mark.parametrize("bit", range(len(LAST) * 8))
def test_every_bit_flip_in_the_last_record_is_damage_never_a_torn_write(bit: int) -> None:
    data = GOOD + flip(LAST, bit // 8, 1 << (bit % 8))
    scan = scan_segment("s", data, 0)
    assert scan.torn is None
    assert [r.position for r in scan.records] == [0, 1, 2]
    assert [(d.offset, d.length, d.first_position, d.positions) for d in scan.damage] == [
        (len(GOOD), len(LAST), 3, 1)
    ]


@pytest.mark.parametrize("cut", range(len(LAST)))
def test_every_cut_of_the_last_record_is_a_torn_write(cut: int) -> None:
    """With the file ending at the cut, and with zero-filled blocks after a cut in the header."""
    tails = [LAST[:cut]] + ([LAST[:cut] + bytes(4096)] if cut <= HEADER else [])
    for tail in tails:
        scan = scan_segment("s", GOOD + tail, 0)
        assert scan.damage == [] and scan.valid_end == len(GOOD)
        assert (scan.torn is not None) == bool(tail)


@pytest.mark.parametrize(
    ("tail", "torn"),
    [
        (b"", "incomplete header (0 of 12 bytes)"),
        (b"WR\x01", "incomplete header (3 of 12 bytes)"),
        (b"WR" + bytes(20), "nothing after the header reached disk (zero-filled)"),
        (b"\xff" * 12 + bytes(20), "nothing after the header reached disk (zero-filled)"),
        (LAST[: HEADER + 9], "incomplete record (9 of 34 payload bytes)"),
        (LAST, None),  # complete: not torn (and valid)
        (flip(LAST, -1), None),  # complete but wrong: damage
        (with_length(LAST, +1), None),  # the bytes there match the CRC: the length is wrong
        (LAST[:HEADER] + b"\x01" + bytes(40), None),  # a payload byte reached disk
        (b"XY" + bytes(10) + b"\x01", None),
    ],
)
def test_torn_tail_decision(tail: bytes, torn: str | None) -> None:
    assert torn_tail(GOOD + tail, len(GOOD)) == torn


def test_corrupt_record_in_an_older_segment_is_skipped_and_everything_else_read(
    tmp_path: Path,
) -> None:
    older = rec(0) + rec(1) + flip(rec(2), HEADER + 30) + rec(3) + rec(4)
    make_wal(tmp_path, {0: older, 5: recs(5, 5)})
    scan = WalReader(tmp_path).scan()
    assert [r.position for r in scan.records] == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    [damage] = scan.damage
    assert (damage.segment, damage.offset, damage.length) == (
        segment_name(0),
        2 * len(rec(0)),
        len(rec(2)),
    )
    assert (damage.first_position, damage.positions, damage.reason) == (2, 1, "crc mismatch")
    assert damage.claimed == "position 2, source 'cam', seq 3"
    # the gateway's writer looks at the newest segment only: it opens and appends
    with WalWriter(tmp_path) as wal:
        assert wal.damage == [] and wal.append("cam", 11, b"x") == 10


@pytest.mark.parametrize(
    ("segments", "records", "damage"),
    [
        # a corrupt length field: resynchronised on the next record's magic and CRC
        ({0: rec(0) + with_length(rec(1), 7) + recs(2, 3)}, [0, 2, 3, 4], [(1, 1, "crc mismatch")]),
        (
            {0: rec(0) + flip(rec(1), 4, 0x40) + recs(2, 3)},
            [0, 2, 3, 4],
            [(1, 1, "payload length")],
        ),
        # two damaged records in a row are one region holding two positions
        ({0: rec(0) + flip(rec(1), 0) + flip(rec(2), 0) + rec(3)}, [0, 3], [(1, 2, "bad magic")]),
        # garbage between two records holds no position
        ({0: rec(0) + b"garbage" + rec(1)}, [0, 1], [(1, 0, "bad magic")]),
        # the end of an older segment: the next segment's base says how many positions
        ({0: recs(0, 3)[:-3], 3: rec(3)}, [0, 1, 3], [(2, 1, "incomplete record")]),
        (
            {0: rec(0) + b"WR" + bytes(200), 4: rec(4)},
            [0, 4],
            [(1, 3, "unsupported record version 0")],
        ),
        # an older segment that ends early at a record boundary: positions with no bytes left
        ({0: recs(0, 2), 4: rec(4)}, [0, 1, 4], [(2, 2, "positions 2..3 are missing")]),
        # a record whose position is ahead: the positions before it are missing
        ({0: rec(0) + rec(3)}, [0, 3], [(1, 2, "positions 1..2 are missing")]),
        # a record whose position is behind (a duplicate) is damage too
        ({0: rec(0) + rec(1) + rec(1) + rec(2)}, [0, 1, 2], [(2, 0, "position 1, expected 2")]),
        # damage in the middle of the newest segment and a torn write at its end
        (
            {0: rec(0) + flip(rec(1), -1) + rec(2) + b"WR" + bytes(100)},
            [0, 2],
            [(1, 1, "crc mismatch")],
        ),
    ],
)
def test_damage_table(
    tmp_path: Path,
    segments: dict[int, bytes],
    records: list[int],
    damage: list[tuple[int, int, str]],
) -> None:
    make_wal(tmp_path, segments)
    scan = WalReader(tmp_path).scan()
    assert [r.position for r in scan.records] == records
    assert len(scan.damage) == len(damage)
    for found, (first, positions, reason) in zip(scan.damage, damage, strict=True):
        assert (found.first_position, found.positions) == (first, positions)
        assert reason in found.reason


def test_overlapping_segments_need_a_human(tmp_path: Path) -> None:
    make_wal(tmp_path, {0: recs(0, 3), 2: recs(2, 2)})
    with pytest.raises(WalCorruption, match="next segment starts at 2"):
        WalReader(tmp_path).scan()


def test_missing_first_segments_are_damage_without_bytes(tmp_path: Path) -> None:
    make_wal(tmp_path, {10: recs(10, 2)})
    scan = WalReader(tmp_path).scan(4)
    assert [r.position for r in scan.records] == [10, 11]
    assert [(d.first_position, d.positions, d.length) for d in scan.damage] == [(4, 6, 0)]
    assert "positions 4..9 are missing" in scan.damage[0].reason


def test_damage_behind_the_start_is_not_reported_again(tmp_path: Path) -> None:
    make_wal(tmp_path, {0: rec(0) + flip(rec(1), -1) + rec(2) + b"junk" + rec(3)})
    assert [d.first_position for d in WalReader(tmp_path).scan(0).damage] == [1, 3]
    assert [d.first_position for d in WalReader(tmp_path).scan(1).damage] == [1, 3]
    assert [d.first_position for d in WalReader(tmp_path).scan(2).damage] == [3]  # junk before 3
    assert WalReader(tmp_path).scan(3).damage == []
    assert [r.position for r in WalReader(tmp_path).scan(3).records] == [3]


def test_damage_in_the_newest_segment_is_kept_and_the_torn_tail_cut(tmp_path: Path) -> None:
    newest = rec(0) + flip(rec(1), -1) + rec(2)
    make_wal(tmp_path, {0: newest + b"WR" + bytes(100)})
    with WalWriter(tmp_path) as wal:
        assert wal.torn_bytes == 102
        assert [d.first_position for d in wal.damage] == [1]
        assert wal.append("cam", 4, b"next") == 3  # same segment: it ends in a valid record
    assert (tmp_path / segment_name(0)).read_bytes()[: len(newest)] == newest
    assert [base for base, _ in list_segments(tmp_path)] == [0]
    assert _positions(tmp_path) == [0, 2, 3]


def test_quarantine_keeps_raw_bytes_once_and_tracks_escalation(tmp_path: Path) -> None:
    bad = flip(rec(1), HEADER + 30)
    make_wal(tmp_path, {0: rec(0) + bad + rec(2), 3: b"WR" + bytes(10) + rec(3)})
    damage = WalReader(tmp_path).scan().damage
    assert [(d.segment, d.first_position) for d in damage] == [
        (segment_name(0), 1),
        (segment_name(3), 3),
    ]

    assert quarantine_damage(tmp_path, "w1", damage) == damage
    assert quarantine_damage(tmp_path, "w1", damage) == []  # a re-run adds nothing
    assert quarantine_damage(tmp_path, "w1", WalReader(tmp_path).scan().damage) == []
    entries = read_quarantine(tmp_path).entries
    assert len(entries) == 2
    assert base64.b64decode(entries[0].raw_base64) == bad
    assert (entries[0].offset, entries[0].length, entries[0].reason) == (
        len(rec(0)),
        len(bad),
        "crc mismatch",
    )
    on_disk = json.loads((tmp_path / QUARANTINE_FILE).read_text())
    assert on_disk["format"] == 1 and on_disk["wal_id"] == "w1"
    assert set(on_disk["entries"][0]) >= {
        "segment",
        "offset",
        "length",
        "first_position",
        "positions",
        "reason",
        "sha256",
        "raw_base64",
        "quarantined_at",
        "reported_at",
    }

    assert unreported_damage(tmp_path) == damage
    mark_reported(tmp_path, damage[:1])
    assert unreported_damage(tmp_path) == damage[1:]
    mark_reported(tmp_path, damage)
    assert unreported_damage(tmp_path) == []
    assert quarantine_damage(tmp_path, "w1", damage) == []  # reported entries are not re-added

    with pytest.raises(WalCorruption, match="belongs to WAL w1, not w2"):
        quarantine_damage(tmp_path, "w2", damage)
