"""Runbook: MySQL not writing data (seed 004 §4.3, SEV-2).

No new rows in the watched table (the seed's `moving_averages`), JDBC write errors, connection
refused. The runbook connects the way the writers do and tells the failures apart (refused,
timed out, wrong credentials, unknown database), reads the server's state (read_only,
super_read_only, version, uptime, the data directory's free space), the table's schema against
the one the writers expect, the newest row's age, and who holds the locks writers wait for.
It kills a blocking session (approval: its transaction is rolled back) and clears read_only
where the server must be writable (approval), then verifies that writes land. It never
restarts MySQL (the seed's first action): that stays a human's last resort.
"""

from typing import Annotated

from prefect import flow
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from blocks.mysql import MySQLDatabase
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.mysql import (
    BlockerSurvey,
    KillResult,
    ServerProbe,
    TableCheck,
    WritableResult,
    check_table,
    find_blockers,
    kill_blocking_session,
    probe_server,
    probe_write,
    read_freshness,
    set_writable,
)
from tasks.mysql_decisions import (
    Decision,
    Freshness,
    Observation,
    Remedy,
    WriteProbe,
    decide_write_fix,
    identifier_problem,
    kill_danger,
    root_blockers,
)

RUNBOOK = "mysql-not-writing"

# Killing sessions again and again means an application keeps leaving transactions open.
KILL_BUDGET = Budget(max_actions=3, window_s=3600)
# read_only that keeps coming back is set by something (a failover tool): a human looks.
WRITABLE_BUDGET = Budget(max_actions=2, window_s=3600)

_SPLIT_BRAIN = (
    "clearing read_only makes this server accept writes: if it is a replica or a demoted "
    "primary (read_only is how failover tools fence one), two servers take writes and their "
    "data diverges"
)


def _identifier(value: str | None) -> str | None:
    problem = None if value is None else identifier_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
# an empty form field is no column/table
OptionalIdentifier = Annotated[
    str | None, BeforeValidator(lambda v: None if v == "" else v), AfterValidator(_identifier)
]


class MySQLNotWritingParams(RunbookParams):
    """Run form of the mysql-not-writing runbook."""

    db_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks MySQL Database' block."
    )
    table: Identifier = Field(
        "moving_averages", description="Table the writers insert into (in the block's database)."
    )
    timestamp_column: OptionalIdentifier = Field(
        "created_at",
        description="Column with each row's write time; empty: newest-row age not checked.",
    )
    max_row_age_s: float = Field(
        300.0, gt=0, le=7 * 86400, description="The newest row may be at most this old."
    )
    expected_columns: dict[str, str] = Field(
        default_factory=dict,
        description="The schema the writers expect, column -> type (e.g. {'symbol': "
        "'varchar(16)', 'avg_price': 'decimal(18,8)'}); empty: not checked.",
    )
    canary_table: OptionalIdentifier = Field(
        None,
        description="A table for test writes (every column with a default); diagnosis inserts "
        "and rolls back, verification commits a row.",
    )
    must_be_writable: bool = Field(
        False,
        description="This server is the primary: clear read_only (with approval) if it is set.",
    )
    min_free_percent: float = Field(
        5.0, ge=0, le=100, description="Less free space on the data directory counts as full."
    )
    verify_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="How long to wait for writes to land after acting."
    )


class WriteHealth(BaseModel):
    """What verification re-reads: can writers write, and do they."""

    read_only: bool | None
    blocked_writers: int
    new_row: bool | None = Field(
        None, description="A row newer than before acting; None: unwatched."
    )
    canary: WriteProbe

    def describe(self) -> str:
        parts = [
            "read-only" if self.read_only else "writable",
            f"{self.blocked_writers} writer(s) waiting for a lock",
        ]
        if self.new_row is not None:
            parts.append("a new row arrived" if self.new_row else "no new row yet")
        if self.canary.attempted:
            parts.append(self.canary.describe())
        return ", ".join(parts)


def writes_land(health: WriteHealth) -> bool:
    """Writable, nobody waiting, and proof of a write: a new row, or the canary's commit."""
    if health.read_only or health.blocked_writers:
        return False
    if health.new_row is None and not health.canary.attempted:
        return True  # nothing more to watch
    return bool(health.new_row) or health.canary.ok


