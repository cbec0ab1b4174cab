"""Back up a Kafka topic (or an offset/time range of it) to S3, resumable; check a backup.

The format and the pure decisions are in tasks.kafka_backup_format, restoring in
tasks.kafka_restore. Progress is what S3 holds: a resumed run lists the backup's segments and
continues after the last unbroken one; nothing is kept anywhere else.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prefect import task
from pydantic import BaseModel, Field

from blocks.backup_store import BackupStore
from blocks.kafka import KafkaCluster
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.kafka import is_retriable
from tasks.kafka_backup_format import (
    MANIFEST,
    PLAN,
    BackupPlan,
    Manifest,
    Resume,
    SegmentInfo,
    SegmentWriter,
    TopicConfigs,
    backup_root,
    backup_to_resume,
    check_manifest,
    compress,
    configs_to_keep,
    decompress,
    iter_segment,
    new_backup_id,
    parse_segment_key,
    plan_ranges,
    record_content,
    resume_point,
    segment_key,
    summarize,
)
from tasks.kafka_backup_s3 import list_backups, list_objects, load_manifest, put_json
from tasks.kafka_dlq import peek_consumer, read_records


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, KafkaException):
        return is_retriable(exc)
    return isinstance(exc, BotoCoreError | TimeoutError)


def read_deadline(records: int) -> float:
    """Reading stops with an error below about 1,000 records/s: a broker that stopped serving."""
    return 60.0 + records / 1000


# --- the topic ----------------------------------------------------------------------------------


def log_bounds(cluster: KafkaCluster, topic: str) -> dict[int, tuple[int, int]]:
    """Each partition's (earliest, end) offsets; a topic that does not exist is an error.

    The end is read, not only asked for: tansu reports a high watermark at the last batch's base
    offset + 1, so the last batch is read from there and its last offset + 1 taken when larger.
    """
    timeout = cluster.request_timeout_s
    # the end of a partition shows as an empty fetch, which the broker holds for
    # fetch.wait.max.ms (500 ms by default): here nothing is waited for
    consumer = cluster.get_consumer(
        f"runbooks-backup-probe-{uuid.uuid4().hex[:12]}",
        **{
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
        },
    )
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            raise ValueError(f"topic {topic!r} not found: {md.error if md else 'missing'}")
        marks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            for p in sorted(md.partitions)
        }
        ends = {p: high for p, (_, high) in marks.items()}
        probe = {p for p, (low, high) in marks.items() if high > low}
        consumer.assign([TopicPartition(topic, p, max(marks[p][0], ends[p] - 1)) for p in probe])
        deadline = time.monotonic() + max(30.0, timeout * 3)
        while probe:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the end of {topic} took over {timeout * 3:.0f}s")
            for msg in consumer.consume(1000, timeout=0.5):
                err = msg.error()
                if err is None:
                    ends[msg.partition()] = max(ends[msg.partition()], msg.offset() + 1)
                elif err.code() == KafkaError._PARTITION_EOF:
                    probe.discard(msg.partition())
                else:
                    raise KafkaException(err)
    finally:
        consumer.close()
    return {p: (low, ends[p]) for p, (low, _) in marks.items()}


def offsets_at(
    cluster: KafkaCluster, topic: str, partitions: Iterable[int], at: datetime
) -> dict[int, int | None]:
    """Per partition, the first offset whose timestamp is at or after ``at`` (None: none is)."""
    consumer = peek_consumer(cluster)
    try:
        ms = int(at.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in partitions], timeout=cluster.request_timeout_s
        )
    finally:
        consumer.close()
    return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}


# --- backing up ---------------------------------------------------------------------------------


class BackupResult(ChangeSet):
    """What a backup wrote (or would write)."""

    topic: str
    backup_id: str
    location: str = Field(description="s3://bucket/prefix/topic/backup-id/")
    resumed: bool = Field(False, description="An interrupted backup was continued.")
    complete_before: bool = Field(False, description="The backup was already complete.")
    records: int = Field(0, description="Records written by this run.")
    segments: int = Field(0, description="Segment objects written by this run.")
    bytes: int = Field(0, description="Bytes written by this run (compressed).")
    elapsed_s: float = 0.0
    manifest: Manifest | None = None


def _selection(
    from_offset: int | None,
    to_offset: int | None,
    from_time: datetime | None,
    to_time: datetime | None,
) -> dict[str, Any]:
    return {
        "from_offset": from_offset,
        "to_offset": to_offset,
        "from_time": from_time.isoformat() if from_time else None,
        "to_time": to_time.isoformat() if to_time else None,
    }


def _new_plan(
    cluster: KafkaCluster,
    topic: str,
    backup_id: str,
    selection: dict[str, Any],
    segment_bytes: int,
    compress_level: int,
    from_time: datetime | None,
    to_time: datetime | None,
) -> BackupPlan:
    bounds = log_bounds(cluster, topic)
    starts = offsets_at(cluster, topic, bounds, from_time) if from_time else None
    ends = offsets_at(cluster, topic, bounds, to_time) if to_time else None
    return BackupPlan(
        topic=topic,
        backup_id=backup_id,
        created_at=datetime.now(UTC),
        ranges=plan_ranges(bounds, selection["from_offset"], selection["to_offset"], starts, ends),
        segment_bytes=segment_bytes,
        compress_level=compress_level,
        selection=selection,
        topic_configs=topic_configs(cluster, topic),
    )


def describe_topic_configs(
    cluster: KafkaCluster, topic: str
) -> list[tuple[str, str | None, int, bool, bool]]:
    """DescribeConfigs of ``topic``: (name, value, source, read-only, sensitive) per entry."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    timeout = cluster.request_timeout_s
    admin = cluster.get_admin_client()
    [future] = admin.describe_configs(
        [ConfigResource(ResourceType.TOPIC, topic)], request_timeout=timeout
    ).values()
    return [
        (e.name, e.value, int(e.source), bool(e.is_read_only), bool(e.is_sensitive))
        for e in future.result(timeout * 2).values()
    ]


