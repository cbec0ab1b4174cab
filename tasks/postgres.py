"""PostgreSQL tasks: connection usage against max_connections, and terminating idle sessions."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from enum import StrEnum

import psycopg
from prefect import get_run_logger, task
from psycopg import sql
from psycopg.rows import class_row
from pydantic import BaseModel, Field, computed_field

from blocks.postgres import PostgresDatabase
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options

# Out of connection slots, or the server shutting down or starting up: the next try may work.
_TRANSIENT_SQLSTATES = frozenset({"53300", "57P01", "57P02", "57P03"})
# libpq reports a failed connection as text only, without SQLSTATE; these causes would repeat.
_PERMANENT_CONNECT_FAILURES = (
    "authentication failed",
    "pg_hba.conf",
    "does not exist",
    "permission denied",
)


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: connection failures, server restarts, deadlock aborts.

    A statement timeout (57014), bad credentials or a privilege error would only repeat.
    """
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    if state is None:
        # the client could not connect or lost the connection
        return not any(cause in str(exc) for cause in _PERMANENT_CONNECT_FAILURES)
    return state[:2] in ("08", "40") or state in _TRANSIENT_SQLSTATES


pg_retries = runbook_task_options(psycopg.OperationalError, when=is_transient)


@task(**pg_retries)
def get_system_identifier(db: PostgresDatabase) -> str:
    """The server's own identity: ``system_identifier`` from ``pg_control_system()``.

    Set by initdb and the same whichever host name or address reached the server, so runbooks
    key their locks and budgets on it rather than on the block's host text. A physical standby
    keeps its primary's identifier: runs on the two share one lock and budget (they take turns).
    """
    with db.connect(autocommit=True) as conn:
        (identifier,) = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    return str(identifier)


# --- connection usage ------------------------------------------------------------------


class ConnectionUsage(BaseModel):
    """Client sessions against the connection limit, as the server counts them."""

    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int = Field(
        0, description="Slots for pg_use_reserved_connections (PostgreSQL 16+); 0 before."
    )
    total_backends: int = Field(description="Every process in pg_stat_activity, workers included.")
    client_backends: int = Field(description="Client sessions: the ones max_connections limits.")
    by_state: dict[str, int] = Field(description="Client sessions per state (active, idle, ...).")

    @computed_field
    @property
    def usable_connections(self) -> int:
        """Slots an ordinary (non-superuser) client can take."""
        return (
            self.max_connections - self.superuser_reserved_connections - self.reserved_connections
        )

    @computed_field
    @property
    def headroom(self) -> int:
        """Free usable slots; negative when superusers are eating into their reserve."""
        return self.usable_connections - self.client_backends

    @computed_field
    @property
    def percent_used(self) -> float:
        return round(100.0 * self.client_backends / max(self.usable_connections, 1), 2)

    def describe(self) -> str:
        return (
            f"{self.client_backends} of {self.usable_connections} usable connections in use "
            f"({self.percent_used:.0f}%), {self.headroom} free, max_connections={self.max_connections}"
        )


class PoolTargets(BaseModel):
    """What "enough free connections" means; the pool is exhausted when either is missed."""

    target_headroom_percent: float = Field(ge=0, le=100)
    min_free_connections: int = Field(ge=0)


def has_headroom(usage: ConnectionUsage, targets: PoolTargets) -> bool:
    """Whether enough usable slots are free: both the share and the absolute number."""
    free_percent = 100.0 - usage.percent_used
    return (
        usage.headroom >= targets.min_free_connections
        and free_percent >= targets.target_headroom_percent
    )


@task(**pg_retries)
def get_connection_usage(db: PostgresDatabase) -> ConnectionUsage:
    """Count client sessions per state and read the connection limits (seed: pg_stat_activity)."""
    with db.connect(autocommit=True) as conn:
        max_connections, superuser_reserved, reserved = conn.execute(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            # missing_ok: reserved_connections exists from PostgreSQL 16 on
            " coalesce(current_setting('reserved_connections', true), '0')::int"
        ).fetchone()
        rows = conn.execute(
            "SELECT coalesce(state, 'unknown'), backend_type = 'client backend', count(*)::int"
            " FROM pg_stat_activity GROUP BY 1, 2"
        ).fetchall()
    by_state: Counter[str] = Counter()
    for state, is_client, n in rows:
        if is_client:
            by_state[state] += n
    return ConnectionUsage(
        max_connections=max_connections,
        superuser_reserved_connections=superuser_reserved,
        reserved_connections=reserved,
        total_backends=sum(n for _, _, n in rows),
        client_backends=sum(by_state.values()),
        by_state=dict(sorted(by_state.items())),
    )


# --- idle sessions ---------------------------------------------------------------------


