"""Runbook: monthly disaster-recovery drill (seed 003 "disaster recovery drill"; disaster recovery
"restore from the latest backup").

Restores the latest complete backup of a database (database-backup's) into a scratch database,
streamed from S3 through pg_restore while its sha256 is checked; compares every table's rows and
checksum with the manifest (read in the dump's own snapshot); reports the restore time as the
recovery-time evidence against the objective; drops the scratch database. A failed drill escalates:
a backup that cannot be restored is no backup.

``engine: mysql``: a MariaDB / MySQL backup (mariadb-dump, gzip'd SQL) piped into the ``mariadb``
client, the scratch database marked by a ``_runbooks_drill`` table (tasks.mysql_backup).
"""

from datetime import UTC, datetime
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from blocks.backup_store import BackupStore
from blocks.mysql import MySQLDatabase
from blocks.postgres import PostgresDatabase
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.db_backup_format import (
    DrillVerdict,
    DumpManifest,
    OptionalDatabaseName,
    OptionalDumpId,
    TableFingerprint,
    TableMismatch,
    compare_tables,
    database_name_problem,
    human_bytes,
    is_scratch_left_behind,
    judge_drill,
    scratch_database_name,
)
from tasks.mysql_backup import backup_location as mysql_backup_location
from tasks.mysql_backup import (
    drop_mysql_scratch,
    fingerprint_mysql_database,
    mysql_scratch_left_behind,
    restore_mysql_into_scratch,
)
from tasks.pg_backup import (
    RestoreResult,
    backup_location,
    describe_manifest,
    drop_scratch_databases,
    fingerprint_database,
    list_database_backups,
    load_database_manifest,
    restore_into_scratch,
    scratch_databases,
)
from tasks.postgres import get_system_identifier

RUNBOOK = "disaster-recovery-drill"

# a drill restores a whole database: a few a day at most
DRILL_BUDGET = Budget(max_actions=4, window_s=86400)


class DrillParams(RunbookParams):
    """Run form of the disaster-recovery-drill runbook."""

    engine: Literal["postgres", "mysql"] = Field(
        "postgres",
        description="postgres: pg_restore into PostgreSQL; mysql: a mariadb-dump backup piped "
        "into the mariadb client ('Runbooks MySQL Database' blocks; restore_jobs unused).",
    )
    db_block: BlockName = Field(
        "default",
        description="Name of the 'Runbooks PostgreSQL Database' (or, engine mysql, 'Runbooks "
        "MySQL Database') block of the database that was "
        "backed up (its host and port locate the backups).",
    )
    restore_db_block: BlockName | None = Field(
        None,
        description="Block of the server to restore on (its role needs CREATEDB); empty: the "
        "same server, into a scratch database.",
    )
    backup_store_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Backup Store' block (S3 bucket, prefix)."
    )
    database: OptionalDatabaseName = Field(None, description="Database whose backup to restore; empty: the block's.")
    backup_id: OptionalDumpId = Field(
        None, description="Backup to restore (e.g. 20261201T030000Z-1a2b3c4d); empty: the latest complete."
    )
    rto_target_s: float | None = Field(
        3600.0,
        gt=0,
        description="Recovery time objective: the restore must finish within this many seconds; "
        "empty: only reported.",
    )
    max_backup_age_h: float = Field(
        26.0,
        gt=0,
        description="The latest backup must be younger than this (the recovery point objective; "
        "daily backups: 26 h).",
    )
    restore_jobs: int = Field(
        1,
        ge=1,
        le=16,
        description="1: pg_restore reads straight from S3, no local disk (fastest on a small "
        "machine: python -m bench db-backup). More: pg_restore --jobs, connections loading tables "
        "and building indexes side by side, from a copy spooled to local disk first.",
    )
    compare_source: bool = Field(
        True,
        description="Also report the source database's current row counts next to the backup's "
        "(information: the source has moved on since the backup).",
    )



class DrillSummary(BaseModel):
    outcome: Outcome
    backup_id: str | None = None
    scratch_database: str | None = None
    restore_seconds: float | None = None
    verdict: DrillVerdict | None = None
    report: str


