"""Event store tasks: find events stuck in PROCESSING and put them back to PENDING."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

import psycopg
from prefect import task
from psycopg import sql
from pydantic import BaseModel, Field, computed_field

from blocks.event_store import EventStore
from runbooks.results import Change, ChangeSet
from tasks.postgres import pg_retries

_SAMPLE_SIZE = 10


# The server's clock decides: the runner's clock may disagree with the database's.
_STUCK = (
    "{status} = %(processing)s AND {updated} < now() - make_interval(secs => %(stuck_after_s)s)"
)


def _sql(store: EventStore, template: str) -> sql.Composed:
    """Fill a statement's identifiers from the block (``{stuck}``: the stuck-event condition).

    Identifiers are quoted by psycopg; values stay query parameters.
    """
    names = {
        "table": sql.Identifier(store.schema_name, store.table),
        "id": sql.Identifier(store.id_column),
        "status": sql.Identifier(store.status_column),
        "updated": sql.Identifier(store.updated_at_column),
    }
    return sql.SQL(template).format(stuck=sql.SQL(_STUCK).format(**names), **names)


def _params(store: EventStore, **extra: Any) -> dict[str, Any]:
    return {
        "processing": store.processing_status,
        "pending": store.pending_status,
        "stuck_after_s": store.stuck_after_s,
        **extra,
    }


class StuckSummary(BaseModel):
    """Events PROCESSING for longer than the threshold."""

    table: str
    stuck_after_s: float
    count: int
    oldest_age_s: float | None = Field(description="Age of the oldest stuck event, in seconds.")
    sample_ids: list[str] = Field(description="Ids of the longest-stuck events (at most 10).")
    resettable: int | None = Field(
        None, description="Stuck events no other transaction holds locked; measured on request."
    )

    @computed_field
    @property
    def locked(self) -> int | None:
        """Stuck events a live transaction holds: a consumer is (or hangs) on them."""
        return None if self.resettable is None else self.count - self.resettable

    def describe(self) -> str:
        text = f"{self.count} event(s) PROCESSING for over {self.stuck_after_s:g}s in {self.table}"
        if self.oldest_age_s is not None:
            text += f", oldest {self.oldest_age_s:.0f}s"
        if self.locked:
            text += f", {self.locked} locked by live transactions"
        return text


@task(**pg_retries)
def count_stuck_events(store: EventStore, check_locks: bool = False) -> StuckSummary:
    """Count stuck events and sample the oldest (seed 003 "Identify stuck events").

    ``check_locks`` also counts how many could be reset now, by trying to lock them with
    SKIP LOCKED in a transaction that is rolled back: it never waits and never changes a
    row, but it does lock for a moment, so it is meant for verifying after a reset.
    """
    with store.database.connect(autocommit=True) as conn:
        # An aggregate and a sample, not one read with `count(*) OVER ()`: a window over every
        # stuck row materializes and sorts them all (100k rows: most of this task's time), while
        # the aggregate streams and `ORDER BY ... LIMIT` keeps only the sample (top-N heapsort).
        # One statement, so both see the same snapshot.
        count, oldest_age_s, sample = conn.execute(
            _sql(
                store,
                "SELECT count(*)::int, extract(epoch FROM now() - min({updated}))::float8,"
                # qualified: a bare {id} in ORDER BY would sort by the text output column
                " ARRAY(SELECT e.{id}::text FROM {table} AS e WHERE {stuck}"
                " ORDER BY e.{updated}, e.{id} LIMIT %(sample)s)"
                " FROM {table} WHERE {stuck}",
            ),
            _params(store, sample=_SAMPLE_SIZE),
        ).fetchone()
        resettable = None
        if check_locks:
            with conn.transaction(force_rollback=True):
                (resettable,) = conn.execute(
                    _sql(
                        store,
                        "WITH lockable AS (SELECT 1 FROM {table} WHERE {stuck}"
                        " FOR UPDATE SKIP LOCKED) SELECT count(*)::int FROM lockable",
                    ),
                    _params(store),
                ).fetchone()
    return StuckSummary(
        table=f"{store.schema_name}.{store.table}",
        stuck_after_s=store.stuck_after_s,
        count=count,
        oldest_age_s=oldest_age_s,
        sample_ids=list(sample),
        resettable=resettable,
    )


class ResetResult(ChangeSet):
    """Stuck events put back to PENDING, one change per committed batch."""

    reset_count: int = Field(0, description="Rows set to PENDING (0 in dry-run).")
    batch_sizes: list[int] = Field(
        default_factory=list,
        description="Rows per batch; in dry-run, per planned chunk of ids.",
    )
    elapsed_s: float = Field(0.0, description="Time spent resetting (0 in dry-run).")
    slowest_batch_s: float = Field(
        0.0, description="The longest batch: how long its rows stayed locked."
    )
    out_of_time: bool = Field(
        False, description="Stopped when the time budget ended: more may remain."
    )

    @computed_field
    @property
    def rows_per_s(self) -> float | None:
        return self.reset_count / self.elapsed_s if self.elapsed_s > 0 else None


# A batch may shrink below the block's batch_size when transactions run slow, down to this
# (or to batch_size if that is smaller): fewer rows per batch would only add round trips.
MIN_BATCH_SIZE = 10
# One batch changes the next one's size by at most this factor either way: a single slow batch
# (a checkpoint, a cache miss) should not swing the size by more than one step.
MAX_BATCH_STEP = 2.0
# A pass ends at the end of the table; a second one from the start picks up rows that a consumer
# held locked during the first (and let go since) or that became stuck behind it, but only when
# a quick look finds such a row: a pass over the primary key of a large table costs seconds.
MAX_PASSES = 2
# A dry-run plan lists at most this many chunks of ids (as many as an audit event lists in full).
MAX_PLANNED_CHUNKS = 200


def batch_bounds(store: EventStore) -> tuple[int, int, int]:
    """(first batch size, smallest, largest) for this block's settings."""
    largest = store.max_batch_size
    first = min(store.batch_size, largest)
    return first, min(MIN_BATCH_SIZE, first), largest


