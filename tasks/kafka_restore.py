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
from tasks.kafka_backup import describe_topic_configs, log_bounds, read_deadline
from tasks.kafka_backup_format import (
    RESTORES,
    Manifest,
    Record,
    backup_root,
    check_manifest,
    config_drift,
    decompress,
    iter_segment,
    iter_sendable,
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
    config_drift: list[str] = Field(
        default_factory=list,
        description="How the existing target's configs differ from the backed-up topic's "
        "(reported, not changed).",
    )
    elapsed_s: float = 0.0


def state_key(store: BackupStore, manifest: Manifest, target: str) -> str:
    return (
        backup_root(store.prefix, manifest.topic, manifest.backup_id) + f"{RESTORES}/{target}.json"
    )


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


class SegmentStream:
    """(partition, decompressed segment) of every segment, partition by partition in order.

    Downloads start when it is made (a restore makes it before creating the target and writing
    its progress record, which then cost no time) and run ``ahead`` segments ahead on two
    threads that also decompress (zlib releases the GIL). Decoding is left to the caller's
    thread: on worker threads it contended with the sends for the GIL."""

    def __init__(self, s3: Any, store: BackupStore, manifest: Manifest, ahead: int = 3) -> None:
        root = backup_root(store.prefix, manifest.topic, manifest.backup_id)

        def fetch(key: str) -> bytes:
            return decompress(s3.get_object(Bucket=store.bucket, Key=root + key)["Body"].read())

        self._fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="restore-get")
        segs = sorted(manifest.segments, key=lambda s: (s.partition, s.seq))
        self._rest = iter(segs[ahead:])
        self._ahead = deque((s.partition, self._pool.submit(fetch, s.key)) for s in segs[:ahead])

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while self._ahead:
            partition, fut = self._ahead.popleft()
            raw = fut.result()
            nxt = next(self._rest, None)
            if nxt is not None:
                self._ahead.append((nxt.partition, self._pool.submit(self._fetch, nxt.key)))
            yield partition, raw

    def close(self) -> None:
        self._ahead.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> SegmentStream:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _create_topic(
    cluster: KafkaCluster, topic: str, partitions: int, replication: int, configs: dict[str, str]
) -> None:
    admin = cluster.get_admin_client()
    futures = admin.create_topics(
        [NewTopic(topic, partitions, replication, config=configs)],
        request_timeout=cluster.request_timeout_s,
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


RESTORE_PRODUCER: dict[str, Any] = {
    "enable.idempotence": True,  # per partition, the target holds a prefix of what was sent ...
    "enable.gapless.guarantee": True,  # ... with no gap: a failed record fails all later ones
    "acks": "all",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "queue.buffering.max.kbytes": 256 * 1024,
    # delivery reports for failed records only: a report per delivered record costs the client
    # about as much as the send (served by poll); failures still reach the callback, and flush
    # waits for every record
    "delivery.report.only.error": True,
}
"""The restore's producer settings (the benchmark's bare produce loop uses the same)."""


def _produce(
    cluster: KafkaCluster,
    manifest: Manifest,
    target: str,
    skip: dict[int, int],
    found: dict[int, tuple[int, Any]],
    segments: SegmentStream,
) -> dict[int, int]:
    """Send each partition's records after the first ``skip[p]``; those are checked against what
    ``found`` read in the target. Returns records sent per partition."""
    timeout = cluster.request_timeout_s
    failures: list[str] = []

    def failed(err: Any, _msg: Any) -> None:  # called for failed records only
        if err is not None:
            failures.append(str(err))

    producer = cluster.get_producer(**RESTORE_PRODUCER, on_delivery=failed)
    sent: dict[int, int] = {p: 0 for p in manifest.partitions}
    left = {p: skip.get(p, 0) for p in manifest.partitions}
    prefixes = {p: hashlib.sha256() for p in manifest.partitions}
    produce, poll = producer.produce, producer.poll
    for p, raw in segments:
        if left[p]:  # resuming: the records an interrupted run restored are checked, not sent
            records = _skip_restored(
                iter_segment(raw), p, left, prefixes[p], skip[p], found[p][1], target
            )
            sendable: Iterator[tuple[int, Any, Any, Any]] = (
                (r.timestamp, r.key, r.value, r.headers or None) for r, _ in records
            )
        else:
            sendable = iter_sendable(raw)
        count = 0
        # the hot loop of a restore: one produce per record, nothing else
        for ts, key, value, headers in sendable:
            try:
                produce(target, value, key, p, timestamp=ts if ts > 0 else 0, headers=headers)
            except BufferError:  # the local queue is full: let deliveries drain it, send again
                _send_when_room(produce, poll, target, p, ts, key, value, headers)
            count += 1
            if not count & 1023:
                poll(0)
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


def _send_when_room(
    produce: Any, poll: Any, target: str, p: int, ts: int, key: Any, value: Any, headers: Any
) -> None:
    while True:
        poll(0.05)
        try:
            produce(target, value, key, p, timestamp=ts if ts > 0 else 0, headers=headers)
            return
        except BufferError:
            continue


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
    into_non_empty: bool = False,
    replication_factor: int = 3,
) -> RestoreResult:
    """Restore backup ``backup_id`` of ``topic`` (default: the newest complete one) into
    ``target_topic`` (default: ``topic``), creating it with the backup's partitions if missing.

    Refuses (``refused``, nothing planned) a target that holds records unless ``into_non_empty``
    (the runbook sets it only once the approver typed the topic's name); continues an
    interrupted restore of the same backup into the same target without sending anything twice.
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
    if not resuming and now.exists and not now.empty and not into_non_empty:
        # the restored records would follow what is there; consumers would read both
        done = f" (restored from this backup at {state.completed_at:%Y-%m-%d %H:%M:%S} UTC)"
        return result.model_copy(
            update={
                "refused": f"{target} already holds {sum(now.records.values())} records"
                + (done if state is not None and state.completed_at else "")
                + ": not restoring into it unless the approver types its name",
            }
        )

    configs = manifest.topic_configs.configs if manifest.topic_configs else {}
    if now.exists and configs:
        target_configs = {
            name: value
            for name, value, *_ in describe_topic_configs(cluster, target)
            if value is not None
        }
        result.config_drift = config_drift(configs, target_configs)

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
                detail={
                    "partitions": needed,
                    "replication_factor": replication_factor,
                    "configs": configs,
                },
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

    with SegmentStream(s3, store, manifest) as segments:  # downloads begin now
        if not now.exists:
            _create_topic(cluster, target, needed, replication_factor, configs)
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
        sent = _produce(cluster, manifest, target, skip, found, segments)
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
    cluster: KafkaCluster,
    store: BackupStore,
    topic: str,
    backup_id: str,
    target_topic: str,
    start_offsets: dict[int, int],
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
    bounds: dict[int, tuple[int, int | None]] = {
        p: (start_offsets.get(p, 0), None) for p in manifest.partitions
    }
    for msg in read_records(
        cluster, target_topic, bounds, deadline_s=read_deadline(manifest.records)
    ):
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
            problems.append(
                f"{target_topic}[{p}]: {counts[p]} records, the backup has {expected[p]}"
            )
    return RestoreCheck(records=counts, expected=expected, problems=problems)
