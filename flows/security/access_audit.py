"""Runbook: monthly access audit of a PostgreSQL or MySQL/MariaDB server (seed 003 security:
"monitor unauthorized access attempts, audit log access").

Reads the roles or accounts and what they may do (superusers, logins, powerful predefined roles or
global privileges, password expiry and hashing, anonymous and password-less accounts), the refused
logins in the server log, and who is connected from where; turns them into findings by a policy;
reports. It changes nothing. High findings escalate, so a person looks at them.
"""

from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from blocks.mysql import MySQLDatabase
from blocks.postgres import PostgresDatabase
from runbooks.errors import Escalation
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from tasks.mysql_access import (
    POWERFUL_PRIVILEGES,
    MySQLAccount,
    MySQLAuditPolicy,
    is_allowed,
    mysql_audit_findings,
    mysql_sessions,
    read_accounts,
    read_mysql_failed_logins,
)
from tasks.pg_access import (
    AuditPolicy,
    Finding,
    LogRead,
    RoleInfo,
    SessionGroup,
    Severity,
    audit_findings,
    now_utc,
    read_failed_logins,
    read_roles,
    role_sessions,
)

RUNBOOK = "access-audit"


class AccessAuditParams(RunbookParams):
    """Run form of the access-audit runbook."""

    engine: Literal["postgres", "mysql"] = Field(
        "postgres",
        description="postgres: a 'Runbooks PostgreSQL Database' block's server; mysql: a "
        "'Runbooks MySQL Database' block's MySQL or MariaDB server.",
    )
    db_block: BlockName = Field(
        "default",
        description="Block of the server to audit. PostgreSQL: its role needs pg_read_all_stats "
        "(and pg_read_server_files to read the log through the server, superuser to see how "
        "passwords are hashed). MySQL/MariaDB: its user needs SELECT on the mysql schema and "
        "PROCESS (to see every account and session).",
    )
    log_path: str | None = Field(
        None,
        description="The server's log file on this host (the runbook runs on the database host); "
        "empty: PostgreSQL's own log through pg_read_file (logging_collector on), or the file "
        "in MySQL's @@log_error.",
    )
    allowed_superusers: list[str] | None = Field(
        None,
        description="Roles (PostgreSQL) or accounts with SUPER (MySQL: user, or user@host) "
        "expected to be superusers; empty: postgres, or root.",
    )
    allowed_powerful: list[str] = Field(
        default_factory=list,
        description="PostgreSQL: predefined roles (pg_read_all_data, ...) whose members are "
        "expected. MySQL: accounts (user, or user@host) expected to hold FILE, PROCESS, "
        "SHUTDOWN, CREATE USER or GRANT OPTION.",
    )
    failed_login_threshold: int = Field(
        5,
        ge=1,
        le=100_000,
        description="Refused logins of one user from one address (in the log read) that make a "
        "high finding.",
    )
    expiry_warning_days: int = Field(
        14, ge=0, le=365, description="Warn about passwords expiring within this many days."
    )


class AccessAuditSummary(BaseModel):
    outcome: Outcome
    findings: list[Finding] = Field(default_factory=list)
    roles: list[RoleInfo] = Field(default_factory=list)
    accounts: list[MySQLAccount] = Field(default_factory=list)
    sessions: list[SessionGroup] = Field(default_factory=list)
    log: LogRead | None = None
    report: str


@flow(
    name=RUNBOOK,
    description="Audit a PostgreSQL or MySQL/MariaDB server's access: superusers, logins and "
    "their powers, password expiry and hashing, refused logins in the server log, sessions by "
    "role and address.",
)
@ends_as_reported
def access_audit(params: AccessAuditParams) -> AccessAuditSummary:
    audit = _Audit()
    with incident_report(
        runbook=RUNBOOK, title="Database Access Audit", severity="P4", params=params
    ) as report:
        if params.engine == "mysql":
            _audit_mysql(params, report, audit)
        else:
            _audit_postgres(params, report, audit)
    return AccessAuditSummary(
        outcome=report.outcome or Outcome.FAILED,
        findings=audit.findings,
        roles=audit.roles,
        accounts=audit.accounts,
        sessions=audit.sessions,
        log=audit.log,
        report=report.to_markdown(),
    )


class _Audit(BaseModel):
    """What the audit read, kept for the run's result even when it escalates."""

    findings: list[Finding] = Field(default_factory=list)
    roles: list[RoleInfo] = Field(default_factory=list)
    accounts: list[MySQLAccount] = Field(default_factory=list)
    sessions: list[SessionGroup] = Field(default_factory=list)
    log: LogRead | None = None


def _audit_postgres(params: AccessAuditParams, report: IncidentReport, audit: _Audit) -> None:
    db = PostgresDatabase.load(params.db_block)
    audit.roles = roles = read_roles(db)
    logins = [r for r in roles if r.can_login]
    report.evidence("roles that can log in", [_role_row(r) for r in logins])
    supers = [r.name for r in roles if r.superuser]
    report.check(
        "superusers are the allowed ones",
        set(supers) <= set(params.allowed_superusers or ["postgres"]),
        ", ".join(supers) or "none",
    )
    audit.sessions = role_sessions(db)
    _sessions_evidence(report, audit.sessions)
    audit.log = log = read_failed_logins(db, params.log_path)
    _log_evidence(report, log)
    policy = AuditPolicy(
        allowed_superusers=params.allowed_superusers or ["postgres"],
        failed_login_threshold=params.failed_login_threshold,
        expiry_warning_days=params.expiry_warning_days,
        allowed_powerful=params.allowed_powerful,
    )
    audit.findings = audit_findings(roles, log.failures, policy, now_utc())
    _conclude(
        report,
        audit,
        f"{db.host}:{db.port}",
        f"{len(logins)} roles can log in ({len(supers)} superuser(s))",
    )


