"""Event store tasks: move old events in terminal states to an archive table, in short batches.

Each batch is one statement in its own transaction: it locks the next ids (``FOR UPDATE SKIP
LOCKED``: a row a writer holds is skipped, never waited on), deletes them from the events table
and inserts exactly those rows into the archive (``ON CONFLICT (id) DO NOTHING``). A crash
commits the whole batch or none of it: nothing is lost or copied twice, and the next run
continues where the committed batches stopped.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from prefect import task
from psycopg import sql
from pydantic import BaseModel, Field, computed_field

from blocks.event_store import EventStore
from runbooks.results import Change, ChangeSet
from tasks.event_store import batch_bounds, next_batch_size
from tasks.postgres import pg_retries

# --- pure decisions --------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$ -]{0,62}")


def name_problem(name: str, what: str) -> str | None:
    """Why ``name`` is not acceptable as a table or column name (None: it is)."""
    if not _NAME.fullmatch(name):
        return f"{what} {name!r} must be 1-63 letters, digits, '_', '$', '-' or spaces"
    return None


def archive_table_name(table: str, archive: str | None) -> str:
    """The archive table: as given, else ``<table>_archive`` (cut to PostgreSQL's 63 bytes)."""
    return archive or f"{table[: 63 - len('_archive')]}_archive"


def forbidden_statuses(statuses: list[str], live: list[str]) -> list[str]:
    """Statuses asked to be archived that belong to events still being worked on (PENDING,
    PROCESSING): archiving those would lose events. Empty when the list is safe."""
    return sorted(set(statuses) & set(live))


def columns_mismatch(source: list[tuple[str, str]], archive: list[tuple[str, str]]) -> str | None:
    """Why rows of the events table cannot go into the archive as ``SELECT *`` (None: they can):
    the same column names and types, in the same order."""
    if source == archive:
        return None
    missing = [c for c, _ in source if c not in dict(archive)]
    extra = [c for c, _ in archive if c not in dict(source)]
    typed = [c for c, t in source if c in dict(archive) and dict(archive)[c] != t]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"extra {', '.join(extra)}")
    if typed:
        parts.append(f"other types for {', '.join(typed)}")
    return "; ".join(parts) or "columns in another order"


def _utc(at: datetime) -> str:
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def needs_approval(total: int, approve_over: int) -> bool:
    return total > approve_over


# --- reading ---------------------------------------------------------------------------------


class ArchiveSpec(BaseModel):
    """What one run archives: which rows, where to."""

    archive_table: str
    time_column: str
    statuses: list[str]
    cutoff: datetime = Field(description="Rows whose time column is before this are old.")
    older_than_days: float
    time_budget_s: float


class ArchiveSurvey(BaseModel):
    """Old terminal events still in the events table, and the archive's size."""

    table: str
    archive_table: str
    cutoff: datetime
    by_status: dict[str, int]
    oldest: datetime | None
    newest: datetime | None
    archive_exists: bool
    archive_rows: int | None
    lockable: int | None = Field(
        None, description="Of the old terminal rows, how many no transaction holds (on request)."
    )

    @computed_field
    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    def describe(self) -> str:
        per = ", ".join(f"{n:,} {s}" for s, n in sorted(self.by_status.items())) or "none"
        text = f"{self.total:,} event(s) older than {_utc(self.cutoff)} in {self.table} ({per})"
        if self.oldest is not None and self.newest is not None:
            text += f", oldest {_utc(self.oldest)}, newest {_utc(self.newest)}"
        if self.lockable is not None and self.lockable < self.total:
            text += f", {self.total - self.lockable:,} locked by live transactions"
        return text


def _names(store: EventStore, spec: ArchiveSpec) -> dict[str, sql.Composable]:
    return {
        "table": sql.Identifier(store.schema_name, store.table),
        "archive": sql.Identifier(store.schema_name, spec.archive_table),
        "id": sql.Identifier(store.id_column),
        "status": sql.Identifier(store.status_column),
        "time": sql.Identifier(spec.time_column),
    }


_OLD = "{status} = ANY(%(statuses)s) AND {time} < %(cutoff)s"


def _sql(store: EventStore, spec: ArchiveSpec, template: str) -> sql.Composed:
    names = _names(store, spec)
    return sql.SQL(template).format(old=sql.SQL(_OLD).format(**names), **names)


def _params(spec: ArchiveSpec, **extra: Any) -> dict[str, Any]:
    return {"statuses": list(spec.statuses), "cutoff": spec.cutoff, **extra}


_TABLE_EXISTS = (
    "SELECT EXISTS (SELECT 1 FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p'))"
)
# the archive has a unique index on exactly the id column (ON CONFLICT (id) needs one)
_UNIQUE_ON_ID = (
    "SELECT EXISTS (SELECT 1 FROM pg_index AS x JOIN pg_class AS c ON c.oid = x.indrelid"
    " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = x.indkey[0]"
    " WHERE n.nspname = %s AND c.relname = %s AND x.indisunique AND x.indisvalid"
    " AND x.indnkeyatts = 1 AND x.indpred IS NULL AND a.attname = %s)"
)
_COLUMNS = (
    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute AS a"
    " JOIN pg_class AS c ON c.oid = a.attrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
    " ORDER BY a.attnum"
)


