"""Edge-gateway WAL drain: every record after the marker to Kafka, exactly once.

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

The on-disk format is in ``tasks.wal_format``; reading the topic back and verifying a drain
in ``tasks.wal_topic``.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from prefect import task
from pydantic import Field

from blocks.edge_gateway import EdgeGateway
from blocks.kafka import KafkaCluster
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.wal import (
    DrainConflict,
    KafkaUnavailable,
    SequenceReport,
    advance_marker,
    check_sequences,
    deletable_segments,
    quarantined_positions,
)
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
    quarantine_damage,
    read_marker,
    write_marker,
)
from tasks.wal_topic import (
    TopicRecord,
    _end_offsets,
    _topic_partitions,
    kafka_failure,
    read_wal_records_in_topic,
)


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
