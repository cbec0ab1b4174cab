"""DLQ decisions as data: a record's headers and payload -> failure kind; what samples show; how
replayed records are marked; when a replay needs approval."""

from __future__ import annotations

import struct

import pytest

from flows.kafka.dlq_growing import _needs_approval
from runbooks.audit import scrub_text
from runbooks.results import Change
from tasks.kafka_dlq import FailureKind, classify_record, offset_ranges, sample_value
from tasks.kafka_dlq_replay import REPLAYED_FROM, ReplayResult, replay_headers
from tests.dlq_records import avro_wire, connect_headers, protobuf_event, spring_headers

SCHEMA, SER, PROC = FailureKind.SCHEMA, FailureKind.SERIALIZATION, FailureKind.PROCESSING
DATA_EXC = "org.apache.kafka.connect.errors.DataException"
LISTENER = "org.springframework.kafka.listener.ListenerExecutionFailedException"


def connect(stage: str, exc: str, message: str) -> dict[str, bytes]:
    return dict(connect_headers("orders", 1, 42, stage, exc, message))


def spring(exc: str, cause: str, message: str, type_id: str | None = None) -> dict[str, bytes]:
    return dict(spring_headers("payments", 3, 9_000_000_000, exc, cause, message, type_id))


# (case, headers, value, kind)
CASES = [
    (
        "connect: schema id not in the registry",
        connect("VALUE_CONVERTER", DATA_EXC, "Schema 42 not found; error code: 40403"),
        avro_wire(42, 1, "red"),
        SCHEMA,
    ),
    (
        "connect: subject not found",
        connect("VALUE_CONVERTER", DATA_EXC, "Subject 'orders-value' not found."),
        avro_wire(7, 1, "red"),
        SCHEMA,
    ),
    (
        "spring: schema validation",
        spring(
            LISTENER,
            "org.everit.json.schema.ValidationException",
            "#/amount: expected type: Number",
        ),
        b'{"amount": "x"}',
        SCHEMA,
    ),
    (
        "connect: converter stage",
        connect("VALUE_CONVERTER", DATA_EXC, "Converting byte[] to Kafka Connect data failed"),
        b'{"a": ',
        SER,
    ),
    (
        "connect: key converter stage, no class hint",
        connect("KEY_CONVERTER", "java.lang.RuntimeException", "boom"),
        b"{}",
        SER,
    ),
    (
        "spring: deserialization exception",
        spring(
            "org.springframework.kafka.support.serializer.DeserializationException", "", "failed"
        ),
        protobuf_event(3),
        SER,
    ),
    (
        "spring: jackson cause",
        spring(
            LISTENER, "com.fasterxml.jackson.databind.exc.MismatchedInputException", "no content"
        ),
        b"",
        SER,
    ),
    ("no headers, not UTF-8", {}, b"\xff\xfe\x00", SER),
    ("no headers, wire format decodes", {}, avro_wire(1, 1, "x"), PROC),
    ("no headers, JSON", {}, b'{"ok": true}', PROC),
    ("no headers, null value (tombstone)", {}, None, PROC),
    (
        "spring: listener failed on a good payload",
        spring(
            LISTENER, "java.lang.IllegalStateException", "player 7 not found", "com.example.Payment"
        ),
        b'{"id": 7}',
        PROC,
    ),
    (
        "connect: sink task failed",
        connect("TASK_PUT", "org.apache.kafka.connect.errors.ConnectException", "duplicate key"),
        b'{"id": 1}',
        PROC,
    ),
]


