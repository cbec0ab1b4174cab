"""Runbook: archive old events (seed 003 monthly "review and archive old events"), on a
PostgreSQL event store: into an archive table (tasks.event_archive) or, with ``destination: s3``,
into gzip'd JSON-lines objects in S3, one per batch (tasks.event_archive_s3)."""

from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field, field_validator

from blocks.backup_store import BackupStore, bucket_name_problem
from blocks.event_store import EventStore
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard, Target
from tasks.event_archive import (
    ArchiveResult,
    ArchiveSpec,
    ArchiveSurvey,
    ArchiveUnsuitable,
    archive_table_name,
    forbidden_statuses,
    name_problem,
    needs_approval,
    server_cutoff,
    survey_archivable,
)
from tasks.event_archive import (
    archive_old_events as archive_task,
)
from tasks.event_archive_s3 import (
    S3ArchiveResult,
    archive_old_events_to_s3,
    archive_prefix_problem,
    count_archived_rows,
)
from tasks.postgres import get_system_identifier

RUNBOOK = "archive-old-events"

# monthly maintenance; a few runs a day cover a budget that ran out and a re-run after approval
ARCHIVE_BUDGET = Budget(max_actions=6, window_s=86_400)


class ArchiveParams(RunbookParams):
    """Run form of the archive-old-events runbook."""

    event_store_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Event Store' block."
    )
    older_than_days: float = Field(
        90, gt=0, le=36_500, description="Archive events whose time column is older than this."
    )
    time_column: str | None = Field(
        None,
        description="timestamptz column that dates an event (e.g. created_at); empty: the "
        "block's updated_at column.",
    )
    statuses: list[str] = Field(
        default_factory=lambda: ["COMPLETED", "FAILED"],
        min_length=1,
        description="Terminal statuses to archive; the block's PENDING and PROCESSING statuses "
        "are refused.",
    )
    archive_table: str | None = Field(
        None,
        description="Archive table in the events table's schema (created LIKE it when missing); "
        "empty: <table>_archive.",
    )
    approve_over: int = Field(
        100_000,
        ge=0,
        description="Moving more than this many events in one run needs a human's approval.",
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="Start no new batch after this many seconds (empty: the block's); the next "
        "run continues.",
    )
    destination: Literal["table", "s3"] = Field(
        "table",
        description="table: into the archive table; s3: gzip'd JSON-lines objects in S3, one per "
        "batch (<prefix>/<database>/<schema>.<table>/<first id>-<last id>.jsonl.gz), rows deleted only once "
        "S3 verifiably holds them.",
    )
    backup_store_block: BlockName = Field(
        "default",
        description="destination s3: name of the saved 'Runbooks Backup Store' block (S3 "
        "credentials, endpoint, bucket).",
    )
    s3_bucket: str | None = Field(
        None, description="destination s3: bucket; empty: the Backup Store block's bucket."
    )
    s3_prefix: str | None = Field(
        None,
        description="destination s3: key prefix (no leading '/', no '..'); empty: the block's "
        "prefix + '/event-archive'.",
    )

    @field_validator("time_column", "archive_table")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        problem = name_problem(value, "name")
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("s3_bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        problem = bucket_name_problem(value)
        if problem:
            raise ValueError(f"s3_bucket {value!r}: {problem}")
        return value

    @field_validator("s3_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = archive_prefix_problem(value)
        if problem:
            raise ValueError(problem)
        return value.rstrip("/")

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, value: list[str]) -> list[str]:
        for status in value:
            if not status or len(status) > 100:
                raise ValueError(f"status {status!r} must be 1-100 characters")
        return value


class ArchiveSummary(BaseModel):
    outcome: Outcome
    before: ArchiveSurvey
    archive: S3ArchiveResult | ArchiveResult | None = None
    after: ArchiveSurvey | None = None
    report: str


@flow(
    name=RUNBOOK,
    description="Move events in terminal states older than N days into an archive table or S3 "
    "objects in short batches; verify the counts.",
)
@ends_as_reported
def archive_old_events(params: ArchiveParams) -> ArchiveSummary:
    with incident_report(
        runbook=RUNBOOK, title="Archive Old Events", severity="P4", params=params
    ) as report:
        store = EventStore.load(params.event_store_block)
        live = forbidden_statuses(params.statuses, [store.pending_status, store.processing_status])
        if live:
            raise Escalation(
                f"refusing to archive events in {', '.join(live)}: they are still being worked "
                "on (only terminal statuses may be archived)"
            )
        db = store.database
        table = f"{db.dbname}/{store.schema_name}.{store.table}"
        target = Target(
            "event-store-archive",
            f"{db.host}:{db.port}/{table}",
            f"{get_system_identifier(db)}/{table}",
        )
        with report.guard(target) as guard:
            spec = ArchiveSpec(
                archive_table=archive_table_name(store.table, params.archive_table),
                time_column=params.time_column or store.updated_at_column,
                statuses=params.statuses,
                cutoff=server_cutoff(store, params.older_than_days),
                older_than_days=params.older_than_days,
                time_budget_s=params.time_budget_s or store.time_budget_s,
            )
            before = survey_archivable(store, spec)
            report.evidence("old events before", before)
            if report.check("old events in terminal states", before.total == 0, before.describe()):
                report.finish(Outcome.NO_ACTION_NEEDED, f"Nothing to archive: {before.describe()}.")
                return _summary(report, before)
            if params.destination == "s3":
                return _archive_to_s3(report, guard, params, store, spec, before)

            try:
                result = guard.act(
                    "archive old events",
                    lambda dry_run: archive_task(store, spec, dry_run),
                    budget=ARCHIVE_BUDGET,
                    approval=lambda plan: _danger(plan, params.approve_over),
                )
            except ArchiveUnsuitable as exc:
                raise Escalation(
                    f"{exc}; nothing was moved: fix the archive table or name another one (archive_table)"
                ) from None
            if params.dry_run:
                report.finish(
                    Outcome.PLANNED,
                    f"Would move {before.describe()} into {before.archive_table}"
                    + ("" if before.archive_exists else " (created LIKE the events table)")
                    + f", in batches of about {store.batch_target_ms:g} ms each, for at most "
                    f"{spec.time_budget_s:g}s.",
                )
                return _summary(report, before, result)

            after = survey_archivable(store, spec, check_locks=not result.out_of_time)
            report.evidence("old events after", after)
            _verify_counts(report, before, result, after)
            _account_for_the_rest(report, spec, result, after, "")
            report.finish(
                Outcome.RESOLVED,
                f"Moved {result.moved:,} event(s) "
                f"({', '.join(f'{n:,} {s}' for s, n in sorted(result.moved_by_status.items()))}) "
                f"into {before.archive_table} in {len(result.batch_sizes)} batch(es), "
                f"{_rate(result)}; the archive grew by exactly that many.",
            )
            return _summary(report, before, result, after)


def _archive_to_s3(
    report: IncidentReport,
    guard: Guard,
    params: ArchiveParams,
    store: EventStore,
    spec: ArchiveSpec,
    before: ArchiveSurvey,
) -> ArchiveSummary:
    backup = BackupStore.load(params.backup_store_block)
    bucket = params.s3_bucket or backup.bucket
    prefix = (
        params.s3_prefix
        if params.s3_prefix is not None
        else "/".join(p for p in (backup.prefix, "event-archive") if p)
    )
    try:
        result = guard.act(
            "archive old events to S3",
            lambda dry_run: archive_old_events_to_s3(store, backup, spec, bucket, prefix, dry_run),
            budget=ARCHIVE_BUDGET,
            approval=lambda plan: _danger(plan, params.approve_over),
        )
    except ArchiveUnsuitable as exc:
        raise Escalation(
            f"{exc}; nothing was moved: create the bucket, fix the Backup Store block's "
            "credentials, or name another bucket (s3_bucket)"
        ) from None
    where = f"s3://{bucket}/{result.root}"
    if params.dry_run:
        report.finish(
            Outcome.PLANNED,
            f"Would move {before.describe()} to {where} as gzip'd JSON-lines objects, one per "
            f"batch: about {result.batches_planned:,} batch(es) of up to "
            f"{store.batch_size:,} rows (sized to take about {store.batch_target_ms:g} ms), for "
            f"at most {spec.time_budget_s:g}s. Nothing is written to S3 or deleted.",
        )
        return _summary(report, before, result)

    after = survey_archivable(store, spec, check_locks=not result.out_of_time)
    report.evidence("old events after", after)
    report.evidence(
        "objects written",
        [
            {"key": o.key, "rows": o.rows, "bytes": o.bytes, "sha256": o.sha256}
            for o in result.objects
        ],
    )
    in_s3 = count_archived_rows(backup, bucket, [o.key for o in result.objects])
    ok = report.check(
        "S3 objects hold exactly the rows removed",
        in_s3 == result.moved,
        f"{len(result.objects)} object(s) in {where} hold {in_s3:,} row(s) by their metadata "
        f"(HEAD); {result.moved:,} row(s) deleted",
    )
    if not ok:
        raise VerificationFailed(
            f"the objects written hold {in_s3:,} rows but {result.moved:,} were deleted from "
            f"{after.table}: compare them with the manifest {result.manifest_key}"
        )
    report.check(
        "no old terminal events left below the cutoff",
        after.total == 0 or result.out_of_time,
        after.describe(),
    )
    _account_for_the_rest(report, spec, result, after, f" to {where}")
    resumed = [o for o in result.objects if o.resumed]
    report.finish(
        Outcome.RESOLVED,
        f"Moved {result.moved:,} event(s) "
        f"({', '.join(f'{n:,} {s}' for s, n in sorted(result.moved_by_status.items()))}) "
        f"to {where} in {len(result.objects)} object(s), {result.bytes_written:,} bytes gzip'd"
        + (
            f" ({len(resumed)} of them finished a batch an interrupted run had uploaded)"
            if resumed
            else ""
        )
        + f", {_rate(result)}; each object was verified in S3 (size, sha256, rows) before its "
        f"rows were deleted, and the objects hold exactly the rows removed. Manifest: "
        f"{result.manifest_key}.",
    )
    return _summary(report, before, result, after)


def _account_for_the_rest(
    report: IncidentReport,
    spec: ArchiveSpec,
    result: ArchiveResult,
    after: ArchiveSurvey,
    to_where: str,
) -> None:
    """Old events still there after the batches: out of time (escalate, the next run goes on),
    left though lockable (verification failed), or held by live transactions (a follow-up)."""
    if result.out_of_time:
        raise Escalation(
            f"time budget of {spec.time_budget_s:g}s ended: moved {result.moved:,} "
            f"event(s){to_where} ({_rate(result)}); {after.total:,} left; the next run continues"
        )
    left = after.total if after.lockable is None else after.lockable
    if left:
        raise VerificationFailed(
            f"{left:,} old terminal event(s) are still in {after.table} after the run"
        )
    if after.total:
        report.follow_ups.append(
            f"{after.total:,} old event(s) were locked by live transactions and skipped; "
            "the next run archives them."
        )


def _rate(result: ArchiveResult) -> str:
    rate = f", {result.rows_per_s:,.0f}/s" if result.rows_per_s else ""
    return f"{result.elapsed_s:.1f}s{rate}, slowest batch {result.slowest_batch_s * 1000:.0f} ms"


def _verify_counts(
    report: IncidentReport, before: ArchiveSurvey, result: ArchiveResult, after: ArchiveSurvey
) -> None:
    grown = (after.archive_rows or 0) - (before.archive_rows or 0)
    ok = report.check(
        "archive grew by exactly the rows moved",
        grown == result.inserted,
        f"archive {before.archive_rows or 0:,} -> {after.archive_rows or 0:,} rows (+{grown:,}); "
        f"moved {result.moved:,}, inserted {result.inserted:,}",
    )
    if result.already_archived:
        report.follow_ups.append(
            f"{result.already_archived:,} moved event(s) had an id already in the archive: the "
            "archive kept its copy. Check why ids repeat in the events table."
        )
    if not ok:
        raise VerificationFailed(
            f"the archive grew by {grown:,} rows but {result.inserted:,} were inserted: "
            "something else writes to it"
        )
    report.check(
        "no old terminal events left below the cutoff",
        after.total == 0 or result.out_of_time,
        after.describe(),
    )


def _danger(plan: ArchiveResult, approve_over: int) -> str | None:
    total = sum(c.detail.get("rows", 0) for c in plan.planned)
    if needs_approval(total, approve_over):
        return (
            f"{total:,} events would move out of the events table (more than approve_over="
            f"{approve_over:,}): anything still reading them there stops finding them"
        )
    return None


def _summary(
    report: IncidentReport,
    before: ArchiveSurvey,
    result: ArchiveResult | None = None,
    after: ArchiveSurvey | None = None,
) -> ArchiveSummary:
    return ArchiveSummary(
        outcome=report.outcome,
        before=before,
        archive=result,
        after=after,
        report=report.to_markdown(),
    )
