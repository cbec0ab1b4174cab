"""Kafka topic activity: is a producer still writing to a topic?

Two samples of each topic's offsets (low and end, per partition) show whether the log end moved;
the newest record of each partition, read without joining a group or committing (the DLQ peek's
consumer), says when it last moved. The verdict is a pure function of both, tested with data
tables.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import StrEnum

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prefect import task
from pydantic import BaseModel, Field, computed_field

from blocks.kafka import KafkaCluster
from runbooks.params import TopicName
from runbooks.retry import runbook_task_options
from tasks.kafka import is_retriable
from tasks.kafka_dlq import read_records


class TopicOffsets(BaseModel):
    """One topic's offsets at one moment."""

    topic: str
    exists: bool
    at: float = Field(description="When the offsets were read (monotonic seconds).")
    low: dict[int, int] = Field(default_factory=dict, description="Earliest offset per partition.")
    end: dict[int, int] = Field(default_factory=dict, description="Log end offset per partition.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def readable(self) -> int:
        """Records still in the log (end minus earliest, over every partition)."""
        return sum(self.end[p] - self.low.get(p, 0) for p in self.end)


class LastRecord(BaseModel):
    """The newest record of a partition."""

    partition: int
    offset: int
    timestamp: datetime | None = Field(
        description="The record's timestamp; None when the producer set none."
    )
    timestamp_type: str = Field(
        description="CreateTime (the producer's clock) or LogAppendTime (the broker's)."
    )


# librdkafka's types (module `cimpl`) are named only in helpers, never in a task's body: a task's
# function is pickled by value when a served run starts, and those types cannot be.


def _list_offsets(
    admin: AdminClient, partitions: list[tuple[str, int]], spec: OffsetSpec, timeout: float
) -> dict[tuple[str, int], int]:
    futures = admin.list_offsets(
        {TopicPartition(t, p): spec for t, p in partitions}, request_timeout=timeout
    )
    return {(tp.topic, tp.partition): f.result(timeout).offset for tp, f in futures.items()}


def _read_offsets(cluster: KafkaCluster, topics: list[str]) -> dict[str, TopicOffsets]:
    admin = cluster.get_admin_client()  # held until the answers: dropping it aborts the requests
    timeout = cluster.request_timeout_s
    # all topics: asking for named ones would create them on brokers with auto.create.topics.enable
    metadata = admin.list_topics(timeout=timeout)
    found = {
        t: metadata.topics[t]
        for t in topics
        if t in metadata.topics
        and (
            metadata.topics[t].error is None
            or metadata.topics[t].error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART
        )
    }
    # a partition without a leader has no offsets to give (the runbook reports it as such)
    partitions = [
        (t, p)
        for t, md in found.items()
        for p in sorted(md.partitions)
        if md.partitions[p].leader >= 0
    ]
    at = time.monotonic()
    low = _list_offsets(admin, partitions, OffsetSpec.earliest(), timeout) if partitions else {}
    end = _list_offsets(admin, partitions, OffsetSpec.latest(), timeout) if partitions else {}
    return {
        t: TopicOffsets(
            topic=t,
            exists=t in found,
            at=at,
            low={p: o for (tt, p), o in low.items() if tt == t},
            end={p: o for (tt, p), o in end.items() if tt == t},
        )
        for t in topics
    }


@task(**runbook_task_options(KafkaException, when=is_retriable))
def read_topic_offsets(cluster: KafkaCluster, topics: list[str]) -> dict[str, TopicOffsets]:
    """Earliest and end offset of every partition of each topic, in two ListOffsets rounds; a
    topic the broker does not have comes back with ``exists=False``."""
    return _read_offsets(cluster, topics)


_TIMESTAMP_TYPES = {1: "CreateTime", 2: "LogAppendTime"}


@task(**runbook_task_options(KafkaException, when=is_retriable))
def read_last_records(
    cluster: KafkaCluster, offsets: TopicOffsets, look_back: int = 10
) -> dict[int, LastRecord]:
    """The newest record of each non-empty partition, read by assignment under a throwaway group
    id with auto-commit off: no group joined, no offset committed.

    Reading starts ``look_back`` offsets before the end, because the offsets just before it may
    hold no data record (transaction markers, compacted away).
    """
    bounds: dict[int, tuple[int, int | None]] = {
        p: (max(offsets.low.get(p, 0), end - look_back), None)
        for p, end in offsets.end.items()
        if end > offsets.low.get(p, 0)
    }
    newest: dict[int, LastRecord] = {}
    if not bounds:
        return newest
    deadline = max(30.0, cluster.request_timeout_s * 3)
    for msg in read_records(cluster, offsets.topic, bounds, deadline_s=deadline):
        kind, ms = msg.timestamp()
        p = msg.partition()
        if p in newest and newest[p].offset > msg.offset():
            continue
        newest[p] = LastRecord(
            partition=p,
            offset=msg.offset(),
            timestamp=datetime.fromtimestamp(ms / 1000, UTC) if kind in _TIMESTAMP_TYPES else None,
            timestamp_type=_TIMESTAMP_TYPES.get(kind, "none"),
        )
    return dict(sorted(newest.items()))


# --- the verdict --------------------------------------------------------------------------------


class ExpectedTopic(BaseModel):
    """A topic a producer should keep writing to, and how often."""

    name: TopicName = Field(description="The topic.")
    min_per_minute: float = Field(
        1.0,
        ge=0,
        description="Fewest new records per minute while the producer works; 0: the topic is not "
        "expected to receive data (reported only).",
    )
    window_s: float = Field(
        300,
        gt=0,
        le=7 * 86400,
        description="No new record for longer than this, while records are expected, is a stall.",
    )


class Activity(StrEnum):
    SENDING = "sending"
    # no new record in the watch, but the last one is younger than the window
    QUIET = "quiet"
    # not expected to receive data (min_per_minute 0) and receiving none
    IDLE = "idle"
    # new records, fewer than expected
    SLOW = "slow"
    # no new record for longer than the window
    STALLED = "stalled"
    # no record to read at all
    EMPTY = "empty"
    MISSING = "missing"


PROBLEMS = {Activity.SLOW, Activity.STALLED, Activity.EMPTY, Activity.MISSING}


class TopicActivity(BaseModel):
    """What two offset samples and the newest records say about one topic."""

    topic: str
    activity: Activity
    new_records: int = Field(description="How far the log ends moved between the samples.")
    per_minute: float = Field(description="new_records over the watch, per minute.")
    last_record_at: datetime | None = Field(
        description="Newest record timestamp over the partitions."
    )
    last_record_by_partition: dict[int, str] = Field(
        default_factory=dict,
        description="Per partition, the newest record's offset, timestamp and timestamp type.",
    )
    silent_s: float | None = Field(
        description="Seconds since the newest record (None: no record to read)."
    )
    reason: str = Field(description="The evidence behind the activity, in one sentence.")

    @property
    def problem(self) -> bool:
        return self.activity in PROBLEMS


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def classify_activity(
    expected: ExpectedTopic,
    first: TopicOffsets,
    last: TopicOffsets,
    newest: dict[int, LastRecord],
    now: datetime,
) -> TopicActivity:
    """Classify a topic from two offset samples and each partition's newest record at ``now``."""
    watched_s = max(last.at - first.at, 1e-3)
    moved = sum(max(end - first.end.get(p, 0), 0) for p, end in last.end.items())
    rate = moved * 60 / watched_s
    stamps = [r.timestamp for r in newest.values() if r.timestamp is not None]
    last_at = max(stamps) if stamps else None
    # a producer clock ahead of ours makes a record "from the future": silent for 0 s
    silent = max((now - last_at).total_seconds(), 0.0) if last_at else None
    common = {
        "topic": expected.name,
        "new_records": moved,
        "per_minute": round(rate, 2),
        "last_record_at": last_at,
        "last_record_by_partition": {
            p: f"offset {r.offset} at "
            + (r.timestamp.isoformat(timespec="milliseconds") if r.timestamp else "(no timestamp)")
            + f" ({r.timestamp_type})"
            for p, r in newest.items()
        },
        "silent_s": None if silent is None else round(silent, 1),
    }
    watch = f"in {watched_s:.0f}s"
    last_seen = f"last record {_ago(silent)} ago" if silent is not None else "no record to read"
    if not last.exists:
        return TopicActivity(
            activity=Activity.MISSING,
            reason="the topic does not exist: producers writing to it fail (or create it with "
            "broker defaults)",
            **common,
        )
    if moved:
        if rate >= expected.min_per_minute:
            return TopicActivity(
                activity=Activity.SENDING,
                reason=f"{moved} new record(s) {watch} ({rate:.1f}/min, expected at least "
                f"{expected.min_per_minute:g}/min)",
                **common,
            )
        return TopicActivity(
            activity=Activity.SLOW,
            reason=f"only {moved} new record(s) {watch} ({rate:.1f}/min), expected at least "
            f"{expected.min_per_minute:g}/min",
            **common,
        )
    if expected.min_per_minute == 0:
        return TopicActivity(
            activity=Activity.IDLE,
            reason=f"no new record {watch}; not expected to receive data ({last_seen})",
            **common,
        )
    if last.readable == 0:
        before = sum(last.end.values())
        why = (
            f"every one of its {before} record(s) is past retention, none arrived since"
            if before
            else "it has never received a record"
        )
        return TopicActivity(
            activity=Activity.EMPTY, reason=f"no new record {watch}, and {why}", **common
        )
    if silent is None or silent > expected.window_s:
        return TopicActivity(
            activity=Activity.STALLED,
            reason=f"no new record {watch}; {last_seen}, longer than the "
            f"{_ago(expected.window_s)} window"
            + ("" if silent is not None else " (its records carry no timestamp)"),
            **common,
        )
    return TopicActivity(
        activity=Activity.QUIET,
        reason=f"no new record {watch}, but the {last_seen} is within the "
        f"{_ago(expected.window_s)} window",
        **common,
    )
