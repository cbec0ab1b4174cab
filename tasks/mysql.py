"""MySQL / MariaDB tasks: reachability, server state, disk, schema, freshness, lock blockers,
killing a blocker, clearing read_only, and a test write."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pymysql
from prefect import get_run_logger, task
from pydantic import BaseModel, Field

from blocks.mysql import MySQLDatabase
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.mysql_decisions import (
    Blocker,
    ConnectFailure,
    Freshness,
    SchemaDrift,
    WriteProbe,
    classify_connect_error,
    disk_low,
    group_blockers,
    quote_identifier,
    schema_drift,
)

# Lost the connection mid-statement, server gone away, lock wait timeout, deadlock victim: the
# next try may work. Refused connections, bad credentials and privilege errors would repeat
# (and the probe below reports them instead of raising).
_ER_LOCK_WAIT_TIMEOUT = 1205
_TRANSIENT_ERRNOS = frozenset({2006, 2013, _ER_LOCK_WAIT_TIMEOUT, 1213})


def is_transient(exc: BaseException) -> bool:
    """Whether another try of a statement may succeed."""
    return (
        isinstance(exc, pymysql.err.OperationalError)
        and bool(exc.args)
        and (exc.args[0] in _TRANSIENT_ERRNOS)
    )


mysql_retries = runbook_task_options(pymysql.err.OperationalError, when=is_transient)


def _errno(exc: BaseException) -> int | None:
    first = exc.args[0] if exc.args else None
    return first if isinstance(first, int) else None


def _message(exc: BaseException) -> str:
    return str(exc.args[1]) if len(exc.args) > 1 else str(exc)


def _one(conn: Any, query: str, args: Any = None) -> dict[str, Any] | None:
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(query, args)
        return cur.fetchone()


def _all(conn: Any, query: str, args: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(query, args)
        return list(cur.fetchall())


# --- server ------------------------------------------------------------------------------


class DiskState(BaseModel):
    """Free space of the data directory, where the runbook can see it."""

    datadir: str | None = None
    free_bytes: int | None = Field(None, description="None: not on the runbook's host (unknown).")
    total_bytes: int | None = None
    low: bool | None = Field(None, description="Below min_free_percent; None: unknown.")

    def describe(self) -> str:
        if self.free_bytes is None or not self.total_bytes:
            return (
                f"free space of {self.datadir or 'the data directory'} unknown (the server is "
                "not on the runbook's host)"
            )
        pct = 100.0 * self.free_bytes / self.total_bytes
        return f"{self.free_bytes / 2**30:.1f} GiB free ({pct:.0f}%) on {self.datadir}"


class ServerProbe(BaseModel):
    """A connection attempt and, when it worked, the server's state."""

    reachable: bool
    failure: ConnectFailure | None = None
    error: str | None = Field(None, description="The client's error text (never the password).")
    errno: int | None = None
    version: str | None = None
    hostname: str | None = None
    port: int | None = None
    server_uuid: str | None = Field(None, description="MySQL's @@server_uuid; MariaDB has none.")
    read_only: bool | None = None
    super_read_only: bool | None = Field(None, description="None: the server has no such variable.")
    uptime_s: int | None = None
    disk: DiskState = Field(default_factory=DiskState)

    @property
    def identity(self) -> str:
        """What the server says it is: server_uuid, else @@hostname:@@port."""
        return self.server_uuid or f"{self.hostname}:{self.port}"

    def describe(self) -> str:
        if not self.reachable:
            return f"{self.failure.value if self.failure else 'unreachable'}: {self.error}"
        ro = "read-only" if self.read_only else "writable"
        if self.super_read_only:
            ro += " (super_read_only)"
        return f"{self.version} on {self.hostname}, up {self.uptime_s}s, {ro}"


