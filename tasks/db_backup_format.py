"""Database backups in S3: where they live, what their manifest holds, and the pure decisions
(retention, drill verdicts, scratch database names) of database-backup and disaster-recovery-drill.

Layout, under the backup store's prefix::

    <prefix>/<engine>/<server>/<database>/<backup id>/dump       the dump (pg_dump custom format)
    <prefix>/<engine>/<server>/<database>/<backup id>/manifest.json   written last: complete

A backup without a manifest is incomplete (its run died, or is still running). The backup id is the
UTC time the dump's snapshot was taken plus the run's id, so ids sort by time and a retried run
writes to the same place.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

DUMP = "dump"
MANIFEST = "manifest.json"
SCRATCH_MARKER = "runbooks disaster-recovery-drill scratch database"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")
_BACKUP_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")
_SERVER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_TABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_$]{0,62})\.([A-Za-z_][A-Za-z0-9_$]{0,62})")


def database_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a database name here (it becomes an S3 key part and an identifier)."""
    if not _NAME.fullmatch(name or ""):
        return (
            f"{name!r} is not a database name (letters, digits, '_', '$', '-'; starting with a "
            "letter or '_'; at most 63)"
        )
    return None


def _database_name(value: str | None) -> str | None:
    problem = None if value is None else database_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _backup_id(value: str | None) -> str | None:
    problem = None if value is None else backup_id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


_EMPTY_IS_NONE = BeforeValidator(lambda v: None if v == "" else v)
OptionalDatabaseName = Annotated[str | None, _EMPTY_IS_NONE, AfterValidator(_database_name)]
"""A database name from a parameter or alert label (it becomes an S3 key part), or empty."""
OptionalDumpId = Annotated[str | None, _EMPTY_IS_NONE, AfterValidator(_backup_id)]
"""A database backup's id, or empty for the latest."""


def table_name_problem(name: str) -> str | None:
    if not _TABLE.fullmatch(name or ""):
        return f"{name!r} is not schema.table (letters, digits, '_', '$'; each at most 63)"
    return None


def split_table(name: str) -> tuple[str, str]:
    m = _TABLE.fullmatch(name)
    if not m:
        raise ValueError(table_name_problem(name))
    return m.group(1), m.group(2)


def server_label(host: str, port: int) -> str:
    """The server's part of the key: host and port, with anything but [A-Za-z0-9._-] as '_'."""
    label = re.sub(r"[^A-Za-z0-9._-]", "_", f"{host}_{port}")
    return label if _SERVER.fullmatch(label) else "server"


def backup_prefix(prefix: str, engine: str, server: str, database: str) -> str:
    """Where every backup of one database lives, ending in '/'."""
    return "/".join(p for p in (prefix.strip("/"), engine, server, database) if p) + "/"


def new_backup_id(at: datetime, run_id: str) -> str:
    """``20261201T030000Z-1a2b3c4d``: sortable by time, the same for every retry of one run."""
    suffix = re.sub(r"[^0-9a-f]", "", run_id.lower())[:8].ljust(8, "0")
    return f"{at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{suffix}"


def backup_id_problem(backup_id: str) -> str | None:
    if not _BACKUP_ID.fullmatch(backup_id or ""):
        return f"{backup_id!r} is not a backup id (e.g. 20261201T030000Z-1a2b3c4d)"
    return None


def backup_time(backup_id: str) -> datetime:
    return datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


class TableFingerprint(BaseModel):
    """Rows of a table and an order-independent checksum of their text, at one snapshot."""

    rows: int
    checksum: str | None = Field(
        None, description="Sum of hashtextextended(row::text, 0) over all rows, as text."
    )


class DumpManifest(BaseModel):
    """What a complete backup holds; written after the dump object, so it proves completeness."""

    engine: str = "postgres"
    backup_id: str
    database: str
    server: str = Field(description="host:port the dump was taken from.")
    system_identifier: str | None = None
    server_version: str
    tool: str = Field(description="The dump program and its version, e.g. 'pg_dump (PostgreSQL) 15.19'.")
    format: str = "custom"
    snapshot_at: datetime = Field(description="When the dump's snapshot was taken.")
    completed_at: datetime
    database_bytes: int = Field(description="pg_database_size when the dump started.")
    size: int = Field(description="Bytes of the dump object.")
    sha256: str
    dump_seconds: float
    tables: dict[str, TableFingerprint] = Field(
        default_factory=dict,
        description="schema.table -> rows and checksum, read in the dump's own snapshot.",
    )


class StoredBackup(BaseModel):
    backup_id: str
    complete: bool
    size: int = Field(0, description="Bytes of all its objects.")

    @property
    def taken_at(self) -> datetime:
        return backup_time(self.backup_id)