def next_batch_size(
    size: int, elapsed_s: float, target_s: float, smallest: int, largest: int
) -> int:
    """The next batch's size: scaled so it takes about ``target_s``, by at most 2x per batch.

    A batch's time is nearly proportional to its rows (locking and writing each row dominates),
    so the ratio of target to measured time is the correction.
    """
    factor = MAX_BATCH_STEP if elapsed_s <= 0 else target_s / elapsed_s
    factor = min(MAX_BATCH_STEP, max(1 / MAX_BATCH_STEP, factor))
    return max(smallest, min(largest, round(size * factor)))


def next_pass_wanted(passes_done: int, resettable_left: bool) -> bool:
    """Start (again) from the lowest id: first of all, then once more if a row can be reset."""
    return passes_done == 0 or (passes_done < MAX_PASSES and resettable_left)


def describe_progress(reset_count: int, elapsed_s: float, left: int | None = None) -> str:
    """How far a reset got, for the report: rows, time, rate and, when known, what is left."""
    text = f"{reset_count:,} event(s) reset to PENDING in {elapsed_s:.1f}s"
    if elapsed_s > 0 and reset_count:
        rate = reset_count / elapsed_s
        text += f" ({rate:,.0f}/s)"
        if left:
            text += f"; {left:,} still stuck, about {left / rate:,.0f}s more at this rate"
            return text
    if left:
        text += f"; {left:,} still stuck"
    return text