def _datadir_usage(datadir: str | None, hostname: str | None, min_free_percent: float) -> DiskState:
    """shutil.disk_usage of the data directory, only when the server runs on this host."""
    state = DiskState(datadir=datadir)
    if not datadir or hostname != socket.gethostname() or not Path(datadir).is_dir():
        return state
    usage = shutil.disk_usage(datadir)
    state.free_bytes, state.total_bytes = usage.free, usage.total
    state.low = disk_low(usage.free, usage.total, min_free_percent)
    return state


def _variable(conn: Any, name: str) -> Any:
    """A global variable's value, or None where the server has no such variable."""
    row = _one(conn, "SHOW GLOBAL VARIABLES LIKE %s", (name,))
    return row["Value"] if row else None


def _on(value: Any) -> bool | None:
    """A switch variable's value: None when absent; anything but OFF/0 is on (MariaDB 11's
    read_only also takes NO_LOCK and NO_LOCK_NO_ADMIN)."""
    return None if value is None else str(value).upper() not in ("OFF", "0")


_RETRIED_FAILURES = (
    ConnectFailure.REFUSED,
    ConnectFailure.TIMEOUT,
    ConnectFailure.LOST,
    ConnectFailure.TOO_MANY_CONNECTIONS,
)


@task(**runbook_task_options())
def probe_server(
    db: MySQLDatabase, min_free_percent: float = 5.0, attempts: int = 3
) -> ServerProbe:
    """Connect and read the server's state; a failed connection is classified, not raised.

    A refused, timed-out or dropped connection is tried ``attempts`` times, a second apart (a
    server restarting, a blip); credentials and database errors are final at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            conn = db.connect()
            break
        except pymysql.err.MySQLError as exc:
            errno, message = _errno(exc), _message(exc)
            failure = classify_connect_error(errno, message)
            get_run_logger().warning(
                "connecting to %s:%s failed (attempt %d): %s", db.host, db.port, attempt, failure
            )
            if failure not in _RETRIED_FAILURES or attempt == attempts:
                tries = f" ({attempt} attempts)" if attempt > 1 else ""
                return ServerProbe(
                    reachable=False, failure=failure, error=message + tries, errno=errno
                )
            time.sleep(1.0)
    with conn:
        row = _one(
            conn,
            "SELECT VERSION() AS version, @@hostname AS hostname, @@port AS port, "
            "@@datadir AS datadir, @@read_only AS read_only",
        )
        uptime = _one(conn, "SHOW GLOBAL STATUS LIKE 'Uptime'")
        probe = ServerProbe(
            reachable=True,
            version=row["version"],
            hostname=row["hostname"],
            port=row["port"],
            server_uuid=_variable(conn, "server_uuid"),
            read_only=_on(row["read_only"]),
            # MariaDB has no super_read_only: its READ_ONLY ADMIN privilege plays that part
            super_read_only=_on(_variable(conn, "super_read_only")),
            uptime_s=int(uptime["Value"]) if uptime else None,
        )
        probe.disk = _datadir_usage(row["datadir"], row["hostname"], min_free_percent)
    return probe


# --- table -------------------------------------------------------------------------------


class TableCheck(BaseModel):
    table: str
    exists: bool
    columns: dict[str, str] = Field(default_factory=dict, description="name -> COLUMN_TYPE")
    drift: SchemaDrift = Field(default_factory=SchemaDrift)
    checked_schema: bool = Field(False, description="Whether an expected schema was given.")

    def describe(self) -> str:
        if not self.exists:
            return f"table {self.table} does not exist"
        if not self.checked_schema:
            return f"table {self.table} exists ({len(self.columns)} columns; no expected schema)"
        return f"table {self.table}: {self.drift.describe()}"


@task(**mysql_retries)
def check_table(db: MySQLDatabase, table: str, expected_columns: dict[str, str]) -> TableCheck:
    """The table's columns from information_schema.COLUMNS against the expected schema."""
    with db.connect() as conn:
        rows = _all(
            conn,
            "SELECT COLUMN_NAME AS name, COLUMN_TYPE AS type FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (db.database, table),
        )
    columns = {r["name"]: r["type"] for r in rows}
    check = TableCheck(table=table, exists=bool(rows), columns=columns)
    if rows and expected_columns:
        check.checked_schema = True
        check.drift = schema_drift(expected_columns, columns)
    return check