def topic_configs(cluster: KafkaCluster, topic: str) -> TopicConfigs | None:
    """The configs a backup of ``topic`` records (see ``configs_to_keep``); None when the broker
    refuses to describe them (e.g. no DescribeConfigs permission): the records still matter
    more, and a restore then says the backup has no configs."""
    try:
        return configs_to_keep(describe_topic_configs(cluster, topic))
    except KafkaException as exc:
        if is_retriable(exc):
            raise
        return None


def _resume_points(plan: BackupPlan, objects: dict[str, int]) -> dict[int, Resume]:
    found: dict[int, list[Any]] = {p: [] for p in plan.ranges}
    keys: dict[Any, str] = {}
    for key in objects:
        seg = parse_segment_key(key)
        if seg is not None and seg.partition in found:
            found[seg.partition].append(seg)
            keys[seg] = key
    return {p: resume_point(s, e, found[p], keys) for p, (s, e) in plan.ranges.items()}


class _Uploader:
    """Compresses and puts segments on worker threads, at most ``depth`` in flight."""

    def __init__(self, s3: Any, store: BackupStore, root: str, level: int, threads: int):
        self.s3 = s3
        self.bucket, self.root, self.level = store.bucket, root, level
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="backup-put")
        self.pending: list[Future[SegmentInfo]] = []
        self.done: list[SegmentInfo] = []
        self.depth = threads * 2

    def submit(self, partition: int, seq: int, writer: SegmentWriter) -> None:
        while len(self.pending) >= self.depth:
            self.done.append(self.pending.pop(0).result())
        self.pending.append(self.pool.submit(self._put, partition, seq, writer))

    def _put(self, partition: int, seq: int, writer: SegmentWriter) -> SegmentInfo:
        body = compress(writer.body(), self.level)
        key = segment_key(partition, seq, writer.first, writer.last)
        info = SegmentInfo(
            key=key,
            partition=partition,
            seq=seq,
            first_offset=writer.first,
            last_offset=writer.last,
            records=writer.records,
            size=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            records_sha256=writer.digest(),
        )
        self.s3.put_object(
            Bucket=self.bucket,
            Key=self.root + key,
            Body=body,
            ContentType="application/gzip",
            Metadata={
                "records": str(info.records),
                "sha256": info.sha256,
                "records-sha256": info.records_sha256,
            },
        )
        return info

    def finish(self) -> list[SegmentInfo]:
        try:
            for fut in self.pending:
                self.done.append(fut.result())
            return self.done
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _segment_from_s3(s3: Any, bucket: str, root: str, key: str) -> SegmentInfo:
    """A segment an earlier run wrote, described by its object metadata."""
    seg = parse_segment_key(key)
    assert seg is not None
    head = s3.head_object(Bucket=bucket, Key=root + key)
    meta = head.get("Metadata", {})
    return SegmentInfo(
        key=key,
        partition=seg.partition,
        seq=seg.seq,
        first_offset=seg.first,
        last_offset=seg.last,
        records=int(meta["records"]),
        size=head["ContentLength"],
        sha256=meta["sha256"],
        records_sha256=meta["records-sha256"],
    )


