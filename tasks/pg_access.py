"""What a PostgreSQL access audit reads (seed 003 security: "monitor unauthorized access attempts,
audit log access"): roles and their powers, password expiry and hashing, failed logins from the
server log, sessions by role and client address; and the pure rules that turn them into findings.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

import psycopg
from prefect import task
from pydantic import BaseModel, Field

from blocks.postgres import PostgresDatabase
from tasks.postgres import pg_retries

# predefined roles that reach past table privileges: files, programs, every table
POWERFUL_ROLES = (
    "pg_execute_server_program",
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_write_all_data",
    "pg_read_all_data",
)


class RoleInfo(BaseModel):
    name: str
    superuser: bool
    can_login: bool
    create_role: bool
    create_db: bool
    replication: bool
    bypass_rls: bool
    valid_until: datetime | None
    password_hash: str | None = Field(
        None, description="'scram-sha-256', 'md5', 'none' or None when not readable (no superuser)."
    )
    member_of: list[str] = Field(default_factory=list)


class SessionGroup(BaseModel):
    role: str
    client: str = Field(description="Client address, or 'local' for a Unix socket.")
    application: str
    sessions: int
    oldest_s: float


class FailedLogin(BaseModel):
    at: str
    user: str
    client: str
    reason: str


@task(**pg_retries)
def read_roles(db: PostgresDatabase) -> list[RoleInfo]:
    """Every role (pg_roles), the predefined powerful roles each is a member of (directly or not),
    and, where the audit login may read pg_authid (superuser), how its password is hashed."""
    with db.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT r.rolname, r.rolsuper, r.rolcanlogin, r.rolcreaterole, r.rolcreatedb,"
            " r.rolreplication, r.rolbypassrls,"
            " CASE WHEN r.rolvaliduntil = 'infinity' THEN NULL ELSE r.rolvaliduntil END,"
            " ARRAY(SELECT p FROM unnest(%s::text[]) p WHERE pg_has_role(r.oid, p, 'MEMBER')"
            "       AND r.rolname <> p)"
            " FROM pg_roles r WHERE r.rolname !~ '^pg_' ORDER BY r.rolname",
            (list(POWERFUL_ROLES),),
        ).fetchall()
        hashes = _password_hashes(conn)
    return [
        RoleInfo(
            name=name,
            superuser=su,
            can_login=login,
            create_role=cr,
            create_db=cdb,
            replication=repl,
            bypass_rls=bypass,
            valid_until=until,
            password_hash=hashes.get(name),
            member_of=list(member_of),
        )
        for name, su, login, cr, cdb, repl, bypass, until, member_of in rows
    ]


def _password_hashes(conn: psycopg.Connection) -> dict[str, str]:
    """How each password is stored, never the hash itself; {} without the right to read it."""
    try:
        rows = conn.execute(
            "SELECT rolname, CASE WHEN rolpassword IS NULL THEN 'none'"
            " WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram-sha-256'"
            " WHEN rolpassword LIKE 'md5%' THEN 'md5' ELSE 'other' END FROM pg_authid"
        ).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        return {}
    return dict(rows)


@task(**pg_retries)
def role_sessions(db: PostgresDatabase, role: str | None = None) -> list[SessionGroup]:
    """Client sessions grouped by role, client address and application (pg_read_all_stats sees
    every role's)."""
    with db.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT usename, coalesce(host(client_addr), 'local'), coalesce(application_name, ''),"
            " count(*), coalesce(extract(epoch FROM max(now() - backend_start)), 0)"
            " FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid() AND (%s::text IS NULL OR usename = %s)"
            " GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1",
            (role, role),
        ).fetchall()
    return [
        SessionGroup(role=r or "?", client=c, application=a, sessions=n, oldest_s=round(float(age), 1))
        for r, c, a, n, age in rows
    ]


# --- failed logins from the server log ---------------------------------------------------------

# the log lines PostgreSQL writes for refused connections (English messages, lc_messages=C)
_FAILURES = [
    (re.compile(r'password authentication failed for user "(?P<user>[^"]*)"'), "wrong password"),
    (re.compile(r'role "(?P<user>[^"]*)" does not exist'), "unknown role"),
    (re.compile(r'no pg_hba\.conf entry for host "(?P<host>[^"]*)", user "(?P<user>[^"]*)"'),
     "not allowed from this address (pg_hba.conf)"),
    (re.compile(r'role "(?P<user>[^"]*)" is not permitted to log in'), "role cannot log in"),
    (re.compile(r'pg_hba\.conf rejects connection for host "(?P<host>[^"]*)", user "(?P<user>[^"]*)"'),
     "rejected by pg_hba.conf"),
]
_CLIENT = re.compile(
    r"(?<![\w.:])(?:(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:]+)\(\d+\)|(\[local\]))"
)
_RECEIVED = re.compile(r"connection received: host=(\S+)")
_PID = re.compile(r"\[(\d+)\]")
_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?(?: \w+)?)")


def parse_failed_logins(lines: list[str]) -> list[FailedLogin]:
    """Refused logins from PostgreSQL log lines (stderr format). The client address comes from
    the line itself (log_line_prefix with %r or %h) or from the same process's earlier
    "connection received" line (log_connections, log_line_prefix with %p)."""
    received: dict[str, str] = {}
    found = []
    for line in lines:
        pid = _PID.search(line)
        got = _RECEIVED.search(line)
        if got and pid:
            received[pid.group(1)] = got.group(1)
            continue
        if "FATAL" not in line:
            continue
        for pattern, reason in _FAILURES:
            m = pattern.search(line)
            if not m:
                continue
            groups = m.groupdict()
            client = groups.get("host")
            if not client:
                addr = _CLIENT.search(line)
                if addr:
                    client = addr.group(1) or addr.group(2)
                elif pid:
                    client = received.get(pid.group(1))
            t = _TIME.search(line)
            found.append(
                FailedLogin(
                    at=t.group(1) if t else "",
                    user=groups["user"],
                    client=client or "unknown",
                    reason=reason,
                )
            )
            break
    return found