@task(**mysql_retries)
def read_freshness(
    db: MySQLDatabase, table: str, timestamp_column: str, threshold_s: float
) -> Freshness:
    """Age of the newest row by ``timestamp_column``, by the server's clock (NOW(6)).

    DATETIME columns are compared in the session's time zone, as the writers stored them;
    an index on the column makes MAX() a single index read.
    """
    # identifiers pass quote_identifier's strict check; no value is formatted in
    column = quote_identifier(timestamp_column)
    source = f"{quote_identifier(db.database)}.{quote_identifier(table)}"
    age = f"TIMESTAMPDIFF(MICROSECOND, MAX({column}), NOW(6)) / 1e6"
    query = f"SELECT MAX({column}) AS newest, {age} AS age_s FROM {source}"  # noqa: S608
    with db.connect() as conn:
        try:
            row = _one(conn, query)
        except pymysql.err.OperationalError as exc:
            if _errno(exc) != _ER_LOCK_WAIT_TIMEOUT:
                raise
            # LOCK TABLES or DDL holds the table: the writers wait just the same
            return Freshness(
                rows=False, threshold_s=threshold_s, lock_wait_s=db.lock_wait_timeout_s
            )
    newest = row["newest"]
    if hasattr(newest, "isoformat"):
        # one fixed format, so two readings compare as text
        newest = newest.isoformat(sep=" ", timespec="microseconds")
    return Freshness(
        rows=newest is not None,
        newest=str(newest) if newest is not None else None,
        age_s=float(row["age_s"]) if row["age_s"] is not None else None,
        threshold_s=threshold_s,
    )


# --- blockers ----------------------------------------------------------------------------


class BlockerSurvey(BaseModel):
    """Who holds the locks writers to the database wait for."""

    supported: bool = Field(True, description="False: the server lacks the lock-wait tables.")
    blockers: list[Blocker] = Field(default_factory=list)
    metadata_lock_waiters: list[dict[str, Any]] = Field(
        default_factory=list, description="Threads waiting for a table/metadata/global lock."
    )
    own_thread: int | None = None

    def describe(self) -> str:
        if not self.supported:
            return "lock waits unknown (no information_schema.INNODB_LOCK_WAITS on this server)"
        parts = [b.describe() for b in self.blockers] or ["no writer waits for a row lock"]
        if self.metadata_lock_waiters:
            parts.append(f"{len(self.metadata_lock_waiters)} thread(s) wait for a table lock")
        return "; ".join(parts)


# Each lock wait on a table of the database: the blocking transaction, its session, and the
# waiting one. information_schema.INNODB_LOCK_WAITS/INNODB_LOCKS/INNODB_TRX exist on MariaDB and
# MySQL 5.7 (MySQL 8 moved them to performance_schema.data_lock_waits: not read here). Query
# texts are never read: they may hold secrets.
_LOCK_WAITS = """
SELECT b.trx_mysql_thread_id AS thread_id, CAST(b.trx_id AS CHAR) AS trx_id,
       CAST(b.trx_started AS CHAR) AS trx_started,
       TIMESTAMPDIFF(MICROSECOND, b.trx_started, NOW(6)) / 1e6 AS trx_age_s,
       b.trx_rows_modified, b.trx_rows_locked, b.trx_state = 'LOCK WAIT' AS waiting,
       p.USER AS user, p.HOST AS host, p.DB AS db, p.COMMAND AS command, p.TIME AS state_s,
       r.trx_mysql_thread_id AS waiter_thread_id,
       TIMESTAMPDIFF(MICROSECOND, r.trx_wait_started, NOW(6)) / 1e6 AS wait_s
FROM information_schema.INNODB_LOCK_WAITS w
JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id
JOIN information_schema.INNODB_TRX r ON r.trx_id = w.requesting_trx_id
JOIN information_schema.INNODB_LOCKS l ON l.lock_id = w.requested_lock_id
LEFT JOIN information_schema.PROCESSLIST p ON p.ID = b.trx_mysql_thread_id
WHERE l.lock_table LIKE %s AND b.trx_mysql_thread_id <> CONNECTION_ID()
"""

