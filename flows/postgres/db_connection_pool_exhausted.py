"""Runbook: database connection pool exhausted (seed 001; seed 002 scenario 2)."""

from collections import Counter

from prefect import flow
from pydantic import BaseModel, Field

from blocks.postgres import PostgresDatabase
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.postgres import (
    Backend,
    ConnectionUsage,
    IdleCriteria,
    PoolAction,
    PoolTargets,
    TerminateResult,
    decide_pool_relief,
    find_idle_connections,
    get_connection_usage,
    has_headroom,
    terminate_idle_connections,
)

RUNBOOK = "db-connection-pool-exhausted"

# Terminating idle sessions again and again means a pool leaks; after this many, a human looks.
TERMINATE_BUDGET = Budget(max_actions=3, window_s=3600)

# Seed 001: "Scale up database if needed; Increase connection pool size in services".
_SCALE_ADVICE = "scale up the database or resize the services' connection pools"
_SCALE_FOLLOW_UP = (
    "Scale up the database (raise max_connections) or size the services' connection pools "
    "to fit it."
)


class ConnectionPoolParams(RunbookParams):
    """Run form of the db-connection-pool-exhausted runbook."""

    db_block: str = Field(
        "default", description="Name of the saved 'Runbooks PostgreSQL Database' block."
    )
    idle_threshold_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Terminate sessions idle for longer than this many seconds (seed: 5 minutes).",
    )
    include_idle_in_transaction: bool = Field(
        False,
        description="Also terminate 'idle in transaction' sessions; their uncommitted work is lost.",
    )
    exclude_roles: list[str] = Field(
        default_factory=list, description="Roles whose sessions are never terminated."
    )
    exclude_applications: list[str] = Field(
        default_factory=list, description="application_name values never terminated."
    )
    databases: list[str] = Field(
        default_factory=list, description="Only terminate sessions of these databases; empty: all."
    )
    target_headroom_percent: float = Field(
        20.0, ge=0, le=100, description="Share of usable connections that must be free."
    )
    min_free_connections: int = Field(
        5, ge=0, le=10_000, description="Number of usable connections that must be free."
    )
    verify_timeout_s: float = Field(
        30.0, gt=0, le=600, description="How long to wait for the freed slots to show up."
    )


class ConnectionPoolSummary(BaseModel):
    """What a db-connection-pool-exhausted run saw and did."""

    outcome: Outcome
    before: ConnectionUsage
    candidates: list[Backend]
    terminate: TerminateResult | None = None
    after: ConnectionUsage | None = None
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name=RUNBOOK,
    description="Measure connections against max_connections; terminate long-idle sessions; "
    "verify free connections are back.",
)
@ends_as_reported
def db_connection_pool_exhausted(params: ConnectionPoolParams) -> ConnectionPoolSummary:
    with incident_report(
        runbook=RUNBOOK,
        title="Database Connection Pool Exhausted",
        severity="P1",
        params=params,
    ) as report:
        db = PostgresDatabase.load(params.db_block)
        targets = PoolTargets(
            target_headroom_percent=params.target_headroom_percent,
            min_free_connections=params.min_free_connections,
        )
        criteria = IdleCriteria(
            idle_for_s=params.idle_threshold_s,
            include_idle_in_transaction=params.include_idle_in_transaction,
            exclude_roles=params.exclude_roles,
            exclude_applications=params.exclude_applications,
            databases=params.databases,
        )
        # max_connections is per server: every block pointing at it shares one lock and budget
        with report.guard(Target("postgres", f"{db.host}:{db.port}")) as guard:
            before = get_connection_usage(db)
            report.evidence("connections before", before)
            report.check("free connections", has_headroom(before, targets), before.describe())
            candidates = find_idle_connections(db, criteria)
            report.evidence("idle connections by role/application", _by_client(candidates))
            report.check(
                "idle connections",
                not candidates,
                f"{len(candidates)} idle for over {params.idle_threshold_s:g}s",
            )

            decision = decide_pool_relief(before, len(candidates), targets)
            report.step(f"decision: {decision.action.value} ({decision.reason})")
            if decision.action is PoolAction.NONE:
                report.finish(Outcome.NO_ACTION_NEEDED, f"Pool not exhausted: {before.describe()}.")
                return _summary(report, before, candidates)
            if decision.action is PoolAction.ESCALATE:
                report.follow_ups.append(_SCALE_FOLLOW_UP)
                raise Escalation(f"{decision.reason} ({before.describe()}): {_SCALE_ADVICE}")

            terminated = guard.act(
                "terminate idle connections",
                lambda dry_run: terminate_idle_connections(db, candidates, criteria, dry_run),
                budget=TERMINATE_BUDGET,
                approval=_needs_approval,
            )
            if params.dry_run:
                report.finish(
                    Outcome.PLANNED,
                    f"Would terminate {len(candidates)} idle connection(s); {decision.reason}.",
                )
                return _summary(report, before, candidates, terminate=terminated)

            verified = guard.verify(
                "free connections restored",
                lambda: get_connection_usage(db),
                lambda usage: has_headroom(usage, targets),
                timeout_s=params.verify_timeout_s,
                describe=lambda usage: usage.describe(),
            )
            after = verified.last
            report.evidence("connections after", after)
            _add_follow_ups(report, candidates)
            if not verified.ok:
                report.follow_ups.append(_SCALE_FOLLOW_UP)
                raise VerificationFailed(
                    f"after terminating {len(terminated.terminated)} idle connection(s), "
                    f"{after.describe()} within {params.verify_timeout_s:g}s: busy connections "
                    f"exhaust the pool; {_SCALE_ADVICE}"
                )
            report.finish(
                Outcome.RESOLVED,
                f"Terminated {len(terminated.terminated)} idle connection(s); "
                f"{after.describe()}"
                + (" (alert resolved)." if verified.by == "alert.resolved" else "."),
            )
            return _summary(report, before, candidates, terminate=terminated, after=after)


def _needs_approval(plan: TerminateResult) -> str | None:
    """Terminating a session inside a transaction throws its uncommitted work away."""
    in_tx = [c.target for c in plan.planned if c.detail.get("state") != "idle"]
    if in_tx:
        return (
            f"{len(in_tx)} session(s) are inside a transaction; terminating them rolls back "
            "their uncommitted work"
        )
    return None


def _summary(
    report: IncidentReport,
    before: ConnectionUsage,
    candidates: list[Backend],
    terminate: TerminateResult | None = None,
    after: ConnectionUsage | None = None,
) -> ConnectionPoolSummary:
    return ConnectionPoolSummary(
        outcome=report.outcome,
        before=before,
        candidates=candidates,
        terminate=terminate,
        after=after,
        report=report.to_markdown(),
    )


def _by_client(candidates: list[Backend]) -> dict[str, int]:
    """Idle connections per role/application: who hoards them (each one is in the actions table)."""
    return dict(
        Counter(f"{b.usename}/{b.application_name or '-'}" for b in candidates).most_common()
    )


def _add_follow_ups(report: IncidentReport, candidates: list[Backend]) -> None:
    """Point at the applications that hoarded idle connections, so the cause gets fixed."""
    report.follow_ups.append(
        f"Cap idle connections in the pools of {', '.join(_by_client(candidates))} "
        "(idle timeout / max idle), or set idle_session_timeout for their roles."
    )
