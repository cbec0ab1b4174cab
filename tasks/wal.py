"""Edge-gateway WAL tasks: measuring the backlog, draining it to Kafka, verifying delivery.

The on-disk format (segments, records, the ``ack.json`` marker) lives in ``tasks.wal_format``
and is specified in docs/wal-format.md.

Draining delivers each record exactly once, across crashes: a transactional producer (so
idempotent, acks=all) whose ``transactional.id`` belongs to the WAL fences any earlier
drainer, then the drain reads the topic from the marker's ``scan_from`` offsets to find the
records an interrupted drain delivered without recording them, and skips those.

For speed the drain overlaps what it can without weakening that: fencing and reading the
topic run while the WAL is decoded; batches are large transactions; the marker after a
commit is written on a thread of its own while the next batch is produced, and is durable
before the next commit. The marker on disk is therefore at most one committed batch behind,
and the records it does not cover lie after its ``scan_from`` offsets, where the next drain
looks (docs/wal-format.md, "Draining exactly once").
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import socket
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from operator import attrgetter
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from prefect import task
from pydantic import BaseModel, Field

from blocks.edge_gateway import EdgeGateway
from blocks.kafka import KafkaCluster
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.wal_format import (
    H_GATEWAY,
    H_POSITION,
    H_SEQ,
    H_SOURCE,
    H_WAL_ID,
    LOCK_FILE,
    MARKER_FILE,
    QUARANTINE_FILE,
    WalCorruption,
    WalDamage,
    WalMarker,
    WalReader,
    WalRecord,
    WalScan,
    fsync_dir,
    mark_reported,
    quarantine_damage,
    read_marker,
    unreported_damage,
    write_marker,
)


class KafkaUnavailable(RuntimeError):
    """Kafka did not answer or confirm in time. The marker did not move past it: safe to retry."""


class DrainConflict(RuntimeError):
    """Another drain owns this WAL (local lock held, or fenced by a newer drainer elsewhere)."""


# --- pure decisions -----------------------------------------------------------------------


class WalAction(StrEnum):
    NOTHING_PENDING = "NOTHING_PENDING"
    DRAIN = "DRAIN"
    WAIT_FOR_NETWORK = "WAIT_FOR_NETWORK"
    INVESTIGATE = "INVESTIGATE"


def decide(pending: int, threshold: int, kafka_reachable: bool, damaged: int = 0) -> WalAction:
    """Seed 000, Stadium Network Flap: what to do about a WAL backlog.

    Kafka reachable means the network is back: drain, whatever the size. Unreachable and at most
    ``threshold`` pending is a blip the WAL absorbs (wait); above it, a human looks at the uplink.
    ``damaged`` regions after the marker need a drain too, even when they hold no event: the
    drain quarantines them and the run escalates.
    """
    if pending <= 0 and damaged <= 0:
        return WalAction.NOTHING_PENDING
    if kafka_reachable:
        return WalAction.DRAIN
    return WalAction.INVESTIGATE if pending > threshold else WalAction.WAIT_FOR_NETWORK


def advance_marker(next_position: int, confirmed: Iterable[int]) -> int:
    """New acknowledged-up-to position: past every confirmed record with nothing unconfirmed below.

    Delivery reports arrive out of order across partitions; a confirmed record above an
    unconfirmed one cannot be acknowledged yet, or a crash would lose the unconfirmed one.
    """
    # a set is used as it is: the drain passes one that grows with every committed batch
    done = confirmed if isinstance(confirmed, set | frozenset) else set(confirmed)
    while next_position in done:
        next_position += 1
    return next_position


def quarantined_positions(damage: Iterable[WalDamage]) -> set[int]:
    """Positions whose events only the quarantine holds: the marker passes them, nobody sends them."""
    return {p for d in damage for p in d.position_range}


def describe_damage(damage: list[WalDamage], limit: int = 3) -> str:
    """One line naming damaged regions for checks and escalations."""
    shown = "; ".join(d.describe() for d in damage[:limit])
    more = f"; and {len(damage) - limit} more" if len(damage) > limit else ""
    lost = len(quarantined_positions(damage))
    return f"{len(damage)} damaged region(s) holding {lost} event(s): {shown}{more}"


def deletable_segments(bases: list[int], next_position: int) -> list[int]:
    """Bases of segments whose every record is below the marker; never the newest (being written)."""
    return [base for base, nxt in zip(bases, bases[1:], strict=False) if nxt <= next_position]


class SeqRange(BaseModel):
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def to_ranges(numbers: Iterable[int]) -> list[SeqRange]:
    """Collapse integers into sorted inclusive ranges: 1,2,3,7 -> 1-3, 7."""
    out: list[SeqRange] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1].last + 1:
            out[-1].last = n
        else:
            out.append(SeqRange(first=n, last=n))
    return out


class SourceSequences(BaseModel):
    source: str
    count: int
    first: int
    last: int
    gaps: list[SeqRange] = Field(default_factory=list, description="Sequence numbers never seen.")
    duplicates: list[int] = Field(
        default_factory=list, description="Seen more than once, or already acknowledged earlier."
    )
    reordered: list[int] = Field(
        default_factory=list, description="Arrived after a higher sequence number of the source."
    )

    def problems(self) -> list[str]:
        out = []
        if self.gaps:
            missing = sum(g.last - g.first + 1 for g in self.gaps)
            out.append(
                f"source {self.source}: gap, missing seq {', '.join(map(str, self.gaps))} "
                f"({missing} event(s))"
            )
        if self.duplicates:
            out.append(
                f"source {self.source}: duplicate seq {', '.join(map(str, to_ranges(self.duplicates)))}"
            )
        if self.reordered:
            out.append(
                f"source {self.source}: out of order seq {', '.join(map(str, to_ranges(self.reordered)))}"
            )
        return out


class SequenceReport(BaseModel):
    """Gaps, duplicates and reordering of per-source sequence numbers."""

    sources: dict[str, SourceSequences] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        return [p for s in self.sources.values() for p in s.problems()]


def check_sequences(
    events: Iterable[tuple[str, int]], baseline: Mapping[str, int] | None = None
) -> SequenceReport:
    """Check (source, seq) pairs in delivery order.

    ``baseline`` holds the last sequence number already acknowledged per source (from the
    marker), so a gap right after the previous drain is seen too.
    """
    baseline = baseline or {}
    events = list(events)
    clean = _continuous_sources(events, baseline)
    return clean if clean is not None else _check_each(events, baseline)


def _check_each(events: list[tuple[str, int]], baseline: Mapping[str, int]) -> SequenceReport:
    """``check_sequences`` event by event: finds every gap, duplicate and late arrival."""
    seen: dict[str, Counter[int]] = defaultdict(Counter)
    high: dict[str, int] = {}
    reordered: dict[str, list[int]] = defaultdict(list)
    order: list[str] = []
    for source, seq in events:
        if source not in seen:
            order.append(source)
        prior = baseline.get(source)
        top = high.get(source)
        if (
            top is not None
            and seq < top
            and not seen[source][seq]
            and (prior is None or seq > prior)
        ):
            reordered[source].append(seq)
        seen[source][seq] += 1
        high[source] = seq if top is None else max(top, seq)
    report = SequenceReport()
    for source in order:
        counts = seen[source]
        prior = baseline.get(source)
        start = prior + 1 if prior is not None else min(counts)
        present = {s for s in counts if s >= start}
        gaps = to_ranges(set(range(start, high[source] + 1)) - present) if present else []
        dups = sorted(s for s, n in counts.items() if n > 1 or (prior is not None and s <= prior))
        report.sources[source] = SourceSequences(
            source=source,
            count=sum(counts.values()),
            first=min(counts),
            last=high[source],
            gaps=gaps,
            duplicates=dups,
            reordered=reordered[source],
        )
    return report


def _continuous_sources(
    events: list[tuple[str, int]], baseline: Mapping[str, int]
) -> SequenceReport | None:
    """The report when every source counts up by one from its baseline, else None.

    The common case, checked with list comparisons instead of a counter per event: a drain
    checks hundreds of thousands of events.
    """
    per_source: dict[str, list[int]] = {}
    for source, seq in events:
        try:
            per_source[source].append(seq)
        except KeyError:
            per_source[source] = [seq]
    report = SequenceReport()
    for source, seqs in per_source.items():
        first, prior = seqs[0], baseline.get(source)
        if (prior is not None and first != prior + 1) or seqs != list(
            range(first, first + len(seqs))
        ):
            return None
        report.sources[source] = SourceSequences(
            source=source, count=len(seqs), first=first, last=seqs[-1]
        )
    return report


# --- measuring ----------------------------------------------------------------------------


class SourcePending(BaseModel):
    count: int
    first_seq: int
    last_seq: int


class WalStatus(BaseModel):
    """What the gateway's WAL holds that Kafka does not (`gateway_wal_pending_events`)."""

    gateway: str
    directory: str
    pending_events: int
    pending_bytes: int
    oldest_pending_at: datetime | None
    oldest_pending_age_s: float | None
    per_source: dict[str, SourcePending]
    damaged: list[WalDamage] = Field(
        default_factory=list,
        description="Damaged bytes or missing positions after the marker; their positions are "
        "counted in pending_events (a drain quarantines them).",
    )
    torn_tail_bytes: int = Field(
        0, description="A torn last write at the end of the newest segment: ignored, not pending."
    )
    unreported_quarantine: list[WalDamage] = Field(
        default_factory=list,
        description=f"Damage in {QUARANTINE_FILE} that no run has escalated yet.",
    )
    acked_up_to: int = Field(
        description="The marker: every record below this position is in Kafka or quarantined."
    )
    end_position: int = Field(description="Position the next appended record will get.")
    segments: int
    wal_bytes: int
    capacity_events: int
    capacity_bytes: int
    capacity_used: float = Field(
        description="Fraction of capacity the backlog uses (events or bytes)."
    )

    def describe(self) -> str:
        """One line for reports: the backlog against the gateway's capacity."""
        age = (
            f", oldest {self.oldest_pending_age_s:.0f}s old"
            if self.oldest_pending_age_s is not None
            else ""
        )
        damaged = f", {len(self.damaged)} damaged region(s)" if self.damaged else ""
        return (
            f"{self.pending_events} events / {self.pending_bytes} bytes pending ({self.capacity_used:.0%} "
            f"of {self.capacity_events} events / {self.capacity_bytes} bytes){age}{damaged}"
        )


