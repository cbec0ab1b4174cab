"""Decisions of the event-processing-stuck runbook, as data tables."""

from __future__ import annotations

import pytest

from blocks.event_store import EventStore
from blocks.postgres import PostgresDatabase
from tasks.event_store import (
    ResetVerdict,
    StuckSummary,
    _sql,
    judge_reset,
    next_batch_wanted,
)


@pytest.mark.parametrize(
    ("last_batch", "batch_size", "batches_done", "max_batches", "wanted"),
    [
        (10, 10, 1, 100, True),  # full batch: there may be more
        (5, 10, 4, 100, False),  # partial batch: nothing unlocked is left
        (0, 10, 0, 100, False),  # nothing stuck (or all locked)
        (0, 10, 3, 100, False),
        (10, 10, 3, 4, True),
        (10, 10, 4, 4, False),  # per-run bound reached
        (10, 10, 5, 4, False),
        (1, 1, 1, 2, True),
        (1, 1, 2, 2, False),
        (9, 10, 1, 100, False),  # skipped locked rows make a batch short: that is the end
    ],
)
def test_batching_continues_only_while_batches_come_back_full(
    last_batch: int, batch_size: int, batches_done: int, max_batches: int, wanted: bool
) -> None:
    assert next_batch_wanted(last_batch, batch_size, batches_done, max_batches) is wanted


def summary(count: int, resettable: int | None) -> StuckSummary:
    return StuckSummary(
        table="public.events",
        stuck_after_s=3600,
        count=count,
        oldest_age_s=None,
        sample_ids=[],
        resettable=resettable,
    )


@pytest.mark.parametrize(
    ("reset_count", "count_after", "resettable_after", "verdict", "locked"),
    [
        (35, 0, 0, ResetVerdict.RESOLVED, 0),
        (35, 1, 0, ResetVerdict.RESOLVED, 1),  # one held by a live consumer: not ours to reset
        (35, 3, 3, ResetVerdict.INCOMPLETE, 0),  # batch limit reached, or new events got stuck
        (35, 4, 1, ResetVerdict.INCOMPLETE, 3),
        (0, 1, 0, ResetVerdict.NOTHING_RESET, 1),  # every stuck event is locked
        (0, 0, 0, ResetVerdict.NOTHING_RESET, 0),  # consumers finished them meanwhile
        (0, 2, 2, ResetVerdict.INCOMPLETE, 0),
        (5, 2, None, ResetVerdict.INCOMPLETE, None),  # locks not probed: every stuck one counts
        (5, 0, None, ResetVerdict.RESOLVED, None),
    ],
)
def test_verdict_after_reset(
    reset_count: int,
    count_after: int,
    resettable_after: int | None,
    verdict: ResetVerdict,
    locked: int | None,
) -> None:
    after = summary(count_after, resettable_after)
    assert judge_reset(reset_count, after) is verdict
    assert after.locked == locked


def test_identifiers_are_quoted_never_spliced() -> None:
    store = EventStore(
        database=PostgresDatabase(host="db", user="u"),
        schema_name="ops",
        table='events"; DROP TABLE users; --',
        id_column="Event Id",
        status_column="state",
        updated_at_column="touched_at",
    )
    text = _sql(store, "SELECT {id} FROM {table} WHERE {stuck}").as_string(None)
    assert text == (
        'SELECT "Event Id" FROM "ops"."events""; DROP TABLE users; --"'
        ' WHERE "state" = %(processing)s'
        ' AND "touched_at" < now() - make_interval(secs => %(stuck_after_s)s)'
    )
