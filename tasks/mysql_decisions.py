"""Pure decisions of the mysql-not-writing runbook: no I/O, each tested as a data table."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, Field

# --- names -------------------------------------------------------------------------------

# Unquoted MySQL identifiers, minus '$' (deprecated as a first character) and at most 64 long.
# Names come from parameters and alert labels: anything else is refused before it reaches SQL.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def identifier_problem(name: str) -> str | None:
    """Why ``name`` is not a plain MySQL identifier (letters, digits, '_'), or None."""
    if not _IDENTIFIER.fullmatch(name):
        return f"{name[:80]!r} is not a MySQL identifier (a letter or '_', then up to 63 letters, digits or '_')"
    return None


def quote_identifier(name: str) -> str:
    """``name`` in backticks, after the strict check above (so it cannot hold a backtick)."""
    problem = identifier_problem(name)
    if problem:
        raise ValueError(problem)
    return f"`{name}`"


# --- connecting --------------------------------------------------------------------------


class ConnectFailure(StrEnum):
    REFUSED = "connection refused"
    UNRESOLVED = "host name not resolved"
    TIMEOUT = "timed out"
    AUTH_FAILED = "authentication failed"
    UNKNOWN_DATABASE = "unknown database"
    DATABASE_DENIED = "access to the database denied"
    TOO_MANY_CONNECTIONS = "too many connections"
    LOST = "connection lost"
    OTHER = "other error"


# Client errors (CR_*) and server errors (ER_*) PyMySQL raises while connecting
_CR_CONN_HOST_ERROR = 2003  # "Can't connect to MySQL server on 'h' (<socket error>)"
_CR_SERVER_LOST = 2013  # "Lost connection to MySQL server during query (<socket error>)"
_CR_SERVER_GONE = 2006
_ER_ACCESS_DENIED = 1045
_ER_DBACCESS_DENIED = 1044
_ER_BAD_DB = 1049
_ER_CON_COUNT = 1040
_ER_TOO_MANY_USER_CONNECTIONS = 1203


def classify_connect_error(errno: int | None, message: str) -> ConnectFailure:
    """Name why a connection failed, from PyMySQL's error code and text.

    PyMySQL wraps every socket error in 2003 (connecting) or 2013 (the handshake): the socket
    error's text tells refused from timed out from unresolved.
    """
    text = message.lower()
    if errno == _ER_ACCESS_DENIED:
        return ConnectFailure.AUTH_FAILED
    if errno == _ER_BAD_DB:
        return ConnectFailure.UNKNOWN_DATABASE
    if errno == _ER_DBACCESS_DENIED:
        return ConnectFailure.DATABASE_DENIED
    if errno in (_ER_CON_COUNT, _ER_TOO_MANY_USER_CONNECTIONS):
        return ConnectFailure.TOO_MANY_CONNECTIONS
    if errno in (_CR_CONN_HOST_ERROR, _CR_SERVER_LOST, _CR_SERVER_GONE, None):
        if "timed out" in text:
            return ConnectFailure.TIMEOUT
        if "refused" in text:
            return ConnectFailure.REFUSED
        if (
            "name or service not known" in text
            or "nodename nor servname" in text
            or ("temporary failure in name resolution" in text)
        ):
            return ConnectFailure.UNRESOLVED
        if errno in (_CR_SERVER_LOST, _CR_SERVER_GONE):
            return ConnectFailure.LOST
        if errno == _CR_CONN_HOST_ERROR:
            return ConnectFailure.REFUSED if "errno 111" in text else ConnectFailure.OTHER
    return ConnectFailure.OTHER


# --- disk --------------------------------------------------------------------------------

_ER_RECORD_FILE_FULL = 1114  # "The table 't' is full"
_ER_DISK_FULL = 1021  # "Disk full (%s); waiting for someone to free some space..."
_ER_GET_ERRNO = 1030  # "Got error 28 'No space left on device' from storage engine"
_ER_ERROR_ON_WRITE = 3  # "Error writing file '...' (Errcode: 28 ...)"
_ENOSPC = re.compile(r"\b28\b|no space left")


def is_disk_full_error(errno: int | None, message: str) -> bool:
    """Whether a write failed because the server's disk (or the tablespace) is full."""
    if errno in (_ER_RECORD_FILE_FULL, _ER_DISK_FULL):
        return True
    return errno in (_ER_GET_ERRNO, _ER_ERROR_ON_WRITE) and bool(_ENOSPC.search(message.lower()))


_ER_READ_ONLY = 1290  # "The MySQL server is running with the --read-only option ..."