@task(**runbook_task_options())
def get_wal_identity(gateway: EdgeGateway) -> str:
    """Where the WAL is: this host's name and the real path of its directory (``~``, ``..`` and
    symlinks resolved), so blocks and gateways naming one directory differently agree.

    Local file system calls only: nothing to time out or retry.
    """
    return f"{socket.gethostname()}:{gateway.wal_path().expanduser().resolve()}"


@task(**runbook_task_options())
def measure_wal(gateway: EdgeGateway) -> WalStatus:
    """Pending events (after the marker), their bytes, age and per-source counts, and damage."""
    reader = WalReader(gateway.wal_path())
    marker = read_marker(reader.directory)
    acked = marker.next_position if marker else 0
    scan = reader.scan(acked)
    count = len(quarantined_positions(scan.damage))
    size = sum(d.length for d in scan.damage)
    oldest: int | None = None
    per_source: dict[str, SourcePending] = {}
    for r in scan.records:
        count += 1
        size += r.size
        oldest = r.timestamp_ms if oldest is None else min(oldest, r.timestamp_ms)
        s = per_source.get(r.source)
        if s is None:
            per_source[r.source] = SourcePending(count=1, first_seq=r.seq, last_seq=r.seq)
        else:
            s.count += 1
            s.last_seq = r.seq
    segments = reader.segments()
    oldest_at = datetime.fromtimestamp(oldest / 1000, UTC) if oldest is not None else None
    return WalStatus(
        gateway=gateway.gateway_name,
        directory=str(reader.directory),
        pending_events=count,
        pending_bytes=size,
        oldest_pending_at=oldest_at,
        oldest_pending_age_s=(datetime.now(UTC) - oldest_at).total_seconds() if oldest_at else None,
        per_source=per_source,
        damaged=scan.damage,
        torn_tail_bytes=scan.torn_bytes,
        unreported_quarantine=unreported_damage(reader.directory),
        acked_up_to=acked,
        end_position=scan.end_position,
        segments=len(segments),
        wal_bytes=sum(p.stat().st_size for _, p in segments),
        capacity_events=gateway.capacity_events,
        capacity_bytes=gateway.capacity_bytes,
        capacity_used=max(count / gateway.capacity_events, size / gateway.capacity_bytes),
    )