@flow(
    name=RUNBOOK,
    description="Restore the latest database backup from S3 into a scratch database, compare rows "
    "and checksums with the backup's manifest, report the restore time (RTO), drop the scratch.",
)
@ends_as_reported
def disaster_recovery_drill(params: DrillParams) -> DrillSummary:
    run_id = str(flow_run.id or "manual")
    restored: RestoreResult | None = None
    verdict: DrillVerdict | None = None
    manifest: DumpManifest | None = None
    with incident_report(
        runbook=RUNBOOK, title="Disaster Recovery Drill", severity="P3", params=params
    ) as report:
        mysql = params.engine == "mysql"
        block_type = MySQLDatabase if mysql else PostgresDatabase
        source = block_type.load(params.db_block)
        restore_db = block_type.load(params.restore_db_block or params.db_block)
        store = BackupStore.load(params.backup_store_block)
        database = params.database or (source.database if mysql else source.dbname)
        problem = database_name_problem(database)
        if problem:
            raise ValueError(f"the block's database: {problem}")
        scratch = scratch_database_name(database, run_id)
        if mysql:
            location = mysql_backup_location(store, source, database)
            target = Target("mysql-drill", f"{restore_db.host}:{restore_db.port}/{database}")
        else:
            location = backup_location(store, source, database)
            restore_sysid = get_system_identifier(restore_db)
            target = Target(
                "postgres-drill",
                f"{restore_db.host}:{restore_db.port}/{database}",
                f"{restore_sysid}/{database}",
            )
        with report.guard(target) as guard:
            if mysql:
                _clean_left_behind_mysql(report, guard, restore_db, database, run_id)
            else:
                _clean_left_behind(report, guard, restore_db, run_id)
            manifest = _pick_backup(report, store, location, params)
            report.evidence("backup", describe_manifest(manifest))
            age_h = (datetime.now(UTC) - manifest.completed_at).total_seconds() / 3600
            fresh = age_h <= params.max_backup_age_h
            report.check(
                "latest backup within the recovery point objective",
                fresh,
                f"{manifest.backup_id} finished {age_h:.1f} h ago (objective {params.max_backup_age_h:g} h)",
            )
            attempted = False
            try:
                attempted = not params.dry_run
                restored = guard.act(
                    "restore the backup into a scratch database",
                    lambda dry_run: (
                        restore_mysql_into_scratch(
                            restore_db, store, manifest, location, scratch, run_id, dry_run
                        )
                        if mysql
                        else restore_into_scratch(
                            restore_db, store, location, manifest, scratch, run_id, dry_run,
                            jobs=params.restore_jobs,
                        )
                    ),
                    budget=DRILL_BUDGET,
                )
                assert isinstance(restored, RestoreResult)
                if params.dry_run:
                    report.finish(
                        Outcome.PLANNED,
                        f"Would restore {describe_manifest(manifest)} into the scratch database "
                        f"{scratch} on {restore_db.host}:{restore_db.port}, compare "
                        f"{len(manifest.tables)} tables and drop it; nothing was created.",
                    )
                    return _summary(report, manifest, restored, verdict)
                found = (
                    fingerprint_mysql_database(restore_db, scratch)
                    if mysql and restored.error is None
                    else fingerprint_database(
                        restore_db,
                        scratch,
                        list(manifest.tables),
                        any(t.checksum is not None for t in manifest.tables.values()),
                    )
                    if restored.error is None
                    else {}
                )
            finally:
                if attempted:  # also after a failed restore: it may have created the database
                    guard.act(
                        "drop the scratch database",
                        lambda dry_run: (
                            drop_mysql_scratch(restore_db, [scratch], dry_run)
                            if mysql
                            else drop_scratch_databases(restore_db, [scratch], run_id, dry_run)
                        ),
                    )
            mismatches = compare_tables(manifest.tables, found) if restored.error is None else []
            verdict = judge_drill(
                manifest,
                restored.sha256,
                restored.size,
                restored.error,
                mismatches,
                restored.seconds,
                params.rto_target_s,
            )
            _record_checks(report, manifest, restored, found, mismatches, params)
            if params.compare_source:
                _compare_with_source(report, source, database, manifest, mysql)
            if not verdict.ok:
                report.follow_ups.append(
                    "Take a new backup now (database-backup) and find why this one does not "
                    "restore before the next one is needed."
                )
                raise VerificationFailed(
                    f"the drill failed: backup {manifest.backup_id} of {database} "
                    + "; ".join(verdict.problems[:5])
                )
            if not fresh:
                report.follow_ups.append(
                    f"The newest backup is {age_h:.0f} h old: check the database-backup schedule."
                )
                raise Escalation(
                    f"the restore worked, but the latest backup of {database} is {age_h:.1f} h "
                    f"old, over the {params.max_backup_age_h:g} h objective"
                )
            rows = sum(f.rows for f in found.values())
            report.finish(
                Outcome.RESOLVED,
                f"Restored backup {manifest.backup_id} of {database} "
                f"({human_bytes(manifest.size)}) into {scratch} in {restored.seconds:.1f}s"
                + (f" (objective {params.rto_target_s:g}s)" if params.rto_target_s else "")
                + f"; all {len(found)} tables match the backup ({rows} rows"
                + (", checksums equal" if any(f.checksum for f in found.values()) else "")
                + "); the backup object's sha256 matches its manifest; the scratch database was "
                "dropped.",
            )
    return _summary(report, manifest, restored, verdict)


