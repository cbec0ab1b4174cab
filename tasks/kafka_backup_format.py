"""Kafka topic backups in S3: the object layout, the segment format, the manifest, and the pure
decisions (which ranges to back up, what remains after a crash, whether a manifest holds).

Backing up is in tasks.kafka_backup, restoring in tasks.kafka_restore.

Layout under ``<store prefix>/<topic>/<backup id>/``:

- ``backup.json``: the plan, written first: per partition the offset range [start, end) to back
  up and the segment size. A resumed run reads it, so it backs up the same ranges the same way.
- ``p<partition>/<seq>-<first offset>-<last offset>.seg.gz``: segments, gzip of records in offset
  order. The key follows from the topic's contents and the plan alone, so a run that repeats a
  segment (after a crash) overwrites the same key with the same bytes: never a duplicate object.
  Each carries its record count and records digest as object metadata.
- ``manifest.json``: written last; its presence is what makes a backup complete. Per partition:
  records, first and last offset, checksum; per segment: key, size, object SHA-256, records digest.
- ``restores/<target topic>.json``: progress of a restore from this backup into that topic.

Segment record (big-endian): offset q, timestamp q, timestamp type b, key length i (-1: null),
value length i (-1: null), header count H; key; value; per header: name length H, value length i
(-1: null), name (UTF-8), value. The *records digest* is the SHA-256 of each record's content (the
same bytes from key length on: key, value, headers, not offset or timestamp), so a restored topic,
read back, has the same digest when its keys, values, headers and order are the same.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, BaseModel, Field

FORMAT = "runbooks-kafka-backup/1"
PLAN = "backup.json"
MANIFEST = "manifest.json"
RESTORES = "restores"

_POS = struct.Struct(">qqb")  # offset, timestamp, timestamp type
_CONTENT = struct.Struct(">iiH")  # key length, value length, header count
_HEADER = struct.Struct(">Hi")  # name length, value length
_RECORD = struct.Struct(">qqbiiH")  # _POS and _CONTENT together: one unpack per record
_SEGMENT = re.compile(r"p(\d{5})/(\d{8})-(\d{20})-(\d{20})\.seg\.gz")
_BACKUP_ID = re.compile(r"\d{8}T\d{6}Z(?:-[a-z0-9-]{1,40})?")


class Record(NamedTuple):
    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


# --- keys -----------------------------------------------------------------------------------


def backup_root(prefix: str, topic: str, backup_id: str) -> str:
    return f"{prefix}/{topic}/{backup_id}/" if prefix else f"{topic}/{backup_id}/"


def segment_key(partition: int, seq: int, first: int, last: int) -> str:
    """A segment's key below the backup root."""
    return f"p{partition:05d}/{seq:08d}-{first:020d}-{last:020d}.seg.gz"


class SegmentKey(NamedTuple):
    partition: int
    seq: int
    first: int
    last: int


def parse_segment_key(relative: str) -> SegmentKey | None:
    """The parts of a segment key below the backup root; None for any other object."""
    m = _SEGMENT.fullmatch(relative)
    return SegmentKey(*(int(g) for g in m.groups())) if m else None


def is_backup_id(value: str) -> bool:
    return bool(_BACKUP_ID.fullmatch(value))


def _checked_backup_id(value: str | None) -> str | None:
    if value in (None, "", "None"):  # an empty form field, or a label the alert does not have
        return None
    if not is_backup_id(value):
        raise ValueError("a backup id looks like 20260105T030000Z")
    return value


OptionalBackupId = Annotated[str | None, AfterValidator(_checked_backup_id)]
"""A backup id (``20260105T030000Z``) or nothing, as a runbook parameter."""


def new_backup_id(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ")


# --- segment format ---------------------------------------------------------------------------


def record_content(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, Any]] | None
) -> bytes:
    """The bytes a record's digest covers: key, value and headers, in the segment's encoding."""
    head = _CONTENT.pack(
        -1 if key is None else len(key),
        -1 if value is None else len(value),
        len(headers) if headers else 0,
    )
    if not headers:  # the common case, kept short: it runs once per record
        return head + (key or b"") + (value or b"")
    parts = [head, key or b"", value or b""]
    for name, hv in headers:
        raw = name.encode()
        parts.append(_HEADER.pack(len(raw), -1 if hv is None else len(hv)))
        parts.append(raw)
        if hv is not None:
            parts.append(hv if isinstance(hv, bytes) else str(hv).encode())
    return b"".join(parts)


