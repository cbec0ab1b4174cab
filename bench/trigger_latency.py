"""Latency from Alertmanager's webhook POST to the runbook's first task starting, on the real stack.

`runbooks up` runs as one subprocess tree exactly as a user starts it: its own Prefect server on
SQLite, the alert gateway, and one runner serving every deployment of prefect.yaml. A throwaway
PostgreSQL backs the `db-connection-pool-exhausted` runbook (a healthy pool: the run checks and
finishes without changing anything). Each sample POSTs one Alertmanager v4 webhook, exactly as
Alertmanager does, to the gateway and follows the alert through every stage, all timed from the
POST with the server's (or the run's) own timestamps, so how often this script looks does not
change the figures:

    gateway accepted         the webhook's 202
    event in Prefect         the alert event's `received` (Prefect took the gateway's POST /events)
    automation fired         `prefect.automation.triggered` for that alert event
    flow run created         the run the automation created (its `created`)
    run picked up            the run's PENDING state (the runner proposed it before starting it)
    process started          the run's RUNNING state (the flow engine in the run's process)
    first task running       the first task run's start time

    python -m bench trigger-latency --alerts 50 [--poll-seconds 1.0] [--server-env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from bench.stack import child, percentile, wait_for
from tests.servers import PostgresServer, free_port, start_postgres, wait_for_port

TOKEN = uuid.uuid4().hex
DEPLOYMENT = "db-connection-pool-exhausted"
STAGES = [
    ("gateway accepted (202)", "accepted"),
    ("event in Prefect (received)", "event_received"),
    ("automation fired", "automation_fired"),
    ("flow run created (automation)", "created"),
    ("run picked up (PENDING)", "pending"),
    # a worker's steps (none on `runbooks up`, whose runner has no job and no pull steps)
    ("  job resolved (Submitting)", "submitting"),
    ("  workspace step began (log)", "workspace"),
    ("  pull steps done (log)", "pulled"),
    ("process started (RUNNING)", "running"),
    ("first task running", "first_task"),
]
# How often this script looks for progress; figures come from server timestamps, not from this.
LOOK_S = 0.2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench trigger-latency")
    parser.add_argument("--alerts", type=int, default=50)
    parser.add_argument(
        "--poll-seconds", type=float, default=None, help="runbooks up --poll-seconds"
    )
    parser.add_argument(
        "--up-arg", action="append", default=[], help="extra `runbooks up` argument"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for `runbooks up` and its Prefect server (e.g. PREFECT_SERVER_...)",
    )
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    with runbooks_up(args.up_arg, args.poll_seconds, args.server_env) as stack:
        api, gateway, dep_id, home = stack.api, stack.webhook, stack.deployment_id, stack.home
        # the first sample warms caches and is dropped
        samples = [one_alert(api, gateway, dep_id) for _ in range(args.alerts + 1)][1:]
        time.sleep(6)  # Prefect's event persister writes events in batches, every 5 s
        add_event_stages(api, samples)
        starts = run_starts(api, [s["flow_run_id"] for s in samples])
    load_after = os.getloadavg()
    (home / "samples.json").write_text(json.dumps(samples, indent=1))

    twice = {run: n for run, n in starts.items() if n != 1}
    print(
        f"\ntrigger latency, {len(samples)} alerts (`runbooks up` {stack.args or 'defaults'}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)"
    )
    print_stages(samples)
    print(
        f"mean first task: {statistics.mean(s['first_task'] for s in samples):.2f}s; "
        f"runs started more than once: {len(twice)}; per-sample stages in {home / 'samples.json'}"
    )
    return 1 if twice else 0


@dataclass
class UpStack:
    api: str
    webhook: str  # the gateway's Alertmanager endpoint
    deployment_id: str  # db-connection-pool-exhausted's
    home: Path
    postgres: PostgresServer  # the runbook's target, a healthy pool
    proc: subprocess.Popen
    args: str  # the `runbooks up` options given


@contextlib.contextmanager
def runbooks_up(
    up_args: list[str], poll_seconds: float | None, server_env: list[str]
) -> Iterator[UpStack]:
    """`runbooks up` as a user starts it, a throwaway PostgreSQL and its block `bench-db`."""
    home = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"logs in {home}")
    port, gateway_port = free_port(), free_port()
    api = f"http://127.0.0.1:{port}/api"
    gateway = f"http://127.0.0.1:{gateway_port}/alerts/alertmanager"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}
    env.update(
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        RUNBOOKS_GATEWAY_TOKEN=TOKEN,
        RUNBOOKS_GATEWAY_SPOOL_PATH=str(home / "spool.sqlite3"),
    )
    env.update(dict(item.split("=", 1) for item in server_env))
    options = ["--port", str(port), "--gateway-port", str(gateway_port), *up_args]
    if poll_seconds is not None:
        options += ["--poll-seconds", str(poll_seconds)]
    up = [sys.executable, "-m", "serving.cli", "up", *options]

    pg = start_postgres()
    try:
        with child(up, env, home / "runbooks-up.log") as proc:
            dep_id = wait_for(
                lambda: find_deployment_id(api), 180, "deployment served", interval_s=0.5
            )
            save_db_blocks(api, pg, ["bench-db"])
            # `runbooks up` starts its gateway only once every deployment is applied
            wait_for_port(gateway_port, timeout_s=120)
            time.sleep(3)  # automations load shortly after creation
            yield UpStack(api, gateway, dep_id, home, pg, proc, " ".join(options[4:]))
    finally:
        pg.stop()


def save_db_blocks(api: str, pg: PostgresServer, names: list[str]) -> None:
    """PostgreSQL Database blocks with these names, all on `pg`."""
    # prefect is already imported (its settings read): point it at this server explicitly
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks.postgres import PostgresDatabase

    with temporary_settings(updates={PREFECT_API_URL: api}):
        for name in names:
            PostgresDatabase(
                host="127.0.0.1",
                port=pg.port,
                dbname="postgres",
                user=pg.user,
                password=pg.password,
            ).save(name, overwrite=True)


def print_stages(samples: list[dict]) -> None:
    """The stage table: p50/p95/p99/max of each stage, timed from the webhook POST."""
    print(f"{'webhook POST to the gateway ->':34} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for name, key in STAGES:
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            print(f"{name:34} (not found)")
            continue
        missing = (
            f"  ({len(samples) - len(values)} not found)" if len(values) < len(samples) else ""
        )
        print(
            f"{name:34} "
            + " ".join(f"{percentile(values, q):6.2f}s" for q in (50, 95, 99))
            + f" {max(values):6.2f}s{missing}"
        )


def find_deployment_id(api: str) -> str | None:
    found = httpx.post(
        f"{api}/deployments/filter",
        timeout=5,
        json={"deployments": {"name": {"any_": [DEPLOYMENT]}}},
    ).json()
    return found[0]["id"] if found else None


def one_alert(api: str, gateway: str, deployment_id: str) -> dict:
    fingerprint = uuid.uuid4().hex[:16]
    labels = {
        "alertname": "PostgresTooManyConnections",
        "database": "bench-db",
        "severity": "critical",
    }
    since = datetime.now(UTC) - timedelta(seconds=1)
    t0 = time.time()
    httpx.post(
        gateway,
        timeout=10,
        headers={"Authorization": f"Bearer {TOKEN}"},
        json=alertmanager_body(fingerprint, labels),
    ).raise_for_status()
    accepted = time.time() - t0

    def alert_run():
        # this alert's run: the scheduler creates runs of the same deployment meanwhile
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            timeout=5,
            json={
                "flow_runs": {
                    "deployment_id": {"any_": [deployment_id]},
                    "start_time": {"is_null_": False},
                },
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 20,
            },
        ).json()
        return next(
            (
                r
                for r in runs
                if ((r["parameters"].get("params") or {}).get("alert") or {}).get("fingerprint")
                == fingerprint
                and _seen_since(r, since)
            ),
            None,
        )

    run = wait_for(alert_run, 60, "run started", interval_s=LOOK_S)

    def first_task_start():
        tasks = _read(
            api,
            "/task_runs/filter",
            {
                "task_runs": {"flow_run_id": {"any_": [run["id"]]}},
                "sort": "EXPECTED_START_TIME_ASC",
            },
        )
        starts = [t["start_time"] for t in tasks if t.get("start_time")]
        return min(starts) if starts else None

    first_task = _ts(wait_for(first_task_start, 120, "first task started", interval_s=LOOK_S))
    # let the run finish so runs do not pile up on two cores
    wait_for(
        lambda: (
            httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()["state"]["type"]
            in ("COMPLETED", "FAILED", "CRASHED")
        ),
        120,
        "run finished",
        interval_s=LOOK_S,
    )
    states = httpx.get(
        f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=5
    ).json()

    def first_state(kind: str, name: str | None = None) -> float | None:
        times = [
            _ts(st["timestamp"])
            for st in states
            if st["type"] == kind and (name is None or st["name"] == name)
        ]
        return min(times) - t0 if times else None

    # a worker's steps between PENDING and RUNNING, from what Prefect records of them: the
    # Submitting state (job resolved), and the workspace step's own log lines in the child
    logs = _read(
        api,
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )

    def first_log(test) -> float | None:
        return next(
            (_ts(entry["timestamp"]) - t0 for entry in logs if test(entry["message"])), None
        )

    return {
        "fingerprint": fingerprint,
        "flow_run_id": run["id"],
        "t0": t0,
        "accepted": accepted,
        "created": _ts(run["created"]) - t0,
        "pending": first_state("PENDING"),
        "submitting": first_state("PENDING", "Submitting"),
        "workspace": first_log(lambda m: m.startswith("Running ") and "pull step" in m),
        "pulled": first_log(lambda m: m == "All deployment steps completed successfully"),
        "running": first_state("RUNNING"),
        "first_task": first_task - t0,
    }


def _read(api: str, path: str, body: dict) -> list[dict]:
    """One filter request to Prefect's API (a list of objects)."""
    return httpx.post(f"{api}{path}", timeout=5, json=body).json()