class WriteProbe(BaseModel):
    """A test write (insert, then rolled back) and what became of it."""

    attempted: bool = Field(False, description="False when no canary table was given.")
    ok: bool = False
    errno: int | None = None
    error: str | None = None

    @property
    def disk_full(self) -> bool:
        return self.errno is not None and is_disk_full_error(self.errno, self.error or "")

    @property
    def read_only(self) -> bool:
        return self.errno == _ER_READ_ONLY

    def describe(self) -> str:
        if not self.attempted:
            return "no canary table: no test write"
        return (
            "test write succeeded" if self.ok else f"test write failed ({self.errno}: {self.error})"
        )


def disk_low(
    free_bytes: int | None, total_bytes: int | None, min_free_percent: float
) -> bool | None:
    """Whether the data directory's file system is below the free-space floor; None: unknown."""
    if free_bytes is None or not total_bytes:
        return None
    return 100.0 * free_bytes / total_bytes < min_free_percent


# --- schema ------------------------------------------------------------------------------

_INT_WIDTH = re.compile(r"^(tinyint|smallint|mediumint|int|bigint)\(\d+\)")
_ALIASES = {
    "integer": "int",
    "bool": "tinyint(1)",
    "boolean": "tinyint(1)",
    "double precision": "double",
    "real": "double",
    "dec": "decimal",
    "numeric": "decimal",
}


def normalize_type(column_type: str) -> str:
    """A column type as information_schema.COLUMNS.COLUMN_TYPE spells it, comparable.

    Lower case, single spaces, aliases resolved; integer display widths dropped (MySQL 8.0.19
    stopped showing them, MariaDB still does) except tinyint(1), the boolean.
    """
    text = " ".join(column_type.lower().split())
    text = re.sub(r"\s*\(\s*", "(", re.sub(r"\s*\)", ")", re.sub(r"\s*,\s*", ",", text)))
    for alias, name in _ALIASES.items():
        if text == alias or text.startswith(alias + "(") or text.startswith(alias + " "):
            text = name + text[len(alias) :]
            break
    if text.startswith("tinyint(1)"):
        return text
    return _INT_WIDTH.sub(r"\1", text)


class SchemaDrift(BaseModel):
    """Columns of a table against the schema the writers expect."""

    missing: list[str] = Field(default_factory=list, description="Expected, not in the table.")
    extra: list[str] = Field(default_factory=list, description="In the table, not expected.")
    type_differs: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="column -> {expected, actual} column types."
    )

    @property
    def drifted(self) -> bool:
        return bool(self.missing or self.extra or self.type_differs)

    def describe(self) -> str:
        if not self.drifted:
            return "columns match the expected schema"
        parts = []
        if self.missing:
            parts.append(f"missing column(s) {', '.join(self.missing)}")
        if self.extra:
            parts.append(f"extra column(s) {', '.join(self.extra)}")
        for name, types in self.type_differs.items():
            parts.append(f"{name} is {types['actual']}, expected {types['expected']}")
        return "; ".join(parts)


def schema_drift(expected: dict[str, str], actual: dict[str, str]) -> SchemaDrift:
    """Compare ``actual`` columns (name -> COLUMN_TYPE) with ``expected`` (name -> type).

    Column names compare case-insensitively (as MySQL does); an extra column is drift too (an
    INSERT without a column list then fails), though a nullable or defaulted one harms nobody:
    the report names it and the decision escalates only on missing columns and changed types.
    """
    want = {k.lower(): (k, v) for k, v in expected.items()}
    have = {k.lower(): (k, v) for k, v in actual.items()}
    drift = SchemaDrift(
        missing=[want[k][0] for k in want if k not in have],
        extra=[have[k][0] for k in have if k not in want],
    )
    for key in want.keys() & have.keys():
        exp, act = want[key][1], have[key][1]
        if normalize_type(exp) != normalize_type(act):
            drift.type_differs[want[key][0]] = {"expected": exp, "actual": act}
    drift.type_differs = dict(sorted(drift.type_differs.items()))
    return drift


# --- blockers ----------------------------------------------------------------------------