@task(**runbook_task_options())
def mark_quarantine_reported(gateway: EdgeGateway, damage: list[WalDamage]) -> None:
    """Record in the quarantine file that this run escalated ``damage``: later runs do not again."""
    mark_reported(gateway.wal_path(), damage)


class KafkaReachability(BaseModel):
    reachable: bool
    topic_exists: bool
    partitions: int
    detail: str


@task(**runbook_task_options())
def check_kafka_reachable(cluster: KafkaCluster, topic: str) -> KafkaReachability:
    """Can the gateway's topic be reached now (metadata answered within the cluster's timeout)?"""
    try:
        md = cluster.get_admin_client().list_topics(topic=topic, timeout=cluster.request_timeout_s)
    except KafkaException as exc:
        return KafkaReachability(reachable=False, topic_exists=False, partitions=0, detail=str(exc))
    topic_md = md.topics.get(topic)
    if topic_md is None or topic_md.error is not None:
        err = topic_md.error if topic_md else "missing"
        return KafkaReachability(
            reachable=True,
            topic_exists=False,
            partitions=0,
            detail=f"topic {topic} not found: {err}",
        )
    n = len(topic_md.partitions)
    return KafkaReachability(
        reachable=True,
        topic_exists=True,
        partitions=n,
        detail=f"{len(md.brokers)} broker(s) answered; {topic} has {n} partition(s)",
    )


# --- reading the topic back -----------------------------------------------------------------


class TopicRecord(BaseModel):
    """A record of this WAL found in the topic, by its headers."""

    partition: int
    offset: int
    position: int
    source: str
    seq: int


