"""Restore a Kafka topic backup from S3 into a topic (the same or a new name), exactly once.

Each record goes back to its partition number, in offset order, with its key, value, headers and
timestamp. Exactly once across a crash: before its first send a restore writes its progress
record to S3 (``restores/<target>.json``: the target's end offsets when it began). A run that
finds an unfinished one reads the target back from those offsets: an idempotent producer leaves,
per partition, a prefix of what it sent, in order; so the records there are the first N of the
backup (checked by digest), and the run sends the rest. Transactions were not needed (and tansu,
the test broker, leaves aborted records visible).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic
from prefect import task
from pydantic import BaseModel, Field

from blocks.backup_store import BackupStore
from blocks.kafka import KafkaCluster
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.kafka_backup import log_bounds, read_deadline
from tasks.kafka_backup_format import (
    RESTORES,
    Manifest,
    Record,
    backup_root,
    check_manifest,
    decompress,
    iter_segment,
    record_content,
    restore_skip,
)
from tasks.kafka_backup_s3 import get_json, list_objects, load_manifest, put_json
from tasks.kafka_dlq import read_records


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, KafkaException):
        return bool(exc.args and getattr(exc.args[0], "retriable", lambda: False)())
    return isinstance(exc, BotoCoreError | TimeoutError)


class RestoreState(BaseModel):
    """Progress of one restore of a backup into a topic, in S3 beside the backup."""

    backup_id: str
    target_topic: str
    start_offsets: dict[int, int] = Field(
        description="Per partition, the target's end offset before the restore's first send."
    )
    started_at: datetime
    completed_at: datetime | None = None


class TargetState(BaseModel):
    """The target topic before a restore."""

    exists: bool
    partitions: int = 0
    records: dict[int, int] = Field(default_factory=dict, description="Records per partition now.")
    ends: dict[int, int] = Field(default_factory=dict, description="End offset per partition now.")

    @property
    def empty(self) -> bool:
        return not any(self.records.values())


class RestoreResult(ChangeSet):
    backup_id: str
    target_topic: str
    created_topic: bool = False
    resumed: bool = Field(False, description="An interrupted restore was continued.")
    sent: dict[int, int] = Field(default_factory=dict, description="Records sent per partition.")
    already_there: dict[int, int] = Field(
        default_factory=dict, description="Records an interrupted run had restored: not sent again."
    )
    start_offsets: dict[int, int] = Field(
        default_factory=dict, description="Where the restored records begin in the target."
    )
    refused: str | None = Field(None, description="Why nothing was restored (a non-empty target).")
    target_records: int = Field(0, description="Records in the target before the restore.")
    elapsed_s: float = 0.0


def state_key(store: BackupStore, manifest: Manifest, target: str) -> str:
    return backup_root(store.prefix, manifest.topic, manifest.backup_id) + f"{RESTORES}/{target}.json"


def read_target(cluster: KafkaCluster, topic: str) -> TargetState:
    try:
        bounds = log_bounds(cluster, topic)
    except ValueError:
        return TargetState(exists=False)
    return TargetState(
        exists=True,
        partitions=len(bounds),
        records={p: e - s for p, (s, e) in bounds.items()},
        ends={p: e for p, (_, e) in bounds.items()},
    )


def _digests_from(
    cluster: KafkaCluster, topic: str, starts: dict[int, int], expected: int
) -> dict[int, tuple[int, Any]]:
    """Per partition, (records, running digest) of the target from ``starts`` to its end."""
    out: dict[int, tuple[int, Any]] = {p: (0, hashlib.sha256()) for p in starts}
    bounds: dict[int, tuple[int, int | None]] = {p: (s, None) for p, s in starts.items()}
    for msg in read_records(cluster, topic, bounds, deadline_s=read_deadline(expected)):
        n, digest = out[msg.partition()]
        digest.update(record_content(msg.key(), msg.value(), msg.headers()))
        out[msg.partition()] = (n + 1, digest)
    return out


def _segments(s3: Any, store: BackupStore, manifest: Manifest) -> Iterator[tuple[int, bytes]]:
    """(partition, decompressed segment) of every segment, partition by partition in order,
    the next ones downloading and decompressing (zlib releases the GIL) meanwhile. Decoding is
    left to the caller's thread: on worker threads it contended with the sends for the GIL."""
    root = backup_root(store.prefix, manifest.topic, manifest.backup_id)
    segs = sorted(manifest.segments, key=lambda s: (s.partition, s.seq))

    def fetch(key: str) -> bytes:
        return decompress(s3.get_object(Bucket=store.bucket, Key=root + key)["Body"].read())

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="restore-get") as pool:
        ahead = deque((s.partition, pool.submit(fetch, s.key)) for s in segs[:3])
        rest = iter(segs[3:])
        while ahead:
            partition, fut = ahead.popleft()
            raw = fut.result()
            nxt = next(rest, None)
            if nxt is not None:
                ahead.append((nxt.partition, pool.submit(fetch, nxt.key)))
            yield partition, raw


