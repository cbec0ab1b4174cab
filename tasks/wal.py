"""Edge-gateway WAL tasks: measuring the backlog, deciding what to do, reaching Kafka.

The on-disk format (segments, records, the ``ack.json`` marker) lives in ``tasks.wal_format``
and is specified in docs/wal-format.md. Draining the WAL to Kafka exactly once is in
``tasks.wal_drain``; reading the WAL's records back from the topic and verifying a drain is in
``tasks.wal_topic``.
"""

from __future__ import annotations

import socket
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum

from confluent_kafka import KafkaException
from prefect import task
from pydantic import BaseModel, Field

from blocks.edge_gateway import EdgeGateway
from blocks.kafka import KafkaCluster
from runbooks.retry import runbook_task_options
from tasks.wal_format import (
    QUARANTINE_FILE,
    WalDamage,
    WalReader,
    mark_reported,
    read_marker,
    unreported_damage,
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
