"""Latency from an alert event to the runbook's first task starting, on the real stack.

A Prefect server (SQLite) and `runbooks up --api-url` serving every deployment of prefect.yaml run
as subprocesses; a throwaway PostgreSQL backs the `db-connection-pool-exhausted` runbook (a healthy
pool: the run checks and finishes without changing anything). Each sample posts one
`alert.firing` event and waits for the first task run of the flow run it starts.

    python -m bench trigger-latency --alerts 50
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.servers import free_port, start_postgres

ROOT = Path(__file__).resolve().parent.parent


def _wait(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(what)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench trigger-latency")
    parser.add_argument("--alerts", type=int, default=50)
    parser.add_argument("--poll-seconds", type=float, default=0.25, help="runbooks up --poll-seconds")
    args = parser.parse_args(argv)

    home = tempfile.mkdtemp(prefix="bench-prefect-")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=home, PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    pg = start_postgres()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120, "prefect up")
        os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
        from blocks.postgres import PostgresDatabase

        PostgresDatabase(
            host="127.0.0.1", port=pg.port, dbname="postgres", user=pg.user, password=pg.password
        ).save("bench-db", overwrite=True)
        log = Path(home) / "runbooks-up.log"
        print(f"runbooks up output: {log}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "runbooks.cli", "up", "--api-url", api,
             "--poll-seconds", str(args.poll_seconds)],
            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        ))

        def deployment_id():
            found = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["db-connection-pool-exhausted"]}}}, timeout=5).json()
            return found[0]["id"] if found else None

        dep_id = _wait(deployment_id, 180, "deployment served")
        time.sleep(3)  # automations load shortly after creation
        samples: list[tuple[float, float, float]] = []
        for _ in range(args.alerts + 1):  # the first warms caches and is dropped
            samples.append(_one_alert(api, dep_id))
        samples = samples[1:]
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        pg.stop()

    created, running, first_task = (list(column) for column in zip(*samples, strict=True))
    print(f"\ntrigger latency, {len(samples)} alerts (runbooks up, runner polling every {args.poll_seconds}s)")
    print(f"{'event posted ->':44} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for name, values in [("flow run created (automation)", created),
                         ("flow run RUNNING (runner + process start)", running),
                         ("first task running", first_task)]:
        print(f"{name:44} " + " ".join(f"{_percentile(values, q):6.2f}s" for q in (50, 95, 99))
              + f" {max(values):6.2f}s")
    print(f"mean first task: {statistics.mean(first_task):.2f}s")
    return 0


def _one_alert(api: str, deployment_id: str) -> tuple[float, float, float]:
    before = {r["id"] for r in _runs(api, deployment_id)}
    fingerprint = uuid.uuid4().hex[:16]
    t0 = time.time()
    httpx.post(f"{api}/events", timeout=10, json=[{
        "id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(), "event": "alert.firing",
        "resource": {"prefect.resource.id": f"alert.{fingerprint}",
                     "alertname": "PostgresTooManyConnections", "database": "bench-db"},
    }]).raise_for_status()
    run = _wait(lambda: next((r for r in _runs(api, deployment_id) if r["id"] not in before), None), 60, "run created")
    created = datetime.fromisoformat(run["created"]).timestamp() - t0

    def first_task_start():
        tasks = httpx.post(f"{api}/task_runs/filter", timeout=5, json={
            "task_runs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
        starts = [t["start_time"] for t in tasks if t.get("start_time")]
        return min(starts) if starts else None

    start = _wait(first_task_start, 120, "first task started")
    first = datetime.fromisoformat(start).timestamp() - t0
    states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=5).json()
    running = min(datetime.fromisoformat(st["timestamp"]).timestamp() for st in states if st["type"] == "RUNNING") - t0
    # let the run finish so runs do not pile up on two cores
    _wait(lambda: httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()["state"]["type"]
          in ("COMPLETED", "FAILED", "CRASHED"), 120, "run finished")
    return created, running, first


def _runs(api: str, deployment_id: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", timeout=5, json={
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}}}).json()
