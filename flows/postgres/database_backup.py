"""Runbook: daily database backup (seed 003 disaster recovery "backup the database").

pg_dump (custom format) of one PostgreSQL database streamed to S3, a manifest with the dump's
size, sha256 and every table's rows and checksum read in the dump's own snapshot, written last;
then the retention: the ``keep_last`` newest complete backups stay, older ones and incomplete
leftovers of dead runs go. The disaster-recovery-drill runbook restores these backups.

``engine: mysql``: a MariaDB / MySQL database instead, with ``mariadb-dump`` (tasks.mysql_backup).
"""

from datetime import UTC, datetime
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, field_validator

from blocks.backup_store import BackupStore
from blocks.mysql import MySQLDatabase
from blocks.postgres import PostgresDatabase
from runbooks.errors import VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.db_backup_format import (
    DumpManifest,
    OptionalDatabaseName,
    StoredBackup,
    database_name_problem,
    human_bytes,
    new_backup_id,
    plan_retention,
    table_name_problem,
)
from tasks.mysql_backup import backup_location as mysql_backup_location
from tasks.mysql_backup import dump_mysql_database
from tasks.pg_backup import (
    BackupResult,
    backup_location,
    delete_backups,
    describe_manifest,
    dump_database,
    list_database_backups,
)
from tasks.postgres import get_system_identifier
from tasks.pushgateway import OptionalPushgatewayUrl, push_gauges

RUNBOOK = "database-backup"

# a backup is a full copy: a handful a day is plenty, more means something re-triggers it
BACKUP_BUDGET = Budget(max_actions=6, window_s=86400)