class LogRead(BaseModel):
    source: str | None = Field(None, description="Where the lines came from; None: not readable.")
    lines: int = 0
    failures: list[FailedLogin] = Field(default_factory=list)
    note: str | None = None


def read_log_tail(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a log file on this host, as text (raises OSError)."""
    with path.open("rb") as f:
        size = path.stat().st_size
        f.seek(max(0, size - max_bytes))
        return f.read().decode(errors="replace")


@task(**pg_retries)
def read_failed_logins(
    db: PostgresDatabase, log_path: str | None, max_bytes: int = 16 * 1024 * 1024
) -> LogRead:
    """The tail of the server log: a file on this host (``log_path``, the operator's setting), or
    the server's current log through pg_read_file (logging_collector on; superuser or
    pg_read_server_files)."""
    text: str | None = None
    source = None
    if log_path:
        path = Path(log_path)
        try:
            text = read_log_tail(path, max_bytes)
            source = str(path)
        except OSError as exc:
            return LogRead(note=f"cannot read {path}: {exc.strerror}")
    else:
        with db.connect(autocommit=True) as conn:
            try:
                (current,) = conn.execute("SELECT pg_current_logfile()").fetchone()  # type: ignore[misc]
                if current is None:
                    return LogRead(
                        note="the server has no log file of its own (logging_collector off): "
                        "give log_path where this runbook runs on the database host"
                    )
                (size,) = conn.execute(
                    "SELECT (pg_stat_file(%s)).size", (current,)
                ).fetchone()  # type: ignore[misc]
                (text,) = conn.execute(
                    "SELECT pg_read_file(%s, %s, %s)",
                    (current, max(0, size - max_bytes), max_bytes),
                ).fetchone()  # type: ignore[misc]
                source = f"server:{current}"
            except psycopg.errors.InsufficientPrivilege:
                return LogRead(
                    note="the audit login may not read the server's log (needs "
                    "pg_read_server_files)"
                )
    lines = text.splitlines() if text else []
    return LogRead(source=source, lines=len(lines), failures=parse_failed_logins(lines))


# --- findings ---------------------------------------------------------------------------------


class Severity(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class Finding(BaseModel):
    severity: Severity
    subject: str
    finding: str


class AuditPolicy(BaseModel):
    allowed_superusers: list[str] = Field(default_factory=lambda: ["postgres"])
    failed_login_threshold: int = 5
    expiry_warning_days: int = 14
    allowed_powerful: list[str] = Field(default_factory=list)


def audit_findings(
    roles: list[RoleInfo],
    failures: list[FailedLogin],
    policy: AuditPolicy,
    now: datetime,
) -> list[Finding]:
    """The audit's findings, most severe first."""
    out: list[Finding] = []
    for r in roles:
        if r.superuser and r.name not in policy.allowed_superusers:
            out.append(Finding(severity=Severity.HIGH, subject=r.name, finding=(
                "is a superuser and not in the allowed list"
                + (" and can log in" if r.can_login else "")
            )))
        if not r.can_login:
            continue
        if r.password_hash == "md5":
            out.append(Finding(severity=Severity.MEDIUM, subject=r.name, finding=(
                "password stored as MD5 (weak, replayable): set it again with "
                "password_encryption = scram-sha-256"
            )))
        if r.valid_until is not None:
            left = r.valid_until - now
            if left < timedelta(0):
                out.append(Finding(severity=Severity.LOW, subject=r.name,
                                   finding=f"password expired on {r.valid_until:%Y-%m-%d}"))
            elif left < timedelta(days=policy.expiry_warning_days):
                out.append(Finding(severity=Severity.MEDIUM, subject=r.name, finding=(
                    f"password expires on {r.valid_until:%Y-%m-%d} (in {left.days} days)"
                )))
        powers = [p for p in r.member_of if p not in policy.allowed_powerful]
        if powers and not r.superuser:
            out.append(Finding(severity=Severity.MEDIUM, subject=r.name,
                               finding=f"can log in and is a member of {', '.join(powers)}"))
        if (r.bypass_rls or r.create_role) and not r.superuser:
            what = [w for w, on in (("BYPASSRLS", r.bypass_rls), ("CREATEROLE", r.create_role)) if on]
            out.append(Finding(severity=Severity.LOW, subject=r.name,
                               finding=f"can log in with {' and '.join(what)}"))
    by_client = Counter((f.user, f.client) for f in failures if f.reason != "unknown role")
    for (user, client), n in by_client.most_common():
        if n >= policy.failed_login_threshold:
            out.append(Finding(severity=Severity.HIGH, subject=f"{user} from {client}", finding=(
                f"{n} failed logins: guessing passwords or a client with a stale password"
            )))
    unknown = Counter(f.client for f in failures if f.reason == "unknown role")
    for client, n in unknown.items():
        if n >= policy.failed_login_threshold:
            out.append(Finding(severity=Severity.HIGH, subject=client,
                               finding=f"tried {n} logins as roles that do not exist (probing)"))
    order = {Severity.HIGH: 0, Severity.MEDIUM: 1, Severity.LOW: 2}
    return sorted(out, key=lambda f: (order[f.severity], f.subject))


def now_utc() -> datetime:
    return datetime.now(UTC)
