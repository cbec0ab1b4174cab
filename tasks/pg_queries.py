"""PostgreSQL tasks: statements running long on one database, and cancelling them.

Cancelling (``pg_cancel_backend``) stops the statement and rolls back its transaction; the session
stays connected, so the application sees an error on that one query and goes on. It is the
mildest change a runbook can make to a busy database, and the one `runbooks new` starts from.
"""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task
from psycopg import sql
from psycopg.rows import class_row
from pydantic import BaseModel, Field

from blocks.postgres import PostgresDatabase
from runbooks.results import Change, ChangeSet
from tasks.postgres import _SIGNALABLE, pg_retries  # terminate's rule of who may signal whom


class LongQuery(BaseModel):
    """A client session running one statement for long (its text is never read: it may hold
    secrets)."""

    pid: int
    query_start: datetime = Field(description="When the statement started (the server's clock).")
    datname: str | None
    usename: str | None
    application_name: str | None
    running_s: float = Field(description="Seconds the statement has been running.")
    signalable: bool = Field(description="Whether the runbook's role may cancel it.")

    def label(self) -> str:
        return f"{self.datname} pid={self.pid} ({self.usename}/{self.application_name or '-'})"


def describe_queries(queries: list[LongQuery], running_for_s: float) -> str:
    """E.g. '2 statement(s) running over 300s, the longest 912s (app/api, batch/report)'."""
    if not queries:
        return f"no statement running over {running_for_s:g}s"
    holders = ", ".join(sorted({f"{q.usename}/{q.application_name or '-'}" for q in queries}))
    longest = max(q.running_s for q in queries)
    return (
        f"{len(queries)} statement(s) running over {running_for_s:g}s, the longest "
        f"{longest:.0f}s ({holders})"
    )


_LONG_QUERIES = sql.SQL(
    "SELECT a.pid, a.query_start, a.datname, a.usename, a.application_name,"
    " extract(epoch FROM now() - a.query_start)::float8 AS running_s,"
    " coalesce({signalable}, false) AS signalable"
    " FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid"
    " WHERE a.backend_type = 'client backend' AND a.state = 'active'"
    " AND a.pid <> pg_backend_pid() AND a.datname = %(database)s"
    " AND a.query_start < now() - make_interval(secs => %(running_for_s)s)"
    " ORDER BY a.query_start"
).format(signalable=_SIGNALABLE)

# One statement re-checks and cancels: only a session still running the very statement listed
# (same pid, same query_start) is signalled, so a retry, a re-run or a recycled pid never cancels
# a newer statement; CASE evaluates in order, so pg_cancel_backend runs only on rows that passed.
_CANCEL = sql.SQL(
    "SELECT t.pid, CASE"
    " WHEN a.pid IS NULL THEN 'gone'"
    " WHEN NOT coalesce({signalable}, false) THEN 'not allowed'"
    " WHEN pg_cancel_backend(a.pid) THEN 'cancelled'"
    " ELSE 'gone' END"
    " FROM unnest(%(pids)s::int[], %(starts)s::timestamptz[]) AS t(pid, query_start)"
    " LEFT JOIN pg_stat_activity a"
    " ON a.pid = t.pid AND a.query_start = t.query_start AND a.state = 'active'"
    " LEFT JOIN pg_roles r ON r.oid = a.usesysid"
).format(signalable=_SIGNALABLE)


@task(**pg_retries)
def list_long_queries(db: PostgresDatabase, database: str, running_for_s: float) -> list[LongQuery]:
    """Client statements on ``database`` running longer than ``running_for_s``, oldest first;
    never the runbook's own."""
    with db.connect(autocommit=True) as conn:
        queries = (
            conn.cursor(row_factory=class_row(LongQuery))
            .execute(_LONG_QUERIES, {"database": database, "running_for_s": running_for_s})
            .fetchall()
        )
    get_run_logger().info("%s on %s", describe_queries(queries, running_for_s), database)
    return queries


class CancelResult(ChangeSet):
    """Outcome per statement of cancelling long queries."""

    cancelled: list[int] = Field(default_factory=list, description="pids signalled to cancel.")
    gone: list[int] = Field(
        default_factory=list, description="Already finished, or the session runs a newer statement."
    )
    not_allowed: list[int] = Field(
        default_factory=list, description="The runbook's role may not cancel them (superuser)."
    )


@task(**pg_retries)
def cancel_queries(db: PostgresDatabase, queries: list[LongQuery], dry_run: bool) -> CancelResult:
    """Cancel the statements listed, each only while it is still the one listed. Idempotent: a
    statement already finished or cancelled is reported as gone, never signalled twice."""
    planned = [
        Change(
            action="cancel_query",
            target=q.label(),
            detail={"running_s": round(q.running_s, 1), "query_start": q.query_start.isoformat()},
        )
        for q in queries
    ]
    if dry_run or not queries:
        return CancelResult(dry_run=dry_run, planned=planned)
    with db.connect(autocommit=True) as conn:
        outcome = dict(
            conn.execute(
                _CANCEL,
                {"pids": [q.pid for q in queries], "starts": [q.query_start for q in queries]},
            ).fetchall()
        )
    result = CancelResult(dry_run=False, planned=planned)
    for query, change in zip(queries, planned, strict=True):
        verdict = outcome[query.pid]
        if verdict == "cancelled":
            result.cancelled.append(query.pid)
            result.applied.append(change)
        elif verdict == "not allowed":
            result.not_allowed.append(query.pid)
            result.notes.append(f"{query.label()}: the runbook's role may not cancel it")
        else:
            result.gone.append(query.pid)
            result.notes.append(f"{query.label()} already finished")
    return result
