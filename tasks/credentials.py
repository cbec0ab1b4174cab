"""Credential rotation that survives a crash at any point, for any store that has logins.

The order is the one AWS Secrets Manager's rotation uses (createSecret, setSecret, testSecret,
finishSecret), with a pending copy of the new password kept durably before the server changes:

1. generate a strong password; keep it as *pending* (a Prefect Secret block, on the server);
2. set it on the database (PostgreSQL gets a SCRAM verifier: the plaintext never reaches it);
3. test: the new password logs in and the old one no longer does; otherwise set the old back;
4. finish: store it where clients read it (the block's SecretStr, a Secrets Manager secret whose
   AWSPENDING version becomes AWSCURRENT), then delete the pending copy.

A run killed between 1 and 4 leaves the pending copy; the next run tries it and the stored one on
the server and either finishes the rotation or throws the pending copy away
(``decide_rotation``). The password is only ever held as a ``SecretStr``: tasks take and return
that, so it is masked in logs, task inputs, results and exception text.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
from enum import StrEnum
from typing import Any, Protocol

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from prefect.blocks.system import Secret
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, SecretStr

from runbooks.retry import runbook_task_options

PASSWORD_BYTES = 32  # 256 bits of randomness, 43 URL-safe characters
_ALPHABET = set(string.ascii_letters + string.digits + "-_")


def new_password() -> SecretStr:
    """A password from the OS's CSPRNG (``secrets``), URL-safe: no quoting trouble in a DSN,
    a JDBC URL or a shell variable."""
    while True:
        value = secrets.token_urlsafe(PASSWORD_BYTES)
        # a leading '-' reads as an option to some CLIs; keep a letter or digit first
        if value[0] not in "-_" and set(value) <= _ALPHABET:
            return SecretStr(value)


class LoginCheck(BaseModel):
    """Whether a password logs in: ``ok``, refused (``refused``: the server said no), or neither
    (the server could not be asked: ``error`` says why)."""

    ok: bool
    refused: bool = False
    error: str | None = None

    def describe(self) -> str:
        if self.ok:
            return "logs in"
        return "refused" if self.refused else f"could not tell ({self.error})"


class RotationStep(StrEnum):
    ROTATE = "rotate"
    DISCARD_PENDING = "discard the pending password, then rotate"
    FINISH_PENDING = "finish the interrupted rotation"
    ESCALATE = "escalate"


def decide_rotation(
    pending: bool, pending_login: LoginCheck | None, current_login: LoginCheck
) -> tuple[RotationStep, str]:
    """What to do, given a pending password left by an earlier run (and whether it logs in) and
    whether the stored password logs in."""
    for check in (current_login, pending_login):
        if check is not None and not check.ok and not check.refused:
            return RotationStep.ESCALATE, f"the server could not be asked: {check.error}"
    if pending:
        assert pending_login is not None
        if pending_login.ok:
            return (
                RotationStep.FINISH_PENDING,
                "an earlier rotation set the new password on the server and died before storing "
                "it: store it now",
            )
        if current_login.ok:
            return (
                RotationStep.DISCARD_PENDING,
                "an earlier rotation died before it changed the server (the stored password "
                "still logs in): its pending password is thrown away",
            )
        return (
            RotationStep.ESCALATE,
            "neither the stored password nor the pending one of an earlier rotation logs in: "
            "someone else changed it; set it by hand and store it in the block",
        )
    if current_login.ok:
        return RotationStep.ROTATE, "the stored password logs in"
    return (
        RotationStep.ROTATE,
        "the stored password is refused already (whatever uses it is failing now): a new one "
        "is set and stored",
    )


def pending_block_name(target_key: str) -> str:
    """The Prefect Secret block holding a rotation's pending password (block names: [a-z0-9-])."""
    return f"runbooks-rotation-pending-{hashlib.sha256(target_key.encode()).hexdigest()[:16]}"


# Prefect's API: connection errors are worth another try, a 4xx is not
_prefect_retries = runbook_task_options(OSError)


@task(**_prefect_retries)
def load_pending(name: str) -> SecretStr | None:
    try:
        return SecretStr(Secret.load(name).get())
    except (ValueError, ObjectNotFound):
        return None


@task(**_prefect_retries)
def save_pending(name: str, password: SecretStr) -> None:
    Secret(value=password).save(name, overwrite=True)


@task(**_prefect_retries)
def delete_pending(name: str) -> None:
    try:
        Secret.delete(name)
    except (ValueError, ObjectNotFound):
        pass  # gone already: idempotent


class CredentialBackend(Protocol):
    """One login on one server, and the block that stores its password."""

    @property
    def label(self) -> str: ...  # e.g. "role app on db:5432"

    def try_login(self, password: SecretStr | None) -> LoginCheck: ...

    def set_password(self, password: SecretStr) -> None: ...

    def stored_password(self) -> SecretStr | None: ...

    def store(self, password: SecretStr) -> None: ...  # into the block clients load

    def target(self) -> Any: ...  # the runbooks.safety.Target the rotation locks

    def sessions(self) -> list[dict[str, Any]]: ...  # who is connected as this login now

    def secret_fields(self) -> dict[str, Any]: ...  # Secrets Manager JSON, besides "password"

    def persistence_note(self) -> str | None: ...  # why the change may not survive a restart


# --- AWS Secrets Manager ------------------------------------------------------------------


def secrets_manager_client(aws_credentials: Any, timeout_s: float = 15.0) -> Any:
    """A Secrets Manager client from a prefect-aws ``AwsCredentials`` block: its session, region
    and endpoint, with timeouts and standard-mode retries (transient errors only)."""
    session = aws_credentials.get_boto3_session()
    return session.client(
        "secretsmanager",
        endpoint_url=aws_credentials.aws_client_parameters.endpoint_url,
        config=Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"mode": "standard", "max_attempts": 5},
        ),
    )


@task(**runbook_task_options(BotoCoreError))
def store_in_secrets_manager(
    aws_credentials: Any,
    secret_id: str,
    fields: dict[str, Any],
    password: SecretStr,
    token: str,
) -> str:
    """Put ``fields`` + password as a new AWSPENDING version (the request token makes a retry or
    re-run write the same version once), then make it AWSCURRENT: the Secrets Manager rotation
    protocol, so a client reading AWSCURRENT never sees a half-written secret. Returns the
    version id."""
    client = secrets_manager_client(aws_credentials)
    body = json.dumps({**fields, "password": password.get_secret_value()})
    try:
        client.put_secret_value(
            SecretId=secret_id,
            ClientRequestToken=token,
            SecretString=body,
            VersionStages=["AWSPENDING"],
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code == "ResourceNotFoundException":
            client.create_secret(Name=secret_id, ClientRequestToken=token, SecretString=body)
            return token
        if code != "ResourceExistsException":  # this token's version exists: a retry
            raise RuntimeError(
                f"Secrets Manager refused the new version of {secret_id}: {code}"
            ) from None
    versions = client.describe_secret(SecretId=secret_id).get("VersionIdsToStages", {})
    current = next((v for v, stages in versions.items() if "AWSCURRENT" in stages), None)
    if current != token:
        client.update_secret_version_stage(
            SecretId=secret_id,
            VersionStage="AWSCURRENT",
            MoveToVersionId=token,
            **({"RemoveFromVersionId": current} if current else {}),
        )
    return token
