"""`runbooks up` as a user runs it, for tests and benchmarks that kill and restart it.

One PREFECT_HOME and fixed ports across restarts; helpers to find every process of ours in /proc
(children in other sessions included) and to kill them the way a power cut would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
T = TypeVar("T")


def poll(fn: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    """Call ``fn`` until it returns something truthy (HTTP errors count as not yet); return it."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached in {timeout_s}s (last: {last!r})")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children in other sessions included), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def alertmanager_payload(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    """An Alertmanager v4 webhook body for ``alerts`` (each: labels, fingerprint, optional startsAt)."""
    now = datetime.now(UTC).isoformat()
    return {
        "version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "runbooks",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "truncatedAlerts": 0,
        "alerts": [
            {
                "status": "firing", "fingerprint": a["fingerprint"], "labels": a["labels"],
                "annotations": a.get("annotations", {}), "startsAt": a.get("startsAt", now),
                "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus:9090/graph",
            }
            for a in alerts
        ],
    }


@dataclass
class RunbooksUp:
    """`runbooks up` on fixed ports and one PREFECT_HOME across restarts."""

    home: Path
    port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    token: str = "runbooks-up-test-token"
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home / "runbooks-up.log"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def spool(self) -> Path:
        return self.home / "spool.sqlite3"

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            RUNBOOKS_GATEWAY_TOKEN=self.token,
            RUNBOOKS_GATEWAY_SPOOL_PATH=str(self.spool),
        )
        env.update(self.env)
        return env

    def launch(self) -> None:
        """Start `runbooks up` and return at once (see `start` to wait until it serves)."""
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "serving.cli", "up",
                "--port", str(self.port), "--gateway-port", str(self.gateway_port),
            ],
            cwd=ROOT, env=self.base_env(), stdout=self.log.open("a"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def api_call(self, method: str, path: str, json: Any = None, timeout_s: float = 10) -> Any:
        """One Prefect API call, answered as Prefect's own client would see it: the 503 the server
        sends for a retryable error (SQLite busy while a restarted server recovers its database,
        say) is retried for up to 30 s, as the client retries it; any other error raises."""
        deadline = time.monotonic() + 30
        while True:
            resp = httpx.request(method, f"{self.api}{path}", json=json, timeout=timeout_s)
            if resp.status_code != 503 or time.monotonic() > deadline:
                resp.raise_for_status()
                return resp.json()
            time.sleep(0.5)

    def lock_slots(self) -> list[int]:
        """The active slots of every target lock (runbooks/locks.py's global concurrency limits)."""
        limits = self.api_call("POST", "/v2/concurrency_limits/filter", json={})
        return [lim["active_slots"] for lim in limits if lim["name"].startswith("runbooks-lock-")]

    def start(self, deployment: str = "db-connection-pool-exhausted") -> None:
        self.launch()

        poll(lambda: bool(self.deployments(deployment)), 180, "runbooks up serving its deployments")

    def gateway_alone(self, log: Path) -> subprocess.Popen:
        """The alert gateway on its own (same port, token and spool), e.g. while Prefect is down."""
        env = self.base_env() | {"PREFECT_API_URL": self.api}
        return subprocess.Popen(
            [sys.executable, "-m", "alert_gateway", "--host", "127.0.0.1",
             "--port", str(self.gateway_port)],
            cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def post_alerts(self, alerts: list[dict[str, Any]]) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.gateway_port}/alerts/alertmanager", timeout=10,
            headers={"Authorization": f"Bearer {self.token}"}, json=alertmanager_payload(alerts),
        )

    def kill_everything(self) -> set[int]:
        """SIGKILL every process of ours at once, as a power cut would; returns their pids."""
        assert self.proc is not None
        pids = descendants(self.proc.pid) | {self.proc.pid}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        poll(lambda: not any(alive(p) for p in pids), 20, "every killed process gone")
        return pids

    def interrupt(self) -> None:
        """Ctrl-C in the terminal: SIGINT to the foreground process group."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            # every process of ours writes its threads' stacks to the log (serving.lifetime)
            for pid in descendants(self.proc.pid) | {self.proc.pid}:
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            time.sleep(2)
            raise AssertionError(
                f"runbooks up did not stop within 60 s of Ctrl-C; thread stacks in {self.log}"
            ) from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_everything()

    def run(self, run_id: str) -> dict:
        return self.api_call("GET", f"/flow_runs/{run_id}", timeout_s=5)

    def deployments(self, name: str) -> list[dict]:
        return self.api_call(
            "POST", "/deployments/filter", timeout_s=5,
            json={"deployments": {"name": {"any_": [name]}}},
        )

    def deployment_id(self, name: str) -> str:
        [deployment] = self.deployments(name)
        return deployment["id"]

    def start_run(self, params: dict, deployment: str = "db-connection-pool-exhausted") -> str:
        created = self.api_call(
            "POST", f"/deployments/{self.deployment_id(deployment)}/create_flow_run",
            json={"parameters": {"params": params}},
        )
        return created["id"]

    def wait_final(self, run_id: str, timeout_s: float = 120) -> dict:
        poll(lambda: self.run(run_id)["state"]["type"] in FINAL, timeout_s, f"run {run_id} final")
        return self.run(run_id)

    def wait_suspended(self, run_id: str) -> None:
        """Until the run's process has ended with the run suspended (no process holds it)."""

        def finished_suspended() -> bool:
            logs = self.api_call(
                "POST", "/logs/filter", timeout_s=5,
                json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200},
            )
            return any("Finished in state Suspended" in log["message"] for log in logs)

        poll(finished_suspended, 90, "the run's process ended, the run suspended")

    def report(self, run_id: str) -> str:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from tests.conftest import read_incident_report

        with temporary_settings(updates={PREFECT_API_URL: self.api}):
            return read_incident_report(run_id)