def _copy_records(
    cluster: KafkaCluster, plan: BackupPlan, resume: dict[int, Resume], uploader: _Uploader
) -> int:
    """Read every remaining record and hand full segments to the uploader; returns records read."""
    todo: dict[int, tuple[int, int | None]] = {
        p: (r.offset, plan.ranges[p][1]) for p, r in resume.items() if not r.done
    }
    if not todo:
        return 0
    writers = {p: SegmentWriter() for p in todo}
    seqs = {p: resume[p].seq for p in todo}
    limit = plan.segment_bytes
    count = 0
    remaining = sum((e or 0) - s for s, e in todo.values())
    for msg in read_records(cluster, plan.topic, todo, deadline_s=read_deadline(remaining)):
        p = msg.partition()
        ts_type, ts = msg.timestamp()
        w = writers[p]
        w.add(msg.offset(), ts, ts_type, record_content(msg.key(), msg.value(), msg.headers()))
        count += 1
        if w.size >= limit:
            uploader.submit(p, seqs[p], w)
            seqs[p] += 1
            writers[p] = SegmentWriter()
    for p, w in writers.items():
        if w.records:
            uploader.submit(p, seqs[p], w)
    return count


@task(**runbook_task_options(KafkaException, BotoCoreError, TimeoutError, when=_transient))
def backup_topic(
    cluster: KafkaCluster,
    store: BackupStore,
    topic: str,
    dry_run: bool,
    from_offset: int | None = None,
    to_offset: int | None = None,
    from_time: datetime | None = None,
    to_time: datetime | None = None,
    backup_id: str | None = None,
    segment_bytes: int = 16 * 1024 * 1024,
    compress_level: int = 1,
    upload_threads: int = 2,
) -> BackupResult:
    """Back up the records of ``topic`` (all, or the offset/time range asked) to the store.

    Continues an interrupted backup of the same selection when one is there (or ``backup_id``
    when given): the plan fixed at its start, the segments already in S3 kept, the rest written
    with the same keys. The manifest is written last, after every segment.
    """
    started = time.monotonic()
    s3 = store.get_s3_client()
    selection = _selection(from_offset, to_offset, from_time, to_time)
    refs = {b.backup_id: b for b in list_backups(store, topic, s3)}
    if backup_id is None:
        backup_id = backup_to_resume(
            [
                (b.backup_id, b.complete, b.plan.selection if b.plan else None)
                for b in refs.values()
            ],
            selection,
        )
    ref = refs.get(backup_id) if backup_id else None
    if ref is None or ref.plan is None:
        backup_id = backup_id or new_backup_id(datetime.now(UTC))
        plan = _new_plan(
            cluster, topic, backup_id, selection, segment_bytes, compress_level, from_time, to_time
        )
        fresh = True
    else:
        plan, fresh = ref.plan, False
    root = backup_root(store.prefix, topic, backup_id)
    location = f"s3://{store.bucket}/{root}"
    result = BackupResult(
        dry_run=dry_run, topic=topic, backup_id=backup_id, location=location, resumed=not fresh
    )
    if ref is not None and ref.complete:
        return result.model_copy(
            update={"complete_before": True, "notes": [f"{location} is complete already"]}
        )
    objects = {} if fresh else list_objects(s3, store.bucket, root)
    resume = _resume_points(plan, objects)
    planned = [
        Change(
            action="back_up_partition",
            target=f"{topic}[{p}] -> {location}",
            detail={
                "from_offset": resume[p].offset,
                "to_offset": end,
                "records_at_most": end - resume[p].offset,
                "segments_already_there": resume[p].seq,
            },
        )
        for p, (_, end) in sorted(plan.ranges.items())
        if not resume[p].done
    ]
    planned.append(
        Change(
            action="write_backup_manifest",
            target=location + MANIFEST,
            detail={"partitions": len(plan.ranges)},
        )
    )
    result = result.model_copy(update={"planned": planned})
    if dry_run:
        return result

    if fresh:
        put_json(s3, store.bucket, root + PLAN, plan)
    uploader = _Uploader(s3, store, root, plan.compress_level, upload_threads)
    try:
        count = _copy_records(cluster, plan, resume, uploader)
    finally:
        written = uploader.finish()
    rewritten = {s.key for s in written}
    kept: list[SegmentInfo] = []
    for key in objects:
        seg = parse_segment_key(key)
        if seg is None or key in rewritten:
            continue
        if seg.partition in resume and seg.seq < resume[seg.partition].seq:
            kept.append(_segment_from_s3(s3, store.bucket, root, key))
        else:  # past a gap and not written again: not part of this backup
            s3.delete_object(Bucket=store.bucket, Key=root + key)
    segments = sorted(kept + written, key=lambda s: (s.partition, s.seq))
    manifest = Manifest(
        topic=topic,
        backup_id=backup_id,
        created_at=plan.created_at,
        completed_at=datetime.now(UTC),
        plan=plan,
        partitions=summarize(plan, segments),
        segments=segments,
        records=sum(s.records for s in segments),
        bytes=sum(s.size for s in segments),
        topic_configs=plan.topic_configs,
    )
    problems = check_manifest(manifest, {s.key: s.size for s in segments})
    if problems:
        raise RuntimeError(f"backup {location} does not add up: {'; '.join(problems[:5])}")
    put_json(s3, store.bucket, root + MANIFEST, manifest)
    return result.model_copy(
        update={
            "applied": list(planned),
            "records": count,
            "segments": len(written),
            "bytes": sum(s.size for s in written),
            "elapsed_s": time.monotonic() - started,
            "manifest": manifest,
        }
    )


