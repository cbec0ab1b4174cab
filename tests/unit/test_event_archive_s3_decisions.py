"""archive-old-events to S3: key naming, prefix and bucket validation, object checks."""

from __future__ import annotations

import gzip

import pytest
from pydantic import ValidationError

from blocks.backup_store import bucket_name_problem
from flows.event_store.archive_old_events import ArchiveParams
from tasks.event_archive_s3 import (
    archive_prefix_problem,
    archive_root,
    encode_rows,
    head_matches,
    object_key,
    parse_object_key,
    planned_batches,
)


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("", True),
        ("event-archive", True),
        ("backups/event-archive", True),
        ("backups/event-archive/", True),  # a trailing slash is dropped
        ("team=ops/2026", True),
        ("/event-archive", False),
        ("a/../b", False),
        ("..", False),
        ("a/./b", False),
        ("a//b", False),
        ("a/b\n", False),
        ("a/{b}", False),
        ("a" * 513, False),
    ],
)
def test_archive_prefix_problem(prefix, ok) -> None:
    assert (archive_prefix_problem(prefix) is None) is ok


@pytest.mark.parametrize(
    ("bucket", "ok"),
    [
        ("event-archive", True),
        ("my.archive.bucket", True),
        ("abc", True),
        ("ab", False),
        ("Event-Archive", False),
        ("-archive", False),
        ("archive-", False),
        ("my..bucket", False),
        ("192.168.1.10", False),
        ("a" * 64, False),
        ("bucket/key", False),
    ],
)
def test_bucket_name_problem(bucket, ok) -> None:
    assert (bucket_name_problem(bucket) is None) is ok


@pytest.mark.parametrize(
    ("prefix", "schema", "table", "expected"),
    [
        ("event-archive", "public", "events", "event-archive/app/public.events/"),
        ("a/b/", "ops", "events", "a/b/app/ops.events/"),
        ("", "public", "events", "app/public.events/"),
    ],
)
def test_archive_root(prefix, schema, table, expected) -> None:
    assert archive_root(prefix, "app", schema, table) == expected


@pytest.mark.parametrize(
    ("first", "last", "digest", "expected"),
    [
        (1, 500, None, "r/00000000000000000001-00000000000000000500.jsonl.gz"),
        (
            9_223_372_036_854_775_000,
            9_223_372_036_854_775_807,
            None,
            "r/09223372036854775000-09223372036854775807.jsonl.gz",
        ),
        (7, 7, "ab" * 32, "r/00000000000000000007-00000000000000000007.abababababab.jsonl.gz"),
    ],
)
def test_object_key(first, last, digest, expected) -> None:
    key = object_key("r/", first, last, digest)
    assert key == expected
    assert parse_object_key(key[len("r/") :]) == (first, last)


def test_object_keys_list_in_id_order() -> None:
    ids = [(1, 9), (10, 99), (100, 2000), (2001, 123_456)]
    keys = [object_key("r/", a, b) for a, b in ids]
    assert sorted(keys) == keys


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("00000000000000000001-00000000000000000500.jsonl.gz", (1, 500)),
        ("1-5.jsonl.gz", (1, 5)),
        ("5-1.jsonl.gz", None),  # not a range
        ("_manifests/20261201T120000Z-abcd1234.json", None),
        ("00000000000000000001-00000000000000000500.jsonl", None),
        ("notes.txt", None),
        ("sub/1-5.jsonl.gz", None),
    ],
)
def test_parse_object_key(name, expected) -> None:
    assert parse_object_key(name) == expected


def test_encode_rows_is_deterministic_and_round_trips() -> None:
    lines = ['{"id":1,"status":"COMPLETED"}', '{"id":2,"status":"FAILED"}']
    body, sha = encode_rows(lines)
    again, sha_again = encode_rows(list(lines))
    assert body == again and sha == sha_again
    assert gzip.decompress(body).decode().splitlines() == lines
    assert encode_rows(lines[:1])[1] != sha


SRC = "7301/app/public.events"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ({"ContentLength": 10, "Metadata": {"sha256": "s", "rows": "3", "source": SRC}}, True),
        ({"ContentLength": 11, "Metadata": {"sha256": "s", "rows": "3", "source": SRC}}, False),
        ({"ContentLength": 10, "Metadata": {"sha256": "t", "rows": "3", "source": SRC}}, False),
        ({"ContentLength": 10, "Metadata": {"sha256": "s", "rows": "2", "source": SRC}}, False),
        # the same bytes from another server's table of the same name: not ours
        (
            {"ContentLength": 10, "Metadata": {"sha256": "s", "rows": "3", "source": "9/app/t"}},
            False,
        ),
        ({"ContentLength": 10, "Metadata": {"sha256": "s", "rows": "3"}}, False),
        ({"ContentLength": 10, "Metadata": {}}, False),
        (None, False),
    ],
)
def test_head_matches(head, expected) -> None:
    assert head_matches(head, 10, "s", 3, SRC) is expected


@pytest.mark.parametrize(
    ("total", "size", "expected"), [(0, 1000, 0), (1, 1000, 1), (1000, 1000, 1), (1001, 1000, 2)]
)
def test_planned_batches(total, size, expected) -> None:
    assert planned_batches(total, size) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"destination": "bucket"},
        {"s3_bucket": "Bad_Bucket"},
        {"s3_prefix": "/abs"},
        {"s3_prefix": "a/../b"},
        {"backup_store_block": "../etc"},
    ],
)
def test_run_form_refuses(fields) -> None:
    with pytest.raises(ValidationError):
        ArchiveParams(**fields)


def test_run_form_defaults_to_the_table() -> None:
    params = ArchiveParams()
    assert params.destination == "table" and params.s3_bucket is None and params.s3_prefix is None
    assert ArchiveParams(destination="s3", s3_bucket="", s3_prefix="x/").s3_prefix == "x"
