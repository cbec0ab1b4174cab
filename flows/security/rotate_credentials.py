"""Runbook: monthly rotation of a database password (seed 003 security: "monthly rotation of
database admin password, access keys, service tokens"): a PostgreSQL role (tasks.pg_roles), a
Redis ACL user (tasks.redis_acl) or a MariaDB / MySQL user (tasks.mysql_credentials).

Sets a new strong password on the server for the login a block holds, checks that the new one logs
in and the old one no longer does (setting the old one back if not), and stores it where clients
read it: the block, and optionally an AWS Secrets Manager secret (AWSPENDING -> AWSCURRENT). A run
killed at any point is finished or undone by the next one (tasks.credentials). The password is
never printed: not in logs, events, artifacts or exception text.
"""

import re
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run
from prefect_aws import AwsCredentials
from pydantic import BaseModel, Field, SecretStr, field_validator

from blocks.mysql import MySQLDatabase
from blocks.postgres import PostgresDatabase
from blocks.redis import RedisServer
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.results import Change, ChangeSet
from runbooks.safety import Budget
from tasks.credentials import (
    CredentialBackend,
    LoginCheck,
    RotationStep,
    decide_rotation,
    delete_pending,
    load_pending,
    new_password,
    pending_block_name,
    save_pending,
    store_in_secrets_manager,
)
from tasks.mysql_credentials import MySQLCredential
from tasks.pg_roles import PostgresCredential
from tasks.redis_acl import RedisCredential

RUNBOOK = "rotate-credentials"

# monthly by design; a few more for a manual rotation after a leak
ROTATE_BUDGET = Budget(max_actions=3, window_s=86400)
_SECRET_ID = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")