class DatabaseBackupParams(RunbookParams):
    """Run form of the database-backup runbook."""

    engine: Literal["postgres", "mysql"] = Field(
        "postgres",
        description="postgres: pg_dump of a 'Runbooks PostgreSQL Database' block's database; "
        "mysql: mariadb-dump (gzip'd SQL) of a 'Runbooks MySQL Database' block's database.",
    )
    db_block: BlockName = Field(
        "default",
        description="Name of the saved 'Runbooks PostgreSQL Database' block ('Runbooks MySQL "
        "Database' with engine mysql).",
    )
    backup_store_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Backup Store' block (S3 bucket, prefix)."
    )
    database: OptionalDatabaseName = Field(
        None, description="Database to back up; empty: the block's database."
    )
    tables: list[str] = Field(
        default_factory=list,
        description="schema.table names whose rows and checksum go into the manifest (the drill "
        "compares them); empty: every table. engine mysql: always every table.",
    )
    checksums: bool = Field(
        True,
        description="Checksum every row of those tables (one more read of each, in the dump's "
        "snapshot, while pg_dump runs); off: row counts only.",
    )
    keep_last: int = Field(
        7, ge=1, le=1000, description="Complete backups to keep (seed: daily backups, a week)."
    )
    pushgateway_url: OptionalPushgatewayUrl = Field(
        None,
        description="Prometheus Pushgateway to push the backup's time and size to (the "
        "PostgresBackupMissing alert reads it); empty: nothing pushed.",
    )

    @field_validator("tables")
    @classmethod
    def _tables(cls, value: list[str]) -> list[str]:
        problems = [p for p in map(table_name_problem, value) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return value



class DatabaseBackupSummary(BaseModel):
    outcome: Outcome
    backup_id: str | None = None
    location: str | None = None
    manifest: DumpManifest | None = None
    deleted: list[str] = Field(default_factory=list, description="Backups removed by retention.")
    report: str


@flow(
    name=RUNBOOK,
    description="pg_dump a PostgreSQL database to S3 with a manifest (size, sha256, rows and "
    "checksums per table in the dump's snapshot); keep the newest N backups.",
)
@ends_as_reported
def database_backup(params: DatabaseBackupParams) -> DatabaseBackupSummary:
    result: BackupResult | None = None
    deleted: list[str] = []
    with incident_report(
        runbook=RUNBOOK, title="Database Backup", severity="P4", params=params
    ) as report:
        store = BackupStore.load(params.backup_store_block)
        if params.engine == "mysql":
            my = MySQLDatabase.load(params.db_block)
            database = params.database or my.database
        else:
            db = PostgresDatabase.load(params.db_block)
            database = params.database or db.dbname
        problem = database_name_problem(database)
        if problem:
            raise ValueError(f"the block's database: {problem}")
        if params.engine == "mysql":
            location = mysql_backup_location(store, my, database)
            target = Target("mysql-database", f"{my.host}:{my.port}/{database}")

            def dump(backup_id: str, dry_run: bool) -> BackupResult:
                return dump_mysql_database(my, store, database, backup_id, dry_run)

            if params.tables:
                report.step("engine mysql: every table is fingerprinted (`tables` is PostgreSQL's)")
        else:
            sysid = get_system_identifier(db)
            location = backup_location(store, db, database)
            target = Target("postgres-database", f"{db.host}:{db.port}/{database}", f"{sysid}/{database}")

            def dump(backup_id: str, dry_run: bool) -> BackupResult:
                return dump_database(
                    db, store, database, backup_id, params.tables, params.checksums, dry_run,
                    system_identifier=sysid,
                )  # fmt: skip
        with report.guard(target) as guard:
            before = list_database_backups(store, location)
            report.evidence("backups before", _listing(before))
            complete = [b for b in before if b.complete]
            report.check(
                "a recent complete backup exists",
                bool(complete),
                f"newest complete: {complete[-1].backup_id}" if complete else "none",
            )
            backup_id = new_backup_id(datetime.now(UTC), str(flow_run.id or "manual"))
            result = guard.act(
                f"back up {database}",
                lambda dry_run: dump(backup_id, dry_run),
                budget=BACKUP_BUDGET,
            )
            assert isinstance(result, BackupResult)
            if params.dry_run:
                retention = plan_retention(before, params.keep_last, datetime.now(UTC))
                report.finish(
                    Outcome.PLANNED,
                    f"Would dump {database} ({human_bytes(result.database_bytes)}) to "
                    f"{result.location}"
                    + (
                        f" and then delete {len(retention.delete)} old backup(s)"
                        if retention.delete
                        else ""
                    )
                    + "; nothing was written.",
                )
                return _summary(report, result, deleted)
            manifest = result.manifest
            if manifest is None:
                raise VerificationFailed(f"the backup of {database} wrote no manifest")
            report.evidence("manifest", _manifest_evidence(manifest))
            after = list_database_backups(store, location)
            stored = next((b for b in after if b.backup_id == backup_id), None)
            report.check(
                "backup stored and complete",
                bool(stored and stored.complete),
                f"{backup_id}: {human_bytes(stored.size) if stored else 'missing'}",
            )
            if not (stored and stored.complete):
                raise VerificationFailed(f"backup {backup_id} is not complete in {result.location}")
            deleted = _retention(report, guard, store, location, after, params, backup_id)
            _push(report, params, database, manifest)
            report.finish(
                Outcome.NO_ACTION_NEEDED if result.already_complete else Outcome.RESOLVED,
                ("Already backed up: " if result.already_complete else "Backed up ")
                + f"{describe_manifest(manifest)} to {result.location}"
                + (f"; deleted {len(deleted)} old backup(s) (keeping {params.keep_last})" if deleted else "")
                + ".",
            )
    return _summary(report, result, deleted)


def _retention(
    report: IncidentReport,
    guard,
    store: BackupStore,
    location: str,
    backups: list[StoredBackup],
    params: DatabaseBackupParams,
    backup_id: str,
) -> list[str]:
    plan = plan_retention(backups, params.keep_last, datetime.now(UTC), protect={backup_id})
    if not plan.delete:
        report.step(f"retention: {len(plan.keep)} backup(s) kept, none to delete")
        return []
    doomed = [b for b in backups if b.backup_id in set(plan.delete)]
    deleted = guard.act(
        "delete backups past retention",
        lambda dry_run: delete_backups(store, location, doomed, plan.reasons, dry_run),
    )
    return [c.target for c in deleted.applied]


def _push(
    report: IncidentReport,
    params: DatabaseBackupParams,
    database: str,
    manifest: DumpManifest,
) -> None:
    if not params.pushgateway_url:
        return
    error = push_gauges(
        params.pushgateway_url,
        job="runbooks-database-backup",
        # `database` names the server (its block), as on every PostgreSQL alert; `datname` the
        # database, as postgres_exporter labels it
        grouping_key={"database": params.db_block, "datname": database},
        gauges={
            "runbooks_database_backup_last_success_timestamp_seconds": (
                "When the last complete backup of the database finished.",
                manifest.completed_at.timestamp(),
            ),
            "runbooks_database_backup_size_bytes": ("Bytes of the last backup's dump.", manifest.size),
        },
    )
    if error is None:
        report.step(f"pushed the backup's time to {params.pushgateway_url}")
    else:
        report.step(f"could not push the backup's time to {params.pushgateway_url}: {error}")


def _listing(backups: list[StoredBackup]) -> list[dict]:
    return [
        {"backup": b.backup_id, "complete": b.complete, "size": human_bytes(b.size)}
        for b in backups
    ] or [{"backup": "none"}]


def _manifest_evidence(m: DumpManifest) -> dict:
    return {
        "backup": m.backup_id,
        "snapshot at": m.snapshot_at.isoformat(),
        "dump": f"{human_bytes(m.size)}, sha256 {m.sha256}",
        "database size": human_bytes(m.database_bytes),
        "took": f"{m.dump_seconds:.1f}s",
        "tool": m.tool,
        "tables": {t: f.model_dump() for t, f in m.tables.items()},
    }


def _summary(
    report: IncidentReport, result: BackupResult | None, deleted: list[str]
) -> DatabaseBackupSummary:
    return DatabaseBackupSummary(
        outcome=report.outcome or Outcome.FAILED,
        backup_id=result.backup_id if result else None,
        location=result.location if result else None,
        manifest=result.manifest if result else None,
        deleted=deleted,
        report=report.to_markdown(),
    )