class MySQLNotWritingSummary(BaseModel):
    """What a mysql-not-writing run saw and did."""

    outcome: Outcome | None = Field(None, description="How the run ended (set as it ends).")
    server: ServerProbe
    table: TableCheck | None = None
    freshness: Freshness | None = None
    blockers: BlockerSurvey | None = None
    test_write: WriteProbe | None = None
    decision: Decision | None = None
    killed: list[KillResult] = Field(default_factory=list)
    writable: WritableResult | None = None
    after: WriteHealth | None = None
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name=RUNBOOK,
    description="Tell apart why MySQL takes no writes (unreachable, credentials, schema, disk, "
    "read_only, lock blockers); kill blockers and clear read_only with approval; verify writes land.",
)
@ends_as_reported
def mysql_not_writing(params: MySQLNotWritingParams) -> MySQLNotWritingSummary:
    with incident_report(
        runbook=RUNBOOK, title="MySQL Not Writing Data", severity="SEV-2", params=params
    ) as report:
        db = MySQLDatabase.load(params.db_block)
        server = probe_server(db, params.min_free_percent)
        report.evidence("server", server)
        if not report.check("MySQL reachable", server.reachable, server.describe()):
            decision = decide_write_fix(
                Observation(connect_failure=server.failure, connect_error=server.error),
                must_be_writable=params.must_be_writable,
            )
            _escalate(report, decision)

        # read_only and KILL are per server: every block reaching it shares one lock and budget
        target = Target("mysql", f"{db.host}:{db.port}", server.identity)
        with report.guard(target) as guard:
            table = check_table(db, params.table, params.expected_columns)
            report.evidence("table", table)
            drift = table.drift.model_copy(deep=True)
            freshness = None
            if table.exists and params.timestamp_column:
                if params.timestamp_column.lower() in {c.lower() for c in table.columns}:
                    freshness = read_freshness(
                        db, params.table, params.timestamp_column, params.max_row_age_s
                    )
                    report.check("new rows", freshness.fresh, freshness.describe())
                else:
                    drift.missing.append(params.timestamp_column)
            report.check(
                "table schema",
                table.exists and not (drift.missing or drift.type_differs),
                table.describe()
                if drift == table.drift
                else f"{table.describe()}; timestamp column {params.timestamp_column} missing",
            )
            report.check(
                "read_only",
                not (server.read_only or server.super_read_only),
                _read_only_text(server),
            )
            blockers = find_blockers(db)
            report.evidence("lock blockers", blockers)
            report.check(
                "writers not blocked",
                not (blockers.blockers or blockers.metadata_lock_waiters),
                blockers.describe(),
            )
            test_write = probe_write(db, params.canary_table, commit=False)
            disk_full = test_write.disk_full or bool(server.disk.low)
            report.check(
                "disk and test write",
                not disk_full and (test_write.ok or not test_write.attempted),
                f"{server.disk.describe()}; {test_write.describe()}",
            )

            observation = Observation(
                read_only=bool(server.read_only or server.super_read_only or test_write.read_only),
                table_exists=table.exists,
                drift=drift,
                disk_full=disk_full,
                blockers=blockers.blockers,
                metadata_lock_waiters=len(blockers.metadata_lock_waiters),
                lock_waits_known=blockers.supported,
                fresh=freshness.fresh if freshness else None,
            )
            decision = decide_write_fix(observation, must_be_writable=params.must_be_writable)
            report.step(f"decision: {decision.remedy.value} ({decision.reason})")
            summary = MySQLNotWritingSummary(
                server=server,
                table=table,
                freshness=freshness,
                blockers=blockers,
                test_write=test_write,
                decision=decision,
                report="",
            )
            if decision.remedy is Remedy.NONE:
                report.finish(Outcome.NO_ACTION_NEEDED, f"MySQL takes writes: {decision.reason}.")
                return _summary(report, summary)
            if decision.remedy is Remedy.ESCALATE:
                _escalate(report, decision)

            if decision.remedy is Remedy.CLEAR_READ_ONLY:
                summary.writable = guard.act(
                    "clear read_only",
                    lambda dry_run: set_writable(db, dry_run),
                    budget=WRITABLE_BUDGET,
                    approval=lambda plan: _SPLIT_BRAIN,
                )
            else:
                for blocker in root_blockers(blockers.blockers):
                    summary.killed.append(
                        guard.act(
                            "kill blocking session",
                            lambda dry_run, b=blocker: kill_blocking_session(
                                db, b.thread_id, dry_run, trx_id=b.trx_id
                            ),
                            budget=KILL_BUDGET,
                            approval=lambda plan, b=blocker: (
                                kill_danger(b) if plan.planned else None
                            ),
                        )
                    )
            if params.dry_run:
                report.finish(Outcome.PLANNED, f"Would {decision.remedy.value}: {decision.reason}.")
                return _summary(report, summary)

            verified = guard.verify(
                "writes land",
                lambda: _write_health(db, params, freshness),
                writes_land,
                timeout_s=params.verify_timeout_s,
                describe=lambda h: h.describe(),
            )
            summary.after = verified.last
            report.evidence("after", verified.last)
            _add_follow_ups(report, decision, blockers)
            if not verified.ok:
                report.follow_ups.append(
                    "Read the writers' logs for their JDBC errors; "
                    "the server takes writes from the runbook's side."
                )
                raise VerificationFailed(
                    f"after '{decision.remedy.value}', writes did not land within "
                    f"{params.verify_timeout_s:g}s: {verified.last.describe()}"
                )
            report.finish(
                Outcome.RESOLVED,
                f"{_done(summary)}; writes land again ({verified.last.describe()}).",
            )
            return _summary(report, summary)


