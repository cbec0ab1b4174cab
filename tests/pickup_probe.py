"""A tiny flow for tests/integration/test_event_pickup.py: one line per execution, as its effect."""

import os
from pathlib import Path

from prefect import flow


@flow
def append_line(path: str) -> None:
    # appended, not overwritten: a run started twice leaves two lines
    with Path(path).open("a") as out:
        out.write(f"{os.getpid()}\n")
