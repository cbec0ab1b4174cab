"""The edge gateway's write-ahead log (WAL) on disk: segments of CRC-checked records and the marker.

Specified in docs/wal-format.md. The gateway appends with ``WalWriter``; the runbook reads with
``WalReader`` and records what Kafka already holds in the ``ack.json`` marker.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

FORMAT_VERSION = 1
SEGMENT_SUFFIX = ".wal"
META_FILE = "wal.json"
MARKER_FILE = "ack.json"
LOCK_FILE = "drain.lock"
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

_MAGIC = b"WR"
# magic, format version, reserved byte, payload length, crc32 of the payload
_HEADER = struct.Struct(">2sBxII")
# global position, per-source sequence number, timestamp (ms since epoch), source id length
_FIELDS = struct.Struct(">QQqH")

H_WAL_ID = "wal-id"
H_GATEWAY = "wal-gateway"
H_SOURCE = "wal-source"
H_SEQ = "wal-seq"
H_POSITION = "wal-position"


class WalCorruption(RuntimeError):
    """The WAL holds a damaged record that is not a torn last write; a human must look."""


# --- format -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WalRecord:
    """One event in the WAL."""

    position: int
    source: str
    seq: int
    timestamp_ms: int
    value: bytes
    size: int  # bytes on disk, header included


def encode_record(position: int, source: str, seq: int, timestamp_ms: int, value: bytes) -> bytes:
    """The on-disk bytes of one record: header (magic, version, length, crc32) then payload."""
    src = source.encode()
    if not src or len(src) > 0xFFFF:
        raise ValueError(f"source id must be 1..65535 bytes, got {len(src)}")
    payload = _FIELDS.pack(position, seq, timestamp_ms, len(src)) + src + value
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload


def segment_name(base_position: int) -> str:
    return f"{base_position:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(base position, path) of every segment, oldest first."""
    found = []
    for path in directory.glob(f"*{SEGMENT_SUFFIX}"):
        stem = path.name.removesuffix(SEGMENT_SUFFIX)
        if len(stem) == 20 and stem.isdigit():
            found.append((int(stem), path))
    return sorted(found)


def _read_segment(path: Path, base: int, is_last: bool) -> tuple[list[WalRecord], int]:
    """Records of one segment and the length of its valid prefix.

    Only the newest segment may end in a torn record (the writer crashed, or is writing it
    right now): it is ignored. Damage anywhere else raises ``WalCorruption``.
    """
    data = path.read_bytes()
    records: list[WalRecord] = []
    offset, position = 0, base
    while offset < len(data):
        problem, torn = _check_record(data, offset, position)
        if problem is None:
            records.append(_decode(data, offset))
            offset += records[-1].size
            position += 1
            continue
        if is_last and torn:
            break
        raise WalCorruption(f"{path}: {problem} at byte {offset} (position {position})")
    return records, offset


def _check_record(data: bytes, offset: int, position: int) -> tuple[str | None, bool]:
    """(problem or None, whether the problem looks like a torn last write)."""
    if len(data) - offset < _HEADER.size:
        return "incomplete header", True
    magic, version, length, crc = _HEADER.unpack_from(data, offset)
    end = offset + _HEADER.size + length
    if magic != _MAGIC or version != FORMAT_VERSION or not _FIELDS.size <= length <= MAX_PAYLOAD_BYTES:
        # a crash can leave zero-filled blocks after the last complete record
        return "bad record header", not any(data[offset:])
    if end > len(data):
        return "incomplete record", True
    if zlib.crc32(data[offset + _HEADER.size : end]) != crc:
        return "crc mismatch", end == len(data)
    if _FIELDS.unpack_from(data, offset + _HEADER.size)[0] != position:
        return "unexpected position", False
    return None, False


def _decode(data: bytes, offset: int) -> WalRecord:
    length = _HEADER.unpack_from(data, offset)[2]
    start = offset + _HEADER.size
    position, seq, ts, src_len = _FIELDS.unpack_from(data, start)
    src_start = start + _FIELDS.size
    source = data[src_start : src_start + src_len].decode()
    value = data[src_start + src_len : start + length]
    return WalRecord(position, source, seq, ts, value, _HEADER.size + length)