def kafka_failure(exc: KafkaException, doing: str) -> Exception:
    """Map a client error to a domain error: transient ones can be retried from the marker."""
    err: KafkaError = exc.args[0]
    if err.code() == KafkaError._FENCED or err.code() == KafkaError.PRODUCER_FENCED:
        return DrainConflict(f"{doing}: a newer drainer of this WAL fenced this one ({err.str()})")
    transient = {
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._MSG_TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
    }
    if err.retriable() or err.txn_requires_abort() or err.code() in transient:
        return KafkaUnavailable(
            f"{doing}: Kafka did not confirm ({err.str()}); marker unchanged, safe to retry"
        )
    return RuntimeError(f"{doing}: {err.str()}")


def _topic_partitions(cluster: KafkaCluster, topic: str) -> list[int]:
    try:
        md = cluster.get_admin_client().list_topics(topic=topic, timeout=cluster.request_timeout_s)
    except KafkaException as exc:
        raise kafka_failure(exc, f"reading metadata of {topic}") from exc
    topic_md = md.topics.get(topic)
    if topic_md is None or topic_md.error is not None:
        raise RuntimeError(f"topic {topic} not found: {topic_md.error if topic_md else 'missing'}")
    return sorted(topic_md.partitions)


def _end_offsets(cluster: KafkaCluster, topic: str, partitions: list[int]) -> dict[int, int]:
    """High watermarks. tansu may under-report them, which only makes later reads start earlier."""
    consumer = cluster.get_consumer(
        f"wal-drain-{uuid.uuid4().hex}", **{"enable.auto.commit": False}
    )
    try:
        return {
            p: consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=cluster.request_timeout_s
            )[1]
            for p in partitions
        }
    except KafkaException as exc:
        raise kafka_failure(exc, f"reading end offsets of {topic}") from exc
    finally:
        consumer.close()


def read_wal_records_in_topic(
    cluster: KafkaCluster, topic: str, wal_id: str, start: Mapping[int, int]
) -> tuple[list[TopicRecord], dict[int, int]]:
    """Records of this WAL in ``topic`` from ``start`` offsets to each partition's end.

    Returns them in (partition, offset) order and the offsets where each partition ended.
    Reads committed records only, so on a broker that honours transactions an aborted
    drain's records count as not delivered. The end is where the broker reported
    end-of-partition; a read that makes no progress for the cluster's request timeout fails.
    """
    consumer = cluster.get_consumer(
        f"wal-drain-{wal_id}",
        **{
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "auto.offset.reset": "error",
        },
    )
    found: list[TopicRecord] = []
    ends: dict[int, int] = {}
    idle_limit = cluster.request_timeout_s
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        last_progress = time.monotonic()
        while len(ends) < len(start):
            messages = consumer.consume(500, timeout=min(1.0, idle_limit))
            if messages:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > idle_limit:
                waiting = sorted(set(start) - set(ends))
                raise KafkaUnavailable(
                    f"reading {topic} partitions {waiting}: no progress in {idle_limit}s"
                )
            for m in messages:
                if m.partition() in ends:
                    continue  # appended after we reached the end: not from a drain of ours
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise kafka_failure(KafkaException(err), f"reading {topic}")
                    ends[m.partition()] = m.offset()
                    continue
                record = _wal_record_of(m, wal_id)
                if record is not None:
                    found.append(record)
    except KafkaException as exc:
        raise kafka_failure(exc, f"reading {topic}") from exc
    finally:
        consumer.close()
    found.sort(key=lambda r: (r.partition, r.offset))
    return found, ends


def _wal_record_of(m: Message, wal_id: str) -> TopicRecord | None:
    headers = {k: v for k, v in (m.headers() or []) if v is not None}
    if headers.get(H_WAL_ID) != wal_id.encode():
        return None
    return TopicRecord(
        partition=m.partition(),
        offset=m.offset(),
        position=int(headers[H_POSITION]),
        source=headers[H_SOURCE].decode(),
        seq=int(headers[H_SEQ]),
    )


# --- draining -------------------------------------------------------------------------------


