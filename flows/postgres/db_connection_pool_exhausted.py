"""Runbook: database connection pool exhausted (seed 001; seed 002 scenario 2)."""

from datetime import UTC, datetime
from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from blocks.postgres import PostgresDatabase
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import (
    BlockName,
    OptionalNamespace,
    OptionalPlatformRef,
    OptionalServiceName,
    RunbookParams,
)
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard, Target
from tasks.postgres import (
    Backend,
    ConnectionUsage,
    IdleCriteria,
    PoolAction,
    PoolTargets,
    SessionSurvey,
    TerminateResult,
    decide_pool_relief,
    describe_idle,
    get_connection_usage,
    get_system_identifier,
    has_headroom,
    survey_connections,
    terminate_idle_connections,
)
from tasks.workloads import WorkloadRef, load_backend, restart_workload

RUNBOOK = "db-connection-pool-exhausted"

# Terminating idle sessions again and again means a pool leaks; after this many, a human looks.
TERMINATE_BUDGET = Budget(max_actions=3, window_s=3600)
# The last resort: a second restart of the database in a day is not a fix, it is an outage.
RESTART_BUDGET = Budget(max_actions=1, window_s=86400)

# Seed 001: "Scale up database if needed; Increase connection pool size in services".
_SCALE_ADVICE = "scale up the database or resize the services' connection pools"
_SCALE_FOLLOW_UP = (
    "Scale up the database (raise max_connections) or size the services' connection pools "
    "to fit it."
)