class IdleCriteria(BaseModel):
    """Which sessions count as idle connections that may be terminated."""

    idle_for_s: float = Field(gt=0, description="Idle for longer than this many seconds.")
    include_idle_in_transaction: bool = Field(
        False, description="Also 'idle in transaction' sessions (their open work is rolled back)."
    )
    exclude_roles: list[str] = Field(default_factory=list, description="Never these roles.")
    exclude_applications: list[str] = Field(
        default_factory=list, description="Never sessions with these application_name values."
    )
    databases: list[str] = Field(
        default_factory=list, description="Only sessions of these databases; empty: every database."
    )

    @property
    def states(self) -> list[str]:
        if self.include_idle_in_transaction:
            return ["idle", "idle in transaction", "idle in transaction (aborted)"]
        return ["idle"]


class Backend(BaseModel):
    """One server process from pg_stat_activity (its query text is never read: it may hold secrets)."""

    pid: int
    backend_start: datetime | None
    backend_type: str | None
    datname: str | None
    usename: str | None
    application_name: str | None
    client_addr: str | None
    state: str | None = Field(description="None when the runbook role may not see it.")
    state_change: datetime | None
    idle_s: float | None = Field(description="Seconds since state_change, by the server's clock.")
    signalable: bool = Field(description="Whether the runbook's role may terminate it.")
    own_session: bool = Field(description="The session that read pg_stat_activity.")

    def label(self) -> str:
        return f"{self.datname} pid={self.pid} ({self.usename}/{self.application_name or '-'})"


def skip_reason(backend: Backend, criteria: IdleCriteria) -> str | None:
    """Why a backend must not be terminated, or None if it qualifies as an idle connection.

    Idle time is measured from `state_change`, the moment the session went idle. The seed's
    `query_start` is when the last query *began*: a session that just finished a 10-minute
    report has an old query_start but has been idle for a second, and must survive.
    Keep in step with `_QUALIFIES`, which re-applies these rules inside PostgreSQL.
    """
    if backend.own_session:
        return "the runbook's own session"
    if backend.backend_type != "client backend":
        return "not a client session"
    if criteria.databases and backend.datname not in criteria.databases:
        return "database not targeted"
    if backend.usename in criteria.exclude_roles:
        return "excluded role"
    if (backend.application_name or "") in criteria.exclude_applications:
        return "excluded application"
    if not backend.signalable:
        return "the runbook role may not terminate it (superuser session or no pg_signal_backend)"
    if backend.state not in criteria.states:
        return f"state {backend.state or 'unknown'}"
    if backend.idle_s is None or backend.idle_s <= criteria.idle_for_s:
        return "idle too briefly"
    return None


# Mirrors the server's rule for pg_terminate_backend (PostgreSQL 15 signalfuncs.c), so a
# session we may not signal is skipped instead of failing the whole statement.
_SIGNALABLE = sql.SQL(
    "CASE WHEN current_setting('is_superuser') = 'on' THEN true"
    " WHEN r.rolsuper THEN false"
    " ELSE pg_has_role(a.usesysid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE') END"
)

_LIST_BACKENDS = sql.SQL(
    "SELECT a.pid, a.backend_start, a.backend_type, a.datname, a.usename, a.application_name,"
    " host(a.client_addr) AS client_addr, a.state, a.state_change,"
    " extract(epoch FROM now() - a.state_change)::float8 AS idle_s,"
    " coalesce({signalable}, false) AS signalable,"
    " a.pid = pg_backend_pid() AS own_session"
    " FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid ORDER BY a.pid"
).format(signalable=_SIGNALABLE)

# skip_reason, as SQL over pg_stat_activity a / pg_roles r
_QUALIFIES = sql.SQL(
    "a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()"
    " AND (cardinality(%(databases)s::text[]) = 0 OR a.datname = ANY(%(databases)s::text[]))"
    " AND a.usename <> ALL(%(exclude_roles)s::text[])"
    " AND coalesce(a.application_name, '') <> ALL(%(exclude_applications)s::text[])"
    " AND {signalable}"
    " AND a.state = ANY(%(states)s::text[])"
    " AND a.state_change < now() - make_interval(secs => %(idle_for_s)s)"
).format(signalable=_SIGNALABLE)

# One statement re-checks every candidate and signals only those that still qualify: a
# session that turned busy since it was listed survives, and matching backend_start keeps
# a recycled pid (a different, newer session) out of reach. CASE evaluates in order, so
# pg_terminate_backend runs only on rows that passed the check.
_TERMINATE = sql.SQL(
    "SELECT t.pid, CASE"
    " WHEN a.pid IS NULL THEN 'gone'"
    " WHEN NOT coalesce({qualifies}, false) THEN 'spared'"
    " WHEN pg_terminate_backend(a.pid) THEN 'terminated'"
    " ELSE 'gone' END"
    " FROM unnest(%(pids)s::int[], %(starts)s::timestamptz[]) AS t(pid, backend_start)"
    " LEFT JOIN pg_stat_activity a ON a.pid = t.pid AND a.backend_start = t.backend_start"
    " LEFT JOIN pg_roles r ON r.oid = a.usesysid"
).format(qualifies=_QUALIFIES)