def _create_topic(cluster: KafkaCluster, topic: str, partitions: int, replication: int) -> None:
    admin = cluster.get_admin_client()
    futures = admin.create_topics(
        [NewTopic(topic, partitions, replication)], request_timeout=cluster.request_timeout_s
    )
    for fut in futures.values():
        fut.result(cluster.request_timeout_s * 2)
    deadline = time.monotonic() + cluster.request_timeout_s * 3
    while time.monotonic() < deadline:  # metadata catches up with the create
        md = admin.list_topics(topic, timeout=cluster.request_timeout_s).topics.get(topic)
        if md is not None and md.error is None and len(md.partitions) == partitions:
            return
        time.sleep(0.2)
    raise TimeoutError(f"topic {topic} created but not in the metadata yet")


def _produce(
    s3: Any,
    cluster: KafkaCluster,
    store: BackupStore,
    manifest: Manifest,
    target: str,
    skip: dict[int, int],
    found: dict[int, tuple[int, Any]],
) -> dict[int, int]:
    """Send each partition's records after the first ``skip[p]``; those are checked against what
    ``found`` read in the target. Returns records sent per partition."""
    timeout = cluster.request_timeout_s
    producer = cluster.get_producer(
        **{
            "enable.idempotence": True,
            "enable.gapless.guarantee": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.kbytes": 256 * 1024,
        }
    )
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    sent: dict[int, int] = {p: 0 for p in manifest.partitions}
    left = {p: skip.get(p, 0) for p in manifest.partitions}
    prefixes = {p: hashlib.sha256() for p in manifest.partitions}
    produce, poll = producer.produce, producer.poll
    for p, raw in _segments(s3, store, manifest):
        records = iter_segment(raw, contents=bool(left[p]))
        if left[p]:
            records = _skip_restored(records, p, left, prefixes[p], skip[p], found[p][1], target)
        pending: Record | None = None
        count = 0
        for rec, _ in records:
            if pending is not None:
                _send(produce, poll, target, p, pending, None)
            pending = rec
            count += 1
            if count % 1000 == 0:
                poll(0)
        if pending is not None:
            # a report for each segment's last record only: with gapless idempotence a record
            # that fails fails every later one too (and a report per record costs as much as
            # the send)
            _send(produce, poll, target, p, pending, delivered)
        sent[p] += count
        if failures:
            _undelivered(failures)
    if producer.flush(timeout * 6) or failures:
        _undelivered(failures)
    return sent


def _skip_restored(
    records: Iterator[tuple[Record, bytes]],
    p: int,
    left: dict[int, int],
    prefix: Any,
    restored: int,
    found: Any,
    target: str,
) -> Iterator[tuple[Record, bytes]]:
    """The records after those an interrupted run restored; those are checked by digest."""
    for rec, content in records:
        if not left[p]:
            yield rec, content
            continue
        prefix.update(content)
        left[p] -= 1
        if left[p] == 0 and prefix.digest() != found.digest():
            raise RuntimeError(
                f"{target}[{p}] holds {restored} records after the restore's start that are not "
                "the backup's first ones: something else writes to it"
            )


def _send(produce: Any, poll: Any, target: str, p: int, rec: Record, report: Any) -> None:
    while True:
        try:
            produce(
                target,
                key=rec.key,
                value=rec.value,
                headers=rec.headers or None,
                partition=p,
                timestamp=rec.timestamp if rec.timestamp > 0 else 0,
                on_delivery=report,
            )
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            poll(0.05)


def _undelivered(failures: list[str]) -> None:
    reason = f"restore not delivered: {failures[:3] or 'flush timed out'}"
    raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, reason))


