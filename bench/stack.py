"""Real processes for benchmarks: a Prefect server and the alert gateway, on free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.servers import PrefectServer

ROOT = Path(__file__).resolve().parent.parent


def wait_for(fn: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(what)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@contextlib.contextmanager
def child(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A child process in its own session, stopped with SIGINT (then SIGKILL) on exit."""
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def prefect_server() -> Iterator[tuple[str, dict[str, str], Path]]:
    """A Prefect server on SQLite in a temp home; yields (api url, environment, work dir)."""
    server = PrefectServer(home=Path(tempfile.mkdtemp(prefix="bench-")))
    server.start()
    print(f"logs in {server.home}")
    try:
        yield server.api_url, server.env(), server.home
    finally:
        server.stop()
