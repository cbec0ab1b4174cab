"""PostgreSQL tasks: connection usage against max_connections, and terminating idle sessions."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from enum import StrEnum
from statistics import median
from typing import Any

import psycopg
from prefect import get_run_logger, task
from psycopg import sql
from psycopg.rows import class_row
from pydantic import BaseModel, Field, computed_field

from blocks.postgres import PostgresDatabase
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from runbooks.waiting import poll_until

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
    own_session: bool = Field(
        description="The session that read pg_stat_activity, or another of the runbooks' (the "
        "block's application_name): an earlier step's connection can still be listed, idle, for "
        "a moment after it closed."
    )

    def label(self) -> str:
        return f"{self.datname} pid={self.pid} ({self.usename}/{self.application_name or '-'})"


IDLE_TOO_BRIEFLY = "idle too briefly"
_IDLE_STATES = ("idle", "idle in transaction", "idle in transaction (aborted)")


def skip_reason(backend: Backend, criteria: IdleCriteria) -> str | None:
    """Why a backend must not be terminated, or None if it qualifies as an idle connection.

    Idle time is measured from `state_change`, the moment the session went idle. The seed's
    `query_start` is when the last query *began*: a session that just finished a 10-minute
    report has an old query_start but has been idle for a second, and must survive.
    Keep in step with `_QUALIFIES`, which re-applies these rules (but the idle time) inside
    PostgreSQL; `_TERMINATE` replaces the idle-time rule with "still in the idle spell listed".
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
        return IDLE_TOO_BRIEFLY
    return None


# Mirrors the server's rule for pg_terminate_backend (PostgreSQL 15 signalfuncs.c), so a
# session we may not signal is skipped instead of failing the whole statement.
_SIGNALABLE = sql.SQL(
    "CASE WHEN current_setting('is_superuser') = 'on' THEN true"
    " WHEN r.rolsuper THEN false"
    " ELSE pg_has_role(a.usesysid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE') END"
)

# This session, or another with the same (non-empty) application_name: the runbooks' own
_OWN = sql.SQL(
    "(a.pid = pg_backend_pid() OR (current_setting('application_name') <> ''"
    " AND a.application_name = current_setting('application_name')))"
)

_LIST_BACKENDS = sql.SQL(
    "SELECT a.pid, a.backend_start, a.backend_type, a.datname, a.usename, a.application_name,"
    " host(a.client_addr) AS client_addr, a.state, a.state_change,"
    " extract(epoch FROM now() - a.state_change)::float8 AS idle_s,"
    " coalesce({signalable}, false) AS signalable,"
    " {own} AS own_session"
    " FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid ORDER BY a.pid"
).format(signalable=_SIGNALABLE, own=_OWN)

# skip_reason but the idle time, as SQL over pg_stat_activity a / pg_roles r
_QUALIFIES = sql.SQL(
    "a.backend_type = 'client backend' AND NOT {own}"
    " AND (cardinality(%(databases)s::text[]) = 0 OR a.datname = ANY(%(databases)s::text[]))"
    " AND a.usename <> ALL(%(exclude_roles)s::text[])"
    " AND coalesce(a.application_name, '') <> ALL(%(exclude_applications)s::text[])"
    " AND {signalable}"
    " AND a.state = ANY(%(states)s::text[])"
).format(signalable=_SIGNALABLE, own=_OWN)

# One statement re-checks every candidate and signals only those that still qualify: a
# session that ran a query since it was listed (its state_change moved) survives, even if it
# is idle again, and matching backend_start keeps a recycled pid (a different, newer session)
# out of reach. The same idle spell also means idle at least as long as listed, so this serves
# sessions idle over the threshold and the recently idle ones a human approved alike. CASE
# evaluates in order, so pg_terminate_backend runs only on rows that passed the check.
_TERMINATE = sql.SQL(
    "SELECT t.pid, CASE"
    " WHEN a.pid IS NULL THEN 'gone'"
    " WHEN NOT coalesce({qualifies} AND a.state_change = t.state_change, false) THEN 'spared'"
    " WHEN pg_terminate_backend(a.pid) THEN 'terminated'"
    " ELSE 'gone' END"
    " FROM unnest(%(pids)s::int[], %(starts)s::timestamptz[], %(idle_since)s::timestamptz[])"
    " AS t(pid, backend_start, state_change)"
    " LEFT JOIN pg_stat_activity a ON a.pid = t.pid AND a.backend_start = t.backend_start"
    " LEFT JOIN pg_roles r ON r.oid = a.usesysid"
).format(qualifies=_QUALIFIES)