@task(**pg_retries)
def server_cutoff(store: EventStore, older_than_days: float) -> datetime:
    """now() - N days by the server's clock (the runner's may disagree), fixed for the run."""
    with store.database.connect(autocommit=True) as conn:
        (cutoff,) = conn.execute(
            "SELECT now() - make_interval(secs => %s)", (older_than_days * 86400,)
        ).fetchone()
    return cutoff


@task(**pg_retries)
def survey_archivable(
    store: EventStore, spec: ArchiveSpec, check_locks: bool = False
) -> ArchiveSurvey:
    """Old terminal events per status with the oldest and newest time, and the archive's rows
    (seed 003 monthly "review and archive old events"). ``check_locks`` also counts the ones no
    transaction holds (locks them with SKIP LOCKED in a transaction rolled back at once)."""
    with store.database.connect(autocommit=True) as conn:
        rows = conn.execute(
            _sql(
                store,
                spec,
                "SELECT {status}::text, count(*)::bigint, min({time}), max({time})"
                " FROM {table} WHERE {old} GROUP BY 1",
            ),
            _params(spec),
        ).fetchall()
        exists = conn.execute(_TABLE_EXISTS, (store.schema_name, spec.archive_table)).fetchone()[0]
        archive_rows = None
        if exists:
            (archive_rows,) = conn.execute(
                _sql(store, spec, "SELECT count(*)::bigint FROM {archive}")
            ).fetchone()
        lockable = None
        if check_locks and rows:
            with conn.transaction(force_rollback=True):
                (lockable,) = conn.execute(
                    _sql(
                        store,
                        spec,
                        "WITH l AS (SELECT 1 FROM {table} WHERE {old} FOR UPDATE SKIP LOCKED)"
                        " SELECT count(*)::bigint FROM l",
                    ),
                    _params(spec),
                ).fetchone()
    oldest = min((r[2] for r in rows), default=None)
    newest = max((r[3] for r in rows), default=None)
    return ArchiveSurvey(
        table=f"{store.schema_name}.{store.table}",
        archive_table=f"{store.schema_name}.{spec.archive_table}",
        cutoff=spec.cutoff,
        by_status={r[0]: r[1] for r in rows},
        oldest=oldest,
        newest=newest,
        archive_exists=exists,
        archive_rows=archive_rows,
        lockable=lockable,
    )


# --- acting ----------------------------------------------------------------------------------


class ArchiveUnsuitable(Exception):
    """The archive table exists but cannot take the events table's rows as they are."""


class ArchiveResult(ChangeSet):
    """Events moved to the archive, counted per status."""

    moved: int = Field(0, description="Rows deleted from the events table (0 in dry-run).")
    inserted: int = Field(0, description="Of them, rows inserted into the archive.")
    moved_by_status: dict[str, int] = Field(default_factory=dict)
    batch_sizes: list[int] = Field(default_factory=list)
    slowest_batch_s: float = 0.0
    elapsed_s: float = 0.0
    out_of_time: bool = False
    created_archive: bool = False

    @computed_field
    @property
    def already_archived(self) -> int:
        """Rows whose id the archive already had (kept there; the events table's copy went)."""
        return self.moved - self.inserted

    @computed_field
    @property
    def rows_per_s(self) -> float | None:
        return self.moved / self.elapsed_s if self.elapsed_s > 0 else None


def _status_change(
    store: EventStore,
    spec: ArchiveSpec,
    status: str,
    rows: int,
    *,
    action: str = "archive_events",
    destination: str | None = None,
) -> Change:
    """One planned or applied move of a status's old events (to the archive table by default)."""
    return Change(
        action=action,
        # no count in the target: the plan approved and the plan re-made on resume must match
        target=f"{store.schema_name}.{store.table} -> {destination or spec.archive_table}: "
        f"{status} older than {spec.older_than_days:g} days",
        detail={"status": status, "rows": rows, "cutoff": spec.cutoff.isoformat()},
    )


def _create_change(store: EventStore, spec: ArchiveSpec) -> Change:
    return Change(
        action="create_archive_table",
        target=f"{store.schema_name}.{spec.archive_table}",
        detail={"like": f"{store.schema_name}.{store.table}"},
    )


