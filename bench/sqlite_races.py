"""`python -m bench sqlite-races [--seconds 120] [--clients 8] [--server both|ours|stock]`.

The write pattern that stalled `runbooks up`'s server for 60 s (issue #9 defect 6), without the
runbooks around it: clients race to create the same target-lock concurrency limit (four at once,
so three of four fail with a UNIQUE violation, as runs for one target do), then take and release
a slot, write a variable and read runs, while a prober asks `/api/health` every 0.2 s. Against
`runbooks up`'s server (serving/sqlite_server.py) and Prefect's stock `prefect server start`, one
after the other, each on a fresh SQLite database.

Before serving/sqlite_server.py closed failed cursors on their own thread, ours stalled for the
full 60 s busy timeout about once a minute here (the API silent, then "database is locked"): the
garbage collector freed a failed statement's cursor on the event loop's thread while its pooled
connection waited in SQLite's busy handler for a transaction of that same loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.stack import ROOT, percentile
from tests.servers import PrefectServer

SERVERS = {
    "ours": ("-m", "serving.sqlite_server"),
    "stock": ("-m", "prefect", "server", "start"),
}
RACERS = 4  # creates of one name at once


@dataclass
class Result:
    rounds: int = 0
    created: int = 0
    conflicts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    health_s: list[float] = field(default_factory=list)
    log: str = ""


def race(api: str, seconds: float, clients: int) -> Result:
    result = Result()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def count(response: httpx.Response | None, what: str) -> None:
        with lock:
            if response is None:
                result.errors[f"{what}: no answer"] += 1
            elif response.status_code == 201 and what == "create":
                result.created += 1
            elif response.status_code == 409 and what == "create":
                result.conflicts += 1
            elif response.status_code >= 400:
                result.errors[f"{what}: {response.status_code}"] += 1

    def send(client: httpx.Client, what: str, path: str, body: dict) -> None:
        try:
            count(client.post(f"{api}{path}", json=body), what)
        except httpx.HTTPError:
            count(None, what)

    def client_loop() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop:
                name = f"runbooks-lock-bench-{uuid.uuid4().hex[:12]}"
                body = {"name": name, "limit": 1}
                creates = [
                    threading.Thread(
                        target=send, args=(client, "create", "/v2/concurrency_limits/", body)
                    )
                    for _ in range(RACERS)
                ]
                for t in creates:
                    t.start()
                for t in creates:
                    t.join()
                slot = {"names": [name], "slots": 1, "mode": "concurrency"}
                send(client, "increment", "/v2/concurrency_limits/increment", slot)
                send(client, "decrement", "/v2/concurrency_limits/decrement", slot)
                variable = {"name": f"runbooks_bench_{uuid.uuid4().hex[:16]}", "value": "x"}
                send(client, "variable", "/variables/", variable)
                send(client, "read", "/flow_runs/filter", {"limit": 5})
                with lock:
                    result.rounds += 1

    def probe() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                httpx.get(f"{api}/health", timeout=120)
            except httpx.HTTPError:
                pass
            result.health_s.append(time.monotonic() - started)
            time.sleep(0.2)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    threads.append(threading.Thread(target=probe))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def run_one(kind: str, seconds: float, clients: int) -> Result:
    server = PrefectServer(
        home=Path(tempfile.mkdtemp(prefix=f"bench-sqlite-{kind}-")),
        launcher=SERVERS[kind],
        extra_env={"PYTHONPATH": str(ROOT), "PREFECT_UI_ENABLED": "false"},
    )
    server.start()
    print(f"{kind}: logs in {server.home}", flush=True)
    try:
        result = race(server.api_url, seconds, clients)
    finally:
        server.stop()
    result.log = server.log_path.read_text(errors="replace")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sqlite-races")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--server", choices=("both", "ours", "stock"), default="both")
    args = parser.parse_args(argv)
    kinds = ["ours", "stock"] if args.server == "both" else [args.server]
    results = {kind: run_one(kind, args.seconds, args.clients) for kind in kinds}

    def row(label: str, value: Callable[[Result], object]) -> str:
        return f"| {label} | " + " | ".join(str(value(r)) for r in results.values()) + " |"

    print(f"\n{args.clients} clients for {args.seconds:.0f} s, {RACERS} racing creates per name\n")
    print("| | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for line in (
        row("rounds (4 creates, slot taken and released, variable, read)", lambda r: r.rounds),
        row("limits created / refused as duplicates", lambda r: f"{r.created} / {r.conflicts}"),
        row("requests failed", lambda r: sum(r.errors.values())),
        row(
            "`/health` p50 / p99 / max",
            lambda r: " / ".join(f"{percentile(r.health_s, q):.2f} s" for q in (50, 99, 100)),
        ),
        row("`/health` answers over 10 s", lambda r: sum(1 for h in r.health_s if h > 10)),
        row('"database is locked" in the server log', lambda r: r.log.count("database is locked")),
        row(
            "event loop blocked (watchdog, ours only)", lambda r: r.log.count("event loop blocked")
        ),
    ):
        print(line)
    for kind, r in results.items():
        if r.errors:
            print(f"{kind} failures: {dict(r.errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