# The "after" of each termination: the session as pg_stat_activity shows it now, if at all
_STILL_THERE = sql.SQL(
    "SELECT a.pid, a.state FROM pg_stat_activity a"
    " JOIN unnest(%(pids)s::int[], %(starts)s::timestamptz[]) AS t(pid, backend_start)"
    " ON a.pid = t.pid AND a.backend_start = t.backend_start"
)
# A signalled backend exits within milliseconds; this only bounds the wait for that reading.
_EXIT_WAIT_S = 2.0


def _num(s: float) -> str:
    """Seconds as a person reads them: tenths below 10 s."""
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def _holders(backends: list[Backend]) -> dict[str, int]:
    """Sessions per role/application: who holds them."""
    return dict(Counter(f"{b.usename}/{b.application_name or '-'}" for b in backends).most_common())


def _ages(backends: list[Backend]) -> dict[str, float]:
    ages = sorted(b.idle_s or 0.0 for b in backends)
    return {"youngest": ages[0], "median": median(ages), "oldest": ages[-1]}


def describe_idle(backends: list[Backend], idle_for_s: float, idle: str = "idle for") -> str:
    """E.g. '25 idle for 2.1-2.9s (median 2.5s), below the 300s threshold, held by app/api (25)'."""
    ages = _ages(backends)
    low, high, mid = (_num(ages[k]) for k in ("youngest", "oldest", "median"))
    span = f"{low}s" if low == high else f"{low}-{high}s (median {mid}s)"
    side = "over" if ages["youngest"] > idle_for_s else "below"
    holders = ", ".join(f"{k} ({n})" for k, n in _holders(backends).items())
    return f"{len(backends)} {idle} {span}, {side} the {idle_for_s:g}s threshold, held by {holders}"


class SessionSurvey(BaseModel):
    """Client sessions by what terminating idle ones could free; the runbook's own left out."""

    idle_for_s: float = Field(description="The idle threshold the survey applied.")
    candidates: list[Backend] = Field(
        default_factory=list, description="Idle for longer than the threshold, oldest first."
    )
    recently_idle: list[Backend] = Field(
        default_factory=list,
        description="Would qualify but are idle for the threshold or less (a sudden pool leak).",
    )
    left_alone: dict[str, int] = Field(
        default_factory=dict, description="Other idle sessions, per reason they are never touched."
    )
    busy: int = Field(0, description="Sessions running a query, or in a state the role can't see.")

    def describe(self) -> str:
        parts = [
            describe_idle(group, self.idle_for_s)
            for group in (self.candidates, self.recently_idle)
            if group
        ] or ["no idle session the runbook may terminate"]
        if self.left_alone:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.left_alone.items())
            parts.append(f"{sum(self.left_alone.values())} idle left alone ({reasons})")
        parts.append(f"{self.busy} busy")
        return "; ".join(parts)

    def evidence(self) -> dict[str, Any]:
        def group(backends: list[Backend]) -> dict[str, Any]:
            if not backends:
                return {"count": 0}
            return {
                "count": len(backends),
                "idle_s": {k: round(v, 1) for k, v in _ages(backends).items()},
                "by_role_application": _holders(backends),
            }

        return {
            "idle_threshold_s": self.idle_for_s,
            "idle_over_threshold": group(self.candidates),
            "idle_below_threshold": group(self.recently_idle),
            "idle_left_alone": self.left_alone,
            "busy": self.busy,
        }


def classify_sessions(backends: list[Backend], criteria: IdleCriteria) -> SessionSurvey:
    """Sort client sessions into terminable (idle long, idle briefly), left alone, and busy."""
    survey = SessionSurvey(idle_for_s=criteria.idle_for_s)
    left_alone: Counter[str] = Counter()
    for backend in backends:
        if backend.own_session or backend.backend_type != "client backend":
            continue
        reason = skip_reason(backend, criteria)
        if reason is None:
            survey.candidates.append(backend)
        elif reason == IDLE_TOO_BRIEFLY and backend.idle_s is not None:
            survey.recently_idle.append(backend)
        elif backend.state in _IDLE_STATES:
            left_alone[reason] += 1
        else:
            survey.busy += 1
    survey.candidates.sort(key=lambda b: -(b.idle_s or 0))
    survey.recently_idle.sort(key=lambda b: -(b.idle_s or 0))
    survey.left_alone = dict(left_alone.most_common())
    return survey


