"""Runbook: event store slow (seed 003 issue 3 "database performance degradation", and monthly
"database index optimization"), on a PostgreSQL event store."""

from prefect import flow
from pydantic import BaseModel, Field

from blocks.event_store import EventStore
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.pg_performance import (
    DatabaseFindings,
    IndexBuild,
    IndexBuildGaveUp,
    PlanReading,
    Probe,
    QueryShape,
    StatementsReport,
    build_indexes,
    explain_probes,
    index_validity,
    read_findings,
    read_statements,
)
from tasks.pg_performance_decisions import (
    IndexCandidate,
    choose_candidates,
    connection_usage,
    duplicate_indexes,
    explainable,
    index_name,
    plan_candidates,
    plan_uses_index,
    seq_scan_heavy,
    stats_candidate,
    unused_indexes,
)
from tasks.postgres import get_system_identifier

RUNBOOK = "event-store-slow"

# an index build reads the whole table: a few per day on one table is plenty
BUILD_BUDGET = Budget(max_actions=3, window_s=86_400)


class EventStoreSlowParams(RunbookParams):
    """Run form of the event-store-slow runbook."""

    event_store_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Event Store' block."
    )
    query_shapes: list[QueryShape] = Field(
        default_factory=lambda: list(QueryShape),
        description="The event store's own queries to EXPLAIN (built from the block's table and "
        "columns): pending_oldest, stuck_processing, pending_in_id_order.",
    )
    top_statements: int = Field(
        10, ge=0, le=100, description="Slowest statements (by mean and by total time) to list."
    )
    explain_top: int = Field(
        5,
        ge=0,
        le=50,
        description="Of the slowest statements by mean time, how many that read the events table "
        "are EXPLAINed (generic plan: their parameters are not known) for index candidates.",
    )
    explain_analyze: bool = Field(
        False,
        description="EXPLAIN ANALYZE (runs each query, read-only) instead of EXPLAIN: measured "
        "rows instead of the planner's estimates.",
    )
    min_rows_removed: int = Field(
        10_000,
        ge=1,
        description="A sequential scan proposes an index when its filter throws away at least "
        "this many rows per run.",
    )
    max_selectivity: float = Field(
        0.2,
        gt=0,
        le=1,
        description="... and keeps at most this share of the rows it reads.",
    )
    min_table_rows: int = Field(
        100_000, ge=1, description="Tables smaller than this are not reported for seq scans."
    )
    max_new_indexes: int = Field(1, ge=0, le=5, description="Most indexes built in one run.")
    lock_timeout_ms: int = Field(
        2000,
        ge=100,
        le=60_000,
        description="The build gives up (and drops its leftover) rather than wait longer than "
        "this for a lock.",
    )
    leftover_drop_wait_s: float = Field(
        60,
        gt=0,
        le=3600,
        description="After a failed build, wait up to this long to drop its INVALID leftover "
        "(CONCURRENTLY: writers go on); otherwise the next run drops it.",
    )
    build_timeout_s: float = Field(
        3600, gt=0, le=86_400, description="Statement timeout of the index build's session."
    )
    connections_warn_share: float = Field(
        0.8, gt=0, le=1, description="Connections above this share of max_connections are reported."
    )


class EventStoreSlowSummary(BaseModel):
    outcome: Outcome
    statements: StatementsReport
    findings: DatabaseFindings
    candidates: list[IndexCandidate] = Field(default_factory=list)
    build: IndexBuild | None = None
    before_plans: list[PlanReading] = Field(default_factory=list)
    after_plans: list[PlanReading] = Field(default_factory=list)
    report: str


