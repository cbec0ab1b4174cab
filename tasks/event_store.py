"""Event store tasks: find events stuck in PROCESSING and put them back to PENDING."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import psycopg
from prefect import task
from psycopg import sql
from pydantic import BaseModel, Field, computed_field

from blocks.event_store import EventStore
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
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
    ranges: int = Field(
        1, description="Most ranges of ids reset at the same time (one connection each)."
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


# A large backlog is split into ranges of ids reset side by side, one connection each: every
# batch writes each of its rows twice (the lock, then the update), which one backend does at
# about half the rate of a single UPDATE; two backends on disjoint ranges never wait on each
# other. A pass looks (once) whether to split after it has reset this many rows, so a small
# reset never samples the table and stays one sequence of batches.
SPLIT_CHECK_AFTER_ROWS = 5_000
# ... and splits only when a sample estimates at least this many stuck rows after that point,
# at least this many per range, with at least this many sampled rows per range to place the
# boundaries.
SPLIT_MIN_ROWS_LEFT = 100_000
MIN_ROWS_PER_RANGE = 50_000
MIN_SAMPLED_PER_RANGE = 100
# The sample reads about this many pages (TABLESAMPLE SYSTEM), the whole table when smaller,
# and places the boundaries at quantiles k/SPLIT_QUANTILES of the sampled stuck ids.
SAMPLE_PAGES = 1_000
SPLIT_QUANTILES = 64


def sample_percent(table_pages: int) -> float:
    """The TABLESAMPLE SYSTEM percentage that reads about SAMPLE_PAGES of the table's pages."""
    return min(100.0, 100.0 * SAMPLE_PAGES / max(1, table_pages))


