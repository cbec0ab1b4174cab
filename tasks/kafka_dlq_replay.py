"""Replay Kafka dead letter queue records to their source topic, exactly once across crashes."""

from __future__ import annotations

from collections import Counter
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prefect import task
from prefect.variables import Variable
from pydantic import BaseModel, Field

from blocks.kafka import KafkaCluster
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.kafka import is_retriable
from tasks.kafka_dlq import (
    CONNECT,
    SPRING,
    FailureKind,
    classify_record,
    offset_ranges,
    peek_consumer,
    read_records,
)

# every replayed record carries where it came from: `<dlq topic>/<partition>/<offset>`. After a
# crash, the source topics are scanned for it, so a record already sent is not sent again
REPLAYED_FROM = "runbooks-replayed-from"
_ERROR_HEADERS = (CONNECT, SPRING)


class ReplayState(BaseModel):
    """Progress of replaying one DLQ, kept in a Prefect Variable between runs (and crashes)."""

    dlq_topic: str
    next_offset: dict[int, int] = Field(
        default_factory=dict,
        description="Per DLQ partition: every offset below was replayed or skipped.",
    )
    in_progress: bool = Field(
        False, description="A replay started and has not finished (it may have crashed)."
    )
    scan_from: dict[str, dict[int, int]] = Field(
        default_factory=dict,
        description="Per source topic and partition, its end offset when the unfinished replay began: "
        "replayed records of that replay are at or after it.",
    )


class ReplayResult(ChangeSet):
    """What a replay sent (or would send), per DLQ partition."""

    replayed: dict[int, list[int]] = Field(
        default_factory=dict, description="DLQ offsets sent, per partition."
    )
    already_sent: dict[int, list[int]] = Field(
        default_factory=dict,
        description="DLQ offsets a crashed run had sent already: not sent again.",
    )
    skipped: dict[str, int] = Field(
        default_factory=dict, description="Records not replayed, per reason."
    )
    scan_from: dict[str, dict[int, int]] = Field(
        default_factory=dict,
        description="Source topics' end offsets before this replay's first send.",
    )


def replay_variable(state_key: str) -> str:
    return f"runbooks_dlq_replay_{state_key}"


def _load_state(state_key: str, topic: str) -> ReplayState:
    raw = Variable.get(replay_variable(state_key), default=None)
    return ReplayState.model_validate(raw) if raw else ReplayState(dlq_topic=topic)


def _save_state(state_key: str, state: ReplayState) -> None:
    Variable.set(
        replay_variable(state_key),
        state.model_dump(mode="json"),
        tags=["runbooks", "dlq-replay"],
        overwrite=True,
    )


def replay_headers(headers: list[tuple[str, bytes]], marker: str) -> list[tuple[str, bytes]]:
    """The record's own headers without the failure's, plus where it was replayed from."""
    kept = [(k, v) for k, v in headers if not k.startswith(_ERROR_HEADERS) and k != REPLAYED_FROM]
    return [*kept, (REPLAYED_FROM, marker.encode())]


def find_replayed(
    cluster: KafkaCluster, dlq_topic: str, scan_from: dict[str, dict[int, int]], timeout: float
) -> set[tuple[int, int]]:
    """(DLQ partition, offset) of every record an unfinished replay already put in a source topic."""
    found: set[tuple[int, int]] = set()
    prefix = f"{dlq_topic}/"
    for topic, starts in scan_from.items():
        # up to the end as read, not the high watermark: what the crashed run sent may be newer
        # than a watermark read a moment before
        bounds: dict[int, tuple[int, int | None]] = {p: (s, None) for p, s in starts.items()}
        for msg in read_records(cluster, topic, bounds, deadline_s=max(60.0, timeout * 6)):
            for k, v in msg.headers() or []:
                if k == REPLAYED_FROM and v and v.decode("utf-8", "replace").startswith(prefix):
                    _, p, o = v.decode().rsplit("/", 2)
                    found.add((int(p), int(o)))
    return found


# librdkafka's types (module `cimpl`) are named only in helpers, never in a task's body: a task's
# function is pickled by value when a served run starts, and those types cannot be.


def _end_offsets(cluster: KafkaCluster, topic: str) -> dict[int, int]:
    """Each partition's end offset now; a topic that does not exist is an error."""
    timeout = cluster.request_timeout_s
    consumer = peek_consumer(cluster)
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            raise ValueError(
                f"source topic {topic!r} of the DLQ records not found: nothing replayed to it"
            )
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            for p in md.partitions
        }
    finally:
        consumer.close()


def _undelivered(failures: list[str]) -> None:
    reason = f"replay not delivered: {failures[:3] or 'flush timed out'}"
    raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, reason))


