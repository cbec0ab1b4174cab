"""Crash-test victim: run disaster-recovery-drill and die by SIGKILL once pg_restore has filled
the scratch database, before the drill compares and drops it.

Run by tests/integration/test_database_backup.py as
``python -m tests.db_drill_victim DB_BLOCK STORE_BLOCK`` with PREFECT_API_URL set to the test
server. The kill is real (SIGKILL to this process: no finally, no cleanup); it happens where the
drill would start reading the restored tables.
"""

from __future__ import annotations

import os
import signal
import sys

import tasks.pg_backup
from flows.postgres.disaster_recovery_drill import DrillParams, disaster_recovery_drill
from runbooks.params import SafetyParams


def _die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def main(db_block: str, store_block: str) -> None:
    tasks.pg_backup.fingerprint_tables = _die  # the first thing the drill does after pg_restore
    disaster_recovery_drill(
        DrillParams(
            db_block=db_block,
            backup_store_block=store_block,
            compare_source=False,
            safety=SafetyParams(budget_max_actions=1000),
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit("the victim was not killed")