# Locks the next batch in id order after ``{after}`` (the last id of the batch before, none for
# the first batch of a pass): each batch starts where the last one ended, so the primary key is
# walked once per pass, where restarting from the lowest id re-read every row reset so far
# (quadratic). The update finds its rows by ctid (a TID scan): joining back on the id made the
# planner hash or merge join over the whole table for batches of a few thousand rows.
# Returns (rows locked, rows reset, first id, last id as text, last id, status before, after).
_RESET_BATCH = (
    "WITH picked AS MATERIALIZED ("
    " SELECT ctid AS tid, {id} AS id, {status} AS was FROM {table} WHERE {stuck}{after}"
    "  ORDER BY {id} LIMIT %(batch_size)s FOR UPDATE SKIP LOCKED),"
    " reset AS ("
    " UPDATE {table} SET {status} = %(pending)s, {updated} = now()"
    " WHERE ctid = ANY(ARRAY(SELECT tid FROM picked))"
    " RETURNING {status} AS is_now)"
    " SELECT (SELECT count(*)::int FROM picked), (SELECT count(*)::int FROM reset),"
    # qualified: a bare id in ORDER BY would sort by the text output column
    " (SELECT p.id::text FROM picked AS p ORDER BY p.id LIMIT 1),"
    " (SELECT p.id::text FROM picked AS p ORDER BY p.id DESC LIMIT 1),"
    " (SELECT p.id FROM picked AS p ORDER BY p.id DESC LIMIT 1),"
    " (SELECT string_agg(DISTINCT was::text, ',') FROM picked),"
    " (SELECT string_agg(DISTINCT is_now::text, ',') FROM reset)"
)
_AFTER = " AND {id} > %(after)s"
# Whether a stuck row is left that no one holds: a sequential scan that stops at the first one
# (its lock lasts this statement only).
_ANY_RESETTABLE = (
    "SELECT EXISTS (SELECT 1 FROM {table} WHERE {stuck} LIMIT 1 FOR UPDATE SKIP LOCKED)"
)

# The plan: chunks of batch_size ids, or larger ones so there are at most MAX_PLANNED_CHUNKS.
# Only each chunk's first and last row come back (position i, id, status; k the chunk size):
# grouping every stuck row by chunk made the server sort them all again, on disk past ~50k.
# One statement, so the count and the rows come from the same snapshot.
_PLAN_EDGES = (
    "WITH total AS (SELECT count(*) AS n FROM {table} WHERE {stuck}),"
    " size AS (SELECT n, greatest(%(batch_size)s::bigint, (n + %(chunks)s - 1) / %(chunks)s)"
    "  AS k FROM total),"
    " stuck AS (SELECT {id} AS id, {status} AS was, row_number() OVER (ORDER BY {id}) - 1 AS i"
    "  FROM {table} WHERE {stuck})"
    " SELECT s.i, s.id::text, s.was::text, z.k FROM stuck AS s, size AS z"
    " WHERE s.i %% z.k = 0 OR s.i %% z.k = z.k - 1 OR s.i = z.n - 1 ORDER BY s.i"
)


