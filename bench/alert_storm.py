"""Alert storm through the gateway: many alerts, many fingerprints, concurrent clients.

A Prefect server and `python -m alert_gateway` run as real processes. 16 clients post 10,000
Alertmanager webhooks (one alert each) over 2,000 fingerprints: each fingerprint fires 5 times
with the same startsAt, as Alertmanager re-notifies, so only the first of each is outside the
cooldown. The table shows requests/s, response times, and whether exactly the expected events
reached Prefect (none lost, none twice).

    python -m bench alert-storm [--alerts 10000 --fingerprints 2000 --clients 16]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

import httpx

from bench.stack import child, percentile, prefect_server, wait_for
from tests.alertmanager import scrape_metric
from tests.servers import free_port


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench alert-storm")
    parser.add_argument("--alerts", type=int, default=10_000)
    parser.add_argument("--fingerprints", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args(argv)

    token = uuid.uuid4().hex
    run_id = uuid.uuid4().hex[:8]
    started_at = datetime.now(UTC).isoformat()
    with prefect_server() as (api, env, home):
        gateway_port = free_port()
        gateway = f"http://127.0.0.1:{gateway_port}"
        env = {**env, "RUNBOOKS_GATEWAY_TOKEN": token,
               "RUNBOOKS_GATEWAY_SPOOL_PATH": str(home / "spool.sqlite3")}
        with child([sys.executable, "-m", "alert_gateway", "--port", str(gateway_port)], env,
                   home / "gateway.log"):
            wait_for(lambda: httpx.get(f"{gateway}/healthz", timeout=2).status_code == 200, 60,
                     "gateway up")
            latencies, statuses, elapsed = _storm(gateway, token, run_id, started_at, args)
            expected = args.fingerprints
            drained_at = time.monotonic()
            forwarded = wait_for(lambda: _metric(gateway, "runbooks_gateway_events_forwarded") >= expected
                                 and _metric(gateway, "runbooks_gateway_spool_depth") == 0
                                 and _metric(gateway, "runbooks_gateway_events_forwarded"),
                                 300, "spool drained")
            drain_s = time.monotonic() - drained_at
            in_prefect = wait_for(lambda: (n := _events_in_prefect(api, run_id)) >= expected and n, 120,
                                  "events in Prefect")
            deduplicated = _metric(gateway, "runbooks_gateway_alerts_deduplicated")

    accepted = sum(1 for s in statuses if s == 202)
    print(f"\nalert storm: {args.alerts} alerts, {args.fingerprints} fingerprints, {args.clients} clients")
    print(f"{'requests/s':38} {args.alerts / elapsed:10.0f}")
    for q in (50, 95, 99):
        print(f"{f'response time p{q}':38} {percentile(latencies, q) * 1000:8.1f}ms")
    print(f"{'max response time':38} {max(latencies) * 1000:8.1f}ms")
    print(f"{'accepted (202)':38} {accepted:10d}")
    print(f"{'deduplicated (within cooldown)':38} {int(deduplicated):10d}")
    print(f"{'expected events (outside cooldown)':38} {expected:10d}")
    print(f"{'forwarded by the gateway':38} {int(forwarded):10d}")
    print(f"{'events in Prefect':38} {in_prefect:10d}")
    print(f"{'lost':38} {max(expected - in_prefect, 0):10d}")
    print(f"{'spool drained after the storm in':38} {drain_s:9.1f}s")
    return 0 if accepted == args.alerts and in_prefect == expected else 1


def _storm(gateway: str, token: str, run_id: str, starts_at: str, args: argparse.Namespace):
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    per_client = [range(i, args.alerts, args.clients) for i in range(args.clients)]

    def client(indexes: range) -> None:
        mine_l, mine_s = [], []
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as http:
            for i in indexes:
                fp = f"{run_id}{i % args.fingerprints:08x}"
                body = _payload(fp, starts_at, run_id)
                t0 = time.perf_counter()
                resp = http.post(f"{gateway}/alerts/alertmanager", json=body)
                mine_l.append(time.perf_counter() - t0)
                mine_s.append(resp.status_code)
        with lock:
            latencies.extend(mine_l)
            statuses.extend(mine_s)

    threads = [threading.Thread(target=client, args=(idx,)) for idx in per_client]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses, time.perf_counter() - t0


def _payload(fingerprint: str, starts_at: str, run_id: str) -> dict:
    labels = {"alertname": "BenchStorm", "severity": "warning", "instance": fingerprint,
              "bench_run": run_id}
    return {
        "version": "4", "groupKey": f"{{}}:{{alertname=\"BenchStorm\",instance=\"{fingerprint}\"}}",
        "status": "firing", "receiver": "runbooks", "groupLabels": {}, "commonLabels": labels,
        "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "truncatedAlerts": 0,
        "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "storm"},
                    "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus:9090/graph", "fingerprint": fingerprint}],
    }


def _metric(gateway: str, name: str) -> float:
    return scrape_metric(f"{gateway}/metrics", name)


def _events_in_prefect(api: str, run_id: str) -> int:
    """Distinct alert resources of this run that Prefect stored (pages through /events/filter)."""
    seen: set[str] = set()
    resp = httpx.post(f"{api}/events/filter", timeout=30, json={
        "filter": {"event": {"name": ["alert.firing"]},
                   "resource": {"id_prefix": [f"alert.{run_id}"]},
                   "occurred": {"since": "2000-01-01T00:00:00Z"}},
        "limit": 50}).json()
    while True:
        seen.update(e["id"] for e in resp["events"])
        if not resp.get("next_page"):
            return len(seen)
        resp = httpx.get(resp["next_page"], timeout=30).json()