class Blocker(BaseModel):
    """A session whose InnoDB transaction holds locks writers wait for."""

    thread_id: int = Field(description="The session's thread (connection) id: what KILL takes.")
    trx_id: str = Field(description="Its InnoDB transaction id.")
    trx_started: str | None = Field(None, description="When the transaction began (server time).")
    trx_age_s: float = Field(0, description="How long its transaction has been open.")
    trx_rows_modified: int = Field(0, description="Rows it changed: rolled back if killed.")
    trx_rows_locked: int = 0
    waiting: bool = Field(False, description="Itself waiting for a lock (not a root blocker).")
    user: str | None = None
    host: str | None = None
    db: str | None = None
    command: str | None = Field(None, description="PROCESSLIST COMMAND: Sleep = idle.")
    state_s: float | None = Field(None, description="PROCESSLIST TIME: seconds in this command.")
    waiters: list[int] = Field(default_factory=list, description="Thread ids waiting on it.")
    longest_wait_s: float = 0

    @property
    def in_transaction(self) -> bool:
        """Inside an open transaction: killing it rolls back its uncommitted work."""
        return bool(self.trx_id)

    @property
    def idle(self) -> bool:
        return self.command == "Sleep"

    def label(self) -> str:
        return f"thread {self.thread_id} ({self.user}@{self.host})"

    def describe(self) -> str:
        doing = "idle" if self.idle else f"running ({self.command})"
        return (
            f"{self.label()} blocks {len(self.waiters)} writer(s) "
            f"(thread(s) {', '.join(map(str, self.waiters))}, longest wait {self.longest_wait_s:.0f}s); "
            f"{doing} inside a transaction open for {self.trx_age_s:.0f}s that changed "
            f"{self.trx_rows_modified} row(s)"
        )


def group_blockers(rows: list[dict]) -> list[Blocker]:
    """One Blocker per blocking thread from lock-wait rows (blocker columns + waiter columns)."""
    by_thread: dict[int, Blocker] = {}
    for row in rows:
        thread = int(row["thread_id"])
        blocker = by_thread.get(thread)
        if blocker is None:
            fields = {k: v for k, v in row.items() if k in Blocker.model_fields and k != "waiters"}
            blocker = by_thread[thread] = Blocker(**fields)
        waiter = int(row["waiter_thread_id"])
        if waiter not in blocker.waiters:
            blocker.waiters.append(waiter)
        blocker.longest_wait_s = max(blocker.longest_wait_s, float(row.get("wait_s") or 0))
    return sorted(by_thread.values(), key=lambda b: (-len(b.waiters), -b.trx_age_s))


def root_blockers(blockers: list[Blocker]) -> list[Blocker]:
    """Blockers not themselves waiting: killing one that waits only moves the queue."""
    return [b for b in blockers if not b.waiting]


def kill_danger(blocker: Blocker) -> str | None:
    """Why killing ``blocker`` needs a human: its transaction's work is rolled back."""
    if not blocker.in_transaction:
        return None
    return (
        f"{blocker.label()} is inside a transaction open for {blocker.trx_age_s:.0f}s that "
        f"changed {blocker.trx_rows_modified} row(s) and locks {blocker.trx_rows_locked}: KILL "
        "rolls all of it back, and its application sees its connection dropped"
    )


# --- freshness ---------------------------------------------------------------------------


class Freshness(BaseModel):
    """The newest row of the watched table, by its timestamp column."""

    rows: bool = Field(description="Whether the table has any row with a timestamp.")
    newest: str | None = Field(None, description="The newest timestamp, as the server shows it.")
    age_s: float | None = Field(None, description="Seconds since it, by the server's clock.")
    threshold_s: float
    lock_wait_s: float | None = Field(
        None, description="Set when reading the table waited this long for a lock and gave up."
    )

    @property
    def fresh(self) -> bool:
        return self.age_s is not None and self.age_s <= self.threshold_s

    def describe(self) -> str:
        if self.lock_wait_s is not None:
            return (
                f"newest row unknown: reading the table waited over {self.lock_wait_s:g}s for a "
                "lock (LOCK TABLES or DDL holds it; the writers wait too)"
            )
        if not self.rows:
            return "the table has no rows"
        return f"newest row {self.age_s:.0f}s old ({self.newest}), threshold {self.threshold_s:g}s"


# --- the decision ------------------------------------------------------------------------

ROOT_CAUSES = (
    "MySQL service crash (the process is gone: check `systemctl status mysql` and the error log)",
    "disk full (the data directory's file system, or the tablespace)",
    "incorrect JDBC configuration (host, port, database, user or password of the writers)",
)
RESTART_FOLLOW_UP = (
    "Restarting MySQL is the last resort, only with approval, never automatic: if the server is "
    "down or hung, a DBA restarts it (`systemctl restart mysql`) after reading its error log."
)


