"""PostgreSQL performance tasks for an event store: slow statements, scans, indexes, plans.

Reads ``pg_stat_statements``, ``pg_stat_user_tables``, ``pg_stat_user_indexes``,
``pg_stat_activity`` and EXPLAIN plans; proposes indexes for sequential scans that filter out
most of a large table; builds them with ``CREATE INDEX CONCURRENTLY`` (writers never wait on it).
The decisions are pure functions in ``tasks/pg_performance_decisions.py``; these tasks do the I/O.
"""

from __future__ import annotations

import itertools
import time
from enum import StrEnum
from typing import Any

import psycopg
from prefect import task
from psycopg import sql
from pydantic import BaseModel, Field

from blocks.event_store import EventStore
from runbooks.results import Change, ChangeSet
from tasks.pg_performance_decisions import IndexCandidate, IndexInfo, TableStats, index_name
from tasks.postgres import pg_retries

# --- reading ---------------------------------------------------------------------------------


class Statement(BaseModel):
    queryid: str
    query: str
    calls: int
    total_ms: float
    mean_ms: float
    rows: int
    shared_blks_hit: int
    shared_blks_read: int

    def describe(self) -> str:
        one_line = " ".join(self.query.split())
        return (
            f"{self.mean_ms:,.1f} ms mean, {self.total_ms:,.0f} ms total over {self.calls:,} calls, "
            f"{self.rows:,} rows, blocks hit/read {self.shared_blks_hit:,}/"
            f"{self.shared_blks_read:,}: {one_line[:200]}"
        )


class StatementsReport(BaseModel):
    available: bool
    problem: str | None = None
    by_mean: list[Statement] = Field(default_factory=list)
    by_total: list[Statement] = Field(default_factory=list)


_STATEMENTS = (
    "SELECT s.queryid::text, s.query, s.calls, s.total_exec_time, s.mean_exec_time, s.rows,"
    " s.shared_blks_hit, s.shared_blks_read"
    " FROM pg_stat_statements AS s JOIN pg_database AS d ON d.oid = s.dbid"
    " WHERE d.datname = current_database() AND s.query !~* '^\\s*(explain|prepare|deallocate)'"
    # not the runbook's own reads (its login runs only catalog and statistics queries)
    " AND s.userid <> (SELECT oid FROM pg_roles WHERE rolname = current_user)"
    " ORDER BY {order} DESC LIMIT %(limit)s"
)


@task(**pg_retries)
def read_statements(store: EventStore, limit: int = 10) -> StatementsReport:
    """Top statements of this database by mean and by total time (seed 003 "check slow
    queries"), from pg_stat_statements; says so, instead of failing, when it is missing."""
    with store.database.connect(autocommit=True) as conn:
        installed = conn.execute(
            "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"
        ).fetchone()
        if not installed:
            return StatementsReport(
                available=False,
                problem=f"pg_stat_statements is not installed in database {store.database.dbname} "
                "(CREATE EXTENSION pg_stat_statements; the server must also preload it in "
                "shared_preload_libraries): slow statements cannot be listed",
            )
        out: dict[str, list[Statement]] = {}
        for key, order in (("by_mean", "s.mean_exec_time"), ("by_total", "s.total_exec_time")):
            try:
                rows = conn.execute(
                    sql.SQL(_STATEMENTS).format(order=sql.SQL(order)), {"limit": limit}
                ).fetchall()
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                return StatementsReport(
                    available=False,
                    problem="pg_stat_statements is installed but not loaded (add it to "
                    f"shared_preload_libraries and restart): {exc.diag.message_primary}",
                )
            out[key] = [
                Statement(
                    queryid=r[0],
                    query=r[1],
                    calls=r[2],
                    total_ms=r[3],
                    mean_ms=r[4],
                    rows=r[5],
                    shared_blks_hit=r[6],
                    shared_blks_read=r[7],
                )
                for r in rows
            ]
    return StatementsReport(available=True, **out)


class DatabaseFindings(BaseModel):
    """Tables, indexes and connections of the event store's database."""

    tables: list[TableStats]
    indexes: list[IndexInfo]
    connections_by_state: dict[str, int]
    max_connections: int
    table_rows: float = Field(description="The events table's row estimate (pg_class.reltuples).")
    table_columns: list[str]