class DrainResult(ChangeSet):
    """What a drain sent, skipped and acknowledged."""

    gateway: str
    topic: str
    acked_before: int = Field(description="Marker position when the drain started.")
    acked_after: int = Field(description="Marker position when it ended (unchanged in dry-run).")
    backlog_end: int = Field(description="End of the WAL when the drain read it.")
    sent: int = Field(0, description="Records produced and confirmed by this drain.")
    already_in_kafka: int = Field(
        0, description="Records an interrupted earlier drain had delivered: found and skipped."
    )
    elapsed_s: float = Field(
        0.0, description="The whole drain: reading the WAL, fencing, sending, the last marker."
    )
    rate_eps: float | None = Field(
        None, description="Drain rate, records sent per second of elapsed_s."
    )
    sequences: SequenceReport = Field(
        default_factory=SequenceReport, description="Sequence check of the drained WAL records."
    )
    damaged: list[WalDamage] = Field(
        default_factory=list,
        description="Damaged bytes and missing positions after the marker: kept in "
        f"{QUARANTINE_FILE}, not delivered; the marker moves past them.",
    )
    quarantine_file: str | None = Field(None, description="Where the damaged bytes are kept.")
    torn_tail_bytes: int = Field(
        0,
        description="A torn last write at the end of the newest segment, ignored (the gateway "
        "was writing it; its writer truncates it on reopen).",
    )


@contextlib.contextmanager
def _drain_lock(directory: Path) -> Iterator[None]:
    """One drainer per WAL on this host; the kernel releases the lock if the drainer dies."""
    with open(directory / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DrainConflict(f"another drain of {directory} is running") from exc
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _producer(gateway: EdgeGateway, cluster: KafkaCluster, wal_id: str) -> Producer:
    timeout_ms = int(gateway.delivery_timeout_s * 1000)
    return cluster.get_producer(
        **{
            # one transactional.id per WAL: a new drainer's init_transactions fences an old one,
            # so nothing a crashed or hung drainer still had in flight can land after our read
            "transactional.id": f"wal-drain-{wal_id}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": timeout_ms,
            "transaction.timeout.ms": max(timeout_ms, 60_000),
            # same partition for a key as the Java client's default partitioner
            "partitioner": "murmur2_random",
        }
    )


_position, _source = attrgetter("position"), attrgetter("source")
_source_seq = attrgetter("source", "seq")


def _on_delivery(
    reports: dict[int, tuple[int, int] | KafkaError],
    position: int,
    err: KafkaError | None,
    msg: Message,
) -> None:
    reports[position] = err if err is not None else (msg.partition(), msg.offset())


def _send_transaction(
    producer: Producer,
    gateway: EdgeGateway,
    wal_id: str,
    batch: list[WalRecord],
    before_reports: Callable[[], None],
) -> dict[int, int]:
    """Produce ``batch`` in one transaction and commit it; returns partition -> last offset.

    ``commit_transaction`` flushes and fails unless every record was delivered, so only the
    last record of each source asks for its delivery report: that report gives the partition's
    last offset (a source's records go to one partition, in order). ``before_reports`` runs
    before this transaction's reports are served: the drain waits there for the previous
    transaction's marker write, which ran while this batch was being produced.
    """
    timeout = gateway.delivery_timeout_s
    reports: dict[int, tuple[int, int] | KafkaError] = {}
    last_of_source = {r.source: r.position for r in batch}
    lasts = set(last_of_source.values())
    keys = {s: s.encode() for s in last_of_source}
    source_headers = {s: (H_SOURCE, s) for s in last_of_source}
    wal_header, gateway_header = (H_WAL_ID, wal_id), (H_GATEWAY, gateway.gateway_name)
    produce, topic = producer.produce, gateway.topic
    producer.begin_transaction()
    try:
        for r in batch:
            source, position = r.source, r.position
            report = partial(_on_delivery, reports, position) if position in lasts else None
            headers = [
                wal_header,
                gateway_header,
                source_headers[source],
                (H_SEQ, str(r.seq)),
                (H_POSITION, str(position)),
            ]
            while True:
                try:
                    produce(
                        topic,
                        key=keys[source],
                        value=r.value,
                        timestamp=r.timestamp_ms,
                        headers=headers,
                        on_delivery=report,
                    )
                    break
                except BufferError:
                    # the local queue is full: let librdkafka send, then try again
                    before_reports()
                    producer.poll(0.05)
        before_reports()
        producer.commit_transaction(timeout)
    except BaseException:
        with contextlib.suppress(KafkaException):
            # releases the partitions at once on brokers that honour aborts; the next drain's
            # read of the topic decides what counts as delivered either way
            producer.abort_transaction(timeout)
        raise
    last: dict[int, int] = {}
    for report_ in reports.values():
        if isinstance(report_, tuple):
            partition, offset = report_
            last[partition] = max(last.get(partition, -1), offset)
    return last


class _MarkerWrites:
    """Writes marker snapshots on a thread of its own, one at a time, while the drain goes on.

    The fsyncs of a marker write overlap with producing the next transaction. ``wait()``
    returns once the last snapshot is durable (and raises what the write raised); the drain
    calls it before committing the next transaction, so the marker on disk is never more than
    one committed transaction behind, and what it does not cover is after its ``scan_from``.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wal-marker")
        self._pending: Future[None] | None = None

    def post(self, marker: WalMarker) -> None:
        self.wait()
        self._pending = self._pool.submit(
            write_marker, self.directory, marker.model_copy(deep=True)
        )

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class _Connection:
    """The drain's fenced producer and what it found in the topic."""

    producer: Producer
    partitions: list[int]
    found: list[TopicRecord]
    ends: dict[int, int]


def _connect(
    gateway: EdgeGateway, cluster: KafkaCluster, wal_id: str, marker: WalMarker | None, what: str
) -> _Connection:
    """Steps 2 and 3: fence earlier drainers, then find what an interrupted drain delivered."""
    producer = _producer(gateway, cluster, wal_id)
    try:
        producer.init_transactions(cluster.request_timeout_s)
    except KafkaException as exc:
        raise kafka_failure(exc, f"starting the drain of {what}") from exc
    partitions = _topic_partitions(cluster, gateway.topic)
    if marker is None:
        # no marker: no drain ever produced (each writes one first), so nothing to look for
        found: list[TopicRecord] = []
        ends = _end_offsets(cluster, gateway.topic, partitions)
    else:
        start = {p: marker.scan_from.get(p, 0) for p in partitions}
        found, ends = read_wal_records_in_topic(cluster, gateway.topic, wal_id, start)
    return _Connection(producer=producer, partitions=partitions, found=found, ends=ends)


@task(**runbook_task_options(KafkaUnavailable, backoff_seconds=2.0))
def drain_wal(
    gateway: EdgeGateway, cluster: KafkaCluster, dry_run: bool, batch_size: int = 5000
) -> DrainResult:
    """Send every record after the marker to the gateway's topic exactly once; advance the marker.

    Kafka key = source id (one partition per source keeps its order), headers carry WAL id,
    source, sequence and position. Each batch of ``batch_size`` records is one transaction;
    the marker advances after the commit to the highest position with everything below it
    confirmed, written while the next batch is produced. Fencing and reading the topic run
    while the WAL is read. In dry-run only the plan is returned: no Kafka write, marker
    untouched.
    """
    started = time.monotonic()
    reader = WalReader(gateway.wal_path())
    directory = reader.directory
    with contextlib.ExitStack() as stack:
        if not dry_run:
            stack.enter_context(_drain_lock(directory))
        marker = read_marker(directory)
        _check_marker(marker, reader, gateway)
        connecting: Future[_Connection] | None = None
        if not dry_run:
            # never send a record the gateway has not made durable: after a power loss it could
            # reuse that position for another event
            _fsync_newest_segment(reader)
            # fencing and reading the topic wait on the network: let them run while the WAL is
            # read (they need nothing from it)
            pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="wal-connect"))
            connecting = pool.submit(
                _connect, gateway, cluster, reader.wal_id or "", marker, str(directory)
            )
        acked = marker.next_position if marker else 0
        scan = reader.scan(acked)
        pending, end = scan.records, scan.end_position
        result = DrainResult(
            dry_run=dry_run,
            gateway=gateway.gateway_name,
            topic=gateway.topic,
            acked_before=acked,
            acked_after=acked,
            backlog_end=end,
            sequences=check_sequences(
                map(_source_seq, pending), marker.sources if marker else None
            ),
            damaged=scan.damage,
            torn_tail_bytes=scan.torn_bytes,
            quarantine_file=str(directory / QUARANTINE_FILE) if scan.damage else None,
        )
        if scan.torn:
            result.notes.append(
                f"ignored a torn write of {scan.torn_bytes} byte(s) at the end of the newest "
                f"segment ({scan.torn}): the gateway was writing it when it stopped or was read"
            )
        if not pending and not scan.damage:
            result.notes.append("nothing pending after the marker")
            return result
        result.planned = _plan(gateway, reader, pending, scan.damage, acked, end)
        if connecting is None:
            result.notes.append(
                "records an interrupted earlier drain already delivered are found in the topic "
                "and skipped when applied"
            )
            return result
        _deliver(gateway, reader, marker, scan, connecting, batch_size, result, started)
    return result