_TABLE_LOCK_WAITS = """
SELECT ID AS thread_id, USER AS user, HOST AS host, DB AS db, STATE AS state, TIME AS wait_s
FROM information_schema.PROCESSLIST
WHERE (STATE LIKE 'Waiting for%%metadata lock' OR STATE LIKE 'Waiting for table%%lock'
       OR STATE = 'Waiting for global read lock') AND (DB = %s OR DB IS NULL)
"""


def _has_lock_wait_tables(conn: Any) -> bool:
    row = _one(
        conn,
        "SELECT COUNT(*) AS n FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
        "'information_schema' AND TABLE_NAME IN ('INNODB_LOCK_WAITS', 'INNODB_LOCKS')",
    )
    return row["n"] == 2


def _lock_table_pattern(database: str) -> str:
    """LIKE pattern for INNODB_LOCKS.lock_table ('`db`.`table`') of any table in ``database``."""
    escaped = database.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"`{escaped}`.%"


def _survey(conn: Any, database: str) -> BlockerSurvey:
    own = _one(conn, "SELECT CONNECTION_ID() AS id")["id"]
    if not _has_lock_wait_tables(conn):
        return BlockerSurvey(supported=False, own_thread=own)
    rows = _all(conn, _LOCK_WAITS, (_lock_table_pattern(database),))
    waits = _all(conn, _TABLE_LOCK_WAITS, (database,))
    return BlockerSurvey(blockers=group_blockers(rows), metadata_lock_waiters=waits, own_thread=own)


@task(**mysql_retries)
def find_blockers(db: MySQLDatabase) -> BlockerSurvey:
    """Sessions holding the InnoDB locks that writers to the block's database wait for.

    Needs PROCESS to see other users' transactions and sessions.
    """
    with db.connect() as conn:
        survey = _survey(conn, db.database)
    get_run_logger().info("blockers: %s", survey.describe())
    return survey


class KillResult(ChangeSet):
    killed: list[int] = Field(default_factory=list)
    spared: list[int] = Field(default_factory=list, description="No longer blocking at re-check.")


# A killed thread's rollback takes a moment; this only bounds the wait for that reading.
_KILL_WAIT_S = 5.0


@task(**mysql_retries)
def kill_blocking_session(
    db: MySQLDatabase, thread_id: int, dry_run: bool, trx_id: str | None = None
) -> KillResult:
    """KILL the session ``thread_id`` if it still blocks writers (in transaction ``trx_id``).

    Re-checks at the last moment: a session that committed, rolled back or went away since it
    was listed is left alone, and so is one that now blocks in another transaction than the
    one a human approved. Idempotent: a re-run finds it gone and kills nothing.
    """
    with db.connect() as conn:
        survey = _survey(conn, db.database)
        blocker = next((b for b in survey.blockers if b.thread_id == thread_id), None)
        change = Change(
            action="kill_connection",
            target=f"thread {thread_id}",
            detail={}
            if blocker is None
            else {
                "user": blocker.user,
                "host": blocker.host,
                "trx_age_s": round(blocker.trx_age_s, 1),
                "rows_modified": blocker.trx_rows_modified,
                "waiters": blocker.waiters,
            },
        )
        still = blocker is not None and (trx_id is None or blocker.trx_id == trx_id)
        result = KillResult(dry_run=dry_run, planned=[change] if still else [])
        if not still:
            result.spared.append(thread_id)
            result.notes.append(f"thread {thread_id} no longer blocks the writers")
            return result
        if dry_run:
            return result
        try:
            with conn.cursor() as cur:
                cur.execute("KILL CONNECTION %s", (thread_id,))
        except pymysql.err.OperationalError as exc:
            if _errno(exc) != 1094:  # ER_NO_SUCH_THREAD: it ended on its own meanwhile
                raise
        deadline = time.monotonic() + _KILL_WAIT_S
        while time.monotonic() < deadline:
            alive = _one(
                conn,
                "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST WHERE ID = %s",
                (thread_id,),
            )["n"]
            if not alive:
                break
            time.sleep(0.05)
        result.killed.append(thread_id)
        after = {"present": bool(alive)}
        result.applied.append(change.model_copy(update={"detail": after}))
    return result