# One batch, one statement, one transaction: the next ids after the last batch's (keyset),
# locked without waiting, deleted, and the deleted rows inserted into the archive.
_BATCH = (
    "WITH picked AS MATERIALIZED (SELECT {id} FROM {table} WHERE {old}{after}"
    "  ORDER BY {id} LIMIT %(batch_size)s FOR UPDATE SKIP LOCKED),"
    " moved AS (DELETE FROM {table} WHERE {id} IN (SELECT {id} FROM picked) RETURNING *),"
    " ins AS (INSERT INTO {archive} SELECT * FROM moved ON CONFLICT ({id}) DO NOTHING"
    "  RETURNING {id})"
    " SELECT (SELECT count(*)::int FROM picked), (SELECT count(*)::int FROM moved),"
    " (SELECT count(*)::int FROM ins),"
    " (SELECT p.{id} FROM picked AS p ORDER BY p.{id} DESC LIMIT 1),"
    " (SELECT coalesce(json_object_agg(s, n), '{{}}') FROM"
    "  (SELECT {status}::text AS s, count(*) AS n FROM moved GROUP BY 1) AS per)"
)
_AFTER = " AND {id} > %(after)s"
MAX_PASSES = 2


@task(**pg_retries)
def archive_old_events(store: EventStore, spec: ArchiveSpec, dry_run: bool) -> ArchiveResult:
    """Move the old terminal events into the archive table in batches (created ``LIKE`` the
    events table, ``INCLUDING ALL``, when missing). Each batch is sized to take about the
    block's ``batch_target_ms``; no batch starts after ``spec.time_budget_s``. Idempotent: a
    re-run (or a retry after a failure) finds only what is left."""
    with store.database.connect(autocommit=True) as conn:
        exists = conn.execute(_TABLE_EXISTS, (store.schema_name, spec.archive_table)).fetchone()[0]
        counts = dict(
            conn.execute(
                _sql(
                    store,
                    spec,
                    "SELECT {status}::text, count(*)::int FROM {table} WHERE {old} GROUP BY 1",
                ),
                _params(spec),
            ).fetchall()
        )
        result = ArchiveResult(dry_run=dry_run)
        if not counts:
            return result
        if not exists:
            result.planned.append(_create_change(store, spec))
        result.planned += [_status_change(store, spec, s, n) for s, n in sorted(counts.items())]
        if dry_run:
            return result
        if not exists:
            conn.execute(
                _sql(
                    store, spec, "CREATE TABLE IF NOT EXISTS {archive} (LIKE {table} INCLUDING ALL)"
                )
            )
            result.created_archive = True
            result.applied.append(_create_change(store, spec))
        source = conn.execute(_COLUMNS, (store.schema_name, store.table)).fetchall()
        archive = conn.execute(_COLUMNS, (store.schema_name, spec.archive_table)).fetchall()
        problem = columns_mismatch(source, archive)
        if (
            problem is None
            and not conn.execute(
                _UNIQUE_ON_ID, (store.schema_name, spec.archive_table, store.id_column)
            ).fetchone()[0]
        ):
            problem = f"no primary key or unique index on {store.id_column} (ON CONFLICT needs one)"
        if problem:
            raise ArchiveUnsuitable(
                f"archive table {store.schema_name}.{spec.archive_table} does not match "
                f"{store.schema_name}.{store.table}: {problem}"
            )
        _move_in_batches(conn, store, spec, result)
    result.applied += [
        _status_change(store, spec, s, n) for s, n in sorted(result.moved_by_status.items())
    ]
    if result.out_of_time:
        result.notes.append(
            f"time budget of {spec.time_budget_s:g}s ended after {result.moved:,} event(s): "
            "the next run continues"
        )
    return result


def _move_in_batches(
    conn: psycopg.Connection, store: EventStore, spec: ArchiveSpec, result: ArchiveResult
) -> None:
    size, smallest, largest = batch_bounds(store)
    target_s = store.batch_target_ms / 1000
    statements = {
        after: _sql(store, spec, _BATCH.replace("{after}", _AFTER if after else ""))
        for after in (False, True)
    }
    started = time.monotonic()
    deadline = started + spec.time_budget_s
    any_left = _sql(
        store,
        spec,
        "SELECT EXISTS (SELECT 1 FROM {table} WHERE {old} LIMIT 1 FOR UPDATE SKIP LOCKED)",
    )
    for _pass in range(MAX_PASSES):
        # a second pass from the lowest id takes rows a writer held during the first, when a
        # quick look finds one no one holds now
        if _pass and not conn.execute(any_left, _params(spec)).fetchone()[0]:
            break
        last: Any = None
        while True:
            if time.monotonic() >= deadline:
                result.out_of_time = True
                break
            t0 = time.perf_counter()
            picked, moved, inserted, last_id, per_status = conn.execute(
                statements[last is not None], _params(spec, batch_size=size, after=last)
            ).fetchone()
            elapsed = time.perf_counter() - t0
            result.slowest_batch_s = max(result.slowest_batch_s, elapsed)
            if moved:
                result.batch_sizes.append(moved)
                result.moved += moved
                result.inserted += inserted
                for status, n in per_status.items():
                    result.moved_by_status[status] = result.moved_by_status.get(status, 0) + n
            # SKIP LOCKED rows do not count against the LIMIT: a short batch is the end
            if picked < size:
                break
            last = last_id
            size = next_batch_size(size, elapsed, target_s, smallest, largest)
        if result.out_of_time:
            break
    result.elapsed_s = time.monotonic() - started