def plan_chunks(edges: list[tuple[int, str, str, int]]) -> list[tuple[int, str, str, str]]:
    """(rows, first id, last id, statuses) per chunk, from its edge rows (i, id, status, k)."""
    chunks: dict[int, list] = {}
    for i, id_, status, k in edges:
        chunk = chunks.setdefault(i // k, [i, id_, i, id_, set()])
        chunk[2:4] = [i, id_]
        chunk[4].add(status)
    return [
        (last - first + 1, first_id, last_id, ",".join(sorted(statuses)))
        for first, first_id, last, last_id, statuses in chunks.values()
    ]


def _batch_change(store: EventStore, rows: int, first_id: str, last_id: str, status: str) -> Change:
    return Change(
        action="reset_to_pending",
        target=f"{store.schema_name}.{store.table} {store.id_column} {first_id}..{last_id} ({rows} rows)",
        detail={"rows": rows, "first_id": first_id, "last_id": last_id, "status": status},
    )


@task(**pg_retries)
def reset_stuck_events(store: EventStore, dry_run: bool) -> ResetResult:
    """Put stuck events back to PENDING in batches (seed 003 "reset stuck events to PENDING").

    Each batch is its own transaction, sized to take about ``batch_target_ms``, so row locks
    are short and consumers are never blocked for long. Rows a live transaction holds (a
    consumer still working on them) are skipped, not waited on. No new batch starts after
    ``time_budget_s``. A re-run finds nothing left to do; a retry after a failure continues
    where the committed batches stopped, and reports only its own batches.
    """
    with store.database.connect(autocommit=True) as conn:
        if dry_run:
            # plain SELECT: no row is locked, so dry-run cannot delay a consumer
            batches = plan_chunks(
                conn.execute(
                    _sql(store, _PLAN_EDGES),
                    _params(store, batch_size=store.batch_size, chunks=MAX_PLANNED_CHUNKS),
                ).fetchall()
            )
            planned = [_batch_change(store, *b) for b in batches]
            return ResetResult(dry_run=True, planned=planned, batch_sizes=[b[0] for b in batches])
        return _reset_in_batches(conn, store)


def _any_resettable(conn: psycopg.Connection, store: EventStore) -> bool:
    (found,) = conn.execute(_sql(store, _ANY_RESETTABLE), _params(store)).fetchone()
    return found


def _reset_in_batches(conn: psycopg.Connection, store: EventStore) -> ResetResult:
    result = ResetResult(dry_run=False)
    first_batch = _sql(store, _RESET_BATCH.replace("{after}", ""))
    next_batch = _sql(store, _RESET_BATCH.replace("{after}", _AFTER))
    size, smallest, largest = batch_bounds(store)
    target_s = store.batch_target_ms / 1000
    started = time.monotonic()
    deadline = started + store.time_budget_s
    passes, more = 0, False
    while next_pass_wanted(passes, more) and not result.out_of_time:
        passes, pass_reset, after = passes + 1, 0, None
        while True:
            if time.monotonic() >= deadline:
                result.out_of_time = True
                break
            t0 = time.perf_counter()
            # autocommit: every batch commits on its own
            locked, rows, first_id, last_id, last_key, was, status = conn.execute(
                first_batch if after is None else next_batch,
                _params(store, batch_size=size, after=after),
            ).fetchone()
            elapsed = time.perf_counter() - t0
            result.slowest_batch_s = max(result.slowest_batch_s, elapsed)
            if rows:
                result.planned.append(_batch_change(store, rows, first_id, last_id, was))
                result.applied.append(_batch_change(store, rows, first_id, last_id, status))
                result.batch_sizes.append(rows)
                result.reset_count += rows
                pass_reset += rows
            # SKIP LOCKED rows do not count against the LIMIT: a short batch is the table's end
            if locked < size:
                break
            after = last_key
            size = next_batch_size(size, elapsed, target_s, smallest, largest)
        # nothing reset in this pass: the next would find nothing either
        more = bool(pass_reset) and not result.out_of_time and _any_resettable(conn, store)
    result.elapsed_s = time.monotonic() - started
    if result.out_of_time:
        result.notes.append(
            f"time budget of {store.time_budget_s:g}s ended: "
            f"{describe_progress(result.reset_count, result.elapsed_s)}; the next run continues"
        )
    return result


class ResetVerdict(StrEnum):
    RESOLVED = "resolved"
    NOTHING_RESET = "nothing reset"
    INCOMPLETE = "incomplete"


def judge_reset(reset_count: int, after: StuckSummary) -> ResetVerdict:
    """Resolved when no stuck event remains that could be reset; locked ones belong to a live consumer."""
    remaining = after.count if after.resettable is None else after.resettable
    if remaining:
        return ResetVerdict.INCOMPLETE
    return ResetVerdict.RESOLVED if reset_count else ResetVerdict.NOTHING_RESET
