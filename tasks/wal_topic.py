"""Edge-gateway WAL records in the Kafka topic: reading them back, verifying a drain.

A record of the WAL is recognised in the topic by its headers (``tasks.wal_format``). The
drain (``tasks.wal_drain``) reads the topic to find what an interrupted drain delivered; the
runbook checkpoints the topic before a drain and reads the drained range back after it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prefect import task
from pydantic import BaseModel, Field

from blocks.edge_gateway import EdgeGateway
from blocks.kafka import KafkaCluster
from runbooks.retry import runbook_task_options
from tasks.wal import (
    DrainConflict,
    KafkaUnavailable,
    SeqRange,
    SequenceReport,
    check_sequences,
    quarantined_positions,
    to_ranges,
)
from tasks.wal_format import (
    H_POSITION,
    H_SEQ,
    H_SOURCE,
    H_WAL_ID,
    WalDamage,
    WalReader,
    read_marker,
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
