"""Dead letter queue records as Kafka Connect and Spring Kafka write them, for tests and benchmarks.

Headers are the ones those frameworks set (Connect with
``errors.deadletterqueue.context.headers.enable=true``; Spring's ``DeadLetterPublishingRecoverer``,
which writes the original partition as a 4-byte and the offset as an 8-byte big-endian number);
payloads are really serialized: Confluent wire-format Avro, broken JSON, protobuf bytes, JSON.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from confluent_kafka import Producer

SECRETS = ("hunter2", "tok_live_51Hsecret", "s3cr3t-pw")


def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def avro_wire(schema_id: int, match_id: int, team: str) -> bytes:
    """Confluent wire format: magic 0, schema id, then an Avro record {long match_id, string team}."""
    body = _zigzag(match_id) + _zigzag(len(team.encode())) + team.encode()
    return b"\x00" + struct.pack(">I", schema_id) + body


def protobuf_event(match_id: int) -> bytes:
    """A protobuf message {1: varint match_id, 2: bytes 0xfffe}: not UTF-8."""
    return b"\x08" + _zigzag(match_id)[:1] + b"\x12\x02\xff\xfe"


@dataclass(frozen=True)
class DlqRecord:
    kind: str  # what the runbook must call it: schema, serialization, processing
    source_topic: str | None
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def connect_headers(
    topic: str, partition: int, offset: int, stage: str, exc: str, message: str
) -> list[tuple[str, bytes]]:
    return [
        ("__connect.errors.topic", topic.encode()),
        ("__connect.errors.partition", str(partition).encode()),
        ("__connect.errors.offset", str(offset).encode()),
        ("__connect.errors.connector.name", b"match-events-sink"),
        ("__connect.errors.task.id", b"0"),
        ("__connect.errors.stage", stage.encode()),
        ("__connect.errors.class.name", b"io.confluent.connect.avro.AvroConverter"),
        ("__connect.errors.exception.class.name", exc.encode()),
        ("__connect.errors.exception.message", message.encode()),
        ("__connect.errors.exception.stacktrace", f"{exc}: {message}\n\tat org.apache...".encode()),
    ]


def spring_headers(
    topic: str,
    partition: int,
    offset: int,
    exc: str,
    cause: str,
    message: str,
    type_id: str | None = None,
) -> list[tuple[str, bytes]]:
    headers = [
        ("kafka_dlt-original-topic", topic.encode()),
        ("kafka_dlt-original-partition", struct.pack(">i", partition)),
        ("kafka_dlt-original-offset", struct.pack(">q", offset)),
        ("kafka_dlt-original-timestamp", struct.pack(">q", 1_764_000_000_000)),
        ("kafka_dlt-original-consumer-group", b"payments-service"),
        ("kafka_dlt-exception-fqcn", exc.encode()),
        ("kafka_dlt-exception-cause-fqcn", cause.encode()),
        ("kafka_dlt-exception-message", message.encode()),
        (
            "kafka_dlt-exception-stacktrace",
            f"{exc}: {message}\n\tat org.springframework...".encode(),
        ),
    ]
    if type_id:
        headers.append(("__TypeId__", type_id.encode()))
    return headers


def dlq_records(orders: str, payments: str, n: int = 1) -> Iterator[DlqRecord]:
    """``n`` rounds of: 3 schema, 5 serialization, 4 processing failures (12 records)."""
    for r in range(n):
        i = r * 100
        for j in range(3):  # Connect's AvroConverter: the schema id is not in the registry
            yield DlqRecord(
                "schema",
                orders,
                b"match-%d" % (i + j),
                avro_wire(4242, i + j, "red"),
                connect_headers(
                    orders,
                    j % 2,
                    i + j,
                    "VALUE_CONVERTER",
                    "org.apache.kafka.connect.errors.DataException",
                    f"Failed to deserialize data for topic {orders} to Avro: Error retrieving Avro "
                    "value schema for id 4242; Schema 4242 not found; error code: 40403",
                ),
            )
        for j in range(2):  # Connect's JsonConverter on truncated JSON
            yield DlqRecord(
                "serialization",
                orders,
                b"match-%d" % (i + 10 + j),
                b'{"match_id": %d, "score": ' % (i + j),
                connect_headers(
                    orders,
                    0,
                    i + 10 + j,
                    "VALUE_CONVERTER",
                    "org.apache.kafka.connect.errors.DataException",
                    "Converting byte[] to Kafka Connect data failed due to serialization error",
                ),
            )
        for j in range(2):  # Spring's ErrorHandlingDeserializer on protobuf bytes
            yield DlqRecord(
                "serialization",
                payments,
                b"pay-%d" % (i + j),
                protobuf_event(i + j),
                spring_headers(
                    payments,
                    1,
                    i + 20 + j,
                    "org.springframework.kafka.support.serializer.DeserializationException",
                    "com.fasterxml.jackson.core.JsonParseException",
                    "failed to deserialize; nested exception is JsonParseException: Invalid UTF-8 start byte 0xff",
                ),
            )
        # no headers at all, bytes that are not UTF-8: a producer wrote garbage straight to the DLQ
        yield DlqRecord("serialization", None, None, b"\xff\xfe\xfd\x00garbage", [])
        for j in range(3):  # Spring listener failed on a good payment: processing (with secrets)
            payment = {
                "payment_id": i + j,
                "amount": 12.5,
                "card_token": SECRETS[1],
                "password": SECRETS[2],
            }
            yield DlqRecord(
                "processing",
                payments,
                b"pay-%d" % (i + 30 + j),
                json.dumps(payment).encode(),
                spring_headers(
                    payments,
                    0,
                    i + 30 + j,
                    "org.springframework.kafka.listener.ListenerExecutionFailedException",
                    "java.lang.IllegalStateException",
                    f"Listener method threw exception; player {i + j} not found "
                    f"(jdbc:postgresql://app:{SECRETS[0]}@db:5432/games password={SECRETS[0]})",
                    type_id="com.example.payments.Payment",
                ),
            )
        # a JSON event with no error header: the application failed on it without saying why
        yield DlqRecord("processing", None, b"evt-%d" % i, b'{"event": "goal", "minute": 88}', [])


EXPECTED_PER_ROUND = {"schema": 3, "serialization": 5, "processing": 4}


def produce_records(
    bootstrap: str, topic: str, records: list[DlqRecord], partitions: int = 2
) -> None:
    """Produce round-robin over ``partitions``, one record per batch (tansu 0.6 reports a
    partition's high watermark as its last batch's base offset + 1)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1})
    for i, r in enumerate(records):
        producer.produce(
            topic, key=r.key, value=r.value, headers=r.headers, partition=i % partitions
        )
        if i % 1000 == 999:
            producer.flush(30)
    assert producer.flush(30) == 0