class RotateCredentialsParams(RunbookParams):
    """Run form of the rotate-credentials runbook."""

    engine: Literal["postgres", "redis", "mysql"] = Field(
        "postgres",
        description="What kind of server the login is on: a PostgreSQL role ('Runbooks "
        "PostgreSQL Database' blocks), a Redis ACL user ('Runbooks Redis Server' blocks) or a "
        "MariaDB user ('Runbooks MySQL Database' blocks; every host entry of the user; MySQL refused).",
    )
    login_block: BlockName = Field(
        "default",
        description="Block whose user's password is rotated and which receives the new one.",
    )
    admin_block: BlockName = Field(
        "admin",
        description="Block of a login allowed to change that user's password (PostgreSQL: "
        "CREATEROLE, a superuser for a superuser role; Redis: ACL SETUSER and ACL SAVE; "
        "MariaDB / MySQL: CREATE USER, SELECT on mysql.user, PROCESS).",
    )
    secret_id: str | None = Field(
        None,
        description="AWS Secrets Manager secret to store the new credentials in as well (created "
        "if missing; the new version becomes AWSCURRENT only after it is verified); empty: the "
        "block only.",
    )
    aws_credentials_block: BlockName | None = Field(
        None,
        description="prefect-aws 'AWS Credentials' block for Secrets Manager (region, endpoint); "
        "empty: boto3's default chain.",
    )
    require_approval: bool = Field(
        False,
        description="Ask before changing the password (clients that keep it in their own "
        "configuration fail on their next connection until they get the new one).",
    )

    @field_validator("secret_id")
    @classmethod
    def _secret_id(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not _SECRET_ID.fullmatch(value):
            raise ValueError("not a Secrets Manager secret name or ARN")
        return value


class RotateCredentialsSummary(BaseModel):
    outcome: Outcome
    login: str | None = None
    step: str | None = None
    stored_in: list[str] = Field(default_factory=list)
    report: str


@flow(
    name=RUNBOOK,
    description="Rotate a database login's password: set a strong new one, verify it logs in and "
    "the old one is refused (else roll back), store it in the block and Secrets Manager.",
)
@ends_as_reported
def rotate_credentials(params: RotateCredentialsParams) -> RotateCredentialsSummary:
    stored_in: list[str] = []
    step: RotationStep | None = None
    with incident_report(
        runbook=RUNBOOK, title="Credential Rotation", severity="P4", params=params
    ) as report:
        login = _backend(params)
        target = login.target()
        pending_name = pending_block_name(target.key)
        with report.guard(target) as guard:
            old = login.stored_password()
            current = login.try_login(old)
            report.check("the stored password logs in", current.ok, current.describe())
            pending = load_pending(pending_name)
            pending_login = login.try_login(pending) if pending is not None else None
            if pending is not None:
                report.step(
                    f"found the pending password of an interrupted rotation (Secret block "
                    f"{pending_name}): it {pending_login.describe()}"
                )
            step, why = decide_rotation(pending is not None, pending_login, current)
            report.step(f"decision: {step.value} ({why})")
            report.evidence(
                "sessions of the login now (clients that will need the new password)",
                login.sessions() or [{"client": "none"}],
            )
            if step is RotationStep.ESCALATE:
                raise Escalation(f"cannot rotate the password of {login.label}: {why}")
            if step is RotationStep.FINISH_PENDING:
                assert pending is not None
                stored_in = _store(report, guard, login, params, pending, pending_name)
                report.finish(
                    Outcome.RESOLVED,
                    f"Finished the interrupted rotation of {login.label}: the password the server "
                    f"already had is now stored in {', '.join(stored_in)}.",
                )
                return _summary(report, login, step, stored_in)
            if step is RotationStep.DISCARD_PENDING and not params.dry_run:
                delete_pending(pending_name)
                report.step("threw away the pending password of the interrupted rotation")

            new: list[SecretStr] = []

            def rotate(dry_run: bool) -> ChangeSet:
                change = Change(
                    action="rotate_password",
                    target=login.label,
                    detail={"stored in": _destinations(params)},
                )
                result = ChangeSet(dry_run=dry_run, planned=[change])
                if dry_run:
                    return result
                password = new_password()
                save_pending(pending_name, password)  # before the server changes: never lost
                login.set_password(password)
                new.append(password)
                result.applied.append(change)
                return result

            guard.act(
                "set a new password",
                rotate,
                budget=ROTATE_BUDGET,
                approval=lambda plan: (
                    "clients that keep the password in their own configuration fail on their "
                    "next connection until they get the new one"
                )
                if params.require_approval
                else None,
            )
            if params.dry_run:
                report.finish(
                    Outcome.PLANNED,
                    f"Would set a new password for {login.label}, verify it and store it in "
                    f"{', '.join(_destinations(params))}; nothing was changed.",
                )
                return _summary(report, login, step, stored_in)
            (password,) = new
            verified = guard.verify(
                "the new password logs in and the old one is refused",
                lambda: (login.try_login(password), login.try_login(old) if old else None),
                lambda checks: checks[0].ok and (checks[1] is None or checks[1].refused),
                timeout_s=10,
                describe=lambda checks: f"new: {checks[0].describe()}"
                + (f"; old: {checks[1].describe()}" if checks[1] is not None else ""),
            )
            if not verified.ok:
                _roll_back(report, guard, login, old, pending_name, verified.last)
            stored_in = _store(report, guard, login, params, password, pending_name)
            note = login.persistence_note()
            report.check("the change survives a server restart", note is None, note or "yes")
            if note:
                report.follow_ups.append(
                    f"Persist the ACL of {login.label} (an ACL file with ACL SAVE, or CONFIG "
                    f"REWRITE): {note}."
                )
            report.follow_ups.append(
                "Sessions opened with the old password stay connected; clients that read the "
                "password at connect time get the new one on their next connection."
            )
            report.finish(
                Outcome.RESOLVED,
                f"Rotated the password of {login.label}: the new one logs in, the old one is "
                f"refused; stored in {', '.join(stored_in)}.",
            )
    return _summary(report, login, step, stored_in)


def _destinations(params: RotateCredentialsParams) -> list[str]:
    out = [f"block {params.login_block}"]
    if params.secret_id:
        out.append(f"Secrets Manager secret {params.secret_id}")
    return out


def _store(
    report: IncidentReport,
    guard,
    login: CredentialBackend,
    params: RotateCredentialsParams,
    password: SecretStr,
    pending_name: str,
) -> list[str]:
    def store(dry_run: bool) -> ChangeSet:
        changes = [Change(action="store_password", target=d) for d in _destinations(params)]
        result = ChangeSet(dry_run=dry_run, planned=changes)
        if dry_run:
            return result
        login.store(password)
        result.applied.append(changes[0])
        if params.secret_id:
            aws = (
                AwsCredentials.load(params.aws_credentials_block)
                if params.aws_credentials_block
                else AwsCredentials()
            )
            store_in_secrets_manager(
                aws,
                params.secret_id,
                login.secret_fields(),
                password,
                # one version per rotation: a retried or re-run store writes it once
                token=str(flow_run.id or pending_name)[:64].ljust(32, "0"),
            )
            result.applied.append(changes[1])
        delete_pending(pending_name)
        return result

    done = guard.act("store the new password", store)
    return [c.target for c in done.applied]


def _roll_back(
    report: IncidentReport,
    guard,
    login: CredentialBackend,
    old: SecretStr | None,
    pending_name: str,
    checks: tuple[LoginCheck, LoginCheck | None] | None,
) -> None:
    seen = (
        f"new: {checks[0].describe()}" + (f"; old: {checks[1].describe()}" if checks[1] else "")
        if checks
        else "no reading"
    )
    if old is None:
        raise VerificationFailed(
            f"the new password of {login.label} did not verify ({seen}) and the block held no "
            f"old one to set back; the new one is kept in Secret block {pending_name}: set a "
            "password by hand"
        )

    def roll_back(dry_run: bool) -> ChangeSet:
        change = Change(action="restore_password", target=login.label)
        result = ChangeSet(dry_run=dry_run, planned=[change])
        if not dry_run:
            login.set_password(old)
            delete_pending(pending_name)
            result.applied.append(change)
        return result

    guard.act("set the old password back", roll_back)
    back = login.try_login(old)
    report.check("the old password logs in again", back.ok, back.describe())
    why = (
        "the server accepts the old password too: it does not authenticate this login by "
        "password (a pg_hba.conf 'trust' or 'peer' line?), so rotating it protects nothing"
        if checks and checks[0].ok
        else "the new password does not log in"
    )
    raise VerificationFailed(
        f"rotation of {login.label} rolled back ({seen}): {why}; the old password is set again"
        + ("" if back.ok else f", but it {back.describe()}")
    )


def _backend(params: RotateCredentialsParams) -> CredentialBackend:
    if params.engine == "mysql":
        return MySQLCredential(
            params.login_block,
            MySQLDatabase.load(params.login_block),
            MySQLDatabase.load(params.admin_block),
        )
    if params.engine == "redis":
        return RedisCredential(
            params.login_block,
            RedisServer.load(params.login_block),
            RedisServer.load(params.admin_block),
        )
    return PostgresCredential(
        params.login_block,
        PostgresDatabase.load(params.login_block),
        PostgresDatabase.load(params.admin_block),
    )


def _summary(
    report: IncidentReport, login: CredentialBackend | None, step: RotationStep | None, stored_in: list[str]
) -> RotateCredentialsSummary:
    return RotateCredentialsSummary(
        outcome=report.outcome or Outcome.FAILED,
        login=login.label if login else None,
        step=step.value if step else None,
        stored_in=stored_in,
        report=report.to_markdown(),
    )