def _pick_backup(
    report: IncidentReport, store: BackupStore, location: str, params: DrillParams
) -> DumpManifest:
    backups = list_database_backups(store, location)
    complete = [b.backup_id for b in backups if b.complete]
    report.step(
        f"{len(complete)} complete backup(s) in s3://{store.bucket}/{location}"
        + (f", newest {complete[-1]}" if complete else "")
    )
    if params.backup_id:
        return load_database_manifest(store, location, params.backup_id)
    if not complete:
        report.follow_ups.append("Run database-backup and check its schedule.")
        raise Escalation(f"no complete backup in s3://{store.bucket}/{location}: nothing to restore")
    return load_database_manifest(store, location, complete[-1])


def _clean_left_behind(report: IncidentReport, guard, db: PostgresDatabase, run_id: str) -> None:
    """A drill killed before its cleanup left its scratch database: drop it now."""
    stale = [s.name for s in scratch_databases(db) if is_scratch_left_behind(s.comment, run_id)]
    if not stale:
        return
    report.step(f"found {len(stale)} scratch database(s) left by earlier drills: {', '.join(stale)}")
    guard.act(
        "drop scratch databases left behind",
        lambda dry_run: drop_scratch_databases(db, stale, run_id, dry_run, left_behind=True),
    )


def _clean_left_behind_mysql(
    report: IncidentReport, guard, db: MySQLDatabase, database: str, run_id: str
) -> None:
    """A drill killed before its cleanup left its (marked) scratch database: drop it now."""
    stale = mysql_scratch_left_behind(db, database, run_id)
    if not stale:
        return
    report.step(f"found {len(stale)} scratch database(s) left by earlier drills: {', '.join(stale)}")
    guard.act(
        "drop scratch databases left behind",
        lambda dry_run: drop_mysql_scratch(db, stale, dry_run),
    )


def _record_checks(
    report: IncidentReport,
    manifest: DumpManifest,
    restored: RestoreResult,
    found: dict[str, TableFingerprint],
    mismatches: list[TableMismatch],
    params: DrillParams,
) -> None:
    report.check(
        "backup object intact (size and sha256 as in the manifest)",
        restored.sha256 == manifest.sha256 and restored.size == manifest.size,
        f"{human_bytes(restored.size)}, sha256 {restored.sha256[:16]}… "
        f"(manifest: {human_bytes(manifest.size)}, {manifest.sha256[:16]}…)",
    )
    report.check(
        f"{'the mariadb client load' if manifest.engine == 'mysql' else 'pg_restore'} succeeded",
        restored.error is None,
        restored.error or f"restored in {restored.seconds:.1f}s",
    )
    if params.rto_target_s is not None:
        report.check(
            "restore within the recovery time objective",
            restored.seconds <= params.rto_target_s,
            f"{restored.seconds:.1f}s (objective {params.rto_target_s:g}s)",
        )
    if restored.error is None:
        report.check(
            "tables match the backup (rows and checksums)",
            not mismatches,
            "; ".join(m.describe() for m in mismatches[:5]) or f"{len(found)} tables equal",
        )
        report.evidence(
            "tables: backup vs restored",
            [
                {
                    "table": t,
                    "rows in backup": want.rows,
                    "rows restored": found[t].rows if t in found else "missing",
                    "checksum": "equal"
                    if t in found and want.checksum == found[t].checksum
                    else ("not compared" if want.checksum is None else "DIFFERENT"),
                }
                for t, want in sorted(manifest.tables.items())
            ],
        )


def _compare_with_source(
    report: IncidentReport, source, database: str, manifest: DumpManifest, mysql: bool = False
) -> None:
    try:
        now = (
            fingerprint_mysql_database(source, database)
            if mysql
            else fingerprint_database(source, database, list(manifest.tables), False)
        )
    except Exception as exc:  # noqa: BLE001 - information only; the drill's verdict stands
        report.step(f"could not read the source's current row counts: {type(exc).__name__}")
        return
    report.evidence(
        "source today vs the backup (rows)",
        [
            {"table": t, "backup": manifest.tables[t].rows, "source now": f.rows}
            for t, f in sorted(now.items())
        ],
    )


def _summary(
    report: IncidentReport,
    manifest: DumpManifest | None,
    restored: RestoreResult | None,
    verdict: DrillVerdict | None,
) -> DrillSummary:
    return DrillSummary(
        outcome=report.outcome or Outcome.FAILED,
        backup_id=manifest.backup_id if manifest else None,
        scratch_database=restored.scratch if restored else None,
        restore_seconds=restored.seconds if restored and not restored.dry_run else None,
        verdict=verdict,
        report=report.to_markdown(),
    )