class SegmentWriter:
    """Encodes records into one segment's bytes and digests their content."""

    __slots__ = ("_parts", "_contents", "size", "records", "first", "last")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._contents: list[bytes] = []
        self.size = 0
        self.records = 0
        self.first = -1
        self.last = -1

    def add(self, offset: int, timestamp: int, ts_type: int, content: bytes) -> None:
        self._parts.append(_POS.pack(offset, timestamp, ts_type))
        self._parts.append(content)
        self._contents.append(content)
        self.size += _POS.size + len(content)
        if self.records == 0:
            self.first = offset
        self.last = offset
        self.records += 1

    def body(self) -> bytes:
        return b"".join(self._parts)

    def digest(self) -> str:
        # one update of the joined contents: much faster than one per record
        return hashlib.sha256(b"".join(self._contents)).hexdigest()


def compress(raw: bytes, level: int) -> bytes:
    """gzip (``zcat`` reads it); zlib releases the GIL, so uploads compress on worker threads."""
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


def decompress(data: bytes) -> bytes:
    return zlib.decompress(data, 31)


def iter_segment(raw: bytes, contents: bool = True) -> Iterator[tuple[Record, bytes]]:
    """Each record of a decompressed segment, with its content bytes (what the digest covers;
    empty when ``contents`` is off: a restore needs them only for records it skips)."""
    unpack_pos, unpack_content = _POS.unpack_from, _CONTENT.unpack_from
    i, n = 0, len(raw)
    while i < n:
        offset, ts, ts_type = unpack_pos(raw, i)
        i += 17
        start = i
        klen, vlen, nh = unpack_content(raw, i)
        i += 10
        if klen < 0:
            key = None
        else:
            key = raw[i : i + klen]
            i += klen
        if vlen < 0:
            value = None
        else:
            value = raw[i : i + vlen]
            i += vlen
        headers, i = _headers(raw, i, nh)
        if i > n:
            raise ValueError("segment ends inside a record")
        yield Record(offset, ts, ts_type, key, value, headers), raw[start:i] if contents else b""


def _headers(raw: bytes, i: int, count: int) -> tuple[list[tuple[str, bytes | None]], int]:
    """``count`` headers (name, value or None) of a record at ``i``; and the offset after them."""
    unpack_header = _HEADER.unpack_from
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        nlen, hlen = unpack_header(raw, i)
        i += 6
        name = raw[i : i + nlen].decode()
        i += nlen
        if hlen < 0:
            headers.append((name, None))
        else:
            headers.append((name, raw[i : i + hlen]))
            i += hlen
    return headers, i


def iter_sendable(
    raw: bytes,
) -> Iterator[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]] | None]]:
    """(timestamp, key, value, headers or None) of each record of a decompressed segment: what a
    restore sends. ``iter_segment`` without what a send does not need (offsets, the content
    bytes, a Record per record): the restore's hot loop, one unpack per record."""
    unpack_record = _RECORD.unpack_from
    i, n = 0, len(raw)
    while i < n:
        _, ts, _, klen, vlen, nh = unpack_record(raw, i)
        i += 27
        if klen < 0:
            key = None
        else:
            key = raw[i : i + klen]
            i += klen
        if vlen < 0:
            value = None
        else:
            value = raw[i : i + vlen]
            i += vlen
        headers: list[tuple[str, bytes | None]] | None = None
        if nh:  # no call for the common record without headers
            headers, i = _headers(raw, i, nh)
        if i > n:
            raise ValueError("segment ends inside a record")
        yield ts, key, value, headers


# --- plan and manifest ------------------------------------------------------------------------


class TopicConfigs(BaseModel):
    """The source topic's configs (retention, cleanup.policy, ...) as the broker described them
    when the backup started; a restore creates a missing target with them."""

    configs: dict[str, str] = Field(default_factory=dict)
    which: str = Field(
        description="'overrides': the entries the broker marks as set on the topic; 'reported': "
        "every entry it reported, because it marks none as set on the topic (tansu reports its "
        "topics' overrides as defaults)."
    )


DYNAMIC_TOPIC_CONFIG = 1  # ConfigSource of a value set on the topic (Kafka's DescribeConfigs)


