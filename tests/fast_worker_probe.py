"""A flow for tests/integration/test_fast_worker.py: writes its pid, then holds its process."""

import os
import time
from pathlib import Path

from prefect import flow


@flow
def hold(path: str, seconds: float) -> None:
    Path(path).write_text(f"{os.getpid()}\n")
    time.sleep(seconds)
