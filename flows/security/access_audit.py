"""Runbook: monthly access audit of a PostgreSQL server (seed 003 security: "monitor unauthorized
access attempts, audit log access").

Reads the roles and what they may do (superusers, logins, powerful predefined roles, password
expiry and hashing), the refused logins in the server log, and who is connected from where; turns
them into findings by a policy; reports. It changes nothing. High findings escalate, so a person
looks at them.
"""

from prefect import flow
from pydantic import BaseModel, Field

from blocks.postgres import PostgresDatabase
from runbooks.errors import Escalation
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
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

    db_block: BlockName = Field(
        "default",
        description="Block of the server to audit; its role needs pg_read_all_stats (and "
        "pg_read_server_files to read the log through the server, superuser to see how "
        "passwords are hashed).",
    )
    log_path: str | None = Field(
        None,
        description="The server's log file on this host (the runbook runs on the database host); "
        "empty: the server's own log through pg_read_file (logging_collector on).",
    )
    allowed_superusers: list[str] = Field(
        default_factory=lambda: ["postgres"], description="Roles expected to be superusers."
    )
    allowed_powerful: list[str] = Field(
        default_factory=list,
        description="Predefined roles (pg_read_all_data, ...) whose members are expected.",
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
    sessions: list[SessionGroup] = Field(default_factory=list)
    log: LogRead | None = None
    report: str


@flow(
    name=RUNBOOK,
    description="Audit a PostgreSQL server's access: superusers, logins and their powers, "
    "password expiry and hashing, refused logins in the server log, sessions by role and address.",
)
@ends_as_reported
def access_audit(params: AccessAuditParams) -> AccessAuditSummary:
    findings: list[Finding] = []
    roles: list[RoleInfo] = []
    sessions: list[SessionGroup] = []
    log: LogRead | None = None
    with incident_report(
        runbook=RUNBOOK, title="Database Access Audit", severity="P4", params=params
    ) as report:
        db = PostgresDatabase.load(params.db_block)
        server = f"{db.host}:{db.port}"
        roles = read_roles(db)
        logins = [r for r in roles if r.can_login]
        report.evidence("roles that can log in", [_role_row(r) for r in logins])
        supers = [r.name for r in roles if r.superuser]
        report.check(
            "superusers are the allowed ones",
            set(supers) <= set(params.allowed_superusers),
            ", ".join(supers) or "none",
        )
        sessions = role_sessions(db)
        report.evidence(
            "sessions by role and client address",
            [s.model_dump() for s in sessions] or [{"role": "none"}],
        )
        log = read_failed_logins(db, params.log_path)
        if log.source is None:
            report.step(f"refused logins not read: {log.note}")
        else:
            report.evidence(
                f"refused logins in {log.source} ({log.lines} lines read)",
                [f.model_dump() for f in log.failures[-50:]] or [{"refused logins": "none"}],
            )
        policy = AuditPolicy(
            allowed_superusers=params.allowed_superusers,
            failed_login_threshold=params.failed_login_threshold,
            expiry_warning_days=params.expiry_warning_days,
            allowed_powerful=params.allowed_powerful,
        )
        findings = audit_findings(roles, log.failures, policy, now_utc())
        report.evidence(
            "findings", [f.model_dump() for f in findings] or [{"finding": "none"}]
        )
        high = [f for f in findings if f.severity is Severity.HIGH]
        report.check("no high findings", not high, "; ".join(_line(f) for f in high) or "none")
        _follow_ups(report, findings)
        if log.source is None:
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
            f"Audited {server}: {len(logins)} roles can log in ({len(supers)} superuser(s)), "
            f"{sum(s.sessions for s in sessions)} sessions, "
            + (f"{len(log.failures)} refused logins in the log, " if log.source else "")
            + (f"{len(findings)} finding(s), none high." if findings else "no findings."),
        )
    return AccessAuditSummary(
        outcome=report.outcome or Outcome.FAILED,
        findings=findings,
        roles=roles,
        sessions=sessions,
        log=log,
        report=report.to_markdown(),
    )


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