_TABLE_STATS = (
    "SELECT relname, coalesce(seq_scan, 0), coalesce(seq_tup_read, 0), idx_scan,"
    " coalesce(n_live_tup, 0) FROM pg_stat_user_tables WHERE schemaname = %(schema)s"
)
_INDEXES = (
    "SELECT c.relname, i.relname, x.indisunique, x.indisprimary, x.indisvalid AND x.indisready,"
    " ARRAY(SELECT coalesce(a.attname::text, '(expr)')"
    "  FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)"
    "  LEFT JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = k.attnum AND k.attnum > 0"
    "  WHERE k.ord <= x.indnkeyatts ORDER BY k.ord),"
    " am.amname, pg_get_expr(x.indpred, x.indrelid), x.indexprs IS NOT NULL,"
    " coalesce(s.idx_scan, 0), pg_relation_size(i.oid), pg_get_indexdef(i.oid)"
    " FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid"
    " JOIN pg_class AS c ON c.oid = x.indrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " JOIN pg_am AS am ON am.oid = i.relam"
    " LEFT JOIN pg_stat_user_indexes AS s ON s.indexrelid = i.oid"
    " WHERE n.nspname = %(schema)s ORDER BY c.relname, i.relname"
)
_CONNECTIONS = (
    "SELECT coalesce(state, 'unknown'), count(*)::int FROM pg_stat_activity"
    " WHERE backend_type = 'client backend' GROUP BY 1"
)
_TABLE_SHAPE = (
    "SELECT greatest(c.reltuples, 0)::float8,"
    " ARRAY(SELECT attname::text FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0"
    "  AND NOT attisdropped ORDER BY attnum)"
    " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %(schema)s AND c.relname = %(table)s"
)


def read_indexes(conn: psycopg.Connection, schema: str) -> list[IndexInfo]:
    return [
        IndexInfo(
            table=r[0],
            name=r[1],
            unique=r[2],
            primary=r[3],
            valid=r[4],
            columns=tuple(r[5]),
            method=r[6],
            predicate=r[7],
            has_expressions=r[8],
            scans=r[9],
            size_bytes=r[10],
            definition=r[11],
        )
        for r in conn.execute(_INDEXES, {"schema": schema}).fetchall()
    ]


@task(**pg_retries)
def read_findings(store: EventStore) -> DatabaseFindings:
    """Scan statistics of the schema's tables, its indexes with their use, connections by state."""
    with store.database.connect(autocommit=True) as conn:
        tables = [
            TableStats(table=r[0], seq_scan=r[1], seq_tup_read=r[2], idx_scan=r[3], n_live_tup=r[4])
            for r in conn.execute(_TABLE_STATS, {"schema": store.schema_name}).fetchall()
        ]
        by_state = dict(conn.execute(_CONNECTIONS).fetchall())
        (max_conn,) = conn.execute("SELECT current_setting('max_connections')::int").fetchone()
        shape = conn.execute(
            _TABLE_SHAPE, {"schema": store.schema_name, "table": store.table}
        ).fetchone()
        if shape is None:
            raise ValueError(f"table {store.schema_name}.{store.table} does not exist")
        return DatabaseFindings(
            tables=tables,
            indexes=read_indexes(conn, store.schema_name),
            connections_by_state=by_state,
            max_connections=max_conn,
            table_rows=shape[0],
            table_columns=list(shape[1]),
        )


# --- plans ---------------------------------------------------------------------------------


class QueryShape(StrEnum):
    """The event store's own queries, built from the block's table and columns."""

    PENDING_OLDEST = "pending_oldest"  # a consumer takes the oldest PENDING events
    STUCK_PROCESSING = "stuck_processing"  # event-processing-stuck's detector
    PENDING_IN_ID_ORDER = "pending_in_id_order"  # a consumer takes PENDING events by id


_SHAPES = {
    QueryShape.PENDING_OLDEST: (
        "SELECT {id} FROM {table} WHERE {status} = %(pending)s ORDER BY {updated} LIMIT 100"
    ),
    QueryShape.STUCK_PROCESSING: (
        "SELECT {id} FROM {table} WHERE {status} = %(processing)s"
        " AND {updated} < now() - interval '1 hour'"
    ),
    QueryShape.PENDING_IN_ID_ORDER: (
        "SELECT {id} FROM {table} WHERE {status} = %(pending)s ORDER BY {id} LIMIT 100"
    ),
}


class Probe(BaseModel):
    """A query the runbook EXPLAINs: one of the store's shapes or a statement from
    pg_stat_statements (its generic plan: parameters are not known)."""

    label: str
    shape: QueryShape | None = None
    query: str | None = None
    params: int = 0