def alertmanager_body(fingerprint: str, labels: dict[str, str]) -> dict:
    """An Alertmanager v4 webhook with one firing alert, as Alertmanager sends it."""
    return {
        "version": "4",
        "groupKey": f"{{}}:{{fp={fingerprint}}}",
        "status": "firing",
        "receiver": "runbooks",
        "groupLabels": {},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {},
                "startsAt": datetime.now(UTC).isoformat(),
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": fingerprint,
            }
        ],
    }


def _seen_since(run: dict, since: datetime) -> bool:
    return datetime.fromisoformat(run["created"]) >= since


def add_event_stages(api: str, samples: list[dict]) -> None:
    """Add when Prefect received each alert event and when its automation fired."""
    since = datetime.fromtimestamp(samples[0]["t0"] - 5, UTC)
    alerts = {
        e["resource"]["prefect.resource.id"]: e for e in _events(api, ["alert.firing"], since)
    }
    fired: dict[str, float] = {}
    for event in _events(api, ["prefect.automation.triggered"], since):
        for related in event.get("related", []):
            if related.get("prefect.resource.role") == "triggering-event":
                cause = related["prefect.resource.id"].removeprefix("prefect.event.")
                fired.setdefault(cause, _ts(event["occurred"]))
    for sample in samples:
        alert = alerts.get(f"alert.{sample['fingerprint']}")
        if alert:
            sample["event_received"] = _ts(alert["received"]) - sample["t0"]
            if alert["id"] in fired:
                sample["automation_fired"] = fired[alert["id"]] - sample["t0"]


def _events(api: str, names: list[str], since: datetime) -> list[dict]:
    until = datetime.now(UTC) + timedelta(minutes=1)
    page = httpx.post(
        f"{api}/events/filter",
        timeout=10,
        json={
            "filter": {
                "event": {"name": names},
                "occurred": {"since": since.isoformat(), "until": until.isoformat()},
                "order": "ASC",
            },
            "limit": 50,
        },
    ).json()
    events = list(page["events"])
    while page.get("next_page"):
        page = httpx.get(page["next_page"], timeout=10).json()
        events += page["events"]
    return events


def run_starts(api: str, run_ids: list[str]) -> dict[str, int]:
    """How many times each run was set RUNNING (a run started twice would show 2)."""
    starts = {}
    for run_id in run_ids:
        states = httpx.get(
            f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=5
        ).json()
        starts[run_id] = sum(1 for st in states if st["type"] == "RUNNING")
    return starts


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()
