"""A tiny flow for tests/integration/test_warm_start.py: leaves a file behind as its effect."""

import os
import sys
from pathlib import Path

from prefect import flow


@flow
def leave_mark(path: str) -> None:
    # what the child had already imported when it ran: proof it forked from a warm process
    Path(path).write_text(
        f"{os.getpid()} {'flows.postgres.db_connection_pool_exhausted' in sys.modules}"
    )
