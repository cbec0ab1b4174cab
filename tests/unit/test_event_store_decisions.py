"""Decisions of the event-processing-stuck runbook, as data tables."""

from __future__ import annotations

import pytest

from blocks.event_store import EventStore
from blocks.postgres import PostgresDatabase
from tasks.event_store import (
    ResetVerdict,
    StuckSummary,
    _sql,
    batch_bounds,
    describe_progress,
    judge_reset,
    next_batch_size,
    next_pass_wanted,
    page_ranges,
    plan_chunks,
    sample_percent,
    split_points,
)


@pytest.mark.parametrize(
    ("size", "elapsed_s", "target_s", "smallest", "largest", "expected"),
    [
        (500, 0.010, 0.075, 10, 20_000, 1000),  # far under target: at most doubles
        (500, 0.050, 0.075, 10, 20_000, 750),  # under target: grows in proportion
        (500, 0.075, 0.075, 10, 20_000, 500),  # on target: stays
        (500, 0.100, 0.075, 10, 20_000, 375),  # over target: shrinks in proportion
        (500, 2.000, 0.075, 10, 20_000, 250),  # one very slow batch: at most halves
        (500, 0.0, 0.075, 10, 20_000, 1000),  # too fast to measure: doubles
        (16_000, 0.010, 0.075, 10, 20_000, 20_000),  # never above the largest
        (20_000, 0.010, 0.075, 10, 20_000, 20_000),
        (15, 1.0, 0.075, 10, 20_000, 10),  # never below the smallest
        (10, 0.001, 0.075, 10, 10, 10),  # smallest == largest: a fixed size
        (1, 0.001, 0.075, 1, 20_000, 2),
        (3, 0.2, 0.075, 1, 20_000, 2),  # rounds, 1.5 -> 2
    ],
)
def test_batch_size_adapts_to_the_target_time_within_bounds(
    size: int, elapsed_s: float, target_s: float, smallest: int, largest: int, expected: int
) -> None:
    assert next_batch_size(size, elapsed_s, target_s, smallest, largest) == expected


@pytest.mark.parametrize(
    ("batch_size", "max_batch_size", "bounds"),
    [
        (500, 20_000, (500, 10, 20_000)),  # the defaults
        (10, 10, (10, 10, 10)),  # fixed batches of 10
        (5, 20_000, (5, 5, 20_000)),  # a first batch below the floor lowers the floor
        (50_000, 20_000, (20_000, 10, 20_000)),  # the first batch within the largest
        (1, 1, (1, 1, 1)),
    ],
)
def test_batch_bounds(batch_size: int, max_batch_size: int, bounds: tuple[int, int, int]) -> None:
    store = EventStore(
        database=PostgresDatabase(host="db", user="u"),
        batch_size=batch_size,
        max_batch_size=max_batch_size,
    )
    assert batch_bounds(store) == bounds


@pytest.mark.parametrize(
    ("passes_done", "resettable_left", "wanted"),
    [
        (0, False, True),  # the first pass always runs
        (1, True, True),  # a row was let go (or got stuck) behind it: once more from the start
        (1, False, False),  # nothing left that anyone could reset: no second pass
        (2, True, False),  # two passes at most: what is left is the verification's to judge
        (2, False, False),
    ],
)
def test_a_second_pass_only_when_a_resettable_row_is_left(
    passes_done: int, resettable_left: bool, wanted: bool
) -> None:
    assert next_pass_wanted(passes_done, resettable_left) is wanted


# quantiles k/64 (k = 1..63) of sampled ids 1000, 2000, ...: point k is k * 1000
Q = [k * 1000 for k in range(1, 64)]


