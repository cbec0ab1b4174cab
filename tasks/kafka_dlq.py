"""Kafka dead letter queues: read a DLQ without consuming it and tell its failures apart.

Replaying them is in tasks.kafka_dlq_replay.

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
from pydantic import BaseModel, Field

from blocks.kafka import KafkaCluster
from runbooks.audit import scrub, scrub_text
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


def peek_consumer(cluster: KafkaCluster) -> Consumer:
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
    consumer = peek_consumer(cluster)
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
    consumer = peek_consumer(cluster)
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