class ConnectionPoolParams(RunbookParams):
    """Run form of the db-connection-pool-exhausted runbook."""

    db_block: BlockName = Field(
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
    last_resort_platform: OptionalPlatformRef = Field(
        None,
        description="Where the PostgreSQL server runs (kubernetes/<block>, docker/<block> or "
        "supervisord/<block>), to offer a restart as the last resort when terminating idle "
        "sessions cannot free the pool: only with approval, never automatically. Empty: escalate.",
    )
    last_resort_service: OptionalServiceName = Field(
        None, description="The server's service there (StatefulSet, Compose service, program)."
    )
    last_resort_namespace: OptionalNamespace = Field(
        None, description="Kubernetes namespace of that service; empty: the block's."
    )
    last_resort_kind: Literal["Deployment", "StatefulSet"] = Field(
        "StatefulSet", description="Kubernetes workload kind of that service."
    )
    restart_timeout_s: float = Field(
        120.0, gt=0, le=1800, description="How long the restarted server may take to accept connections."
    )


class ConnectionPoolSummary(BaseModel):
    """What a db-connection-pool-exhausted run saw and did."""

    outcome: Outcome
    before: ConnectionUsage
    survey: SessionSurvey
    candidates: list[Backend] = Field(
        default_factory=list, description="The sessions chosen for termination."
    )
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
        # max_connections is per server: every block pointing at it, by whatever host name,
        # shares one lock and budget
        server = Target("postgres", f"{db.host}:{db.port}", get_system_identifier(db))
        with report.guard(server) as guard:
            before = get_connection_usage(db)
            report.evidence("connections before", before)
            report.check("free connections", has_headroom(before, targets), before.describe())
            survey = survey_connections(db, criteria)
            report.evidence("client sessions", survey.evidence())
            report.check(
                "idle connections",
                not (survey.candidates or survey.recently_idle),
                survey.describe(),
            )

            decision = decide_pool_relief(
                before,
                targets,
                idle=len(survey.candidates),
                recently_idle=len(survey.recently_idle),
                left_alone=sum(survey.left_alone.values()),
            )
            report.step(f"decision: {decision.action.value} ({decision.reason})")
            if decision.action is PoolAction.NONE:
                report.finish(Outcome.NO_ACTION_NEEDED, f"Pool not exhausted: {before.describe()}.")
                return _summary(report, before, survey)
            if decision.action is PoolAction.ESCALATE:
                report.follow_ups.append(_SCALE_FOLLOW_UP)
                reason = f"{decision.reason} ({before.describe()})"
                if _restart_configured(params):
                    after = _last_resort(report, guard, params, db, targets, reason)
                    return _summary(report, before, survey, after=after)
                raise Escalation(f"{reason}: {_SCALE_ADVICE}")

            recent = survey.recently_idle if decision.recently_idle else []
            candidates = survey.candidates + recent
            terminated = guard.act(
                "terminate idle connections",
                lambda dry_run: terminate_idle_connections(db, candidates, criteria, dry_run),
                budget=TERMINATE_BUDGET,
                approval=lambda plan: _needs_approval(plan, recent, params.idle_threshold_s),
            )
            if params.dry_run:
                report.finish(
                    Outcome.PLANNED,
                    f"Would terminate {len(candidates)} idle connection(s); {decision.reason}.",
                )
                return _summary(report, before, survey, candidates, terminate=terminated)

            verified = guard.verify(
                "free connections restored",
                lambda: get_connection_usage(db),
                lambda usage: has_headroom(usage, targets),
                timeout_s=params.verify_timeout_s,
                describe=lambda usage: usage.describe(),
            )
            after = verified.last
            report.evidence("connections after", after)
            _add_follow_ups(report, survey.candidates, recent)
            if not verified.ok and _restart_configured(params):
                report.follow_ups.append(_SCALE_FOLLOW_UP)
                after = _last_resort(
                    report, guard, params, db, targets,
                    f"after terminating {len(terminated.terminated)} idle connection(s), "
                    f"{after.describe()}",
                )
                return _summary(report, before, survey, candidates, terminate=terminated, after=after)
            if not verified.ok:
                report.follow_ups.append(_SCALE_FOLLOW_UP)
                raise VerificationFailed(
                    f"after terminating {len(terminated.terminated)} idle connection(s), "
                    f"{after.describe()} within {params.verify_timeout_s:g}s: the sessions left "
                    f"({_states(after)}) still exhaust the pool; {_SCALE_ADVICE}"
                )
            report.finish(
                Outcome.RESOLVED,
                f"Terminated {len(terminated.terminated)} idle connection(s); "
                f"{after.describe()}"
                + (" (alert resolved)." if verified.by == "alert.resolved" else "."),
            )
            return _summary(report, before, survey, candidates, terminate=terminated, after=after)


def _needs_approval(
    plan: TerminateResult, recently_idle: list[Backend], idle_threshold_s: float
) -> str | None:
    """A session inside a transaction loses its work; a recently idle one may be about to be used."""
    dangers = []
    in_tx = [c.target for c in plan.planned if c.detail.get("state") != "idle"]
    if in_tx:
        dangers.append(
            f"{len(in_tx)} session(s) are inside a transaction; terminating them rolls back "
            "their uncommitted work"
        )
    if recently_idle:
        dangers.append(
            f"{describe_idle(recently_idle, idle_threshold_s, 'are idle only')}: "
            "their application may be using them (a pool hands idle connections out again at "
            "any moment), and a terminated one fails its next query and must reconnect"
        )
    return "; ".join(dangers) or None


def _summary(
    report: IncidentReport,
    before: ConnectionUsage,
    survey: SessionSurvey,
    candidates: list[Backend] | None = None,
    terminate: TerminateResult | None = None,
    after: ConnectionUsage | None = None,
) -> ConnectionPoolSummary:
    return ConnectionPoolSummary(
        outcome=report.outcome,
        before=before,
        survey=survey,
        candidates=candidates or [],
        terminate=terminate,
        after=after,
        report=report.to_markdown(),
    )


def _states(usage: ConnectionUsage) -> str:
    return ", ".join(f"{state}: {n}" for state, n in usage.by_state.items()) or "none"


def _clients(backends: list[Backend]) -> str:
    return ", ".join(sorted({f"{b.usename}/{b.application_name or '-'}" for b in backends}))


def _add_follow_ups(
    report: IncidentReport, idle: list[Backend], recently_idle: list[Backend]
) -> None:
    """Point at the applications that hoarded or leaked connections, so the cause gets fixed."""
    if idle:
        report.follow_ups.append(
            f"Cap idle connections in the pools of {_clients(idle)} "
            "(idle timeout / max idle), or set idle_session_timeout for their roles."
        )
    if recently_idle:
        report.follow_ups.append(
            f"Find why {_clients(recently_idle)} opened {len(recently_idle)} connection(s) it "
            "left idle: a connection leak (connections not returned to the pool) or a pool "
            "larger than the database's max_connections allows."
        )


def _restart_configured(params: ConnectionPoolParams) -> bool:
    return bool(params.last_resort_platform and params.last_resort_service)


def _last_resort(
    report: IncidentReport,
    guard: Guard,
    params: ConnectionPoolParams,
    db: PostgresDatabase,
    targets: PoolTargets,
    reason: str,
) -> ConnectionUsage | None:
    """Seed 002 scenario 2: "restart database (last resort)". Always asks a person first: every
    session is cut and every open transaction rolled back; then waits for the server to accept
    connections with its headroom back."""
    assert params.last_resort_platform and params.last_resort_service
    backend = load_backend(params.last_resort_platform)
    ref = WorkloadRef(
        name=params.last_resort_service,
        namespace=params.last_resort_namespace,
        kind=params.last_resort_kind,
    )
    report.step(f"terminating idle sessions cannot free the pool ({reason}): offering a restart")
    observed_at = datetime.now(UTC)
    guard.act(
        f"restart the database server {ref.describe()} (last resort)",
        # only instances not started since the run looked: a retry never restarts twice
        lambda dry_run: restart_workload(backend, ref, since=observed_at, dry_run=dry_run),
        budget=RESTART_BUDGET,
        approval=lambda plan: (
            f"{reason}. Restarting PostgreSQL cuts every session and rolls back every open "
            "transaction; clients reconnect. This is the seed's last resort: only a person decides"
        ),
    )
    if params.dry_run:
        report.finish(
            Outcome.PLANNED,
            f"Would ask to restart {ref.describe()} on {params.last_resort_platform} "
            f"(last resort): {reason}. Nothing was changed.",
        )
        return None
    verified = guard.verify(
        "the restarted server accepts connections with headroom",
        lambda: _usage_or_none(db),
        lambda usage: usage is not None and has_headroom(usage, targets),
        timeout_s=params.restart_timeout_s,
        describe=lambda usage: usage.describe() if usage else "not accepting connections yet",
    )
    after = verified.last
    if not verified.ok:
        raise VerificationFailed(
            f"{ref.describe()} was restarted (last resort) but "
            + (after.describe() if after else "does not accept connections")
            + f" within {params.restart_timeout_s:g}s"
        )
    assert after is not None
    report.evidence("connections after the restart", after)
    report.follow_ups.append(
        "Find what filled the pool with busy sessions before the restart (the evidence above "
        "lists them by application): a restart only buys time."
    )
    report.finish(
        Outcome.RESOLVED,
        f"Restarted {ref.describe()} (last resort, approved): {reason}; now {after.describe()}.",
    )
    return after


def _usage_or_none(db: PostgresDatabase) -> ConnectionUsage | None:
    try:
        return get_connection_usage.fn(db)
    except Exception:  # noqa: BLE001 - the server is still starting: not an answer yet
        return None