@flow(
    name=RUNBOOK,
    description="Find slow statements, sequential scans, unused and duplicate indexes; build the "
    "missing index CONCURRENTLY (approved), verify it is valid and used.",
)
@ends_as_reported
def event_store_slow(params: EventStoreSlowParams) -> EventStoreSlowSummary:
    with incident_report(
        runbook=RUNBOOK, title="Event Store Slow Queries", severity="P2", params=params
    ) as report:
        store = EventStore.load(params.event_store_block)
        db = store.database
        table = f"{db.dbname}/{store.schema_name}.{store.table}"
        target = Target(
            "event-store-indexes",
            f"{db.host}:{db.port}/{table}",
            f"{get_system_identifier(db)}/{table}",
        )
        with report.guard(target) as guard:
            statements = read_statements(store, params.top_statements)
            _report_statements(report, statements)
            findings = read_findings(store)
            _report_findings(report, store, findings, params)

            probes = [Probe(label=f"shape {s.value}", shape=s) for s in params.query_shapes]
            probes += _statement_probes(store, statements, params.explain_top)
            before = explain_probes(store, probes, params.explain_analyze)
            failed = [f"{r.probe.label}: {r.error}" for r in before if r.error]
            if failed:
                report.step(f"could not EXPLAIN {len(failed)} statement(s): {'; '.join(failed)}")
            candidates = _candidates(store, findings, before, params)
            for c in candidates:
                report.evidence(f"index candidate {index_name(c.table, c.columns)}", c)
            chosen = choose_candidates(candidates, findings.indexes, params.max_new_indexes)
            leftovers = [
                ix.name for ix in findings.indexes if not ix.valid and ix.table == store.table
            ]
            if leftovers:
                report.step(
                    f"invalid index(es) on {store.table}: {', '.join(leftovers)} (a failed or "
                    "killed CREATE INDEX CONCURRENTLY); the runbook's own are rebuilt"
                )
            report.check(
                "sequential scans an index would avoid",
                not chosen,
                "; ".join(f"{c.source}: {c.reason}" for c in chosen) or "none found",
            )
            if not chosen:
                report.finish(
                    Outcome.NO_ACTION_NEEDED,
                    "No missing index found for the event store's queries"
                    + (
                        f"; {len(report.follow_ups)} finding(s) for a human"
                        if report.follow_ups
                        else ""
                    )
                    + ".",
                )
                return _summary(report, statements, findings, candidates, before=before)

            try:
                build = guard.act(
                    "create index concurrently",
                    lambda dry_run: build_indexes(
                        store,
                        chosen,
                        dry_run,
                        params.lock_timeout_ms,
                        params.build_timeout_s,
                        params.leftover_drop_wait_s,
                    ),
                    budget=BUILD_BUDGET,
                    approval=_approval,
                )
            except IndexBuildGaveUp as exc:
                raise Escalation(
                    f"{exc}. CONCURRENTLY waits for every transaction older than its snapshot: a "
                    "long one is open (see pg_stat_activity). Re-run once it ends, or raise "
                    "lock_timeout_ms"
                ) from None
            slow = _probes_for(chosen, candidates, before)
            if params.dry_run or not build.planned:
                report.finish(
                    Outcome.PLANNED if params.dry_run else Outcome.NO_ACTION_NEEDED,
                    ("Would build " if params.dry_run else "Nothing to build: ")
                    + "; ".join(c.describe() for c in build.planned or [])
                    + ("".join(f" ({n})" for n in build.notes)),
                )
                return _summary(report, statements, findings, candidates, build, before)

            names = [c.detail["index"] for c in build.planned]
            valid = guard.verify(
                "new index valid (pg_index.indisvalid)",
                lambda: index_validity(store, names),
                lambda v: all(v.get(n) for n in names),
                timeout_s=10,
                describe=lambda v: ", ".join(
                    f"{n}: {'valid' if ok else ok}" for n, ok in v.items()
                ),
            )
            if not valid.ok:
                raise VerificationFailed(f"index(es) {', '.join(names)} not valid after the build")
            after = explain_probes(store, [r.probe for r in slow], params.explain_analyze)
            unused = []
            for b, a in zip(slow, after, strict=True):
                uses = [n for n in names if a.plan is not None and plan_uses_index(a.plan, n)]
                report.evidence(
                    f"plan of {a.probe.label} before and after",
                    {"before": b.text.splitlines(), "after": a.text.splitlines()},
                )
                report.check(
                    f"{a.probe.label} uses the new index",
                    bool(uses),
                    f"uses {', '.join(uses)}" if uses else "still does not use it",
                )
                if not uses:
                    unused.append(a.probe.label)
            if unused:
                raise VerificationFailed(
                    f"the index was built and is valid, but {', '.join(unused)} still does not use "
                    "it: check the plan in the report (statistics may be stale: ANALYZE the table)"
                )
            report.finish(
                Outcome.RESOLVED,
                f"Built {', '.join(names)} concurrently "
                f"({', '.join(f'{s:.1f}s' for s in build.build_s.values())}; CONCURRENTLY: "
                "inserts and updates went on during the build); the slow queries' plans now use "
                "it instead of a sequential scan.",
            )
            return _summary(report, statements, findings, candidates, build, before, after)


def _approval(plan: IndexBuild) -> str:
    """Always asked: a build reads the whole table and adds work to every write after it."""
    return (
        f"{len(plan.planned)} index build(s) with CREATE INDEX CONCURRENTLY: reads the whole "
        "table (I/O for minutes on a large one) and every later insert and update maintains the "
        "index; writers are not blocked"
    )