@pytest.mark.parametrize(
    ("parallel_ranges", "sampled", "percent", "quantiles", "points"),
    [
        (2, 20_000, 2.0, Q, [32_000]),  # ~1M left: split at the median
        (3, 20_000, 2.0, Q, [21_000, 43_000]),  # thirds: quantiles 21/64 and 43/64
        (4, 20_000, 2.0, Q, [16_000, 32_000, 48_000]),
        (1, 20_000, 2.0, Q, []),  # parallel_ranges=1: always one range
        (2, 1_000, 2.0, Q, []),  # ~50k left: under SPLIT_MIN_ROWS_LEFT, stays simple
        (2, 2_000, 2.0, Q, [32_000]),  # ~100k left: just enough for two ranges
        (4, 2_400, 2.0, Q, [32_000]),  # ~120k left: ranges of 50k at least, so two
        (4, 3_000, 2.0, Q, [21_000, 43_000]),  # ~150k left: three
        (8, 60_000, 10.0, Q, [8_000, 16_000, 24_000, 32_000, 40_000, 48_000, 56_000]),
        (2, 150, 0.1, Q, []),  # ~150k left but 150 sampled: too few to place a boundary
        (2, 200, 0.1, Q, [32_000]),
        (2, 0, 100.0, [None] * 63, []),  # nothing sampled: percentile_disc gives NULLs
        (2, 150_000, 100.0, Q[:10], []),  # not the quantiles asked for: one range
        # a whole-table sample of a primary key repeats no id; a small one may: equal points merge
        (3, 2_000, 1.0, [7] * 30 + [9] * 33, [7, 9]),
        (4, 2_000, 1.0, [7] * 63, [7]),
        # any ordered type: ids compared only for equality, the database's order kept
        (2, 2_000, 1.0, [f"id-{k:02}" for k in range(1, 64)], ["id-32"]),
    ],
)
def test_a_large_rest_is_split_into_ranges_at_quantiles_of_sampled_ids(
    parallel_ranges: int, sampled: int, percent: float, quantiles: list, points: list
) -> None:
    assert split_points(parallel_ranges, sampled, percent, quantiles) == points


@pytest.mark.parametrize(
    ("pages", "percent"),
    [(0, 100.0), (500, 100.0), (1_000, 100.0), (50_000, 2.0), (1_000_000, 0.1)],
)
def test_the_sample_reads_about_a_thousand_pages(pages: int, percent: float) -> None:
    assert sample_percent(pages) == pytest.approx(percent)


@pytest.mark.parametrize(
    ("pages", "parts", "ranges"),
    [
        (100, 2, [(0, 50), (50, None)]),  # the last share runs to the end, pages added included
        (101, 2, [(0, 50), (50, None)]),
        (100, 3, [(0, 33), (33, 66), (66, None)]),
        (100, 1, [(0, None)]),
        (1, 4, [(0, None)]),  # never more shares than pages
        (0, 2, [(0, None)]),  # an empty table (or its size unknown): one look over all of it
    ],
)
def test_the_look_for_a_row_left_is_split_by_pages(
    pages: int, parts: int, ranges: list[tuple[int, int | None]]
) -> None:
    assert page_ranges(pages, parts) == ranges


@pytest.mark.parametrize(
    ("reset_count", "elapsed_s", "left", "text"),
    [
        (100_000, 2.0, None, "100,000 event(s) reset to PENDING in 2.0s (50,000/s)"),
        (
            40_000,
            2.0,
            60_000,
            "40,000 event(s) reset to PENDING in 2.0s (20,000/s); 60,000 still stuck, "
            "about 3s more at this rate",
        ),
        (0, 1.0, 5, "0 event(s) reset to PENDING in 1.0s; 5 still stuck"),
        (35, 0.0, 0, "35 event(s) reset to PENDING in 0.0s"),
    ],
)
def test_progress_names_rows_rate_and_what_is_left(
    reset_count: int, elapsed_s: float, left: int | None, text: str
) -> None:
    assert describe_progress(reset_count, elapsed_s, left) == text


@pytest.mark.parametrize(
    ("edges", "chunks"),
    [
        ([], []),
        ([(0, "7", "PROCESSING", 10)], [(1, "7", "7", "PROCESSING")]),  # one row
        (
            # 36 rows in chunks of 10: each chunk's first and last row, and the very last
            [(0, "1", "P", 10), (9, "10", "P", 10), (10, "11", "P", 10), (19, "20", "P", 10)]
            + [(20, "21", "P", 10), (29, "30", "P", 10), (30, "31", "P", 10), (35, "36", "P", 10)],
            [(10, "1", "10", "P"), (10, "11", "20", "P"), (10, "21", "30", "P")]
            + [(6, "31", "36", "P")],
        ),
        (
            # the last chunk holds one row
            [(0, "a", "P", 2), (1, "b", "P", 2), (2, "c", "P", 2)],
            [(2, "a", "b", "P"), (1, "c", "c", "P")],
        ),
        ([(i, str(i), "P", 1) for i in range(3)], [(1, str(i), str(i), "P") for i in range(3)]),
    ],
)
def test_plan_chunks_from_their_edge_rows(
    edges: list[tuple[int, str, str, int]], chunks: list[tuple[int, str, str, str]]
) -> None:
    assert plan_chunks(edges) == chunks


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
        (35, 3, 3, ResetVerdict.INCOMPLETE, 0),  # time budget ended, or new events got stuck
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
