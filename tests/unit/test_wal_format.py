"""WAL on-disk format: segments, CRC-checked records, torn tails, the atomic marker file."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.wal_format import (
    MARKER_FILE,
    META_FILE,
    WalCorruption,
    WalMarker,
    WalReader,
    WalWriter,
    _decode_run,
    _parse,
    decode_record,
    encode_record,
    list_segments,
    read_marker,
    segment_name,
    write_marker,
)

HEADER = 12  # magic 2 + version 1 + reserved 1 + length 4 + crc 4


def fill(directory: Path, n: int, segment_max_bytes: int = 1024) -> list[tuple[str, int, bytes]]:
    """Append n events from three sources; returns (source, seq, value) in position order."""
    written = []
    with WalWriter(directory, segment_max_bytes=segment_max_bytes) as wal:
        for i in range(n):
            source, seq = f"src-{i % 3}", i // 3 + 1
            value = json.dumps({"i": i, "pad": "x" * (i % 50)}).encode()
            assert (
                wal.append(source, seq, value, timestamp_ms=1_700_000_000_000 + i, sync=False) == i
            )
            written.append((source, seq, value))
    return written


def read_all(directory: Path, start: int = 0) -> list[tuple[str, int, bytes]]:
    return [(r.source, r.seq, r.value) for r in WalReader(directory).records(start)]


def test_records_round_trip_across_segments(tmp_path: Path) -> None:
    written = fill(tmp_path, 200, segment_max_bytes=1024)
    segments = list_segments(tmp_path)
    assert len(segments) > 5
    records = list(WalReader(tmp_path).records())
    assert [(r.source, r.seq, r.value) for r in records] == written
    assert [r.position for r in records] == list(range(200))
    assert records[7].timestamp_ms == 1_700_000_000_007
    # each segment is named by the position of its first record and stays under the size cap
    firsts = {r.position for r in records if any(r.position == base for base, _ in segments)}
    assert [base for base, _ in segments] == sorted(firsts)
    assert all(path.name == segment_name(base) for base, path in segments)
    assert all(path.stat().st_size <= 1024 for _, path in segments)
    assert sum(r.size for r in records) == sum(p.stat().st_size for _, p in segments)


def test_reading_from_a_position_inside_a_segment(tmp_path: Path) -> None:
    written = fill(tmp_path, 120)
    for start in (0, 1, 37, 119, 120, 500):
        assert read_all(tmp_path, start) == written[start:]


def test_writer_reopens_and_continues_positions(tmp_path: Path) -> None:
    written = fill(tmp_path, 50)
    wal_id = json.loads((tmp_path / META_FILE).read_text())["wal_id"]
    with WalWriter(tmp_path, segment_max_bytes=1024) as wal:
        assert wal.wal_id == wal_id
        assert wal.next_position == 50
        assert wal.append("src-9", 1, b"after restart") == 50
    assert read_all(tmp_path) == [*written, ("src-9", 1, b"after restart")]


def test_record_layout_is_as_documented() -> None:
    data = encode_record(position=5, source="cam", seq=9, timestamp_ms=1234, value=b"v")
    assert data[:2] == b"WR" and data[2] == 1 and data[3] == 0
    length = int.from_bytes(data[4:8], "big")
    assert length == len(data) - HEADER == 8 + 8 + 8 + 2 + 3 + 1
    assert int.from_bytes(data[8:12], "big") == zlib.crc32(data[HEADER:])
    assert int.from_bytes(data[12:20], "big") == 5
    assert int.from_bytes(data[20:28], "big") == 9
    assert int.from_bytes(data[28:36], "big") == 1234
    assert int.from_bytes(data[36:38], "big") == 3
    assert data[38:41] == b"cam" and data[41:] == b"v"


@pytest.mark.parametrize("source", ["", "x" * 70_000])
def test_source_id_must_fit(source: str) -> None:
    with pytest.raises(ValueError, match="source id"):
        encode_record(0, source, 1, 0, b"")


def _last_segment(directory: Path) -> Path:
    return list_segments(directory)[-1][1]


@pytest.mark.parametrize(
    "cut",
    [1, 5, HEADER - 1, HEADER, HEADER + 3, "all-but-one-byte"],
    ids=["1-byte", "5-bytes", "header-minus-1", "header-only", "header+3", "payload-minus-1"],
)
def test_torn_last_record_is_ignored_and_repaired(tmp_path: Path, cut: int | str) -> None:
    """The gateway crashed mid-write: the partial record is skipped, then truncated on reopen."""
    written = fill(tmp_path, 40)
    last = _last_segment(tmp_path)
    good_size = last.stat().st_size
    torn = encode_record(40, "src-1", 99, 0, b"half-written event")
    keep = len(torn) - 1 if cut == "all-but-one-byte" else int(cut)
    with open(last, "ab") as f:
        f.write(torn[:keep])
    assert read_all(tmp_path) == written
    with WalWriter(tmp_path, segment_max_bytes=1024) as wal:
        assert last.stat().st_size == good_size
        assert wal.append("src-1", 99, b"rewritten") == 40
    assert read_all(tmp_path) == [*written, ("src-1", 99, b"rewritten")]


def test_zero_filled_tail_is_a_torn_write(tmp_path: Path) -> None:
    written = fill(tmp_path, 10)
    with open(_last_segment(tmp_path), "ab") as f:
        f.write(b"\0" * 4096)
    assert read_all(tmp_path) == written


def test_crc_mismatch_in_final_record_is_damage_not_a_torn_write(tmp_path: Path) -> None:
    """Its length says it is complete: an acknowledged event, kept (tests/unit/test_wal_damage.py)."""
    written = fill(tmp_path, 10, segment_max_bytes=1 << 20)
    last = _last_segment(tmp_path)
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    scan = WalReader(tmp_path).scan()
    assert [(r.source, r.seq, r.value) for r in scan.records] == written[:-1]
    assert [(d.first_position, d.positions, d.reason) for d in scan.damage] == [
        (9, 1, "crc mismatch")
    ]
    assert scan.torn is None
    with pytest.raises(WalCorruption, match=r"position 9\): crc mismatch"):
        WalReader(tmp_path).records()


def test_damage_before_the_tail_is_refused_by_the_strict_reader(tmp_path: Path) -> None:
    fill(tmp_path, 10, segment_max_bytes=1 << 20)
    last = _last_segment(tmp_path)
    data = bytearray(last.read_bytes())
    data[HEADER + 30] ^= 0xFF  # inside the first record's payload; nine good records follow
    last.write_bytes(bytes(data))
    with pytest.raises(WalCorruption, match=r"byte 0 \(\d+ bytes, position 0\): crc mismatch"):
        WalReader(tmp_path).records()
    # the gateway keeps running: the damage stays for the drain, new records follow the good ones
    with WalWriter(tmp_path) as wal:
        assert [d.first_position for d in wal.damage] == [0]
        assert wal.append("src-1", 99, b"after") == 10
    assert [r.position for r in WalReader(tmp_path).scan().records] == list(range(1, 11))


def test_torn_record_in_an_older_segment_is_corruption(tmp_path: Path) -> None:
    fill(tmp_path, 100)
    first = list_segments(tmp_path)[0][1]
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size - 3)
    with pytest.raises(WalCorruption, match="incomplete record"):
        list(WalReader(tmp_path).records())


def test_missing_segment_below_the_read_position_is_reported(tmp_path: Path) -> None:
    fill(tmp_path, 100)
    list_segments(tmp_path)[0][1].unlink()
    with pytest.raises(WalCorruption, match=r"positions 0\.\.\d+ are missing"):
        list(WalReader(tmp_path).records(0))


def test_marker_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    assert read_marker(tmp_path) is None
    marker = WalMarker(
        wal_id="w1", topic="t", next_position=42, sources={"a": 7}, scan_from={0: 3, 2: 9}
    )
    write_marker(tmp_path, marker)
    assert read_marker(tmp_path) == marker
    on_disk = json.loads((tmp_path / MARKER_FILE).read_text())
    assert on_disk["next_position"] == 42 and on_disk["scan_from"] == {"0": 3, "2": 9}
    marker.next_position = 50
    write_marker(tmp_path, marker)
    assert read_marker(tmp_path).next_position == 50
    assert sorted(os.listdir(tmp_path)) == [MARKER_FILE]  # no temp file left behind


def test_reader_of_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WalReader(tmp_path / "nope")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(st.binary(max_size=200), min_size=1, max_size=25),
    cut_fraction=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_any_crash_point_loses_only_the_record_being_written(
    tmp_path_factory: pytest.TempPathFactory, values: list[bytes], cut_fraction: float
) -> None:
    """Cut the last segment anywhere: every record wholly before the cut survives, nothing else."""
    directory = tmp_path_factory.mktemp("wal")
    with WalWriter(directory, segment_max_bytes=1 << 20) as wal:
        for i, v in enumerate(values):
            wal.append("s", i + 1, v, timestamp_ms=0, sync=False)
    last = _last_segment(directory)
    size = last.stat().st_size
    cut = int(size * cut_fraction)
    with open(last, "r+b") as f:
        f.truncate(cut)
    survivors = [r.value for r in WalReader(directory).records()]
    ends, total = [], 0
    for v in values:
        total += len(encode_record(0, "s", 0, 0, v))
        ends.append(total)
    assert survivors == [v for v, end in zip(values, ends, strict=True) if end <= cut]


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ('{"format": 1, "wal_id": "9f0c2d"}', None),
        ('{"format": 1, "wal_id": "gw-1.wal_2"}', None),
        ('{"format": 2, "wal_id": "9f0c2d"}', "format 2 is not supported"),
        ('{"format": "1", "wal_id": "9f0c2d"}', "format: Input should be a valid integer"),
        ('{"format": true, "wal_id": "9f0c2d"}', "format: Input should be a valid integer"),
        ('{"format": 1.0, "wal_id": "9f0c2d"}', "format: Input should be a valid integer"),
        ('{"format": 1}', "wal_id: Field required"),
        ('{"format": 1, "wal_id": ""}', "wal_id: String should match pattern"),
        ('{"format": 1, "wal_id": "../other"}', "wal_id: String should match pattern"),
        ('{"format": 1, "wal_id": "' + "a" * 65 + '"}', "wal_id: String should match pattern"),
        ('{"format": 1, "wal_id": "9f0c2d", "extra": 1}', "extra: Extra inputs are not permitted"),
        ("[1]", "Input should be an object"),
        ('{"format": 1, "wal_id": "9f0c', "Invalid JSON"),
    ],
)
def test_wal_json_format_is_checked(tmp_path: Path, meta: str, problem: str | None) -> None:
    (tmp_path / META_FILE).write_text(meta)
    if problem is None:
        assert WalReader(tmp_path).wal_id == json.loads(meta)["wal_id"]
        assert WalWriter(tmp_path).wal_id == json.loads(meta)["wal_id"]
        return
    for open_wal in (WalReader, WalWriter):
        with pytest.raises(WalCorruption, match="is not a valid WAL description") as err:
            open_wal(tmp_path)
        assert problem in str(err.value)


def test_writer_creates_wal_json_as_documented(tmp_path: Path) -> None:
    WalWriter(tmp_path).close()
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert set(meta) == {"format", "wal_id"} and meta["format"] == 1
    assert len(meta["wal_id"]) == 32 and int(meta["wal_id"], 16) >= 0


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("position", 0, True),
        ("position", 2**64 - 1, True),  # unsigned 64-bit
        ("position", 2**64, False),
        ("position", -1, False),
        ("seq", 0, True),
        ("seq", 2**64 - 1, True),  # unsigned 64-bit
        ("seq", -1, False),
        ("seq", 2**64, False),
        ("timestamp_ms", 0, True),
        ("timestamp_ms", 2**63 - 1, True),  # signed 64-bit, never before the epoch
        ("timestamp_ms", 2**63, False),
        ("timestamp_ms", -1, False),
    ],
)
def test_field_ranges_are_enforced_when_writing(field: str, value: int, ok: bool) -> None:
    args = {"position": 0, "source": "cam", "seq": 1, "timestamp_ms": 0, "value": b"v"} | {
        field: value
    }
    if ok:
        record = decode_record(encode_record(**args))
        assert getattr(record, field) == value
    else:
        with pytest.raises(ValueError, match=f"{field} must be in 0\\.\\."):
            encode_record(**args)


def _with_valid_crc(payload: bytes, reserved: int = 0) -> bytes:
    """A record header with a correct CRC for any payload, as a foreign writer could produce."""
    return (
        b"WR"
        + bytes([1, reserved])
        + len(payload).to_bytes(4, "big")
        + zlib.crc32(payload).to_bytes(4, "big")
        + payload
    )


def _payload(src_len: int, source: bytes, value: bytes = b"v", timestamp_ms: int = 0) -> bytes:
    return (
        (5).to_bytes(8, "big")
        + (9).to_bytes(8, "big")
        + timestamp_ms.to_bytes(8, "big", signed=True)
        + src_len.to_bytes(2, "big")
        + source
        + value
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_with_valid_crc(_payload(3, b"cam")), None),
        (
            _with_valid_crc(_payload(300, b"cam")),
            "source id length 300 does not fit a payload of 30 bytes",
        ),
        (
            _with_valid_crc(_payload(5, b"cam", b"")),
            "source id length 5 does not fit a payload of 29 bytes",
        ),
        (_with_valid_crc(_payload(0, b"", b"value")), "source id length 0 does not fit"),
        (_with_valid_crc(_payload(2, b"\xff\xfe")), "source id is not UTF-8"),
        (_with_valid_crc(_payload(3, b"cam", timestamp_ms=-5)), "negative timestamp -5"),
        (_with_valid_crc(_payload(3, b"cam"), reserved=1), "reserved byte is 1, not 0"),
        (_with_valid_crc(b"x" * 26), "payload length 26 outside 27..16777216"),
        (_with_valid_crc(_payload(3, b"cam")) + b"\0", "1 byte(s) after the record"),
        (_with_valid_crc(_payload(3, b"cam"))[:-1], "incomplete record (29 of 30 payload bytes)"),
        (b"WR\x02" + bytes(30), "unsupported record version 2"),
        (b"XR\x01" + bytes(30), "bad magic b'XR'"),
        (b"WR\x01\x00", "incomplete header (4 of 12 bytes)"),
    ],
)
def test_decode_record_names_every_problem(data: bytes, problem: str | None) -> None:
    """A valid CRC does not make a record valid: each field is checked against the spec."""
    if problem is None:
        assert decode_record(data).source == "cam"
        return
    with pytest.raises(WalCorruption) as err:
        decode_record(data)
    assert problem in str(err.value)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.binary(max_size=40), min_size=1, max_size=8),
    sources=st.lists(st.sampled_from(["a", "bé", "c" * 300]), min_size=8, max_size=8),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3),
    cut=st.integers(0, 10_000),
)
def test_fast_decoding_stops_exactly_where_the_careful_parse_finds_a_problem(
    values: list[bytes], sources: list[str], flips: list[tuple[int, int]], cut: int
) -> None:
    """The hot loop (one unpack per record) accepts what ``_parse`` accepts, nothing more."""
    data = bytearray(
        b"".join(
            encode_record(7 + i, sources[i], i, 1000 + i, value) for i, value in enumerate(values)
        )
    )
    for at, mask in flips:
        data[at % len(data)] ^= mask
    data = bytes(data[: max(1, len(data) - cut % (len(data) + 1))])
    expected, offset, position = [], 0, 7
    while offset < len(data):
        parsed = _parse(data, offset)
        if isinstance(parsed, str) or parsed.position != position:
            break
        expected.append(parsed)
        offset, position = offset + parsed.size, position + 1
    fast: list = []
    assert _decode_run(data, 0, 7, fast) == (offset, position)
    assert fast == expected