def split_points(
    parallel_ranges: int, sampled: int, percent: float, quantiles: list[Any]
) -> list[Any]:
    """Where to split the rest of a pass into ranges of ids: none (one range) unless it is large.

    ``sampled`` stuck rows after the current id were found in a ``percent`` sample of the table;
    ``quantiles`` are their ids at k/SPLIT_QUANTILES (k = 1..SPLIT_QUANTILES-1), in the
    database's order. The points are ids: range i ends at point i (inclusive), the next starts
    after it. Equal neighbours are dropped (many stuck rows under one id are impossible for a
    primary key, but a small sample repeats), so fewer ranges than asked may result. The ids
    are compared only for equality: any ordered type of primary key works.
    """
    left = sampled * 100.0 / percent if percent > 0 else 0.0
    ranges = min(parallel_ranges, int(left // MIN_ROWS_PER_RANGE), sampled // MIN_SAMPLED_PER_RANGE)
    if left < SPLIT_MIN_ROWS_LEFT or ranges < 2 or len(quantiles) != SPLIT_QUANTILES - 1:
        return []
    points: list[Any] = []
    for i in range(1, ranges):
        point = quantiles[round(i * SPLIT_QUANTILES / ranges) - 1]
        if point is not None and (not points or point != points[-1]):
            points.append(point)
    return points


def page_ranges(pages: int, parts: int) -> list[tuple[int, int | None]]:
    """``parts`` consecutive ranges of page numbers [first, end) covering a table of ``pages``;
    the last has no end (pages added since its size was read are included)."""
    parts = max(1, min(parts, pages))
    starts = [pages * k // parts for k in range(parts)]
    return list(zip(starts, [*starts[1:], None], strict=True))


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
# the first batch of a pass), up to ``{upto}`` in a range of a split pass: each batch starts where the last one ended, so the primary key is
# walked once per pass, where restarting from the lowest id re-read every row reset so far
# (quadratic). The update finds its rows by ctid (a TID scan): joining back on the id made the
# planner hash or merge join over the whole table for batches of a few thousand rows.
# Returns (rows locked, rows reset, first id, last id as text, last id, status before, after).
_RESET_BATCH = (
    "WITH picked AS MATERIALIZED ("
    " SELECT ctid AS tid, {id} AS id, {status} AS was FROM {table} WHERE {stuck}{after}{upto}"
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
_UPTO = " AND {id} <= %(upto)s"
# Whether a stuck row is left that no one holds: a sequential scan that stops at the first one
# (its lock lasts this statement only).
_ANY_RESETTABLE = (
    "SELECT EXISTS (SELECT 1 FROM {table} WHERE {stuck} LIMIT 1 FOR UPDATE SKIP LOCKED)"
)
# After a split pass (a large table) the look is split too: each connection scans its share of
# the table's pages (a TID range scan, PostgreSQL 14 and later), the last one up to the end.
_ANY_RESETTABLE_IN_PAGES = (
    "SELECT EXISTS (SELECT 1 FROM {table} WHERE ctid >= %(from_tid)s::tid{below} AND {stuck}"
    " LIMIT 1 FOR UPDATE SKIP LOCKED)"
)
_BELOW = " AND ctid < %(to_tid)s::tid"
TID_RANGE_SCAN_VERSION = 140000

# The table's size in pages, for the sample's percentage (catalog only: no statistics needed).
_TABLE_PAGES = (
    "SELECT pg_relation_size(c.oid) / current_setting('block_size')::bigint"
    " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %(schema)s AND c.relname = %(table)s"
)
# Stuck rows after an id in a sample of the table's pages, and quantiles of their ids
# (percentile_disc returns ids of the column's own type: any ordered type).
_SAMPLE_REST = (
    "SELECT count(*)::bigint,"
    " percentile_disc(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY {id})"
    " FROM {table} TABLESAMPLE SYSTEM (%(percent)s::real) WHERE {stuck} AND {id} > %(after)s"
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
    consumer still working on them) are skipped, not waited on. A large backlog is split into
    ``parallel_ranges`` ranges of ids, each reset in such batches on its own connection at the
    same time (disjoint ranges: they never wait on each other). No new batch starts after
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


def _table_pages(conn: psycopg.Connection, store: EventStore) -> int:
    row = conn.execute(_TABLE_PAGES, {"schema": store.schema_name, "table": store.table}).fetchone()
    return row[0] if row else 0


def _any_resettable(conn: psycopg.Connection, store: EventStore, connections: int = 1) -> bool:
    """Whether a stuck row no one holds is left; looked for on ``connections`` connections side
    by side, each in its share of the table's pages, when the server can scan a TID range."""
    if connections > 1 and conn.info.server_version >= TID_RANGE_SCAN_VERSION:
        ranges = page_ranges(_table_pages(conn, store), connections)
    else:
        ranges = []
    if len(ranges) < 2:
        (found,) = conn.execute(_sql(store, _ANY_RESETTABLE), _params(store)).fetchone()
        return found

    def look(first: int, end: int | None) -> bool:
        statement = _ANY_RESETTABLE_IN_PAGES.replace("{below}", "" if end is None else _BELOW)
        tids = {"from_tid": f"({first},0)", "to_tid": f"({end},0)"}
        with store.database.connect(autocommit=True) as own:
            (found,) = own.execute(_sql(store, statement), _params(store, **tids)).fetchone()
        return found

    with ThreadPoolExecutor(len(ranges), thread_name_prefix="reset-look") as pool:
        return any(list(pool.map(lambda r: look(*r), ranges)))


@dataclass
class _Walk:
    """The batches of one keyset walk: a pass, or one range of ids of a split pass."""

    size: int
    batches: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    reset: int = 0
    slowest_s: float = 0.0
    out_of_time: bool = False
    ended: bool = False  # its range (or the table) has no more rows to lock
    last_key: Any = None


def _batch_statement(store: EventStore, after: bool, upto: bool) -> sql.Composed:
    template = _RESET_BATCH.replace("{after}", _AFTER if after else "")
    return _sql(store, template.replace("{upto}", _UPTO if upto else ""))


def _walk(
    conn: psycopg.Connection,
    store: EventStore,
    walk: _Walk,
    deadline: float,
    upto: Any = None,
    pause_at: int | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Reset batches in id order after ``walk.last_key`` (up to ``upto`` when given), each its
    own transaction, until the range ends or the time is up; or, with ``pause_at``, as soon as
    the walk has reset that many rows (it continues from there when called again)."""
    _, smallest, largest = batch_bounds(store)
    target_s = store.batch_target_ms / 1000
    statements = {
        after: _batch_statement(store, after, upto is not None) for after in (False, True)
    }
    while pause_at is None or walk.reset < pause_at:
        if stop is not None and stop.is_set():
            return
        if time.monotonic() >= deadline:
            walk.out_of_time = True
            return
        t0 = time.perf_counter()
        # autocommit: every batch commits on its own
        locked, rows, first_id, last_id, last_key, was, status = conn.execute(
            statements[walk.last_key is not None],
            _params(store, batch_size=walk.size, after=walk.last_key, upto=upto),
        ).fetchone()
        elapsed = time.perf_counter() - t0
        walk.slowest_s = max(walk.slowest_s, elapsed)
        if rows:
            walk.batches.append((rows, first_id, last_id, was, status))
            walk.reset += rows
        # SKIP LOCKED rows do not count against the LIMIT: a short batch is the range's end
        if locked < walk.size:
            walk.ended = True
            return
        walk.last_key = last_key
        walk.size = next_batch_size(walk.size, elapsed, target_s, smallest, largest)


def _split_rest(conn: psycopg.Connection, store: EventStore, after: Any) -> list[Any]:
    """Points splitting the stuck rows after ``after`` into ranges; none to stay one range."""
    percent = sample_percent(_table_pages(conn, store))
    fractions = [k / SPLIT_QUANTILES for k in range(1, SPLIT_QUANTILES)]
    sampled, quantiles = conn.execute(
        _sql(store, _SAMPLE_REST),
        _params(store, fractions=fractions, percent=percent, after=after),
    ).fetchone()
    return split_points(store.parallel_ranges, sampled, percent, list(quantiles or []))


def _walk_ranges(
    store: EventStore, after: Any, points: list[Any], size: int, deadline: float
) -> list[_Walk]:
    """The ranges (after, p1], (p1, p2], ... (pn, end) side by side, one connection each.

    Disjoint ranges: no two connections ever want the same row. The first failure stops the
    others after their current batch (committed batches stay; a retry continues) and is raised.
    """
    bounds = list(zip([after, *points], [*points, None], strict=True))
    walks = [_Walk(size=size, last_key=lo) for lo, _ in bounds]
    stop = threading.Event()

    def run(walk: _Walk, upto: Any) -> None:
        try:
            with store.database.connect(autocommit=True) as conn:
                _walk(conn, store, walk, deadline, upto=upto, stop=stop)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(len(walks), thread_name_prefix="reset-range") as pool:
        futures = [pool.submit(run, walk, hi) for walk, (_, hi) in zip(walks, bounds, strict=True)]
    for future in futures:
        future.result()  # raises the first range's failure
    return walks


def _reset_in_batches(conn: psycopg.Connection, store: EventStore) -> ResetResult:
    result = ResetResult(dry_run=False)
    first_size, _, _ = batch_bounds(store)
    started = time.monotonic()
    deadline = started + store.time_budget_s
    passes, more = 0, False
    while next_pass_wanted(passes, more) and not result.out_of_time:
        passes += 1
        walk = _Walk(size=first_size)
        walks = [walk]
        split = store.parallel_ranges > 1
        _walk(conn, store, walk, deadline, pause_at=SPLIT_CHECK_AFTER_ROWS if split else None)
        if not (walk.ended or walk.out_of_time):
            points = _split_rest(conn, store, walk.last_key)
            if points:
                walks += _walk_ranges(store, walk.last_key, points, walk.size, deadline)
                result.ranges = max(result.ranges, len(points) + 1)
            else:
                _walk(conn, store, walk, deadline)
        pass_reset = 0
        for w in walks:  # in id order: each range starts after the one before
            for rows, first_id, last_id, was, status in w.batches:
                result.planned.append(_batch_change(store, rows, first_id, last_id, was))
                result.applied.append(_batch_change(store, rows, first_id, last_id, status))
                result.batch_sizes.append(rows)
            pass_reset += w.reset
            result.slowest_batch_s = max(result.slowest_batch_s, w.slowest_s)
            result.out_of_time |= w.out_of_time
        result.reset_count += pass_reset
        # nothing reset in this pass: the next would find nothing either
        more = (
            bool(pass_reset)
            and not result.out_of_time
            # a split pass ran len(walks) - 1 ranges side by side: the look is split as well
            and _any_resettable(conn, store, connections=max(1, len(walks) - 1))
        )
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


class StoreProbe(BaseModel):
    """Whether the event store answers: a connection, a read of its table, how long it took."""

    ok: bool
    latency_ms: float | None = None
    rows_estimate: int | None = Field(None, description="The planner's estimate (pg_class).")
    error: str | None = None

    def describe(self) -> str:
        if not self.ok:
            return f"not accessible: {self.error}"
        rows = f", ~{self.rows_estimate:,} rows" if self.rows_estimate is not None else ""
        return f"read in {self.latency_ms:.0f} ms{rows}"


# the probe's answer is the finding: an unreachable store is reported, not retried
@task(**runbook_task_options())
def probe_event_store(store: EventStore) -> StoreProbe:
    """Connect with the block's settings and read one row of the events table."""
    started = time.monotonic()
    try:
        with store.database.connect(autocommit=True) as conn:
            conn.execute(_sql(store, "SELECT 1 FROM {table} LIMIT 1")).fetchall()
            (estimate,) = conn.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                (sql.Identifier(store.schema_name, store.table).as_string(conn),),
            ).fetchone()
    except psycopg.Error as exc:
        return StoreProbe(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    return StoreProbe(
        ok=True,
        latency_ms=round((time.monotonic() - started) * 1000, 1),
        rows_estimate=estimate if estimate >= 0 else None,
    )