def _report_statements(report: IncidentReport, statements: StatementsReport) -> None:
    if not statements.available:
        report.check("pg_stat_statements available", False, statements.problem or "")
        report.follow_ups.append(statements.problem or "install pg_stat_statements")
        return
    report.check("pg_stat_statements available", True, "installed and loaded")
    report.evidence("slowest statements by mean time", [s.describe() for s in statements.by_mean])
    report.evidence("statements by total time", [s.describe() for s in statements.by_total])


def _report_findings(
    report: IncidentReport, store: EventStore, f: DatabaseFindings, params: EventStoreSlowParams
) -> None:
    heavy = seq_scan_heavy(f.tables, params.min_table_rows)
    report.check(
        "large tables read by sequential scans",
        not heavy,
        "; ".join(
            f"{t.table}: {t.seq_scan:,} seq scans read {t.seq_tup_read:,} rows, "
            f"{t.idx_scan or 0:,} index scans, {t.n_live_tup:,} live rows"
            for t in heavy
        )
        or "none",
    )
    unused = unused_indexes(f.indexes)
    dups = duplicate_indexes(f.indexes)
    report.evidence("indexes", [ix.definition + f" (scans {ix.scans:,})" for ix in f.indexes])
    for ix in unused:
        report.follow_ups.append(
            f"Index {ix.name} on {ix.table} ({ix.size_bytes / 1e6:,.1f} MB) was never scanned since "
            "the statistics were reset: check replicas' use, then consider DROP INDEX CONCURRENTLY."
        )
    for d in dups:
        report.follow_ups.append(
            f"Index {d.index} on {d.table} duplicates {d.of} ({d.kind}): every write maintains "
            "both; consider DROP INDEX CONCURRENTLY after checking nothing names it."
        )
    _, share, text = connection_usage(f.connections_by_state, f.max_connections)
    report.check("connections below the warning share", share < params.connections_warn_share, text)
    if share >= params.connections_warn_share:
        report.follow_ups.append(
            f"Connections at {share:.0%} of max_connections: see db-connection-pool-exhausted; "
            "slow queries hold connections longer, so the pool fills."
        )


def _statement_probes(store: EventStore, statements: StatementsReport, limit: int) -> list[Probe]:
    probes = []
    for s in statements.by_mean:
        if len(probes) >= limit:
            break
        n = explainable(s.query, store.table)
        if n is not None:
            probes.append(Probe(label=f"statement {s.queryid}", query=s.query, params=n))
    return probes


def _candidates(
    store: EventStore,
    findings: DatabaseFindings,
    plans: list[PlanReading],
    params: EventStoreSlowParams,
) -> list[IndexCandidate]:
    found = []
    columns = set(findings.table_columns)
    for reading in plans:
        if reading.plan is None:
            continue
        found += plan_candidates(
            reading.plan,
            store.schema_name,
            store.table,
            columns,
            findings.table_rows,
            min_rows_removed=params.min_rows_removed,
            max_selectivity=params.max_selectivity,
            source=reading.probe.label,
        )
    if not found:
        stats = next((t for t in findings.tables if t.table == store.table), None)
        fallback = stats_candidate(
            store.table,
            store.status_column,
            store.updated_at_column,
            stats,
            findings.indexes,
            params.min_table_rows,
        )
        found += [fallback] if fallback else []
    return found


def _probes_for(
    chosen: list[IndexCandidate], candidates: list[IndexCandidate], plans: list[PlanReading]
) -> list[PlanReading]:
    """The plans that proposed the chosen indexes (their after-plans verify the build)."""
    keys = {(c.table, c.columns) for c in chosen}
    sources = {c.source for c in candidates if (c.table, c.columns) in keys}
    picked = [r for r in plans if r.probe.label in sources and r.plan is not None]
    return picked or [r for r in plans if r.plan is not None][:1]


def _summary(
    report: IncidentReport,
    statements: StatementsReport,
    findings: DatabaseFindings,
    candidates: list[IndexCandidate],
    build: IndexBuild | None = None,
    before: list[PlanReading] | None = None,
    after: list[PlanReading] | None = None,
) -> EventStoreSlowSummary:
    return EventStoreSlowSummary(
        outcome=report.outcome,
        statements=statements,
        findings=findings,
        candidates=candidates,
        build=build,
        before_plans=before or [],
        after_plans=after or [],
        report=report.to_markdown(),
    )
