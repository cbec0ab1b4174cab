"""`runbooks up`'s Prefect server (serving/sqlite_server.py) creates a deployment's flow run by
waiting for SQLite's write lock, where stock `prefect server start` answers 503 (and its clients,
such as an automation's run-deployment action, retry only 2 s later)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _server(module: str, home: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    api = f"http://127.0.0.1:{port}/api"
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            if module == "prefect"
            else [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server not healthy"
            time.sleep(0.2)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _while_another_writer_commits(home: Path, request: Callable[[], httpx.Response]) -> int:
    """Send a request (no client retries) while another connection holds SQLite's write lock
    and commits a change 0.5 s later; the request's status code."""
    other = sqlite3.connect(
        home / "prefect.db", isolation_level=None, timeout=30, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE IF NOT EXISTS lock_probe (x INTEGER)")
    other.execute("INSERT INTO lock_probe VALUES (1)")

    def commit_later() -> None:
        time.sleep(0.5)
        other.execute("COMMIT")

    committer = threading.Thread(target=commit_later)
    committer.start()
    try:
        return request().status_code
    finally:
        committer.join()
        other.close()


def _post_retrying(url: str, body: dict) -> dict:
    # setup requests: SQLite may answer 503 while the new server's services write
    for attempt in range(10):
        response = httpx.post(url, json=body, timeout=10)
        if response.status_code != 503:
            response.raise_for_status()
            return response.json()
        time.sleep(0.2 * (attempt + 1))
    raise AssertionError(f"{url} kept answering 503")


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("serving.sqlite_server", 201),
        # stock Prefect 3.8.8: the deferred transaction cannot write after the other commit.
        # When this answers 201, Prefect fixed it and serving/sqlite_server.py can go.
        ("prefect", 503),
    ],
)
def test_creating_a_run_waits_for_the_write_lock(
    module: str, expected: int, tmp_path: Path
) -> None:
    with _server(module, tmp_path) as api:
        flow = _post_retrying(f"{api}/flows/", {"name": f"f-{uuid.uuid4().hex[:8]}"})
        deployment = _post_retrying(f"{api}/deployments/", {"name": "d", "flow_id": flow["id"]})
        status = _while_another_writer_commits(
            tmp_path,
            lambda: httpx.post(
                f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=30
            ),
        )
        assert status == expected

        # the runbooks' per-target lock: a global concurrency slot taken with a lease
        _post_retrying(f"{api}/v2/concurrency_limits/", {"name": "target", "limit": 1})
        status = _while_another_writer_commits(
            tmp_path,
            lambda: httpx.post(
                f"{api}/v2/concurrency_limits/increment-with-lease",
                timeout=30,
                json={"names": ["target"], "slots": 1, "lease_duration": 60},
            ),
        )
        assert status == (200 if expected == 201 else expected)


def test_the_server_runs_what_runbooks_up_needs(tmp_path: Path) -> None:
    # the UI and an ordinary request still answer through the wrapped app
    with _server("serving.sqlite_server", tmp_path) as api:
        assert "<html" in httpx.get(api.removesuffix("/api") + "/", timeout=10).text.lower()
        assert httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).status_code == 200