def _check_marker(marker: WalMarker | None, reader: WalReader, gateway: EdgeGateway) -> None:
    if marker is None:
        return
    if marker.wal_id != reader.wal_id:
        raise WalCorruption(
            f"{reader.directory / MARKER_FILE} belongs to WAL {marker.wal_id}, not {reader.wal_id}"
        )
    if marker.topic != gateway.topic:
        raise RuntimeError(
            f"{reader.directory} was drained to topic {marker.topic}, the gateway now feeds "
            f"{gateway.topic}: records may be in either; a human must reconcile"
        )


def _fsync_newest_segment(reader: WalReader) -> None:
    segments = reader.segments()
    if segments:
        fd = os.open(segments[-1][1], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _plan(
    gateway: EdgeGateway,
    reader: WalReader,
    pending: list[WalRecord],
    damage: list[WalDamage],
    acked: int,
    end: int,
) -> list[Change]:
    per_source = Counter(map(_source, pending))
    quarantine = reader.directory / QUARANTINE_FILE
    # damaged bytes go aside first: the marker may only pass them once the quarantine holds them
    plan = [
        Change(
            action="quarantine_wal_damage",
            target=f"{quarantine} <- {d.segment} byte {d.offset}",
            detail=d.model_dump(
                include={"segment", "offset", "length", "first_position", "positions", "reason"}
            ),
        )
        for d in damage
    ]
    plan += [
        Change(
            action="produce_wal_records",
            target=f"topic {gateway.topic} (key = source id)",
            detail={
                "positions": f"{acked}-{end - 1}",
                "records": len(pending),
                "per_source": dict(per_source),
            },
        ),
        Change(
            action="advance_wal_marker",
            target=str(reader.directory / MARKER_FILE),
            detail={"from": acked, "to": end},
        ),
    ]
    if gateway.delete_delivered_segments:
        segments = dict(reader.segments())
        plan += [
            Change(
                action="delete_wal_segment",
                target=str(segments[base]),
                detail={"base_position": base},
            )
            for base in deletable_segments(sorted(segments), end)
        ]
    return plan


def _deliver(
    gateway: EdgeGateway,
    reader: WalReader,
    marker: WalMarker | None,
    scan: WalScan,
    connecting: Future[_Connection],
    batch_size: int,
    result: DrainResult,
    started: float,
) -> None:
    """Quarantine damage, skip what an interrupted drain delivered, send the rest batch by batch."""
    directory, wal_id, topic = reader.directory, reader.wal_id or "", gateway.topic
    pending = scan.records
    quarantined = quarantined_positions(result.damaged)
    if result.damaged:
        quarantine_damage(directory, wal_id, result.damaged)
    conn = connecting.result()
    state = marker or WalMarker(wal_id=wal_id, topic=topic)
    # found in the topic and pending here: every position in [acked, end) is a pending record
    # or damage
    ahead = {
        r.position
        for r in conn.found
        if state.next_position <= r.position < scan.end_position and r.position not in quarantined
    }
    result.already_in_kafka = len(ahead)
    top_ahead = max(ahead, default=-1)
    covered = ahead | quarantined  # grows by each committed batch
    last_offsets: dict[int, int] = {}
    marker_writes = _MarkerWrites(directory)
    unacked = 0  # index in pending of the first record the marker does not cover yet
    in_order = result.sequences.ok

    def acknowledge() -> None:
        """Advance the marker state and hand it to the writer (the caller waits when it must)."""
        nonlocal unacked
        new = advance_marker(state.next_position, covered)
        now_acked = bisect.bisect_left(pending, new, lo=unacked, key=_position)
        sources = state.sources
        if in_order:
            # every source counts up: its last record in the range holds its highest seq
            sources.update({r.source: r.seq for r in pending[unacked:now_acked]})
        else:
            for r in pending[unacked:now_acked]:
                if r.seq > sources.get(r.source, -1):
                    sources[r.source] = r.seq
        unacked = now_acked
        state.next_position = new
        if top_ahead < new:
            # everything of this WAL in the topic is now covered by next_position
            for p in conn.partitions:
                state.scan_from[p] = max(
                    state.scan_from.get(p, 0), conn.ends[p], last_offsets.get(p, -1) + 1
                )
        marker_writes.post(state)

    to_send = [r for r in pending if r.position not in ahead] if ahead else pending
    try:
        # step 4: durable before the first record is produced
        acknowledge()
        marker_writes.wait()
        for i in range(0, len(to_send), batch_size):
            batch = to_send[i : i + batch_size]
            delivered = _send_transaction(conn.producer, gateway, wal_id, batch, marker_writes.wait)
            for partition, offset in delivered.items():
                last_offsets[partition] = max(last_offsets.get(partition, -1), offset)
            result.sent += len(batch)
            covered.update(map(_position, batch))
            acknowledge()
        marker_writes.wait()
    except KafkaException as exc:
        raise kafka_failure(exc, f"draining {directory} to {topic}") from exc
    finally:
        marker_writes.close()
        result.elapsed_s = time.monotonic() - started
        marker_now = read_marker(directory)
        result.acked_after = marker_now.next_position if marker_now else 0
    result.rate_eps = result.sent / result.elapsed_s if result.elapsed_s > 0 else None
    # the "after" is the marker read back from disk, not the plan copied
    acked = result.acked_after
    after = {"marker": acked, "pending": max(result.backlog_end - acked, 0), "sent": result.sent}
    result.applied = [
        c.model_copy(update={"detail": after})
        for c in result.planned
        if c.action != "delete_wal_segment"
    ]
    if gateway.delete_delivered_segments:
        result.applied += _delete_segments(reader, acked, result.planned)


def _delete_segments(reader: WalReader, next_position: int, planned: list[Change]) -> list[Change]:
    segments = dict(reader.segments())
    deletable = set(deletable_segments(sorted(segments), next_position))
    done = []
    for change in planned:
        base = change.detail.get("base_position")
        if change.action == "delete_wal_segment" and base in deletable:
            segments[base].unlink()
            after = {"present": segments[base].exists()}
            done.append(change.model_copy(update={"detail": after}))
    if done:
        fsync_dir(reader.directory)
    return done


# --- verifying --------------------------------------------------------------------------


class DeliveryReport(BaseModel):
    """Did every drained record land in the topic exactly once, in order per source?"""

    topic: str
    positions_from: int
    positions_to: int
    expected: int
    delivered: int = Field(description="Distinct expected positions found in the topic.")
    missing: list[SeqRange] = Field(default_factory=list, description="Positions not in the topic.")
    duplicated: list[int] = Field(
        default_factory=list, description="Positions in the topic more than once."
    )
    reordered: list[int] = Field(
        default_factory=list,
        description="Positions that landed after a later record of the same source.",
    )
    sequences: SequenceReport = Field(description="Sequence check of what landed, in topic order.")

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.reordered)

    def summary(self) -> str:
        if self.ok:
            return f"all {self.expected} records in {self.topic} exactly once, in order per source"
        return (
            f"{self.delivered}/{self.expected} delivered; missing positions "
            f"{', '.join(map(str, self.missing)) or 'none'}; duplicated {self.duplicated or 'none'}; "
            f"out of order {self.reordered or 'none'}"
        )