class PlanReading(BaseModel):
    probe: Probe
    plan: Any = Field(description="EXPLAIN (VERBOSE, FORMAT JSON).")
    text: str = Field(description="EXPLAIN in text, for the report.")
    error: str | None = None


_PROBE_NAMES = itertools.count(1)


def _shape_sql(store: EventStore, shape: QueryShape) -> sql.Composed:
    return sql.SQL(_SHAPES[shape]).format(
        table=sql.Identifier(store.schema_name, store.table),
        id=sql.Identifier(store.id_column),
        status=sql.Identifier(store.status_column),
        updated=sql.Identifier(store.updated_at_column),
    )


def _explain(
    conn: psycopg.Connection, store: EventStore, probe: Probe, analyze: bool
) -> tuple[Any, str]:
    options = "ANALYZE, " if analyze else ""
    out = []
    for fmt in ("VERBOSE, FORMAT JSON", "COSTS ON"):
        head = sql.SQL(f"EXPLAIN ({options}{fmt}) ")
        with conn.transaction(force_rollback=True):
            # EXPLAIN ANALYZE runs the query: read-only, so it can change nothing
            conn.execute("SET TRANSACTION READ ONLY")
            if probe.shape is not None:
                # a custom plan with the block's values, bound client-side as literals
                cur = psycopg.ClientCursor(conn)
                cur.execute(
                    head + _shape_sql(store, probe.shape),
                    {"pending": store.pending_status, "processing": store.processing_status},
                )
                rows = cur.fetchall()
            else:
                conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                # a prepared statement outlives a rolled-back transaction: a name per use, and
                # one that failed stays until the connection closes (at the end of the task)
                name = sql.Identifier(f"rb_probe_{next(_PROBE_NAMES)}")
                conn.execute(sql.SQL("PREPARE {} AS ").format(name) + sql.SQL(probe.query or ""))
                nulls = sql.SQL(", ").join([sql.SQL("NULL")] * probe.params)
                args = sql.SQL("({})").format(nulls) if probe.params else sql.SQL("")
                rows = conn.execute(head + sql.SQL("EXECUTE {}").format(name) + args).fetchall()
                conn.execute(sql.SQL("DEALLOCATE {}").format(name))
        out.append(rows)
    plan = out[0][0][0]
    text = "\n".join(r[0] for r in out[1])
    return plan, text


@task(**pg_retries)
def explain_probes(
    store: EventStore, probes: list[Probe], analyze: bool = False
) -> list[PlanReading]:
    """EXPLAIN each probe (EXPLAIN ANALYZE only when asked: it runs the query, read-only).
    A statement that cannot be prepared alone (its parameter types unknown, a privilege
    missing) is reported with its error, not raised."""
    readings = []
    with store.database.connect(autocommit=False) as conn:
        for probe in probes:
            try:
                plan, text = _explain(conn, store, probe, analyze)
                readings.append(PlanReading(probe=probe, plan=plan, text=text))
            except psycopg.OperationalError:
                raise  # the connection, the server or a timeout: retried or reported as such
            except psycopg.Error as exc:
                conn.rollback()
                readings.append(
                    PlanReading(probe=probe, plan=None, text="", error=str(exc).splitlines()[0])
                )
    return readings


# --- acting ----------------------------------------------------------------------------------


class IndexBuild(ChangeSet):
    """Indexes built CONCURRENTLY (and invalid leftovers dropped first)."""

    built: list[str] = Field(default_factory=list, description="Indexes now valid.")
    dropped_invalid: list[str] = Field(default_factory=list)
    build_s: dict[str, float] = Field(default_factory=dict, description="Seconds per build.")


def _index_state(conn: psycopg.Connection, schema: str, name: str) -> bool | None:
    """None: no such index; else whether it is valid (a killed CONCURRENTLY build leaves it
    invalid: never used by queries, but still maintained by every write)."""
    row = conn.execute(
        "SELECT x.indisvalid AND x.indisready FROM pg_index AS x"
        " JOIN pg_class AS i ON i.oid = x.indexrelid JOIN pg_namespace AS n ON n.oid = i.relnamespace"
        " WHERE n.nspname = %s AND i.relname = %s",
        (schema, name),
    ).fetchone()
    return None if row is None else row[0]


