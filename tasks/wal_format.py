"""The edge gateway's write-ahead log (WAL) on disk: segments of CRC-checked records and the marker.

Specified in docs/wal-format.md. The gateway appends with ``WalWriter``; the runbook reads with
``WalReader`` and records what Kafka already holds in the ``ack.json`` marker. Damaged bytes
are told apart from a torn last write, kept aside in ``quarantine.json`` and never dropped
silently.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FORMAT_VERSION = 1
SEGMENT_SUFFIX = ".wal"
META_FILE = "wal.json"
MARKER_FILE = "ack.json"
QUARANTINE_FILE = "quarantine.json"
LOCK_FILE = "drain.lock"
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

_MAGIC = b"WR"
# magic, format version (u8), reserved (u8, 0), payload length (u32), crc32 of the payload (u32)
_HEADER = struct.Struct(">2sBBII")
# position (u64), per-source sequence number (u64), timestamp in ms since epoch (i64, >= 0),
# source id length (u16)
_FIELDS = struct.Struct(">QQqH")
# both at once, for the fast path that decodes runs of valid records
_HEADER_FIELDS = struct.Struct(">2sBBIIQQqH")
MIN_PAYLOAD_BYTES = _FIELDS.size + 1  # a source id has at least one byte
_U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1

H_WAL_ID = "wal-id"
H_GATEWAY = "wal-gateway"
H_SOURCE = "wal-source"
H_SEQ = "wal-seq"
H_POSITION = "wal-position"

log = logging.getLogger(__name__)


class WalCorruption(RuntimeError):
    """The WAL is damaged in a way no drain can work around; a human must look."""


# --- format -----------------------------------------------------------------------------


class WalRecord(NamedTuple):
    """One event in the WAL (a named tuple: a drain decodes hundreds of thousands of them)."""

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
    for name, number, top in (
        ("position", position, _U64_MAX),
        ("seq", seq, _U64_MAX),
        ("timestamp_ms", timestamp_ms, _I64_MAX),
    ):
        if not 0 <= number <= top:
            raise ValueError(f"{name} must be in 0..{top}, got {number}")
    payload = _FIELDS.pack(position, seq, timestamp_ms, len(src)) + src + value
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, 0, len(payload), zlib.crc32(payload)) + payload


def _header_problem(magic: bytes, version: int, reserved: int, length: int) -> str | None:
    if magic != _MAGIC:
        return f"bad magic {magic!r}"
    if version != FORMAT_VERSION:
        return f"unsupported record version {version}"
    if reserved != 0:
        return f"reserved byte is {reserved}, not 0"
    if not MIN_PAYLOAD_BYTES <= length <= MAX_PAYLOAD_BYTES:
        return f"payload length {length} outside {MIN_PAYLOAD_BYTES}..{MAX_PAYLOAD_BYTES}"
    return None


def _parse(data: bytes, offset: int) -> WalRecord | str:
    """The record at ``offset``, or what is wrong with it (its position is the caller's check)."""
    if len(data) - offset < _HEADER.size:
        return f"incomplete header ({len(data) - offset} of {_HEADER.size} bytes)"
    magic, version, reserved, length, crc = _HEADER.unpack_from(data, offset)
    problem = _header_problem(magic, version, reserved, length)
    if problem:
        return problem
    start = offset + _HEADER.size
    end = start + length
    if end > len(data):
        return f"incomplete record ({len(data) - start} of {length} payload bytes)"
    if zlib.crc32(memoryview(data)[start:end]) != crc:
        return "crc mismatch"
    position, seq, timestamp_ms, src_len = _FIELDS.unpack_from(data, start)
    if not 1 <= src_len <= length - _FIELDS.size:
        return f"source id length {src_len} does not fit a payload of {length} bytes"
    if timestamp_ms < 0:
        return f"negative timestamp {timestamp_ms}"
    src_start = start + _FIELDS.size
    try:
        source = data[src_start : src_start + src_len].decode()
    except UnicodeDecodeError:
        return "source id is not UTF-8"
    value = data[src_start + src_len : end]
    return WalRecord(position, source, seq, timestamp_ms, value, _HEADER.size + length)


def _decode_run(
    data: bytes, offset: int, position: int, records: list[WalRecord]
) -> tuple[int, int]:
    """Append the valid records that follow each other from ``offset``; returns (offset, position).

    The hot loop of every read: one ``unpack_from`` for header and fields, the CRC on a
    memoryview slice, source ids decoded once per distinct id. It checks exactly what
    ``_parse`` checks plus the expected position, and stops at the first record that fails
    any check, where ``scan_segment`` takes the careful path that names the problem.
    """
    unpack = _HEADER_FIELDS.unpack_from
    crc32 = zlib.crc32
    view = memoryview(data)
    append = records.append
    new = tuple.__new__
    sources: dict[bytes, str] = {}
    head, fixed, size = _HEADER.size, _HEADER_FIELDS.size, len(data)
    while offset + fixed <= size:
        magic, version, reserved, length, crc, pos, seq, ts, src_len = unpack(data, offset)
        end = offset + head + length
        if (
            pos != position
            or magic != _MAGIC
            or version != FORMAT_VERSION
            or reserved
            or length > MAX_PAYLOAD_BYTES
            or end > size
            or not 1 <= src_len <= length - _FIELDS.size
            or ts < 0
            or crc32(view[offset + head : end]) != crc
        ):
            break
        src_end = offset + fixed + src_len
        raw = data[offset + fixed : src_end]
        source = sources.get(raw)
        if source is None:
            try:
                source = sources[raw] = raw.decode()
            except UnicodeDecodeError:
                break
        append(new(WalRecord, (pos, source, seq, ts, data[src_end:end], head + length)))
        offset = end
        position += 1
    return offset, position


def decode_record(data: bytes) -> WalRecord:
    """Decode one record's bytes (e.g. a repaired quarantined record); ``WalCorruption`` if invalid."""
    parsed = _parse(data, 0)
    if isinstance(parsed, str):
        raise WalCorruption(parsed)
    if parsed.size != len(data):
        raise WalCorruption(f"{len(data) - parsed.size} byte(s) after the record")
    return parsed


def torn_tail(data: bytes, offset: int) -> str | None:
    """Why the bytes from ``offset`` to the end of the newest segment are a torn write, or None.

    A torn write is the record the writer was writing when it crashed: never fsynced, so never
    acknowledged to its source. The format shows one when the end of the file cuts the header,
    when nothing after the header reached disk (file systems zero-fill blocks they allocated
    but did not write; a real payload is never all zero, its source id length is at least 1),
    or when the end of the file cuts the payload and the bytes there do not match the CRC. A
    record whose length fits in the file but fails its check is damage, not a torn write: it
    may be an event the gateway already acknowledged.
    """
    rest = len(data) - offset
    if rest < _HEADER.size:
        return f"incomplete header ({rest} of {_HEADER.size} bytes)"
    after_header = offset + _HEADER.size
    if data.count(0, after_header) == len(data) - after_header:
        return "nothing after the header reached disk (zero-filled)"
    magic, version, reserved, length, crc = _HEADER.unpack_from(data, offset)
    if (
        _header_problem(magic, version, reserved, length) is None
        and after_header + length > len(data)
        and zlib.crc32(memoryview(data)[after_header:]) != crc
    ):
        return f"incomplete record ({len(data) - after_header} of {length} payload bytes)"
    return None


class WalDamage(BaseModel):
    """Bytes of a segment that hold no valid record, or positions that no segment holds."""

    segment: str = Field(description="Segment file name.")
    offset: int = Field(ge=0, description="First damaged byte in the segment.")
    length: int = Field(ge=0, description="Damaged bytes (0: positions missing, no bytes left).")
    first_position: int = Field(ge=0, description="The position the damage starts at.")
    positions: int = Field(
        ge=0,
        description="Positions the damaged bytes held, so events lost (see docs/wal-format.md).",
    )
    reason: str
    claimed: str | None = Field(
        None, description="What the damaged bytes' own record fields say (unverified)."
    )
    sha256: str = Field(description="SHA-256 of the damaged bytes.")
    head_hex: str = Field("", description="The first damaged bytes, hex.")

    @property
    def key(self) -> tuple[str, int, int]:
        return self.segment, self.offset, self.first_position

    @property
    def position_range(self) -> range:
        return range(self.first_position, self.first_position + self.positions)

    def pending_from(self, start: int) -> bool:
        """Not behind a marker at ``start`` (damage holding no position counts where it sits)."""
        if self.positions:
            return self.first_position + self.positions > start
        return self.first_position > start

    def describe(self) -> str:
        if self.positions:
            last = self.first_position + self.positions - 1
            held = f"position {self.first_position}" + (
                f"..{last}" if last > self.first_position else ""
            )
        else:
            held = f"no position (before {self.first_position})"
        return f"{self.segment} byte {self.offset} ({self.length} bytes, {held}): {self.reason}"


def _damage(
    segment: str, data: bytes, start: int, end: int, position: int, positions: int, reason: str
) -> WalDamage:
    raw = data[start:end]
    return WalDamage(
        segment=segment,
        offset=start,
        length=end - start,
        first_position=position,
        positions=positions,
        reason=reason,
        claimed=_claimed(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        head_hex=raw[:32].hex(),
    )


def _claimed(raw: bytes) -> str | None:
    """What a damaged record says about itself, for the human comparing it with the source."""
    if raw[:2] != _MAGIC or len(raw) < _HEADER.size + _FIELDS.size:
        return None
    position, seq, _, src_len = _FIELDS.unpack_from(raw, _HEADER.size)
    src_start = _HEADER.size + _FIELDS.size
    source = raw[src_start : src_start + src_len].decode(errors="replace")
    return f"position {position}, source {source!r}, seq {seq}"


@dataclass
class SegmentScan:
    """What one segment holds: valid records, damage, and (newest only) a torn tail."""

    records: list[WalRecord]
    damage: list[WalDamage]
    valid_end: int  # where the torn tail starts; the file size without one
    torn: str | None  # why the tail is a torn write
    end_position: int  # the position after the segment's last record or damage


def scan_segment(name: str, data: bytes, base: int, next_base: int | None = None) -> SegmentScan:
    """Records of one segment, its damaged byte ranges and its torn tail.

    ``next_base`` is the next segment's base position, None for the newest segment: only the
    newest one can end in a torn write (the writer truncates it before appending, and starts a
    new segment only after closing the previous one with an fsync). After damaged bytes the
    scan resynchronises on the next valid record (magic, header and CRC) whose position lies
    ahead; that position says how many positions the damage held. Damage at the end of an
    older segment held the positions up to the next segment's base; at the end of the newest,
    one position, because the writer resumes after it at the next position.
    """
    records: list[WalRecord] = []
    damage: list[WalDamage] = []
    offset, position, torn = 0, base, None
    while offset < len(data):
        offset, position = _decode_run(data, offset, position, records)
        if offset >= len(data):
            break
        parsed = _parse(data, offset)
        if isinstance(parsed, WalRecord) and parsed.position == position:
            records.append(parsed)
            offset += parsed.size
            position += 1
            continue
        problem = (
            parsed
            if isinstance(parsed, str)
            else f"position {parsed.position}, expected {position}"
        )
        resume = _next_record(data, offset, position, next_base)
        if resume is None and next_base is None:
            torn = torn_tail(data, offset)
            if torn:
                break
        if resume is not None:
            end, held = resume[0], resume[1] - position
            if end == offset:
                problem = f"positions {position}..{resume[1] - 1} are missing"
        else:
            end, held = len(data), 1 if next_base is None else next_base - position
            if held < 0:
                raise WalCorruption(
                    f"{name}: damage at byte {offset} sits at position {position}, past the next "
                    f"segment's base {next_base}"
                )
        damage.append(_damage(name, data, offset, end, position, held, problem))
        offset, position = end, position + held
    if next_base is not None and position != next_base:
        if position > next_base:
            raise WalCorruption(
                f"{name} holds positions up to {position - 1}, the next segment starts at {next_base}"
            )
        damage.append(
            _damage(
                name,
                data,
                len(data),
                len(data),
                position,
                next_base - position,
                f"positions {position}..{next_base - 1} are missing: the segment ends early",
            )
        )
    return SegmentScan(records, damage, offset, torn, position)


def _next_record(
    data: bytes, offset: int, position: int, next_base: int | None
) -> tuple[int, int] | None:
    """(offset, position) of the first valid record at or after ``offset`` that lies ahead."""
    at = data.find(_MAGIC, offset)
    while at != -1:
        parsed = _parse(data, at)
        if (
            isinstance(parsed, WalRecord)
            and parsed.position >= position
            and (next_base is None or parsed.position < next_base)
        ):
            return at, parsed.position
        at = data.find(_MAGIC, at + 1)
    return None


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


class WalMeta(BaseModel):
    """``wal.json``, written once when the WAL is created."""

    model_config = ConfigDict(extra="forbid")

    format: int = Field(strict=True, description="WAL format version: 1.")
    wal_id: str = Field(
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Random id of this WAL; goes into Kafka headers and the transactional.id.",
    )

    @field_validator("format")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(f"format {value} is not supported, this code reads {FORMAT_VERSION}")
        return value


def _read_wal_id(directory: Path) -> str | None:
    meta = directory / META_FILE
    if not meta.exists():
        return None
    try:
        return WalMeta.model_validate_json(meta.read_text()).wal_id
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise WalCorruption(f"{meta} is not a valid WAL description: {problems}") from None


class WalWriter:
    """Appends events to a WAL directory: what the edge gateway does with every event it receives.

    On open it truncates a torn last write left by a crash (``torn_bytes``, logged), so new
    records never follow garbage. Damage in the newest segment is kept for the drain to
    quarantine (``damage``, logged); when the segment ends in damage, new records go to a new
    segment.

    Example:
        ```python
        with WalWriter("/var/lib/gateway/wal") as wal:
            wal.append("opta-feed", seq=41, value=b'{"type":"goal"}')
        ```
    """

    def __init__(
        self, directory: str | os.PathLike[str], segment_max_bytes: int = 64 * 1024 * 1024
    ):
        self.directory = Path(directory)
        self.segment_max_bytes = segment_max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        wal_id = _read_wal_id(self.directory)
        if wal_id is None:
            wal_id = uuid.uuid4().hex
            meta = WalMeta(format=FORMAT_VERSION, wal_id=wal_id)
            _write_json_atomic(self.directory / META_FILE, meta.model_dump_json())
        self.wal_id = wal_id
        self.torn_bytes = 0
        self.damage: list[WalDamage] = []
        self._file = None
        self._size = 0
        self._next = 0
        segments = list_segments(self.directory)
        if segments:
            self._open_newest(*segments[-1])

    def _open_newest(self, base: int, path: Path) -> None:
        data = path.read_bytes()
        scan = scan_segment(path.name, data, base)
        self.damage, self._next = scan.damage, scan.end_position
        for d in scan.damage:
            log.warning(
                "%s: kept damaged bytes for the drain to quarantine: %s", path, d.describe()
            )
        if scan.torn:
            self.torn_bytes = len(data) - scan.valid_end
            with open(path, "r+b") as f:
                f.truncate(scan.valid_end)
                os.fsync(f.fileno())
            log.warning(
                "%s: truncated a torn last write of %d byte(s) at byte %d (%s)",
                path,
                self.torn_bytes,
                scan.valid_end,
                scan.torn,
            )
        last = scan.damage[-1] if scan.damage else None
        if last is not None and last.offset + last.length == scan.valid_end:
            # never append after bytes that cannot be read: the damage stays as it is, and the
            # next record opens a new segment at the position after it
            return
        self._file = open(path, "r+b")
        self._file.seek(scan.valid_end)
        self._size = scan.valid_end

    @property
    def next_position(self) -> int:
        return self._next

    def append(
        self,
        source: str,
        seq: int,
        value: bytes,
        timestamp_ms: int | None = None,
        *,
        sync: bool = True,
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


@dataclass
class WalScan:
    """Everything at or after a position: intact records, damage, and a torn tail to ignore."""

    records: list[WalRecord]
    damage: list[WalDamage]
    torn: str | None
    torn_bytes: int
    end_position: int  # the position the next appended record gets (at least the start)


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

    def scan(self, start: int = 0) -> WalScan:
        """Records at positions >= ``start`` in order, and the damage among them."""
        segments = self.segments()
        if not segments:
            return WalScan([], [], None, 0, start)
        first = max((i for i, (base, _) in enumerate(segments) if base <= start), default=0)
        records: list[WalRecord] = []
        damage: list[WalDamage] = []
        if segments[first][0] > start:
            base, path = segments[first]
            damage.append(
                _damage(
                    path.name,
                    b"",
                    0,
                    0,
                    start,
                    base - start,
                    f"positions {start}..{base - 1} are missing: no segment holds them "
                    "(deleted before delivery?)",
                )
            )
        for i in range(first, len(segments)):
            base, path = segments[i]
            next_base = segments[i + 1][0] if i + 1 < len(segments) else None
            data = path.read_bytes()
            scan = scan_segment(path.name, data, base, next_base)
            if scan.records and scan.records[0].position >= start:
                records += scan.records
            else:
                records += [r for r in scan.records if r.position >= start]
            damage += [d for d in scan.damage if d.pending_from(start)]
        torn_bytes = len(data) - scan.valid_end
        return WalScan(records, damage, scan.torn, torn_bytes, max(start, scan.end_position))

    def records(self, start: int = 0) -> list[WalRecord]:
        """Records at positions >= ``start``, in order; ``WalCorruption`` if any is damaged."""
        scan = self.scan(start)
        if scan.damage:
            raise WalCorruption(
                f"{self.directory}: " + "; ".join(d.describe() for d in scan.damage)
            )
        return scan.records


# --- quarantine -------------------------------------------------------------------------


class QuarantinedDamage(WalDamage):
    """Damage kept aside: where it was, why, and its bytes."""

    raw_base64: str = Field(description="The damaged bytes, base64.")
    quarantined_at: datetime
    reported_at: datetime | None = Field(
        None, description="When a run escalated it; None until then (the next run escalates it)."
    )

    def damage(self) -> WalDamage:
        return WalDamage.model_validate(self.model_dump(include=set(WalDamage.model_fields)))


class WalQuarantine(BaseModel):
    """``quarantine.json`` in the WAL directory: damaged bytes the drain did not deliver."""

    format: int = FORMAT_VERSION
    wal_id: str
    entries: list[QuarantinedDamage] = Field(default_factory=list)


def read_quarantine(directory: Path) -> WalQuarantine | None:
    path = directory / QUARANTINE_FILE
    return WalQuarantine.model_validate_json(path.read_text()) if path.exists() else None


def unreported_damage(directory: Path) -> list[WalDamage]:
    """Quarantined damage no run has escalated yet (e.g. its drain was killed before it could)."""
    quarantine = read_quarantine(directory)
    return [e.damage() for e in quarantine.entries if e.reported_at is None] if quarantine else []


def mark_reported(directory: Path, damage: list[WalDamage]) -> None:
    """Record that a run escalated these quarantine entries, so later runs do not again."""
    quarantine = read_quarantine(directory)
    keys = {d.key for d in damage}
    if quarantine is None or not keys:
        return
    now = datetime.now(UTC)
    for e in quarantine.entries:
        if e.key in keys and e.reported_at is None:
            e.reported_at = now
    _write_json_atomic(directory / QUARANTINE_FILE, quarantine.model_dump_json(indent=2))


def quarantine_damage(directory: Path, wal_id: str, damage: list[WalDamage]) -> list[WalDamage]:
    """Copy damaged bytes into ``quarantine.json``, each once; returns the entries added now.

    Call it before the marker moves past the damaged positions: a drain killed in between
    finds the damage again and, its key being in the file, does not add it twice.
    """
    current = read_quarantine(directory) or WalQuarantine(wal_id=wal_id)
    if current.wal_id != wal_id:
        raise WalCorruption(
            f"{directory / QUARANTINE_FILE} belongs to WAL {current.wal_id}, not {wal_id}"
        )
    known = {e.key for e in current.entries}
    new = [d for d in damage if d.key not in known]
    for d in new:
        with open(directory / d.segment, "rb") as f:
            f.seek(d.offset)
            raw = f.read(d.length)
        if hashlib.sha256(raw).hexdigest() != d.sha256:
            raise WalCorruption(
                f"{d.segment} changed at byte {d.offset} while it was being quarantined"
            )
        current.entries.append(
            QuarantinedDamage(
                **d.model_dump(),
                raw_base64=base64.b64encode(raw).decode(),
                quarantined_at=datetime.now(UTC),
            )
        )
    if new:
        _write_json_atomic(directory / QUARANTINE_FILE, current.model_dump_json(indent=2))
    return new


# --- the acknowledged-up-to marker --------------------------------------------------------


class WalMarker(BaseModel):
    """Durable record of what Kafka holds: ``ack.json`` in the WAL directory."""

    format: int = FORMAT_VERSION
    wal_id: str = Field(description="The WAL this marker belongs to (wal.json).")
    topic: str = Field(description="The topic the records were delivered to.")
    next_position: int = Field(
        0,
        ge=0,
        description="Acknowledged up to: every record below this position is in Kafka or, if "
        "damaged, in quarantine.json.",
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
