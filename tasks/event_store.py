"""Event store tasks: find events stuck in PROCESSING and put them back to PENDING."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

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
        rows = conn.execute(
            _sql(
                store,
                # qualified: a bare {id} in ORDER BY would sort by the text output column
                "SELECT e.{id}::text, count(*) OVER ()::int,"
                " extract(epoch FROM now() - min(e.{updated}) OVER ())::float8"
                " FROM {table} AS e WHERE {stuck} ORDER BY e.{updated}, e.{id} LIMIT %(sample)s",
            ),
            _params(store, sample=_SAMPLE_SIZE),
        ).fetchall()
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
        count=rows[0][1] if rows else 0,
        oldest_age_s=rows[0][2] if rows else None,
        sample_ids=[r[0] for r in rows],
        resettable=resettable,
    )


class ResetResult(ChangeSet):
    """Stuck events put back to PENDING, one change per committed batch."""

    reset_count: int = Field(0, description="Rows set to PENDING (0 in dry-run).")
    batch_sizes: list[int] = Field(
        default_factory=list, description="Rows per batch; in dry-run, per planned batch."
    )
    hit_batch_limit: bool = Field(False, description="Stopped at max_batches: more may remain.")


def next_batch_wanted(
    last_batch: int, batch_size: int, batches_done: int, max_batches: int
) -> bool:
    """Another batch only while the last one came back full and the per-run bound allows."""
    return last_batch == batch_size and batches_done < max_batches


# Batch rows: (count, first id, last id, status), the same shape for planned and applied
# batches; an applied batch also returns the status its rows had, so its before and after
# both come from the rows themselves.
_RESET_BATCH = (
    "WITH picked AS ("
    " SELECT {id}, {status} AS was FROM {table} WHERE {stuck}"
    "  ORDER BY {id} LIMIT %(batch_size)s FOR UPDATE SKIP LOCKED),"
    " reset AS ("
    " UPDATE {table} AS t SET {status} = %(pending)s, {updated} = now()"
    " FROM picked WHERE t.{id} = picked.{id}"
    " RETURNING t.{id}, picked.was, t.{status} AS is_now)"
    " SELECT count(*)::int, (array_agg({id} ORDER BY {id}))[1]::text,"
    " (array_agg({id} ORDER BY {id} DESC))[1]::text,"
    " string_agg(DISTINCT is_now::text, ','), string_agg(DISTINCT was::text, ',') FROM reset"
)

_PLAN_BATCHES = (
    "WITH picked AS ("
    " SELECT {id}, {status} AS was,"
    " (row_number() OVER (ORDER BY {id}) - 1) / %(batch_size)s AS batch"
    " FROM {table} WHERE {stuck} ORDER BY {id} LIMIT %(limit)s)"
    " SELECT count(*)::int, (array_agg({id} ORDER BY {id}))[1]::text,"
    " (array_agg({id} ORDER BY {id} DESC))[1]::text, string_agg(DISTINCT was::text, ',')"
    " FROM picked GROUP BY batch ORDER BY batch"
)


def _batch_change(store: EventStore, rows: int, first_id: str, last_id: str, status: str) -> Change:
    return Change(
        action="reset_to_pending",
        target=f"{store.schema_name}.{store.table} {store.id_column} {first_id}..{last_id} ({rows} rows)",
        detail={"rows": rows, "first_id": first_id, "last_id": last_id, "status": status},
    )


@task(**pg_retries)
def reset_stuck_events(store: EventStore, dry_run: bool) -> ResetResult:
    """Put stuck events back to PENDING in batches (seed 003 "reset stuck events to PENDING").

    Each batch is its own transaction, so row locks last one batch and consumers are never
    blocked for long. Rows a live transaction holds (a consumer still working on them) are
    skipped, not waited on. A re-run finds nothing left to do; a retry after a failure
    continues where the committed batches stopped, and reports only its own batches.
    """
    with store.database.connect(autocommit=True) as conn:
        if dry_run:
            # plain SELECT: no row is locked, so dry-run cannot delay a consumer
            batches = conn.execute(
                _sql(store, _PLAN_BATCHES),
                _params(
                    store, batch_size=store.batch_size, limit=store.batch_size * store.max_batches
                ),
            ).fetchall()
            planned = [_batch_change(store, *b) for b in batches]
            return ResetResult(dry_run=True, planned=planned, batch_sizes=[b[0] for b in batches])
        result = ResetResult(dry_run=False)
        statement = _sql(store, _RESET_BATCH)
        while True:
            # autocommit: every batch commits on its own
            rows, first_id, last_id, status, was = conn.execute(
                statement, _params(store, batch_size=store.batch_size)
            ).fetchone()
            if rows:
                result.planned.append(_batch_change(store, rows, first_id, last_id, was))
                result.applied.append(_batch_change(store, rows, first_id, last_id, status))
                result.batch_sizes.append(rows)
                result.reset_count += rows
            if not next_batch_wanted(
                rows, store.batch_size, len(result.batch_sizes), store.max_batches
            ):
                break
    result.hit_batch_limit = rows == store.batch_size
    if result.hit_batch_limit:
        result.notes.append(
            f"stopped after max_batches={store.max_batches}; the next run continues"
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
