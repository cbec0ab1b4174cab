"""archive-old-events' decisions: names, refused statuses, archive table compatibility."""

from __future__ import annotations

import pytest

from tasks.event_archive import (
    archive_table_name,
    columns_mismatch,
    forbidden_statuses,
    name_problem,
    needs_approval,
)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("events_archive", True),
        ("Event Log archive", True),
        ("created_at", True),
        ("", False),
        ("1events", False),
        ('events"; DROP TABLE x; --', False),
        ("a" * 64, False),
        ("a" * 63, True),
    ],
)
def test_name_problem(name, ok) -> None:
    assert (name_problem(name, "table") is None) is ok


@pytest.mark.parametrize(
    ("table", "archive", "expected"),
    [
        ("events", None, "events_archive"),
        ("events", "old_events", "old_events"),
        ("e" * 63, None, "e" * 55 + "_archive"),
    ],
)
def test_archive_table_name(table, archive, expected) -> None:
    assert archive_table_name(table, archive) == expected


@pytest.mark.parametrize(
    ("statuses", "live", "expected"),
    [
        (["COMPLETED", "FAILED"], ["PENDING", "PROCESSING"], []),
        (["COMPLETED", "PENDING"], ["PENDING", "PROCESSING"], ["PENDING"]),
        (["PROCESSING", "PENDING", "DONE"], ["PENDING", "PROCESSING"], ["PENDING", "PROCESSING"]),
        (["pending"], ["PENDING", "PROCESSING"], []),  # statuses compare exactly, as SQL does
    ],
)
def test_forbidden_statuses(statuses, live, expected) -> None:
    assert forbidden_statuses(statuses, live) == expected


SOURCE = [("id", "bigint"), ("status", "text"), ("updated_at", "timestamp with time zone")]


@pytest.mark.parametrize(
    ("archive", "expected"),
    [
        (SOURCE, None),
        (SOURCE[:2], "missing updated_at"),
        ([*SOURCE, ("note", "text")], "extra note"),
        ([("id", "integer"), *SOURCE[1:]], "other types for id"),
        ([SOURCE[1], SOURCE[0], SOURCE[2]], "columns in another order"),
    ],
)
def test_columns_mismatch(archive, expected) -> None:
    assert columns_mismatch(SOURCE, archive) == expected


@pytest.mark.parametrize(
    ("total", "approve_over", "expected"),
    [(10, 100, False), (100, 100, False), (101, 100, True), (1, 0, True), (0, 0, False)],
)
def test_needs_approval(total, approve_over, expected) -> None:
    assert needs_approval(total, approve_over) is expected
