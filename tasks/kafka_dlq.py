"""Kafka dead letter queues: read a DLQ without consuming it, tell its failures apart, replay them.

Reading never joins a group and never commits: the consumer is assigned the partitions under a
throwaway group id (librdkafka requires one) with auto-commit off, so the application's group
and its offsets are untouched.

Classification reads what the failing application wrote into each record's headers: Kafka
Connect's ``__connect.errors.*`` (with ``errors.deadletterqueue.context.headers.enable``) and
Spring Kafka's ``kafka_dlt-*`` (``DeadLetterPublishingRecoverer``), plus Spring's ``__TypeId__``.
"""

from __future__ import annotations

import json
import re
import struct
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prefect import task
from prefect.variables import Variable
from pydantic import BaseModel, Field

from blocks.kafka import KafkaCluster
from runbooks.audit import scrub, scrub_text
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from runbooks.text import cut
from tasks.kafka import is_retriable


class FailureKind(StrEnum):
    SCHEMA = "schema"  # schema id / subject not found, schema validation
    SERIALIZATION = "serialization"  # bytes that do not decode (converter, deserializer)
    PROCESSING = "processing"  # decoded fine, the application failed on it


CONNECT = "__connect.errors."
SPRING = "kafka_dlt-"
TYPE_ID = "__TypeId__"

# what a schema registry client or a schema validator says (Confluent's: "Schema 42 not found;
# error code: 40403", "Subject 'x-value' not found"); checked before serialization, whose
# exception classes often wrap them. Lowercase, matched against lowercased text: re.IGNORECASE
# is several times slower, and triage runs these on every record.
_SCHEMA = re.compile(
    r"schema[^;]{0,40}not found|subject[^;]{0,80}not found|error code:? ?4040[1-3]|"
    r"schemaregistry|schemaparseexception|schema validation|"
    r"does not (?:match|conform to) (?:the )?schema|\bvalidationexception\b"
)
_SERIALIZATION = re.compile(
    r"serializ|jsonparse|jsonmapping|mismatchedinput|invalidformat|dataexception|"
    r"unknown magic byte|invalidprotocolbuffer|avroruntime|messageconversion|"
    r"unsupportedencoding|malformedinput|charactercoding"
)
_SCHEMA_WORDS = ("schema", "subject", "4040", "validation")
_CONVERTER_STAGES = {"KEY_CONVERTER", "VALUE_CONVERTER", "HEADER_CONVERTER"}


@dataclass(frozen=True, slots=True)
class Classified:
    """What one DLQ record's headers and payload say about why it failed.

    A plain dataclass, not a pydantic model: triage makes one per record (100k+), and this is
    its hot path. ``message`` is as recorded, not scrubbed: scrub it before showing it.
    """

    kind: FailureKind
    why: str  # which evidence decided the kind
    exception: str = ""  # exception class the application recorded, if any
    message: str = ""
    source_topic: str | None = None  # topic the record failed on, if recorded
    source_partition: int | None = None
    source_offset: int | None = None
    type_id: str | None = None  # Spring's __TypeId__ (the payload's class)


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw is not None else ""


def _number(raw: bytes | None) -> int | None:
    """Connect writes numbers as text; Spring as big-endian int (partition) or long (offset)."""
    if raw is None:
        return None
    text = raw.decode("ascii", "ignore").strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if len(raw) in (4, 8):
        return struct.unpack(">i" if len(raw) == 4 else ">q", raw)[0]
    return None


