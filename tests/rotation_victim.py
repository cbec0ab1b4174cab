"""Crash-test victim: run rotate-credentials and die by SIGKILL right after the new password is
set on the server, before it is verified and stored.

Run by tests/integration/test_rotate_credentials.py as
``python -m tests.rotation_victim LOGIN_BLOCK ADMIN_BLOCK`` with PREFECT_API_URL set to the test
server. The kill is real: no finally runs, the pending copy and the server's new password are all
that is left.
"""

from __future__ import annotations

import os
import signal
import sys

from flows.security.rotate_credentials import RotateCredentialsParams, rotate_credentials
from runbooks.params import SafetyParams
from tasks import pg_roles

_set = pg_roles.PostgresCredential.set_password


def _set_then_die(self, password):  # type: ignore[no-untyped-def]
    _set(self, password)
    os.kill(os.getpid(), signal.SIGKILL)


def main(login_block: str, admin_block: str) -> None:
    pg_roles.PostgresCredential.set_password = _set_then_die  # type: ignore[method-assign]
    rotate_credentials(
        RotateCredentialsParams(
            login_block=login_block,
            admin_block=admin_block,
            safety=SafetyParams(budget_max_actions=1000),
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit("the victim was not killed")
