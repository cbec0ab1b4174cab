"""Restart with queued alerts (issue #9 defect 6), shared by its test and `python -m bench restart-backlog`.

1. `runbooks up` once, so its deployments, automations and a PostgreSQL block exist; then Ctrl-C.
2. While Prefect is down, the alert gateway alone accepts ``alerts`` Alertmanager alerts (distinct
   fingerprints, all for the pool runbook on one real PostgreSQL): they wait in its spool.
3. `runbooks up` again, timed from launch: its gateway forwards the spool, an automation creates a
   run per alert, the runner runs them (they take turns on the server's lock).

Also read: the ids of the deployment's automations before and after the restart (the same ids:
no moment without them). Measured: when the API first answered, its longest silence after that (a probe of /api/health
every 0.2 s with a 2 s timeout), "database is locked" lines in the log, the first and the last run
to finish, and how the runs ended.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.servers import PostgresServer
from tests.up import FINAL, RunbooksUp, poll

DEPLOYMENT = "db-connection-pool-exhausted"
ALERTNAME = "PostgresTooManyConnections"
BLOCK = "backlog-db"


@dataclass
class BacklogResult:
    alerts: int
    first_healthy_s: float
    longest_silence_s: float
    locked_lines: int
    blocked_lines: int  # the server's watchdog: its event loop ran nothing for 10 s
    first_run_done_s: float | None
    last_run_done_s: float | None
    states: Counter = field(default_factory=Counter)
    runs: int = 0
    automations_before: set[str] = field(default_factory=set)
    automations_after: set[str] = field(default_factory=set)


class HealthProbe(threading.Thread):
    """Asks /api/health every 0.2 s; remembers when it answered."""

    def __init__(self, api: str):
        super().__init__(daemon=True)
        self.api = api
        self.answered: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.stopping.is_set():
                try:
                    if client.get(f"{self.api}/health").status_code == 200:
                        self.answered.append(time.monotonic())
                except httpx.HTTPError:
                    pass
                self.stopping.wait(0.2)

    def longest_silence(self, until: float) -> float:
        """The longest gap between answers, from the first answer to ``until``."""
        if not self.answered:
            return float("inf")
        points = [*self.answered, until]
        return max(b - a for a, b in zip(points, points[1:], strict=False)) if len(points) > 1 else 0.0


def save_block(up: RunbooksUp, postgres: PostgresServer) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks.postgres import PostgresDatabase

    with temporary_settings(updates={PREFECT_API_URL: up.api}):
        PostgresDatabase(
            host="127.0.0.1", port=postgres.port, dbname="postgres", user=postgres.user,
            password=postgres.password,
        ).save(BLOCK, overwrite=True)


def queue_alerts_while_down(up: RunbooksUp, alerts: int) -> str:
    """The gateway alone, Prefect down: ``alerts`` alerts accepted (202) into its spool; returns
    the prefix of their fingerprints."""
    gateway = up.gateway_alone(up.home / "gateway-alone.log")
    try:
        poll(
            lambda: httpx.get(f"http://127.0.0.1:{up.gateway_port}/healthz", timeout=2).status_code
            == 200,
            60, "the gateway alone answering",
        )
        run = uuid.uuid4().hex[:8]
        for start in range(0, alerts, 10):
            batch = [
                {
                    "fingerprint": f"{run}{i:08x}",
                    "labels": {"alertname": ALERTNAME, "database": BLOCK, "pod": f"app-{run}-{i}",
                               "severity": "critical"},
                }
                for i in range(start, min(alerts, start + 10))
            ]
            accepted = up.post_alerts(batch)
            assert accepted.status_code == 202, accepted.text
        return run
    finally:
        gateway.send_signal(signal.SIGINT)
        gateway.wait(30)


def automation_ids(api: str, deployment_id: str) -> set[str]:
    """The automations made from the deployment's prefect.yaml triggers."""
    from serving.triggers import MARK

    owner = f"prefect.deployment.{deployment_id}"
    related = httpx.get(f"{api}/automations/related-to/{owner}", timeout=10).json()
    return {a["id"] for a in related if MARK in a["tags"]}


def alert_runs(api: str, deployment_id: str, fingerprint_prefix: str) -> list[dict]:
    """The deployment's runs started by our alerts (not by its schedule)."""
    runs: list[dict] = []
    offset = 0
    while True:
        page = httpx.post(
            f"{api}/flow_runs/filter", timeout=10,
            json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                  "limit": 200, "offset": offset},
        ).json()
        runs += [
            r for r in page
            if str((r["parameters"].get("params") or {}).get("alert", {}).get("fingerprint", ""))
            .startswith(fingerprint_prefix)
        ]
        if len(page) < 200:
            return runs
        offset += 200


def restart_with_backlog(
    home: Path, postgres: PostgresServer, alerts: int = 50, timeout_s: float = 900
) -> BacklogResult:
    up = RunbooksUp(home=home)
    try:
        up.start(DEPLOYMENT)
        save_block(up, postgres)
        before = automation_ids(up.api, up.deployment_id(DEPLOYMENT))
        up.interrupt()
        prefix = queue_alerts_while_down(up, alerts)

        log_offset = up.log.stat().st_size
        probe = HealthProbe(up.api)
        launched = time.monotonic()
        probe.start()
        up.launch()
        poll(lambda: probe.answered, 180, "Prefect answering after the restart", interval_s=0.2)
        deployment_id = poll(lambda: up.deployment_id(DEPLOYMENT), 120, "the deployment")
        done_at: dict[str, float] = {}
        runs: list[dict] = []
        deadline = launched + timeout_s
        while time.monotonic() < deadline:
            try:
                runs = alert_runs(up.api, deployment_id, prefix)
            except httpx.HTTPError:
                time.sleep(1)
                continue
            now = time.monotonic()
            for r in runs:
                if r["state"]["type"] in FINAL and r["id"] not in done_at:
                    done_at[r["id"]] = now - launched
            if len(done_at) >= alerts:
                break
            time.sleep(1)
        ended = time.monotonic()
        after = automation_ids(up.api, deployment_id)
        probe.stopping.set()
        probe.join(5)
        states = Counter(r["state"]["name"] for r in runs)
        log = up.log.read_bytes()[log_offset:].decode(errors="replace")
        return BacklogResult(
            alerts=alerts,
            first_healthy_s=probe.answered[0] - launched,
            longest_silence_s=probe.longest_silence(ended),
            locked_lines=log.count("database is locked"),
            blocked_lines=log.count("event loop blocked"),
            first_run_done_s=min(done_at.values()) if done_at else None,
            last_run_done_s=max(done_at.values()) if len(done_at) >= alerts else None,
            states=states,
            runs=len(runs),
            automations_before=before,
            automations_after=after,
        )
    finally:
        up.stop()
