"""Crash-test victim: run rotate-credentials and die by SIGKILL right after the new password is
set on the server, before it is verified and stored.

Run by tests/integration/test_rotate_credentials.py as
``python -m tests.rotation_victim LOGIN_BLOCK ADMIN_BLOCK [ENGINE]`` with PREFECT_API_URL set to the
test server (tests/integration/test_rotate_mysql_credentials.py with ENGINE mysql). The kill is
real: no finally runs, the pending copy and the server's new password are all that is left.
"""

from __future__ import annotations

import os
import signal
import sys

from flows.security.rotate_credentials import RotateCredentialsParams, rotate_credentials
from runbooks.params import SafetyParams
from tasks import mysql_credentials, pg_roles


def _die_after(set_password):  # type: ignore[no-untyped-def]
    def _set_then_die(self, password):  # type: ignore[no-untyped-def]
        set_password(self, password)
        os.kill(os.getpid(), signal.SIGKILL)

    return _set_then_die


def main(login_block: str, admin_block: str, engine: str = "postgres") -> None:
    for backend in (pg_roles.PostgresCredential, mysql_credentials.MySQLCredential):
        backend.set_password = _die_after(backend.set_password)  # type: ignore[method-assign]
    rotate_credentials(
        RotateCredentialsParams(
            engine=engine,
            login_block=login_block,
            admin_block=admin_block,
            safety=SafetyParams(budget_max_actions=1000),
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit("the victim was not killed")