class BackupCheck(BaseModel):
    """A backup as S3 holds it, checked against its manifest."""

    location: str
    records: int
    segments: int
    problems: list[str]
    segments_read: int = Field(0, description="Segments downloaded and re-digested (deep check).")

    @property
    def ok(self) -> bool:
        return not self.problems


@task(**runbook_task_options(BotoCoreError, TimeoutError, when=_transient))
def check_backup(store: BackupStore, topic: str, backup_id: str, deep: bool = False) -> BackupCheck:
    """List the backup's objects and check them against its manifest (presence, sizes, counts,
    checksums); ``deep`` also downloads every segment and recomputes its digests."""
    s3 = store.get_s3_client()
    manifest = load_manifest(store, topic, backup_id, s3)
    root = backup_root(store.prefix, topic, backup_id)
    objects = list_objects(s3, store.bucket, root)
    problems = check_manifest(manifest, objects)
    read = 0
    if deep and not problems:
        for seg in manifest.segments:
            body = s3.get_object(Bucket=store.bucket, Key=root + seg.key)["Body"].read()
            digest = hashlib.sha256()
            n = 0
            for _, content in iter_segment(decompress(body)):
                digest.update(content)
                n += 1
            read += 1
            if (
                hashlib.sha256(body).hexdigest() != seg.sha256
                or digest.hexdigest() != seg.records_sha256
            ):
                problems.append(f"segment {seg.key}: content does not match its checksum")
            elif n != seg.records:
                problems.append(f"segment {seg.key}: {n} records, the manifest says {seg.records}")
    return BackupCheck(
        location=f"s3://{store.bucket}/{root}",
        records=manifest.records,
        segments=len(manifest.segments),
        problems=problems,
        segments_read=read,
    )