class WritableResult(ChangeSet):
    pass


@task(**mysql_retries)
def set_writable(db: MySQLDatabase, dry_run: bool) -> WritableResult:
    """SET GLOBAL read_only=OFF (and super_read_only where it exists); no-op when writable.

    Needs READ_ONLY ADMIN on MariaDB 10.11 (SUPER or SYSTEM_VARIABLES_ADMIN on MySQL). Clears
    the running value only: a read_only in my.cnf comes back at the next restart.
    """
    with db.connect() as conn:
        read_only = _on(_variable(conn, "read_only"))
        super_ro = _on(_variable(conn, "super_read_only"))
        planned = []
        # super_read_only=ON forces read_only ON: it goes first
        if super_ro:
            planned.append(
                Change(
                    action="set_global",
                    target="super_read_only",
                    detail={"from": "ON", "to": "OFF"},
                )
            )
        if read_only:
            planned.append(
                Change(action="set_global", target="read_only", detail={"from": "ON", "to": "OFF"})
            )
        result = WritableResult(dry_run=dry_run, planned=planned)
        if dry_run or not planned:
            return result
        with conn.cursor() as cur:
            for change in planned:
                # the variable name is one of two constants above, never input
                cur.execute(f"SET GLOBAL {change.target} = OFF")
        after_ro = _on(_variable(conn, "read_only"))
        after_super = _on(_variable(conn, "super_read_only"))
        now = {"read_only": after_ro, "super_read_only": after_super}
        result.applied = [
            c.model_copy(update={"detail": {"now": "ON" if now[c.target] else "OFF"}})
            for c in planned
        ]
    return result


# --- writing -----------------------------------------------------------------------------


@task(**mysql_retries)
def probe_write(db: MySQLDatabase, canary_table: str | None, commit: bool) -> WriteProbe:
    """INSERT a row of defaults into the canary table; rolled back unless ``commit``.

    The canary table's columns all need defaults (e.g. ``id`` AUTO_INCREMENT and ``at``
    TIMESTAMP DEFAULT CURRENT_TIMESTAMP). A rolled-back insert still goes through the write
    path (disk full, read-only, lock waits) and leaves nothing behind, so dry-runs use it too.
    Note: a runbook user with READ_ONLY ADMIN (or SUPER on MySQL) writes despite read_only:
    read @@read_only to learn whether the writers can.
    """
    if not canary_table:
        return WriteProbe()
    table = f"{quote_identifier(db.database)}.{quote_identifier(canary_table)}"
    with db.connect() as conn:
        try:
            with conn.cursor() as cur:
                conn.begin()
                cur.execute(f"INSERT INTO {table} () VALUES ()")  # noqa: S608 - quoted identifiers
            if commit:
                conn.commit()
            else:
                conn.rollback()
        except pymysql.err.MySQLError as exc:
            if isinstance(exc, pymysql.err.OperationalError) and _errno(exc) in (2006, 2013):
                raise
            return WriteProbe(attempted=True, ok=False, errno=_errno(exc), error=_message(exc))
    return WriteProbe(attempted=True, ok=True)