def _write_json_atomic(path: Path, data: str) -> None:
    """Write, fsync, rename over, fsync the directory: the file is either old or new, never torn."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_wal_id(directory: Path) -> str | None:
    meta = directory / META_FILE
    if not meta.exists():
        return None
    return json.loads(meta.read_text())["wal_id"]


class WalWriter:
    """Appends events to a WAL directory: what the edge gateway does with every event it receives.

    On open it truncates a torn last record left by a crash, so new records never follow garbage.

    Example:
        ```python
        with WalWriter("/var/lib/gateway/wal") as wal:
            wal.append("opta-feed", seq=41, value=b'{"type":"goal"}')
        ```
    """

    def __init__(self, directory: str | os.PathLike[str], segment_max_bytes: int = 64 * 1024 * 1024):
        self.directory = Path(directory)
        self.segment_max_bytes = segment_max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        wal_id = _read_wal_id(self.directory)
        if wal_id is None:
            wal_id = uuid.uuid4().hex
            _write_json_atomic(
                self.directory / META_FILE, json.dumps({"format": FORMAT_VERSION, "wal_id": wal_id})
            )
        self.wal_id = wal_id
        self._file = None
        self._size = 0
        self._next = 0
        segments = list_segments(self.directory)
        if segments:
            base, path = segments[-1]
            records, valid = _read_segment(path, base, is_last=True)
            self._file = open(path, "r+b")
            if self._file.seek(0, os.SEEK_END) > valid:
                self._file.truncate(valid)
                os.fsync(self._file.fileno())
            self._file.seek(valid)
            self._size = valid
            self._next = records[-1].position + 1 if records else base

    @property
    def next_position(self) -> int:
        return self._next

    def append(
        self, source: str, seq: int, value: bytes, timestamp_ms: int | None = None, *, sync: bool = True
    ) -> int:
        """Append one event; returns its global position. ``sync=False`` defers the fsync to ``sync()``."""
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        data = encode_record(self._next, source, seq, ts, value)
        if self._file is None or (self._size and self._size + len(data) > self.segment_max_bytes):
            self._rotate()
        assert self._file is not None
        self._file.write(data)
        self._size += len(data)
        self._next += 1
        if sync:
            self.sync()
        return self._next - 1

    def sync(self) -> None:
        """Make every appended record durable (the gateway acknowledges its source after this)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def _rotate(self) -> None:
        if self._file is not None:
            self.close()
        self._file = open(self.directory / segment_name(self._next), "w+b")
        self._size = 0
        fsync_dir(self.directory)

    def __enter__(self) -> WalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WalReader:
    """Reads a WAL directory; safe while the gateway appends (a half-written tail is ignored)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"WAL directory {self.directory} does not exist")
        self.wal_id = _read_wal_id(self.directory)
        if self.wal_id is None and list_segments(self.directory):
            raise WalCorruption(f"{self.directory} has segments but no {META_FILE}")

    def segments(self) -> list[tuple[int, Path]]:
        return list_segments(self.directory)

    def records(self, start: int = 0) -> Iterator[WalRecord]:
        """Records at positions >= ``start``, in order; positions must be contiguous from ``start``."""
        segments = self.segments()
        first = max((i for i, (base, _) in enumerate(segments) if base <= start), default=0)
        expected = start
        for i in range(first, len(segments)):
            base, path = segments[i]
            records, _ = _read_segment(path, base, is_last=i == len(segments) - 1)
            for record in records:
                if record.position < start:
                    continue
                if record.position != expected:
                    raise WalCorruption(
                        f"{self.directory}: positions {expected}..{record.position - 1} are missing "
                        "(segments deleted before delivery?)"
                    )
                expected += 1
                yield record


# --- the acknowledged-up-to marker --------------------------------------------------------


class WalMarker(BaseModel):
    """Durable record of what Kafka holds: ``ack.json`` in the WAL directory."""

    format: int = FORMAT_VERSION
    wal_id: str = Field(description="The WAL this marker belongs to (wal.json).")
    topic: str = Field(description="The topic the records were delivered to.")
    next_position: int = Field(
        0, ge=0, description="Acknowledged up to: every record below this position is in Kafka."
    )
    sources: dict[str, int] = Field(
        default_factory=dict, description="Highest acknowledged sequence number per source."
    )
    scan_from: dict[int, int] = Field(
        default_factory=dict,
        description="Per partition, the offset from which records of this WAL not yet covered "
        "by next_position may be in the topic (read on every drain start).",
    )
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def read_marker(directory: Path) -> WalMarker | None:
    path = directory / MARKER_FILE
    return WalMarker.model_validate_json(path.read_text()) if path.exists() else None


def write_marker(directory: Path, marker: WalMarker) -> None:
    marker.updated_at = datetime.now(UTC)
    _write_json_atomic(directory / MARKER_FILE, marker.model_dump_json(indent=2))