def payload_decodes(value: bytes | None) -> bool:
    """UTF-8 text, or Confluent's wire format (magic byte 0 + 4-byte schema id + body).

    Binary formats without the wire-format prefix (raw Avro, Protobuf) do not decode here: a DLQ
    of such a topic carries its error in headers, which take precedence.
    """
    if not value:
        return True
    if len(value) > 5 and value[0] == 0:
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def classify_record(
    headers: dict[str, bytes], value: bytes | None, max_chars: int = 200
) -> Classified:
    """Classify one DLQ record by its headers, then by its payload.

    The recorded exception (class, cause, message) names a schema problem (schema id or subject
    not found, validation) -> schema; a serialization problem (deserializer/converter classes,
    a Connect converter stage) -> serialization. Otherwise an undecodable payload -> serialization,
    anything else -> processing.
    """
    h = headers
    exception = _text(h.get(f"{CONNECT}exception.class.name") or h.get(f"{SPRING}exception-fqcn"))
    cause = _text(h.get(f"{SPRING}exception-cause-fqcn"))
    message = _text(h.get(f"{CONNECT}exception.message") or h.get(f"{SPRING}exception-message"))
    stage = _text(h.get(f"{CONNECT}stage"))
    key_error = _text(h.get(f"{SPRING}key-exception-fqcn"))
    source = h.get(f"{CONNECT}topic") or h.get(f"{SPRING}original-topic")

    def found(kind: FailureKind, why: str) -> Classified:
        return Classified(
            kind=kind,
            why=why,
            exception=exception or key_error,
            message=message[:max_chars],
            source_topic=_text(source) if source is not None else None,
            source_partition=_number(
                h.get(f"{CONNECT}partition") or h.get(f"{SPRING}original-partition")
            ),
            source_offset=_number(h.get(f"{CONNECT}offset") or h.get(f"{SPRING}original-offset")),
            type_id=_text(h[TYPE_ID]) if TYPE_ID in h else None,
        )

    classes = f"{exception} {cause} {key_error}"
    evidence = f"{classes} {message}"
    # the words every schema pattern contains, checked first: the regex is the slow part
    low = evidence.lower()
    if any(w in low for w in _SCHEMA_WORDS) and _SCHEMA.search(low):
        return found(FailureKind.SCHEMA, "the recorded error names a schema problem")
    if stage in _CONVERTER_STAGES:
        return found(FailureKind.SERIALIZATION, f"Kafka Connect failed in stage {stage}")
    if classes.strip() and _SERIALIZATION.search(classes.lower()):
        return found(
            FailureKind.SERIALIZATION, "the recorded exception is a (de)serialization error"
        )
    if not payload_decodes(value):
        return found(FailureKind.SERIALIZATION, "the payload is neither UTF-8 nor wire-format")
    if exception:
        return found(FailureKind.PROCESSING, "the application failed on a payload that decodes")
    return found(FailureKind.PROCESSING, "no error header; the payload decodes")


def sample_value(value: bytes | None, max_chars: int) -> str:
    """A payload safe to show: JSON with secret-looking keys masked, other text scrubbed, cut."""
    if value is None:
        return "<null>"
    if len(value) > 5 and value[0] == 0:
        schema_id = struct.unpack(">I", value[1:5])[0]
        return f"<wire format, schema id {schema_id}, {len(value) - 5} bytes: {value[5:21].hex()}…>"
    if not payload_decodes(value):
        return f"<{len(value)} bytes, binary: {value[:16].hex()}…>"
    text = value.decode("utf-8")
    try:
        shown = json.dumps(scrub(json.loads(text)), separators=(",", ":"))
    except ValueError:
        shown = text
    return cut(scrub_text(shown), max_chars)


# --- reading -----------------------------------------------------------------------------------


class DlqSample(BaseModel):
    partition: int
    offset: int
    kind: FailureKind
    source_topic: str | None
    error: str
    key: str
    value: str
    headers: dict[str, str]


class DlqTriage(BaseModel):
    """What a peek at a DLQ found."""

    topic: str
    read: int = Field(description="Records read.")
    ranges: dict[int, tuple[int, int]] = Field(
        description="Per partition, the offsets read [first, last]."
    )
    by_kind: dict[str, int]
    by_source_topic: dict[str, int]
    by_error: dict[str, int] = Field(
        description="Most frequent errors (exception: message), with counts."
    )
    samples: list[DlqSample]


def _peek_consumer(cluster: KafkaCluster) -> Consumer:
    # a group id nobody uses, never joined (assign) and never committed to (auto-commit off)
    return cluster.get_consumer(
        f"runbooks-dlq-peek-{uuid.uuid4().hex[:12]}",
        **{
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        },
    )


def _start_offsets(
    consumer: Consumer,
    topic: str,
    partitions: list[int],
    newest: int,
    since: datetime | None,
    timeout: float,
) -> dict[int, tuple[int, int]]:
    """Per partition, [start, end) to read: the newest ``newest`` records, or from ``since``."""
    bounds: dict[int, tuple[int, int]] = {}
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        bounds[p] = (max(low, high - newest), high)
    if since is not None:
        at = int(since.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, at) for p in partitions], timeout=timeout
        )
        for tp in found:
            low, high = bounds[tp.partition]
            start = (
                tp.offset if tp.offset >= 0 else high
            )  # none at or after `since`: nothing to read
            bounds[tp.partition] = (start, min(high, start + newest))
    return {p: b for p, b in bounds.items() if b[0] < b[1]}