class RetentionPlan(BaseModel):
    keep: list[str]
    delete: list[str]
    reasons: dict[str, str] = Field(default_factory=dict)


def plan_retention(
    backups: list[StoredBackup],
    keep_last: int,
    now: datetime,
    incomplete_grace: timedelta = timedelta(days=1),
    protect: set[str] | None = None,
) -> RetentionPlan:
    """Keep the ``keep_last`` newest complete backups; delete older complete ones, and incomplete
    ones older than ``incomplete_grace`` (a backup still being written is younger than that).

    Never deletes a backup in ``protect`` (the one this run just took), nor anything when fewer
    than ``keep_last`` complete backups exist beyond the incomplete leftovers.
    """
    protect = protect or set()
    complete = sorted((b for b in backups if b.complete), key=lambda b: b.backup_id)
    newest = {b.backup_id for b in complete[-keep_last:]} if keep_last > 0 else set()
    keep, delete, reasons = [], [], {}
    for b in sorted(backups, key=lambda b: b.backup_id):
        if b.backup_id in protect or b.backup_id in newest:
            keep.append(b.backup_id)
        elif b.complete:
            delete.append(b.backup_id)
            reasons[b.backup_id] = f"older than the {keep_last} newest complete backups"
        elif now - b.taken_at > incomplete_grace:
            delete.append(b.backup_id)
            reasons[b.backup_id] = (
                f"incomplete (no manifest) and older than {_hours(incomplete_grace)}: "
                "a backup whose run died"
            )
        else:
            keep.append(b.backup_id)
    return RetentionPlan(keep=keep, delete=delete, reasons=reasons)


def _hours(d: timedelta) -> str:
    h = d.total_seconds() / 3600
    return f"{h:g} h"


class TableMismatch(BaseModel):
    table: str
    expected: TableFingerprint | None
    found: TableFingerprint | None

    def describe(self) -> str:
        if self.found is None:
            return f"{self.table}: missing from the restored database"
        if self.expected is None:
            return f"{self.table}: not in the backup's manifest"
        if self.found.rows != self.expected.rows:
            return f"{self.table}: {self.found.rows} rows restored, the backup had {self.expected.rows}"
        return f"{self.table}: checksum {self.found.checksum} differs from the backup's {self.expected.checksum}"


def compare_tables(
    expected: dict[str, TableFingerprint], found: dict[str, TableFingerprint]
) -> list[TableMismatch]:
    """Tables whose restored rows or checksum differ from the manifest (checksums compared only
    where both sides have one)."""
    out = []
    for table in sorted(expected):
        want, got = expected[table], found.get(table)
        if got is None or got.rows != want.rows or (
            want.checksum is not None and got.checksum is not None and got.checksum != want.checksum
        ):
            out.append(TableMismatch(table=table, expected=want, found=got))
    return out


def scratch_database_name(database: str, run_id: str) -> str:
    """``<database>_drill_<8 hex>``, cut so it fits PostgreSQL's 63 bytes."""
    suffix = "_drill_" + re.sub(r"[^0-9a-f]", "", run_id.lower())[:8].ljust(8, "0")
    return database[: 63 - len(suffix)] + suffix


def scratch_comment(run_id: str) -> str:
    return f"{SCRATCH_MARKER}, run {run_id}"


def is_scratch_left_behind(comment: str | None, run_id: str) -> bool:
    """A scratch database of another (dead) drill: ours by its comment, not this run's."""
    return bool(comment) and comment.startswith(SCRATCH_MARKER) and comment != scratch_comment(run_id)


class DrillVerdict(BaseModel):
    ok: bool
    problems: list[str]


def judge_drill(
    manifest: DumpManifest,
    sha256: str,
    size: int,
    restore_error: str | None,
    mismatches: list[TableMismatch],
    restore_s: float,
    rto_target_s: float | None,
) -> DrillVerdict:
    """Did the restore prove the backup? Integrity first: a corrupted object explains the rest."""
    problems = []
    if size != manifest.size:
        problems.append(
            f"the backup object has {size} bytes, its manifest says {manifest.size}: truncated "
            "or replaced"
        )
    if sha256 != manifest.sha256:
        problems.append(
            f"the backup object's sha256 {sha256[:16]}… differs from its manifest's "
            f"{manifest.sha256[:16]}…: the object is corrupted or was replaced"
        )
    if restore_error:
        problems.append(f"pg_restore failed: {restore_error}")
    problems += [m.describe() for m in mismatches]
    if rto_target_s is not None and restore_s > rto_target_s:
        problems.append(
            f"the restore took {restore_s:.1f}s, over the recovery time objective of "
            f"{rto_target_s:g}s"
        )
    return DrillVerdict(ok=not problems, problems=problems)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