def _build_change(store: EventStore, cand: IndexCandidate, name: str, invalid: bool) -> Change:
    cols = ", ".join(cand.columns)
    return Change(
        action="rebuild_invalid_index" if invalid else "create_index_concurrently",
        target=f"{store.schema_name}.{cand.table} ({cols}) as {name}",
        detail={
            "index": name,
            "columns": list(cand.columns),
            "why": cand.reason[:300],
            "source": cand.source,
            "invalid_leftover": invalid,
        },
    )


class IndexBuildGaveUp(Exception):
    """The build waited longer than lock_timeout (CONCURRENTLY waits for every transaction
    older than its snapshot, and to drop its leftover, for them again)."""


def _drop_leftover(conn: psycopg.Connection, schema: str, name: str, wait_s: float) -> str:
    """Drop the INVALID index a failed build left, CONCURRENTLY (writers go on), waiting at
    most ``wait_s`` for the transactions it must outlive; what happened, as a sentence."""
    if _index_state(conn, schema, name) is not False:
        return "it left no index behind"
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(wait_s * 1000)}ms")))
    try:
        conn.execute(
            sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, name))
        )
    except psycopg.errors.LockNotAvailable:
        return (
            f"its INVALID leftover {name} could not be dropped within {wait_s:g}s (the same "
            "transaction is still open): the next run drops and rebuilds it"
        )
    return f"its INVALID leftover {name} was dropped"


@task(**pg_retries)
def build_indexes(
    store: EventStore,
    candidates: list[IndexCandidate],
    dry_run: bool,
    lock_timeout_ms: int = 2000,
    build_timeout_s: float = 3600.0,
    drop_wait_s: float = 60.0,
) -> IndexBuild:
    """``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` for each candidate, under a name derived from
    table and columns. A valid index of that name is left alone (a re-run does nothing); an
    invalid one (a killed or failed concurrent build) is dropped CONCURRENTLY and built again.

    CONCURRENTLY takes only a SHARE UPDATE EXCLUSIVE lock: inserts, updates and deletes go on
    during the build. ``lock_timeout`` bounds any wait for a lock (it never queues for long
    behind a session holding a conflicting lock: the statement fails instead, and the leftover
    it may leave is dropped before the error is raised). The block's statement_timeout would
    cut a long build short: the build's session uses ``build_timeout_s`` instead. A failed
    build's INVALID leftover is dropped CONCURRENTLY, waiting up to ``drop_wait_s``; one that
    cannot be dropped yet is dropped and rebuilt by the next run.
    """
    result = IndexBuild(dry_run=dry_run)
    with store.database.connect(autocommit=True) as conn:
        conn.execute(
            sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout_ms)}ms"))
        )
        conn.execute(
            sql.SQL("SET statement_timeout = {}").format(
                sql.Literal(f"{int(build_timeout_s * 1000)}ms")
            )
        )
        for cand in candidates:
            name = index_name(cand.table, cand.columns)
            state = _index_state(conn, store.schema_name, name)
            if state is True:
                result.notes.append(f"{name} already exists and is valid")
                continue
            change = _build_change(store, cand, name, invalid=state is False)
            result.planned.append(change)
            if dry_run:
                continue
            qualified = sql.Identifier(store.schema_name, name)
            if state is False:
                conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(qualified))
                result.dropped_invalid.append(name)
            t0 = time.monotonic()
            try:
                conn.execute(
                    sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})").format(
                        sql.Identifier(name),
                        sql.Identifier(store.schema_name, cand.table),
                        sql.SQL(", ").join(sql.Identifier(c) for c in cand.columns),
                    )
                )
            except psycopg.Error as exc:
                # a failed concurrent build leaves an invalid index that every write maintains
                leftover = _drop_leftover(conn, store.schema_name, name, drop_wait_s)
                if isinstance(exc, psycopg.errors.LockNotAvailable):
                    raise IndexBuildGaveUp(
                        f"building {name} waited over lock_timeout {int(lock_timeout_ms)} ms for "
                        f"a lock and gave up ({exc.diag.message_primary}); {leftover}"
                    ) from None
                raise
            result.build_s[name] = time.monotonic() - t0
            if _index_state(conn, store.schema_name, name):
                result.built.append(name)
                result.applied.append(change)
    return result


@task(**pg_retries)
def index_validity(store: EventStore, names: list[str]) -> dict[str, bool | None]:
    """pg_index.indisvalid (and indisready) per index name; None when it does not exist."""
    with store.database.connect(autocommit=True) as conn:
        return {n: _index_state(conn, store.schema_name, n) for n in names}