def read_records(
    cluster: KafkaCluster, topic: str, bounds: dict[int, tuple[int, int | None]], deadline_s: float
) -> Iterable[Any]:
    """The records of ``topic`` in ``bounds`` ([start, end) per partition; end None: up to the
    partition's end when read), read by assignment."""
    consumer = _peek_consumer(cluster)
    try:
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in bounds.items()])
        open_parts = set(bounds)
        deadline = time.monotonic() + deadline_s
        while open_parts:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {topic} did not reach the end of partitions {sorted(open_parts)} "
                    f"within {deadline_s:.0f}s"
                )
            for msg in consumer.consume(1000, timeout=0.5):
                p = msg.partition()
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(p)
                        continue
                    raise KafkaException(err)
                end = bounds[p][1]
                if p not in open_parts or (end is not None and msg.offset() >= end):
                    continue
                if end is not None and msg.offset() >= end - 1:
                    open_parts.discard(p)
                yield msg
    finally:
        consumer.close()


@task(**runbook_task_options(KafkaException, when=is_retriable))
def peek_dlq(
    cluster: KafkaCluster,
    topic: str,
    newest: int = 1000,
    since: datetime | None = None,
    samples_per_kind: int = 3,
    max_chars: int = 200,
) -> DlqTriage:
    """Read the newest ``newest`` records of each DLQ partition (or those from ``since``) without
    consuming them, classify each, and count per kind, source topic and error.

    Samples keep ``samples_per_kind`` records of each kind with key, value and headers cut to
    ``max_chars`` and secret-looking values masked.
    """
    timeout = cluster.request_timeout_s
    consumer = _peek_consumer(cluster)
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            raise ValueError(f"DLQ topic {topic!r} not found: {md.error if md else 'missing'}")
        bounds = _start_offsets(consumer, topic, sorted(md.partitions), newest, since, timeout)
    finally:
        consumer.close()
    samples: list[DlqSample] = []
    sampled: Counter[FailureKind] = Counter()
    kinds: Counter[FailureKind] = Counter()
    sources: Counter[str | None] = Counter()
    errors: Counter[tuple[str, str]] = Counter()  # as recorded: scrubbed when shown
    ranges: dict[int, tuple[int, int]] = {}
    read = 0
    for msg in read_records(cluster, topic, bounds, deadline_s=max(60.0, timeout * 6)):
        headers = dict(msg.headers() or [])
        c = classify_record(headers, msg.value(), max_chars)
        read += 1
        p, o = msg.partition(), msg.offset()
        first, last = ranges.get(p, (o, o))
        ranges[p] = (min(first, o), max(last, o))
        kinds[c.kind] += 1
        sources[c.source_topic] += 1
        errors[(c.exception, c.message)] += 1
        if sampled[c.kind] < samples_per_kind:
            sampled[c.kind] += 1
            samples.append(_sample(msg, headers, c, max_chars))
    shown: Counter[str] = Counter()
    # scrubbing is the slow part: only errors that may make the top 10 once scrubbed alike merge
    for (exception, message), n in errors.most_common(100):
        shown[_error_text(exception, message, max_chars)] += n
    return DlqTriage(
        topic=topic,
        read=read,
        ranges=dict(sorted(ranges.items())),
        by_kind={k.value: n for k, n in kinds.most_common()},
        by_source_topic={t or "(not recorded)": n for t, n in sources.most_common()},
        by_error=dict(shown.most_common(10)),
        samples=samples,
    )


def _error_text(exception: str, message: str, max_chars: int) -> str:
    return cut(scrub_text(f"{exception or '(no exception header)'}: {message}"), max_chars)


def _sample(msg: Any, headers: dict[str, bytes], c: Classified, max_chars: int) -> DlqSample:
    """One record as people may see it: cut, secret-looking values masked, no stack traces."""
    return DlqSample(
        partition=msg.partition(),
        offset=msg.offset(),
        kind=c.kind,
        source_topic=c.source_topic,
        error=_error_text(c.exception, c.message, max_chars),
        key=sample_value(msg.key(), max_chars),
        value=sample_value(msg.value(), max_chars),
        headers={
            k: cut(scrub_text(_text(v)), 80)
            for k, v in headers.items()
            if not k.endswith("stacktrace")
        },
    )


def offset_ranges(offsets: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3,7``: DLQ offsets as a person reads them."""
    out: list[str] = []
    ordered = sorted(set(offsets))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


# --- replay ------------------------------------------------------------------------------------

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
    consumer = _peek_consumer(cluster)
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