@task(**pg_retries)
def survey_connections(db: PostgresDatabase, criteria: IdleCriteria) -> SessionSurvey:
    """Client sessions as pg_stat_activity shows them, sorted by what terminating could free.

    Never the runbooks' own sessions (this one, and any with the block's application_name),
    never replication or background processes, never a session the runbook role may not signal.
    """
    with db.connect(autocommit=True) as conn:
        backends = conn.cursor(row_factory=class_row(Backend)).execute(_LIST_BACKENDS).fetchall()
    survey = classify_sessions(backends, criteria)
    get_run_logger().info("%d backends: %s", len(backends), survey.describe())
    return survey


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
    """Terminate the candidates still in the idle spell they were listed in, then re-read them.

    A terminated session's "after" is what pg_stat_activity shows once it exited (or the state
    it lingers in). Idempotent: a candidate already gone is reported as such, not as an error,
    so a retry or re-run never signals a session twice.
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
        "idle_since": [b.state_change for b in candidates],
        "databases": criteria.databases,
        "exclude_roles": criteria.exclude_roles,
        "exclude_applications": criteria.exclude_applications,
        "states": criteria.states,
    }
    with db.connect(autocommit=True) as conn:
        session_pid = conn.info.backend_pid
        outcome = dict(conn.execute(_TERMINATE, params).fetchall())
        signalled = [b for b in candidates if outcome[b.pid] == "terminated"]
        left = poll_until(
            lambda: dict(
                conn.execute(
                    _STILL_THERE,
                    {
                        "pids": [b.pid for b in signalled],
                        "starts": [b.backend_start for b in signalled],
                    },
                ).fetchall()
            ),
            lambda still: not still,
            timeout_s=_EXIT_WAIT_S,
            interval_s=0.05,
        ).last
    result = TerminateResult(dry_run=False, planned=planned, session_pid=session_pid)
    for backend, change in zip(candidates, planned, strict=True):
        verdict = outcome[backend.pid]
        if verdict == "terminated":
            result.terminated.append(backend.pid)
            after = (
                {"present": True, "state": left[backend.pid]}
                if left and backend.pid in left
                else {"present": False}
            )
            result.applied.append(change.model_copy(update={"detail": after}))
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
    recently_idle: bool = Field(
        False,
        description="Also terminate sessions idle for less than the threshold (a human approves).",
    )


def decide_pool_relief(
    usage: ConnectionUsage,
    targets: PoolTargets,
    *,
    idle: int,
    recently_idle: int,
    left_alone: int,
) -> PoolDecision:
    """Act only on an exhausted pool, by terminating idle sessions.

    ``idle``: sessions idle over the threshold (within policy); ``recently_idle``: sessions that
    qualify but for their short idle time, offered (with approval) only when the long-idle ones
    are not enough: a sudden pool leak fills the pool with them; ``left_alone``: idle sessions
    the runbook must not terminate (excluded, out of scope, not its to signal).
    """
    if has_headroom(usage, targets):
        return PoolDecision(
            action=PoolAction.NONE, reason="enough free connections", sufficient=True
        )
    if idle == 0 and recently_idle == 0:
        if left_alone:
            reason = (
                f"no idle connection the runbook may terminate: {left_alone} idle one(s) are "
                "excluded, out of scope or not its to signal, the rest are busy"
            )
        else:
            reason = "no idle connection to terminate: busy connections alone exhaust the pool"
        return PoolDecision(action=PoolAction.ESCALATE, reason=reason, sufficient=False)

    def freed(n: int) -> ConnectionUsage:
        return usage.model_copy(update={"client_backends": usage.client_backends - n})

    short = ", still short of the target"
    if idle and (recently_idle == 0 or has_headroom(freed(idle), targets)):
        enough = has_headroom(freed(idle), targets)
        return PoolDecision(
            action=PoolAction.TERMINATE,
            reason=f"terminating {idle} idle connection(s) should leave "
            f"{freed(idle).headroom} free" + ("" if enough else short),
            sufficient=enough,
        )
    after = freed(idle + recently_idle)
    enough = has_headroom(after, targets)
    if idle:
        why = f"the {idle} idle over the threshold are not enough"
    else:
        why = "none is idle over the threshold"
    return PoolDecision(
        action=PoolAction.TERMINATE,
        reason=f"{why}; terminating also the {recently_idle} idle for less (needs approval) "
        f"should leave {after.headroom} free" + ("" if enough else short),
        sufficient=enough,
        recently_idle=True,
    )


@task(**pg_retries)
def database_sizes(db: PostgresDatabase) -> dict[str, int]:
    """Bytes on disk of every database of the server the block reaches (pg_database_size),
    largest first; templates and databases the role may not connect to are left out."""
    with db.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, pg_database_size(datname) FROM pg_database"
            " WHERE NOT datistemplate AND has_database_privilege(datname, 'CONNECT')"
            " ORDER BY 2 DESC"
        ).fetchall()
    return {name: int(size) for name, size in rows}