@task(**runbook_task_options(KafkaException, BotoCoreError, TimeoutError, when=_transient))
def restore_topic(
    cluster: KafkaCluster,
    store: BackupStore,
    topic: str,
    dry_run: bool,
    backup_id: str | None = None,
    target_topic: str | None = None,
    confirm_non_empty: bool = False,
    replication_factor: int = 3,
) -> RestoreResult:
    """Restore backup ``backup_id`` of ``topic`` (default: the newest complete one) into
    ``target_topic`` (default: ``topic``), creating it with the backup's partitions if missing.

    Refuses (``refused``, nothing planned) a target that holds records unless
    ``confirm_non_empty``; continues an interrupted
    restore of the same backup into the same target without sending anything twice.
    """
    started = time.monotonic()
    s3 = store.get_s3_client()
    manifest = load_manifest(store, topic, backup_id, s3)
    target = target_topic or topic
    root = backup_root(store.prefix, manifest.topic, manifest.backup_id)
    problems = check_manifest(manifest, list_objects(s3, store.bucket, root))
    if problems:
        raise ValueError(f"backup s3://{store.bucket}/{root} is damaged: {'; '.join(problems[:5])}")
    needed = max(manifest.partitions, default=-1) + 1
    raw = get_json(s3, store.bucket, state_key(store, manifest, target))
    state = RestoreState.model_validate(raw) if raw else None
    resuming = state is not None and state.completed_at is None
    now = read_target(cluster, target)
    result = RestoreResult(
        dry_run=dry_run,
        backup_id=manifest.backup_id,
        target_topic=target,
        target_records=sum(now.records.values()),
    )
    if now.exists and now.partitions < needed:
        raise ValueError(
            f"{target} has {now.partitions} partitions, the backup {needed}: records would change "
            "partition; restore into a new topic instead"
        )
    if not resuming and now.exists and not now.empty and not confirm_non_empty:
        # the restored records would follow what is there; consumers would read both
        return result.model_copy(
            update={
                "refused": f"{target} already holds {sum(now.records.values())} records: not "
                "restoring into it unless confirm_non_empty is set",
                "target_records": sum(now.records.values()),
            }
        )
    if state is not None and not resuming and not confirm_non_empty:
        return result.model_copy(
            update={"notes": [f"restored into {target} already at {state.completed_at}"]}
        )

    found: dict[int, tuple[int, Any]] = {}
    skip: dict[int, int] = {}
    if resuming:
        assert state is not None
        expected = manifest.records
        found = _digests_from(cluster, target, state.start_offsets, expected)
        skip = {
            p: restore_skip(found.get(p, (0, None))[0], manifest.partitions[p].records)
            for p in manifest.partitions
        }
        starts = state.start_offsets
    else:
        starts = {p: now.ends.get(p, 0) for p in manifest.partitions}
    planned: list[Change] = []
    if not now.exists:
        planned.append(
            Change(
                action="create_topic",
                target=target,
                detail={"partitions": needed, "replication_factor": replication_factor},
            )
        )
    planned += [
        Change(
            action="restore_partition",
            target=f"{manifest.topic}@{manifest.backup_id}[{p}] -> {target}[{p}]",
            detail={
                "records": s.records - skip.get(p, 0),
                "already_restored": skip.get(p, 0),
                "checksum": s.checksum,
            },
        )
        for p, s in sorted(manifest.partitions.items())
        if s.records - skip.get(p, 0) > 0
    ]
    result = result.model_copy(
        update={
            "planned": planned,
            "resumed": resuming,
            "already_there": {p: n for p, n in skip.items() if n},
            "start_offsets": starts,
        }
    )
    if dry_run or not planned:
        return result

    if not now.exists:
        _create_topic(cluster, target, needed, replication_factor)
    if not resuming:
        state = RestoreState(
            backup_id=manifest.backup_id,
            target_topic=target,
            start_offsets=starts,
            started_at=datetime.now(UTC),
        )
        # before the first send: whatever a crash leaves in the target, the next run finds
        put_json(s3, store.bucket, state_key(store, manifest, target), state)
    assert state is not None
    sent = _produce(s3, cluster, store, manifest, target, skip, found)
    state.completed_at = datetime.now(UTC)
    put_json(s3, store.bucket, state_key(store, manifest, target), state)
    return result.model_copy(
        update={
            "applied": planned,
            "created_topic": not now.exists,
            "sent": sent,
            "elapsed_s": time.monotonic() - started,
        }
    )


class RestoreCheck(BaseModel):
    """The target read back from where the restore began, against the backup's manifest."""

    records: dict[int, int]
    expected: dict[int, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


@task(**runbook_task_options(KafkaException, BotoCoreError, TimeoutError, when=_transient))
def check_restore(
    cluster: KafkaCluster, store: BackupStore, topic: str, backup_id: str, target_topic: str, start_offsets: dict[int, int]
) -> RestoreCheck:
    """Read the target from ``start_offsets`` and compare counts and per-segment digests."""
    manifest = load_manifest(store, topic, backup_id)
    segs: dict[int, list[Any]] = {}
    for s in sorted(manifest.segments, key=lambda s: (s.partition, s.seq)):
        segs.setdefault(s.partition, []).append(s)
    counts = {p: 0 for p in manifest.partitions}
    problems: list[str] = []
    index = {p: 0 for p in manifest.partitions}
    left = {p: (segs[p][0].records if segs.get(p) else 0) for p in manifest.partitions}
    digests = {p: hashlib.sha256() for p in manifest.partitions}
    bounds: dict[int, tuple[int, int | None]] = {p: (start_offsets.get(p, 0), None) for p in manifest.partitions}
    for msg in read_records(cluster, target_topic, bounds, deadline_s=read_deadline(manifest.records)):
        p = msg.partition()
        counts[p] += 1
        if index[p] >= len(segs.get(p, [])):
            continue  # more than backed up: counted, reported below
        digests[p].update(record_content(msg.key(), msg.value(), msg.headers()))
        left[p] -= 1
        if left[p] == 0:
            seg = segs[p][index[p]]
            if digests[p].hexdigest() != seg.records_sha256:
                problems.append(f"{target_topic}[{p}]: records of segment {seg.key} differ")
            index[p] += 1
            digests[p] = hashlib.sha256()
            if index[p] < len(segs[p]):
                left[p] = segs[p][index[p]].records
    expected = {p: s.records for p, s in manifest.partitions.items()}
    for p in sorted(expected):
        if counts[p] != expected[p]:
            problems.append(f"{target_topic}[{p}]: {counts[p]} records, the backup has {expected[p]}")
    return RestoreCheck(records=counts, expected=expected, problems=problems)
