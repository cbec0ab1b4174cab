"""`runbooks up` (what `make up` runs): server, blocks, every deployment served; Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deployments.catalog import load_catalog
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _poll(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout_s}s (last: {last!r})")


@pytest.fixture
def runbooks_up(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbooks.cli", "up", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    yield port, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_up_serves_every_runbook_and_stops_cleanly(runbooks_up) -> None:
    port, proc = runbooks_up
    api = f"http://127.0.0.1:{port}/api"
    expected = {spec.name for spec in load_catalog()}
    assert expected, "prefect.yaml declares no deployment"

    def deployments():
        names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()}
        return names if expected <= names else None

    served = _poll(deployments, 180, "every deployment of prefect.yaml registered")
    assert expected <= served

    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=5).json()
    triggered = {spec.name for spec in load_catalog() if spec.triggers}
    assert len(automations) >= len(triggered)
    assert all(a["enabled"] for a in automations)

    block_types = {b["slug"] for b in httpx.post(f"{api}/block_types/filter", json={}, timeout=5).json()}
    assert "runbooks-kafka-cluster" in block_types

    ui = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert ui.status_code == 200 and "<html" in ui.text.lower()

    # Ctrl-C in the terminal signals the whole foreground process group
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert f"Prefect UI: http://127.0.0.1:{port}" in out
    for name in expected:
        assert name in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)
