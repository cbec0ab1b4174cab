"""Latency from Alertmanager's webhook POST to the runbook's first task starting, on the real stack.

A Prefect server (SQLite) and `runbooks up --api-url` (the alert gateway plus every deployment of
prefect.yaml served) run as subprocesses; a throwaway PostgreSQL backs the
`db-connection-pool-exhausted` runbook (a healthy pool: the run checks and finishes without
changing anything). Each sample POSTs one Alertmanager v4 webhook, exactly as Alertmanager does,
to the gateway and waits for the first task run of the flow run it starts.

    python -m bench trigger-latency --alerts 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx

from bench.stack import child, percentile, prefect_server, wait_for
from tests.servers import free_port, start_postgres

TOKEN = uuid.uuid4().hex


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench trigger-latency")
    parser.add_argument("--alerts", type=int, default=50)
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="runbooks up --poll-seconds")
    args = parser.parse_args(argv)

    pg = start_postgres()
    try:
        with prefect_server() as (api, env, home):
            os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
            from blocks.postgres import PostgresDatabase

            PostgresDatabase(
                host="127.0.0.1", port=pg.port, dbname="postgres", user=pg.user,
                password=pg.password,
            ).save("bench-db", overwrite=True)
            gateway_port = free_port()
            gateway = f"http://127.0.0.1:{gateway_port}/alerts/alertmanager"
            env = {**env, "RUNBOOKS_GATEWAY_TOKEN": TOKEN,
                   "RUNBOOKS_GATEWAY_SPOOL_PATH": str(home / "spool.sqlite3")}
            up = [sys.executable, "-m", "runbooks.cli", "up", "--api-url", api,
                  "--gateway-port", str(gateway_port), "--poll-seconds", str(args.poll_seconds)]
            with child(up, env, home / "runbooks-up.log"):
                dep_id = wait_for(lambda: _deployment_id(api), 180, "deployment served")
                time.sleep(3)  # automations load shortly after creation
                # the first sample warms caches and is dropped
                samples = [_one_alert(api, gateway, dep_id) for _ in range(args.alerts + 1)][1:]
    finally:
        pg.stop()

    created, running, first_task = (list(column) for column in zip(*samples, strict=True))
    print(f"\ntrigger latency, {len(samples)} alerts (runbooks up, runner polling every {args.poll_seconds}s)")
    print(f"{'webhook POST to the gateway ->':44} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for name, values in [("flow run created (automation)", created),
                         ("flow run RUNNING (runner + process start)", running),
                         ("first task running", first_task)]:
        print(f"{name:44} " + " ".join(f"{percentile(values, q):6.2f}s" for q in (50, 95, 99))
              + f" {max(values):6.2f}s")
    print(f"mean first task: {statistics.mean(first_task):.2f}s")
    return 0


def _deployment_id(api: str) -> str | None:
    found = httpx.post(f"{api}/deployments/filter", timeout=5, json={
        "deployments": {"name": {"any_": ["db-connection-pool-exhausted"]}}}).json()
    return found[0]["id"] if found else None


def _one_alert(api: str, gateway: str, deployment_id: str) -> tuple[float, float, float]:
    before = {r["id"] for r in _runs(api, deployment_id)}
    fingerprint = uuid.uuid4().hex[:16]
    labels = {"alertname": "PostgresTooManyConnections", "database": "bench-db", "severity": "critical"}
    t0 = time.time()
    httpx.post(gateway, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}, json={
        "version": "4", "groupKey": f"{{}}:{{fp={fingerprint}}}", "status": "firing",
        "receiver": "runbooks", "groupLabels": {}, "commonLabels": labels,
        "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
        "alerts": [{"status": "firing", "labels": labels, "annotations": {},
                    "startsAt": datetime.now(UTC).isoformat(), "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "", "fingerprint": fingerprint}],
    }).raise_for_status()
    run = wait_for(lambda: next((r for r in _runs(api, deployment_id) if r["id"] not in before), None), 60, "run created")
    created = datetime.fromisoformat(run["created"]).timestamp() - t0

    def first_task_start():
        tasks = httpx.post(f"{api}/task_runs/filter", timeout=5, json={
            "task_runs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
        starts = [t["start_time"] for t in tasks if t.get("start_time")]
        return min(starts) if starts else None

    start = wait_for(first_task_start, 120, "first task started")
    first = datetime.fromisoformat(start).timestamp() - t0
    states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=5).json()
    running = min(datetime.fromisoformat(st["timestamp"]).timestamp() for st in states if st["type"] == "RUNNING") - t0
    # let the run finish so runs do not pile up on two cores
    wait_for(lambda: httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()["state"]["type"]
          in ("COMPLETED", "FAILED", "CRASHED"), 120, "run finished")
    return created, running, first


def _runs(api: str, deployment_id: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", timeout=5, json={
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}}}).json()