def configs_to_keep(entries: Iterable[tuple[str, str | None, int, bool, bool]]) -> TopicConfigs:
    """From DescribeConfigs entries (name, value, source, read-only, sensitive), what a backup
    records: the topic's own overrides when the broker marks any entry as one, else every entry
    it reported (it cannot tell overrides from defaults). Read-only, sensitive and valueless
    entries are never recorded: a create could not set them."""
    usable = [
        (name, value, source)
        for name, value, source, read_only, sensitive in entries
        if value is not None and not read_only and not sensitive
    ]
    overrides = {n: v for n, v, source in usable if source == DYNAMIC_TOPIC_CONFIG}
    if overrides:
        return TopicConfigs(configs=dict(sorted(overrides.items())), which="overrides")
    return TopicConfigs(configs=dict(sorted((n, v) for n, v, _ in usable)), which="reported")


def config_drift(backed_up: dict[str, str], target: dict[str, str]) -> list[str]:
    """How an existing target's configs differ from the backup's (a restore reports, never sets
    them: the target's owner chose them)."""
    return [
        f"{name}: {target.get(name, 'not set (broker default)')} in the target, {value} in the backup"
        for name, value in sorted(backed_up.items())
        if target.get(name) != value
    ]


class BackupPlan(BaseModel):
    """What one backup covers, fixed when it starts (``backup.json``)."""

    format: str = FORMAT
    topic: str
    backup_id: str
    created_at: datetime
    ranges: dict[int, tuple[int, int]] = Field(
        description="Per partition, the offsets [start, end) to back up."
    )
    segment_bytes: int = Field(description="A segment is cut once its records reach this size.")
    compress_level: int = Field(description="gzip level of the segments.")
    selection: dict[str, Any] = Field(
        default_factory=dict, description="How the ranges were chosen (offsets, times), as asked."
    )
    topic_configs: TopicConfigs | None = Field(
        None, description="The topic's configs when the backup started (None: an older backup)."
    )


class SegmentInfo(BaseModel):
    key: str = Field(description="Below the backup root.")
    partition: int
    seq: int
    first_offset: int
    last_offset: int
    records: int
    size: int = Field(description="Bytes of the object (compressed).")
    sha256: str = Field(description="SHA-256 of the object.")
    records_sha256: str = Field(description="Digest of the records' content (see module doc).")


class PartitionSummary(BaseModel):
    partition: int
    start: int
    end: int
    records: int
    first_offset: int | None
    last_offset: int | None
    segments: int
    checksum: str = Field(description="SHA-256 over its segments' records digests, in order.")


class Manifest(BaseModel):
    """A complete backup (``manifest.json``, written last)."""

    format: str = FORMAT
    topic: str
    backup_id: str
    created_at: datetime
    completed_at: datetime
    plan: BackupPlan
    partitions: dict[int, PartitionSummary]
    segments: list[SegmentInfo]
    records: int
    bytes: int = Field(description="Bytes of all segments (compressed).")
    topic_configs: TopicConfigs | None = Field(
        None, description="The topic's configs when the backup started (None: an older backup)."
    )


def partition_checksum(digests: Iterable[str]) -> str:
    h = hashlib.sha256()
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def summarize(plan: BackupPlan, segments: list[SegmentInfo]) -> dict[int, PartitionSummary]:
    """Per planned partition: records, offsets and checksum of its segments."""
    out: dict[int, PartitionSummary] = {}
    for p, (start, end) in sorted(plan.ranges.items()):
        segs = sorted((s for s in segments if s.partition == p), key=lambda s: s.seq)
        out[p] = PartitionSummary(
            partition=p,
            start=start,
            end=end,
            records=sum(s.records for s in segs),
            first_offset=segs[0].first_offset if segs else None,
            last_offset=segs[-1].last_offset if segs else None,
            segments=len(segs),
            checksum=partition_checksum(s.records_sha256 for s in segs),
        )
    return out


# --- decisions ----------------------------------------------------------------------------------


def plan_ranges(
    bounds: dict[int, tuple[int, int]],
    from_offset: int | None = None,
    to_offset: int | None = None,
    time_starts: dict[int, int | None] | None = None,
    time_ends: dict[int, int | None] | None = None,
) -> dict[int, tuple[int, int]]:
    """Per partition, the offsets [start, end) a backup covers.

    ``bounds`` is each partition's (earliest, end) offset now. ``from_offset``/``to_offset``
    (end exclusive) apply to every partition; ``time_starts``/``time_ends`` are the first offsets
    at or after the asked times (None: no record that late). Every limit narrows; a partition
    left with nothing is left out.
    """
    out: dict[int, tuple[int, int]] = {}
    for p, (low, end) in sorted(bounds.items()):
        start, stop = low, end
        if from_offset is not None:
            start = max(start, from_offset)
        if to_offset is not None:
            stop = min(stop, to_offset)
        if time_starts is not None:
            at = time_starts.get(p)
            start = max(start, end if at is None else at)
        if time_ends is not None:
            at = time_ends.get(p)
            stop = min(stop, end if at is None else at)
        if start < stop:
            out[p] = (start, stop)
    return out