class Remedy(StrEnum):
    NONE = "none"
    CLEAR_READ_ONLY = "clear read_only"
    KILL_BLOCKERS = "kill blocking sessions"
    ESCALATE = "escalate"


class Observation(BaseModel):
    """What the runbook saw, as the decision needs it."""

    connect_failure: ConnectFailure | None = None
    connect_error: str | None = None
    read_only: bool = False
    table_exists: bool = True
    drift: SchemaDrift = Field(default_factory=SchemaDrift)
    disk_full: bool = Field(False, description="A write failed for space, or the disk is low.")
    blockers: list[Blocker] = Field(default_factory=list)
    metadata_lock_waiters: int = Field(
        0, description="Writers waiting for a metadata lock (LOCK TABLES, DDL): no known holder."
    )
    fresh: bool | None = Field(None, description="None when freshness is not watched.")
    lock_waits_known: bool = Field(True, description="False: the server's lock waits unread.")


class Decision(BaseModel):
    remedy: Remedy
    reason: str
    follow_ups: list[str] = Field(default_factory=list)


def decide_write_fix(obs: Observation, *, must_be_writable: bool) -> Decision:
    """The decision table of mysql-not-writing, first match wins.

    Unreachable, wrong credentials, a missing table, schema drift and a full disk need a human
    (the seed's restart is never automatic); read_only is cleared only where the server must
    be writable; blocking sessions are killed (a human approves the rollback).
    """
    causes = "; ".join(ROOT_CAUSES)
    if obs.connect_failure is ConnectFailure.AUTH_FAILED:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason="authentication failed: validate credentials (the user and password the "
            "writers and the runbook use, and the host they may connect from)",
            follow_ups=["Validate the writers' JDBC credentials against the server's users."],
        )
    if obs.connect_failure in (ConnectFailure.UNKNOWN_DATABASE, ConnectFailure.DATABASE_DENIED):
        return Decision(
            remedy=Remedy.ESCALATE,
            reason=f"{obs.connect_failure.value}: validate the configured database name and "
            "the user's grants (incorrect JDBC configuration)",
            follow_ups=["Validate the JDBC URL's database and the user's grants on it."],
        )
    if obs.connect_failure is not None:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason=f"MySQL unreachable ({obs.connect_failure.value}: {obs.connect_error}); "
            f"likely causes: {causes}",
            follow_ups=[RESTART_FOLLOW_UP],
        )
    if not obs.table_exists:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason="the table does not exist: validate the table schema (dropped or renamed?)",
        )
    if obs.drift.missing or obs.drift.type_differs:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason=f"schema drift: {obs.drift.describe()}; the writers' inserts do not fit "
            "the table: fix the table or the writers",
        )
    if obs.disk_full:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason="disk full: writes fail for lack of space; free space or grow the volume "
            "(the runbook deletes no data)",
            follow_ups=[
                "Free space on the MySQL data volume or grow it; then re-run this runbook."
            ],
        )
    if obs.read_only:
        if must_be_writable:
            return Decision(
                remedy=Remedy.CLEAR_READ_ONLY,
                reason="the server is read-only and must be writable: clearing read_only "
                "(needs approval)",
            )
        return Decision(
            remedy=Remedy.ESCALATE,
            reason="the server is read-only (a replica, a failover in progress, or set by "
            "hand?): not cleared, must_be_writable is off",
            follow_ups=["If this server is the primary, re-run with must_be_writable."],
        )
    roots = root_blockers(obs.blockers)
    if roots:
        return Decision(
            remedy=Remedy.KILL_BLOCKERS,
            reason=f"{len(roots)} session(s) block the writers: killing "
            + ", ".join(b.label() for b in roots),
        )
    if obs.blockers or obs.metadata_lock_waiters:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason="writers wait for locks whose holder the runbook cannot name "
            f"({obs.metadata_lock_waiters} wait for a metadata lock)",
        )
    if obs.fresh is False and not obs.lock_waits_known:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason="no new rows; the server is reachable, writable and its schema as expected, "
            "but its lock waits could not be read (no information_schema.INNODB_LOCK_WAITS, as "
            "on MySQL 8: see performance_schema.data_lock_waits): check for blocking sessions "
            f"and the writers; {causes}",
        )
    if obs.fresh is False:
        return Decision(
            remedy=Remedy.ESCALATE,
            reason="no new rows, yet the server accepts writes (reachable, writable, no lock "
            f"waits, schema as expected): the writers are not sending; check them; {causes}",
        )
    return Decision(remedy=Remedy.NONE, reason="the server accepts writes and rows are fresh")