def compare_delivery(
    topic: str,
    found: list[TopicRecord],
    positions_from: int,
    positions_to: int,
    baseline: Mapping[str, int] | None = None,
    quarantined: Iterable[int] = (),
) -> DeliveryReport:
    """Compare records found in the topic (in partition/offset order) with the WAL range drained.

    ``quarantined`` positions held damaged bytes: not sent, so not expected in the topic.
    """
    expected = set(range(positions_from, positions_to)) - set(quarantined)
    in_range = [r for r in found if positions_from <= r.position < positions_to]
    counts = Counter(r.position for r in in_range)
    last_seen: dict[str, int] = {}
    reordered = []
    for r in in_range:
        if r.position < last_seen.get(r.source, -1):
            reordered.append(r.position)
        last_seen[r.source] = max(last_seen.get(r.source, -1), r.position)
    return DeliveryReport(
        topic=topic,
        positions_from=positions_from,
        positions_to=positions_to,
        expected=len(expected),
        delivered=len(expected & set(counts)),
        missing=to_ranges(expected - set(counts)),
        duplicated=sorted(p for p, n in counts.items() if n > 1),
        reordered=reordered,
        sequences=check_sequences(((r.source, r.seq) for r in in_range), baseline),
    )


class DeliveryCheckpoint(BaseModel):
    """Where a drain's records can land, taken before it: what the verification reads back."""

    acked: int = Field(description="Marker position before the drain.")
    sources: dict[str, int] = Field(
        description="Last acknowledged sequence per source before the drain."
    )
    kafka_from: dict[int, int] = Field(description="Per partition, the offset to read from.")