@task(**pg_retries)
def find_idle_connections(db: PostgresDatabase, criteria: IdleCriteria) -> list[Backend]:
    """Client sessions idle longer than the threshold, minus exclusions, oldest idle first.

    Never the runbook's own session, never replication or background processes, never a
    session the runbook role may not signal.
    """
    with db.connect(autocommit=True) as conn:
        backends = conn.cursor(row_factory=class_row(Backend)).execute(_LIST_BACKENDS).fetchall()
    skipped: Counter[str] = Counter()
    candidates = []
    for backend in backends:
        reason = skip_reason(backend, criteria)
        if reason is None:
            candidates.append(backend)
        else:
            skipped[reason] += 1
    get_run_logger().info(
        "%d backends, %d idle candidates; skipped: %s",
        len(backends),
        len(candidates),
        dict(skipped) or "none",
    )
    return sorted(candidates, key=lambda b: -(b.idle_s or 0))


class TerminateResult(ChangeSet):
    """Outcome per candidate of terminating idle sessions."""

    session_pid: int | None = Field(None, description="pid that sent the signals; never a target.")
    terminated: list[int] = Field(default_factory=list, description="Signalled to terminate.")
    spared: list[int] = Field(
        default_factory=list, description="No longer qualified at the re-check (e.g. turned busy)."
    )
    gone: list[int] = Field(
        default_factory=list,
        description="Already disconnected, or its pid now names a newer session.",
    )


@task(**pg_retries)
def terminate_idle_connections(
    db: PostgresDatabase, candidates: list[Backend], criteria: IdleCriteria, dry_run: bool
) -> TerminateResult:
    """Terminate the candidates that still match the criteria at the moment of terminating.

    Idempotent: a candidate already gone is reported as such, not as an error, so a retry or
    re-run never signals a session twice.
    """
    planned = [
        Change(
            action="terminate_backend",
            target=b.label(),
            detail={
                "state": b.state,
                "idle_s": round(b.idle_s or 0, 1),
                "client_addr": b.client_addr,
            },
        )
        for b in candidates
    ]
    if dry_run or not candidates:
        return TerminateResult(dry_run=dry_run, planned=planned)
    params = {
        "pids": [b.pid for b in candidates],
        "starts": [b.backend_start for b in candidates],
        "databases": criteria.databases,
        "exclude_roles": criteria.exclude_roles,
        "exclude_applications": criteria.exclude_applications,
        "states": criteria.states,
        "idle_for_s": criteria.idle_for_s,
    }
    with db.connect(autocommit=True) as conn:
        session_pid = conn.info.backend_pid
        outcome = dict(conn.execute(_TERMINATE, params).fetchall())
    result = TerminateResult(dry_run=False, planned=planned, session_pid=session_pid)
    for backend, change in zip(candidates, planned, strict=True):
        verdict = outcome[backend.pid]
        if verdict == "terminated":
            result.terminated.append(backend.pid)
            result.applied.append(change)
        elif verdict == "spared":
            result.spared.append(backend.pid)
            result.notes.append(f"{backend.label()} spared: no longer idle-eligible at re-check")
        else:
            result.gone.append(backend.pid)
            result.notes.append(f"{backend.label()} already gone")
    return result


# --- decision --------------------------------------------------------------------------


class PoolAction(StrEnum):
    NONE = "none"
    TERMINATE = "terminate"
    ESCALATE = "escalate"


class PoolDecision(BaseModel):
    action: PoolAction
    reason: str
    sufficient: bool = Field(
        description="Whether the action alone is expected to meet the targets."
    )


def decide_pool_relief(
    usage: ConnectionUsage, idle_candidates: int, targets: PoolTargets
) -> PoolDecision:
    """Act only on an exhausted pool; terminating idle sessions is the only automatic relief."""
    if has_headroom(usage, targets):
        return PoolDecision(
            action=PoolAction.NONE, reason="enough free connections", sufficient=True
        )
    if idle_candidates == 0:
        return PoolDecision(
            action=PoolAction.ESCALATE,
            reason="no idle connection to terminate: busy connections alone exhaust the pool",
            sufficient=False,
        )
    projected = usage.model_copy(
        update={"client_backends": usage.client_backends - idle_candidates}
    )
    enough = has_headroom(projected, targets)
    return PoolDecision(
        action=PoolAction.TERMINATE,
        reason=f"terminating {idle_candidates} idle connection(s) should leave "
        f"{projected.headroom} free" + ("" if enough else ", still short of the target"),
        sufficient=enough,
    )