@pytest.mark.parametrize(
    ("headers", "value", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_classify_record(headers: dict[str, bytes], value: bytes | None, kind: FailureKind) -> None:
    assert classify_record(headers, value).kind is kind


def test_source_coordinates_from_either_framework() -> None:
    c = classify_record(connect("TASK_PUT", "X", "y"), b"{}")
    assert (c.source_topic, c.source_partition, c.source_offset) == ("orders", 1, 42)
    s = classify_record(spring(LISTENER, "", "m", "com.example.Payment"), b"{}")
    assert (s.source_topic, s.source_partition, s.source_offset) == ("payments", 3, 9_000_000_000)
    assert s.type_id == "com.example.Payment" and s.exception == LISTENER
    assert struct.pack(">q", 9_000_000_000) in spring(LISTENER, "", "m").values()


# (case, text, must not contain, must contain)
SCRUB = [
    ("key=value", "login failed password=hunter2 user=bob", "hunter2", "user=bob"),
    ("JSON pair", '{"api_key": "abc def", "x": 1}', "abc def", '"x": 1'),
    ("URL user info", "jdbc:postgresql://app:S3cret@db:5432/x", "S3cret", "app:**********@db"),
    ("bearer", "Authorization: Bearer eyJhbGci.x.y", "eyJhbGci", "Bearer **********"),
    ("quoted with spaces", "db.password = 'qwe rty' then", "qwe", "then"),
    ("nothing secret", "player 7 not found", "**", "player 7 not found"),
]


@pytest.mark.parametrize(
    ("text", "gone", "kept"), [s[1:] for s in SCRUB], ids=[s[0] for s in SCRUB]
)
def test_scrub_text(text: str, gone: str, kept: str) -> None:
    out = scrub_text(text)
    assert gone not in out and kept in out


# (case, value, max chars, expected)
SAMPLES = [
    (
        "JSON secrets masked",
        b'{"card_token": "tok_1", "amount": 3}',
        200,
        '{"card_token":"**********","amount":3}',
    ),
    ("cut", b"x" * 50, 10, "xxxxxxxxx…"),
    ("binary shown as hex", b"\xff\xfe", 200, "<2 bytes, binary: fffe…>"),
    (
        "wire format shown as hex",
        b"\x00\x00\x00\x00\x2a\x02",
        200,
        "<wire format, schema id 42, 1 bytes: 02…>",
    ),
    ("null", None, 200, "<null>"),
]


@pytest.mark.parametrize(
    ("value", "max_chars", "shown"), [s[1:] for s in SAMPLES], ids=[s[0] for s in SAMPLES]
)
def test_sample_value(value: bytes | None, max_chars: int, shown: str) -> None:
    assert sample_value(value, max_chars) == shown


@pytest.mark.parametrize(
    ("offsets", "text"),
    [([], ""), ([5], "5"), ([1, 2, 3, 7], "1-3,7"), ([9, 8, 1, 8], "1,8-9")],
)
def test_offset_ranges(offsets: list[int], text: str) -> None:
    assert offset_ranges(offsets) == text


def test_replayed_record_loses_the_failure_headers_and_says_where_it_came_from() -> None:
    headers = [
        *connect_headers("orders", 0, 1, "TASK_PUT", "X", "y"),
        *spring_headers("orders", 0, 1, "X", "Y", "z", "com.example.Order"),
        ("traceparent", b"00-abc-01"),
        (REPLAYED_FROM, b"old-dlq/0/1"),
    ]
    assert replay_headers(headers, "dlq/1/7") == [
        ("__TypeId__", b"com.example.Order"),
        ("traceparent", b"00-abc-01"),
        (REPLAYED_FROM, b"dlq/1/7"),
    ]


@pytest.mark.parametrize(
    ("counts", "approve_over", "asks"),
    [([50, 50], 100, False), ([50, 51], 100, True), ([1], 0, True)],
)
def test_replay_needs_approval_over_a_count(
    counts: list[int], approve_over: int, asks: bool
) -> None:
    plan = ReplayResult(
        dry_run=True,
        planned=[
            Change(action="replay_dlq_records", target=f"dlq[{i}] -> t", detail={"count": n})
            for i, n in enumerate(counts)
        ],
    )
    assert (_needs_approval(plan, approve_over) is not None) is asks