def _audit_mysql(params: AccessAuditParams, report: IncidentReport, audit: _Audit) -> None:
    db = MySQLDatabase.load(params.db_block)
    accounts, default_lifetime = read_accounts(db)
    audit.accounts = accounts
    usable = [a for a in accounts if not a.locked]
    report.evidence(
        "accounts that can log in (not locked)",
        [_account_row(a) for a in usable] or [{"account": "none"}],
    )
    if len(usable) < len(accounts):
        report.step(
            f"{len(accounts) - len(usable)} locked account(s) left out: "
            + ", ".join(a.name for a in accounts if a.locked)
        )
    policy = MySQLAuditPolicy(
        allowed_superusers=params.allowed_superusers or ["root"],
        allowed_powerful=params.allowed_powerful,
        failed_login_threshold=params.failed_login_threshold,
        expiry_warning_days=params.expiry_warning_days,
    )
    supers = [a.name for a in usable if a.superuser]
    report.check(
        "accounts with SUPER are the allowed ones",
        all(is_allowed(a, policy.allowed_superusers) for a in usable if a.superuser),
        ", ".join(supers) or "none",
    )
    audit.sessions = mysql_sessions(db)
    _sessions_evidence(report, audit.sessions)
    log, denied = read_mysql_failed_logins(db, params.log_path)
    audit.log = log
    if denied is not None:
        report.evidence(
            "refused logins counted by the server since it started (Access_denied_errors)",
            [{"refused logins": denied}],
        )
    _log_evidence(report, log)
    audit.findings = mysql_audit_findings(
        accounts, log.failures, policy, default_lifetime, now_utc()
    )
    _conclude(
        report,
        audit,
        f"{db.host}:{db.port}",
        f"{len(usable)} accounts can log in ({len(supers)} with SUPER)",
    )


def _sessions_evidence(report: IncidentReport, sessions: list[SessionGroup]) -> None:
    report.evidence(
        "sessions by role and client address",
        [s.model_dump() for s in sessions] or [{"role": "none"}],
    )


def _log_evidence(report: IncidentReport, log: LogRead) -> None:
    if log.source is None:
        report.step(f"refused logins not read: {log.note}")
    else:
        report.evidence(
            f"refused logins in {log.source} ({log.lines} lines read)",
            [f.model_dump() for f in log.failures[-50:]] or [{"refused logins": "none"}],
        )


def _conclude(report: IncidentReport, audit: _Audit, server: str, who: str) -> None:
    """Findings into the report; escalate the high ones, or finish."""
    findings, log = audit.findings, audit.log
    report.evidence("findings", [f.model_dump() for f in findings] or [{"finding": "none"}])
    high = [f for f in findings if f.severity is Severity.HIGH]
    report.check("no high findings", not high, "; ".join(_line(f) for f in high) or "none")
    _follow_ups(report, findings)
    if log is not None and log.source is None:
        report.follow_ups.append(
            f"Make the server's log readable to the audit ({log.note}) so refused logins are "
            "audited too."
        )
    if high:
        raise Escalation(
            f"access audit of {server}: {len(high)} high finding(s): "
            + "; ".join(_line(f) for f in high[:5])
        )
    report.finish(
        Outcome.NO_ACTION_NEEDED,
        f"Audited {server}: {who}, {sum(s.sessions for s in audit.sessions)} sessions, "
        + (f"{len(log.failures)} refused logins in the log, " if log and log.source else "")
        + (f"{len(findings)} finding(s), none high." if findings else "no findings."),
    )


def _account_row(a: MySQLAccount) -> dict:
    lifetime = (
        "server default"
        if a.password_lifetime_days is None
        else "never expires"
        if a.password_lifetime_days == 0
        else f"{a.password_lifetime_days} days"
    )
    return {
        "account": a.name,
        "powers": ", ".join(
            [p for p in ("SUPER", *POWERFUL_PRIVILEGES) if p in a.privileges]
            + [f"role {r}" for r in a.roles]
        )
        or "-",
        "password": (
            "not readable"
            if a.has_password is None
            else "expired"
            if a.password_expired
            else f"{a.plugin}"
            if a.has_password
            else "none"
        ),
        "password lifetime": lifetime,
    }


def _role_row(r: RoleInfo) -> dict:
    powers = [
        w
        for w, on in (
            ("SUPERUSER", r.superuser),
            ("CREATEROLE", r.create_role),
            ("CREATEDB", r.create_db),
            ("REPLICATION", r.replication),
            ("BYPASSRLS", r.bypass_rls),
        )
        if on
    ]
    return {
        "role": r.name,
        "powers": ", ".join(powers + r.member_of) or "-",
        "password": r.password_hash or "not readable",
        "valid until": f"{r.valid_until:%Y-%m-%d}" if r.valid_until else "never expires",
    }


def _line(f: Finding) -> str:
    return f"{f.subject} {f.finding}"


def _follow_ups(report: IncidentReport, findings: list[Finding]) -> None:
    for f in findings:
        if f.severity is not Severity.LOW:
            report.follow_ups.append(f"[{f.severity.value}] {_line(f)}.")