def _write_health(
    db: MySQLDatabase, params: MySQLNotWritingParams, before: Freshness | None
) -> WriteHealth:
    """Re-read what blocked writes, and look for a row newer than ``before`` (None: unwatched)."""
    server = probe_server(db, params.min_free_percent, attempts=1)
    survey = find_blockers(db)
    new_row = None
    if before is not None and params.timestamp_column:
        now = read_freshness(db, params.table, params.timestamp_column, params.max_row_age_s)
        new_row = now.newest is not None and (before.newest is None or now.newest > before.newest)
    return WriteHealth(
        read_only=bool(server.read_only or server.super_read_only) if server.reachable else None,
        blocked_writers=sum(len(b.waiters) for b in survey.blockers),
        new_row=new_row,
        canary=probe_write(db, params.canary_table, commit=True),
    )


def _read_only_text(server: ServerProbe) -> str:
    sro = (
        "not on this server"
        if server.super_read_only is None
        else ("ON" if server.super_read_only else "OFF")
    )
    return f"read_only={'ON' if server.read_only else 'OFF'}, super_read_only={sro}"


def _done(summary: MySQLNotWritingSummary) -> str:
    """What the run changed, in a sentence."""
    if summary.writable is not None:
        cleared = " and ".join(c.target for c in summary.writable.applied) or "nothing"
        return f"Cleared {cleared} (the server was read-only)"
    killed = [c for k in summary.killed for c in k.applied]
    spared = [n for k in summary.killed for n in k.notes]
    text = f"Killed {', '.join(c.target for c in killed) or 'no session'}"
    waiters = sum(len(b.waiters) for b in root_blockers(summary.blockers.blockers))
    text += f", whose open transaction blocked {waiters} writer(s)"
    return text + (f" ({'; '.join(spared)})" if spared else "")


def _escalate(report: IncidentReport, decision: Decision) -> None:
    report.step(f"decision: {decision.remedy.value} ({decision.reason})")
    report.follow_ups.extend(decision.follow_ups)
    raise Escalation(decision.reason)


def _add_follow_ups(report: IncidentReport, decision: Decision, blockers: BlockerSurvey) -> None:
    """Point at whoever caused it, so the cause gets fixed."""
    if decision.remedy is Remedy.KILL_BLOCKERS:
        who = ", ".join(sorted({f"{b.user}@{b.host}" for b in root_blockers(blockers.blockers)}))
        report.follow_ups.append(
            f"Find why {who} kept a transaction open holding locks the writers need "
            "(a missing commit, a hung batch job); set innodb_lock_wait_timeout and "
            "a transaction time limit in that application."
        )
    if decision.remedy is Remedy.CLEAR_READ_ONLY:
        report.follow_ups.append(
            "Find who set read_only (a failover tool, a DBA) and check my.cnf: a read_only "
            "there comes back at the next restart."
        )


def _summary(report: IncidentReport, summary: MySQLNotWritingSummary) -> MySQLNotWritingSummary:
    return summary.model_copy(update={"outcome": report.outcome, "report": report.to_markdown()})