class Resume(NamedTuple):
    """Where a partition's backup continues: the next segment's number and first offset."""

    seq: int
    offset: int
    done: bool
    stray: list[str]  # segments past a gap (a crash between parallel uploads): rewritten


def resume_point(
    start: int, end: int, found: list[SegmentKey], keys: dict[SegmentKey, str]
) -> Resume:
    """From the segments of one partition already in S3, where its backup continues.

    Segments are numbered from 0; only the unbroken run from 0 counts (uploads run in parallel,
    so a crash can leave segment 5 without segment 4). Segments after a gap are stray: the run
    writes their keys again (the same bytes) or, if they are not written again, deletes them.
    """
    by_seq = {k.seq: k for k in found}
    seq, offset = 0, start
    while seq in by_seq:
        offset = by_seq[seq].last + 1
        seq += 1
    stray = sorted(keys[k] for k in found if k.seq >= seq)
    return Resume(seq=seq, offset=offset, done=offset >= end, stray=stray)


def check_manifest(manifest: Manifest, objects: dict[str, int]) -> list[str]:
    """Problems of a backup: ``objects`` maps each key below its root to its size in S3."""
    problems: list[str] = []
    for s in manifest.segments:
        size = objects.get(s.key)
        if size is None:
            problems.append(f"segment {s.key} is missing")
        elif size != s.size:
            problems.append(f"segment {s.key} is {size} bytes, the manifest says {s.size}")
    listed = {k for k in objects if parse_segment_key(k)}
    extra = listed - {s.key for s in manifest.segments}
    if extra:
        problems.append(f"{len(extra)} segment(s) not in the manifest, e.g. {sorted(extra)[0]}")
    expected = summarize(manifest.plan, manifest.segments)
    for p, want in expected.items():
        got = manifest.partitions.get(p)
        if got is None:
            problems.append(f"partition {p} is planned but not in the manifest")
            continue
        segs = sorted((s for s in manifest.segments if s.partition == p), key=lambda s: s.seq)
        if [s.seq for s in segs] != list(range(len(segs))):
            problems.append(f"partition {p}: segment numbers are not 0..{len(segs) - 1}")
        prev = want.start - 1
        for s in segs:
            if s.first_offset <= prev or s.last_offset < s.first_offset:
                problems.append(f"partition {p}: segment {s.key} overlaps or is out of order")
            prev = s.last_offset
        if prev >= want.end:
            problems.append(f"partition {p}: records past the planned end {want.end}")
        if got.records != want.records:
            problems.append(
                f"partition {p}: {got.records} records, its segments hold {want.records}"
            )
        if got.checksum != want.checksum:
            problems.append(f"partition {p}: checksum does not match its segments")
    if set(manifest.partitions) - set(expected):
        problems.append("the manifest has partitions the plan does not")
    if manifest.records != sum(s.records for s in manifest.segments):
        problems.append("total records differ from the sum of the segments")
    return problems


def restore_skip(restored: int, backed_up: int) -> int:
    """How many of a partition's backed-up records a resumed restore skips: those an earlier
    run put in the target (an idempotent producer leaves a prefix of what it sent, in order)."""
    if restored > backed_up:
        raise ValueError(
            f"the target holds {restored} records after the restore's start, more than the "
            f"{backed_up} backed up: something else writes to it"
        )
    return restored


def backup_to_resume(
    found: list[tuple[str, bool, dict[str, Any] | None]], selection: dict[str, Any]
) -> str | None:
    """The unfinished backup a run continues: ``found`` is (backup id, complete, selection of its
    plan) per backup of the topic. The newest unfinished one with the same selection, unless a
    newer backup completed since (then the unfinished one is abandoned and a new one starts)."""
    for backup_id, complete, chosen in sorted(found, key=lambda f: f[0], reverse=True):
        if complete:
            return None
        if chosen == selection:
            return backup_id
    return None
