"""Runbook: event processing stuck (seed 003, issue 5), on a PostgreSQL event store."""

from prefect import flow
from pydantic import BaseModel, Field

from blocks.event_store import EventStore
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.event_store import (
    ResetResult,
    ResetVerdict,
    StuckSummary,
    count_stuck_events,
    describe_progress,
    judge_reset,
    reset_stuck_events,
)
from tasks.postgres import get_system_identifier

RUNBOOK = "event-processing-stuck"

# Events that keep getting stuck after a reset mean the consumer is broken: after this many
# resets of one table in an hour, a human looks at the consumer instead.
RESET_BUDGET = Budget(max_actions=3, window_s=3600)


class StuckEventsParams(RunbookParams):
    """Run form of the event-processing-stuck runbook; empty overrides use the block's values."""

    event_store_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Event Store' block."
    )
    stuck_after_s: float | None = Field(
        None, gt=0, le=30 * 86400, description="Override: PROCESSING longer than this is stuck."
    )
    batch_size: int | None = Field(
        None, ge=1, le=100_000, description="Override: rows in the first transaction."
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=100_000, description="Override: most rows reset in one transaction."
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="Override: start no new batch after this many seconds; what is left is "
        "reported and escalated.",
    )
    approve_over: int = Field(
        1000,
        ge=0,
        le=100_000_000,
        description="Resetting more than this many events in one run needs a human's approval "
        "(consumers reprocess every one of them).",
    )


class StuckEventsSummary(BaseModel):
    """What an event-processing-stuck run saw and did."""

    outcome: Outcome
    before: StuckSummary
    reset: ResetResult | None = None
    after: StuckSummary | None = None
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name=RUNBOOK,
    description="Find events stuck in PROCESSING, reset them to PENDING in short batches, "
    "verify none is left.",
)
@ends_as_reported
def event_processing_stuck(params: StuckEventsParams) -> StuckEventsSummary:
    with incident_report(
        runbook=RUNBOOK, title="Event Processing Stuck", severity="P2", params=params
    ) as report:
        store = _with_overrides(EventStore.load(params.event_store_block), params)
        db = store.database
        table = f"{db.dbname}/{store.schema_name}.{store.table}"
        target = Target(
            "event-store",
            f"{db.host}:{db.port}/{table}",
            f"{get_system_identifier(db)}/{table}",
        )
        with report.guard(target) as guard:
            before = count_stuck_events(store)
            report.evidence("stuck events before", before)
            if report.check("events stuck in PROCESSING", before.count == 0, before.describe()):
                report.finish(Outcome.NO_ACTION_NEEDED, f"No stuck events: {before.describe()}.")
                return _summary(report, before)
            _add_follow_ups(report, before)

            reset = guard.act(
                "reset stuck events to PENDING",
                lambda dry_run: reset_stuck_events(store, dry_run),
                budget=RESET_BUDGET,
                approval=lambda plan: _needs_approval(plan, params.approve_over),
            )
            if params.dry_run:
                report.finish(
                    Outcome.PLANNED,
                    f"Would reset up to {sum(reset.batch_sizes):,} event(s) in batches starting "
                    f"at {store.batch_size} rows, sized to take about {store.batch_target_ms:g} ms "
                    f"each, for at most {store.time_budget_s:g}s; rows a consumer holds locked "
                    "would be skipped.",
                )
                return _summary(report, before, reset)

            # after a budget ran out, probing every row left for locks would lock them all in
            # one long transaction: count them instead
            after = count_stuck_events(store, check_locks=not reset.out_of_time)
            report.evidence("stuck events after", after)
            verdict = judge_reset(reset.reset_count, after)
            report.check(
                "no resettable stuck events left",
                verdict is not ResetVerdict.INCOMPLETE,
                after.describe(),
            )
            if after.locked:
                report.follow_ups.append(
                    f"{after.locked} stuck event(s) are locked by open transactions (skipped): "
                    "find the consumer session in pg_stat_activity ('idle in transaction') and "
                    "check it for deadlocks; restart it if it hangs."
                )
            if verdict is ResetVerdict.INCOMPLETE and reset.out_of_time:
                # progress, not a failure of the reset: but the symptom is still there, and
                # whether to re-run now, raise the budget or first fix the consumer is a
                # human's call
                raise Escalation(
                    f"time budget of {store.time_budget_s:g}s ended: "
                    f"{describe_progress(reset.reset_count, reset.elapsed_s, after.count)}. "
                    "The next run continues where this one stopped (or raise time_budget_s)"
                )
            if verdict is ResetVerdict.INCOMPLETE:
                raise VerificationFailed(
                    f"{after.resettable} stuck event(s) remain after the reset: more events got "
                    "stuck meanwhile: the consumer is still failing"
                )
            if verdict is ResetVerdict.NOTHING_RESET:
                report.finish(
                    Outcome.NO_ACTION_NEEDED,
                    "Nothing reset: the stuck events are held by live transactions or were "
                    f"finished meanwhile ({after.describe()}).",
                )
            else:
                report.finish(
                    Outcome.RESOLVED,
                    f"{describe_progress(reset.reset_count, reset.elapsed_s)}, in "
                    f"{len(reset.batch_sizes)} batch(es); {after.describe()}.",
                )
            return _summary(report, before, reset, after)


def _needs_approval(plan: ResetResult, approve_over: int) -> str | None:
    """Many events back to PENDING at once: every consumer reprocesses them, maybe twice."""
    planned = sum(plan.batch_sizes)
    if planned > approve_over:
        return (
            f"{planned} events would go back to PENDING at once (more than approve_over="
            f"{approve_over}): consumers reprocess all of them, and any a consumer actually "
            "finished without updating its status would be processed twice"
        )
    return None


def _with_overrides(store: EventStore, params: StuckEventsParams) -> EventStore:
    """The block's settings with this run's overrides (validated by the params' bounds)."""
    overrides = {
        "stuck_after_s": params.stuck_after_s,
        "batch_size": params.batch_size,
        "max_batch_size": params.max_batch_size,
        "time_budget_s": params.time_budget_s,
    }
    return store.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _add_follow_ups(report: IncidentReport, before: StuckSummary) -> None:
    """Seed 003: resetting clears the symptom; the consumer that left the events is the cause."""
    report.follow_ups += [
        f"Check the event consumer for deadlocks or infinite loops: {before.count} event(s) "
        f"stayed PROCESSING (e.g. ids {', '.join(before.sample_ids[:5])}).",
        "Restart the consumer service if it keeps leaving events in PROCESSING.",
    ]


def _summary(
    report: IncidentReport,
    before: StuckSummary,
    reset: ResetResult | None = None,
    after: StuckSummary | None = None,
) -> StuckEventsSummary:
    return StuckEventsSummary(
        outcome=report.outcome, before=before, reset=reset, after=after, report=report.to_markdown()
    )