@task(**runbook_task_options(KafkaUnavailable))
def checkpoint_delivery(gateway: EdgeGateway, cluster: KafkaCluster) -> DeliveryCheckpoint:
    """Record the marker and topic offsets before a drain (and its retries) so it can be verified."""
    marker = read_marker(gateway.wal_path())
    partitions = _topic_partitions(cluster, gateway.topic)
    if marker is None:
        # no drain ever produced: whatever comes is after today's end offsets
        return DeliveryCheckpoint(
            acked=0, sources={}, kafka_from=_end_offsets(cluster, gateway.topic, partitions)
        )
    return DeliveryCheckpoint(
        acked=marker.next_position,
        sources=dict(marker.sources),
        kafka_from={p: marker.scan_from.get(p, 0) for p in partitions},
    )


@task(**runbook_task_options(KafkaUnavailable))
def verify_delivery(
    gateway: EdgeGateway,
    cluster: KafkaCluster,
    since: DeliveryCheckpoint,
    acked_to: int,
    quarantined: list[WalDamage] | None = None,
) -> DeliveryReport:
    """Read the drained range back from the topic and check it record by record.

    ``quarantined`` is the damage the drain kept aside: its positions are not expected.
    """
    wal_id = WalReader(gateway.wal_path()).wal_id or ""
    found, _ = read_wal_records_in_topic(cluster, gateway.topic, wal_id, since.kafka_from)
    return compare_delivery(
        gateway.topic,
        found,
        since.acked,
        acked_to,
        since.sources,
        quarantined_positions(quarantined or []),
    )