@task(**runbook_task_options(KafkaException, when=is_retriable))
def replay_dlq(
    cluster: KafkaCluster,
    dlq_topic: str,
    bounds: dict[int, tuple[int, int]],
    kinds: list[FailureKind],
    state_key: str,
    dry_run: bool,
    fallback_topic: str | None = None,
    batch_size: int = 500,
) -> ReplayResult:
    """Send the DLQ records in ``bounds`` ([start, end) per partition) whose kind is in ``kinds``
    back to their source topic (the one their headers name, else ``fallback_topic``), with their
    key and headers minus the failure's headers, plus ``runbooks-replayed-from``.

    Exactly once across crashes: the progress per DLQ partition is a Prefect Variable
    (``state_key``) saved after every flushed batch; a run that finds an unfinished replay scans
    the source topics from where that replay began for the ``runbooks-replayed-from`` header and
    skips what is there. A transactional producer with the offsets in the transaction was the
    first choice, but not every Kafka-compatible broker hides aborted records from
    read_committed readers (tansu does not), and this works with a plain idempotent producer.
    Offsets below the saved progress are never read again, so a re-run sends nothing twice.
    """
    timeout = cluster.request_timeout_s
    state = _load_state(state_key, dlq_topic)
    todo = {p: (max(s, state.next_offset.get(p, 0)), e) for p, (s, e) in bounds.items()}
    todo = {p: b for p, b in todo.items() if b[0] < b[1]}
    wanted = set(kinds)
    sends: list[tuple[Any, str]] = []  # (message, target topic)
    skipped: Counter[str] = Counter()
    for msg in (
        read_records(cluster, dlq_topic, todo, deadline_s=max(60.0, timeout * 6)) if todo else []
    ):
        c = classify_record(dict(msg.headers() or []), msg.value())
        target = c.source_topic or fallback_topic
        if c.kind not in wanted:
            skipped[f"{c.kind.value} failures (not selected)"] += 1
        elif not target:
            skipped["no source topic recorded and no fallback topic"] += 1
        else:
            sends.append((msg, target))
    by_target: dict[tuple[int, str], list[int]] = {}
    for msg, target in sends:
        by_target.setdefault((msg.partition(), target), []).append(msg.offset())
    planned = [
        Change(
            action="replay_dlq_records",
            target=f"{dlq_topic}[{p}] -> {target}",
            detail={"dlq_offsets": offset_ranges(offsets), "count": len(offsets)},
        )
        for (p, target), offsets in sorted(by_target.items())
    ]
    result = ReplayResult(dry_run=dry_run, planned=planned, skipped=dict(skipped))
    if dry_run or not todo:
        return result

    already: set[tuple[int, int]] = set()
    if state.in_progress:
        already = find_replayed(cluster, dlq_topic, state.scan_from, timeout)
    targets = sorted({t for _, t in sends})
    for topic in targets:
        if topic not in state.scan_from:
            state.scan_from[topic] = _end_offsets(cluster, topic)
    # saved before the first send: whatever a crash leaves sent from here on, the scan finds
    state.in_progress = True
    _save_state(state_key, state)

    producer = cluster.get_producer(**{"enable.idempotence": True, "acks": "all", "linger.ms": 5})
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    replayed: dict[int, list[int]] = {}
    sent: dict[tuple[int, str], list[int]] = {}
    skipped_again: dict[int, list[int]] = {}
    for i in range(0, len(sends), batch_size):
        batch = sends[i : i + batch_size]
        for msg, target in batch:
            p, o = msg.partition(), msg.offset()
            if (p, o) in already:
                skipped_again.setdefault(p, []).append(o)
                continue
            producer.produce(
                target,
                key=msg.key(),
                value=msg.value(),
                headers=replay_headers(list(msg.headers() or []), f"{dlq_topic}/{p}/{o}"),
                on_delivery=delivered,
            )
            producer.poll(0)
        if producer.flush(timeout * 3) or failures:
            _undelivered(failures)
        for msg, target in batch:
            p, o = msg.partition(), msg.offset()
            if (p, o) not in already:
                replayed.setdefault(p, []).append(o)
                sent.setdefault((p, target), []).append(o)
            state.next_offset[p] = max(state.next_offset.get(p, 0), o + 1)
        _save_state(state_key, state)
    for p, (_, end) in todo.items():
        state.next_offset[p] = max(state.next_offset.get(p, 0), end)
    scanned_from = state.scan_from
    state.in_progress = False
    state.scan_from = {}
    _save_state(state_key, state)
    applied = [
        Change(
            action="replay_dlq_records",
            target=f"{dlq_topic}[{p}] -> {target}",
            detail={"dlq_offsets": offset_ranges(offsets), "count": len(offsets)},
        )
        for (p, target), offsets in sorted(sent.items())
    ]
    notes = [
        f"{dlq_topic}[{p}] offsets {offset_ranges(o)} were sent by an earlier, interrupted run: not sent again"
        for p, o in sorted(skipped_again.items())
    ]
    return result.model_copy(
        update={
            "applied": applied,
            "replayed": replayed,
            "already_sent": skipped_again,
            "scan_from": scanned_from,
            "notes": notes,
        }
    )
