"""Speed of the runbooks on the PostgreSQL team topology (issue #16), with our worker type
(`runbooks worker`: serving/fast_worker.py) and with stock process workers (`runbooks worker --stock`).

tests/team_topology.py starts the topology as processes on free ports: PostgreSQL for Prefect's
database, Redis, API server A (with services) and B (`--no-services`), `runbooks deploy`, and
`runbooks worker`s (stock `prefect worker start --pool runbooks --type process`). The alert gateway
(`python -m alert_gateway`) forwards to B, the API-only replica. The runbook is
`db-connection-pool-exhausted` against the topology's own PostgreSQL through PostgreSQL Database
blocks: a healthy pool, so each run checks, finds nothing to do and finishes without changing
anything.

1. Latency (bench/trigger_latency.py's `one_alert`, same stages, same table): one Alertmanager
   webhook at a time to the gateway, followed to the run's first task, with one worker: ours
   (runs start on their Scheduled event; its poll, the fallback, at Prefect's default 10 s), then
   a stock one polling every `--short-poll` seconds and with Prefect's default poll
   (PREFECT_WORKER_QUERY_SECONDS unset: 10 s); then all of them side by side in one table.
2. Throughput: `--alerts` webhooks, each for a database block of its own (distinct targets, so no
   run waits for another's target lock), posted back to back; the time until every run has
   finished, runs/minute, runs per alert (none lost, none doubled), with 1, 2 and 4 workers (ours
   unless `--throughput-worker stock`; each polls every second, half of them talk to A and half to
   B), the runs' states every second,
   and the CPU each process group used meanwhile (from /proc).

    python -m bench team [--latency-alerts 20] [--default-poll-alerts 10] [--alerts 100]
                         [--skip-ours] [--skip-stock] [--throughput-worker ours|stock]
                         [--workers 1,2,4] [--short-poll 1] [--skip-latency] [--skip-throughput]
    python -m bench team --sqlite [--alerts 100]    the same throughput on `runbooks up` (SQLite)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from bench.stack import child, percentile, wait_for
from bench.trigger_latency import (
    STAGES,
    TOKEN,
    add_event_stages,
    alertmanager_body,
    find_deployment_id,
    one_alert,
    print_stages,
    run_starts,
    runbooks_up,
    save_db_blocks,
)
from tests.servers import PostgresServer, free_port
from tests.team_topology import TeamTopology, start_team_topology

TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# worker name -> (which API server it talks to, its own queue)
WORKERS = {
    "worker-1": ("a", "w1"),
    "worker-2": ("b", "w2"),
    "worker-3": ("a", "w3"),
    "worker-4": ("b", "w4"),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench team")
    parser.add_argument("--latency-alerts", type=int, default=20)
    parser.add_argument("--default-poll-alerts", type=int, default=10)
    parser.add_argument("--short-poll", type=float, default=1.0)
    parser.add_argument("--alerts", type=int, default=100, help="throughput: distinct alerts")
    parser.add_argument("--workers", default="1,2,4", help="throughput: worker counts, in order")
    parser.add_argument("--phase-timeout", type=float, default=400)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-ours", action="store_true", help="latency: no run with ours")
    parser.add_argument("--skip-stock", action="store_true", help="latency: no stock worker")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--throughput-worker",
        choices=("ours", "stock"),
        default="ours",
        help="throughput: `runbooks worker` (ours, the default) or `runbooks worker --stock`",
    )
    parser.add_argument(
        "--sqlite", action="store_true", help="throughput on `runbooks up` (SQLite) instead"
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    if any(n < 1 or n > len(WORKERS) for n in counts) or counts != sorted(counts):
        parser.error(f"--workers: increasing counts between 1 and {len(WORKERS)}")

    if args.sqlite:
        return _sqlite_throughput(args)
    t_start = time.monotonic()
    topology = start_team_topology()
    print(f"topology up in {time.monotonic() - t_start:.0f} s; logs in {topology.home}", flush=True)
    failed = False
    try:
        for queue in ("w3", "w4"):
            httpx.post(
                f"{topology.api_a}/work_pools/runbooks/queues", json={"name": queue}, timeout=10
            ).raise_for_status()
        dep_id = wait_for(lambda: find_deployment_id(topology.api_a), 60, "deployment")
        gateway_port = free_port()
        gateway = f"http://127.0.0.1:{gateway_port}"
        env = {
            **topology.client_env(topology.api_b),
            "RUNBOOKS_GATEWAY_TOKEN": TOKEN,
            "RUNBOOKS_GATEWAY_SPOOL_PATH": str(topology.home / "spool.sqlite3"),
        }
        with child(
            [sys.executable, "-m", "alert_gateway", "--port", str(gateway_port)],
            env,
            topology.home / "gateway.log",
        ) as gateway_proc:
            wait_for(
                lambda: httpx.get(f"{gateway}/healthz", timeout=2).status_code == 200,
                60,
                "gateway up",
            )
            webhook = f"{gateway}/alerts/alertmanager"
            save_db_blocks(topology.api_a, topology.postgres, ["bench-db"])
            time.sleep(3)  # automations load shortly after creation
            topology.procs["worker-2"].stop()  # one worker, as `runbooks up` has one runner
            if not args.skip_latency:
                phases = [] if args.skip_ours else [(False, None, args.latency_alerts)]
                if not args.skip_stock:
                    phases += [
                        (True, args.short_poll, args.latency_alerts),
                        (True, None, args.default_poll_alerts),
                    ]
                columns = []
                for stock, poll, n in phases:
                    if n:
                        label, samples, twice = _latency(
                            topology, webhook, dep_id, poll, n, stock=stock
                        )
                        columns.append((label, samples))
                        failed |= twice
                _print_side_by_side(columns)
            if not args.skip_throughput:
                stock = args.throughput_worker == "stock"
                _restart_worker(topology, "worker-1", 1.0, stock=stock)
                blocks = [f"bench-db-{i}" for i in range(max(args.alerts, 1))]
                save_db_blocks(topology.api_a, topology.postgres, blocks)
                named = {gateway_proc.pid: "gateway"}
                results = []
                for n in counts:
                    for name in list(WORKERS)[:n]:
                        if not topology.procs.get(name) or not topology.procs[name].alive:
                            _restart_worker(topology, name, 1.0, stock=stock)
                    named.update({p.proc.pid: k for k, p in topology.procs.items() if p.proc})
                    result = _throughput(
                        topology.api_a,
                        webhook,
                        dep_id,
                        blocks,
                        str(n),
                        lambda: _cpu_by_group(named, topology.postgres),
                        args.phase_timeout,
                    )
                    results.append(result)
                    failed |= bool(result["lost"] or result["doubled"] or result["unfinished"])
                    # so far: a later phase may run out of time
                    _print_throughput(
                        results,
                        "team topology, "
                        + ("stock process workers" if stock else "our workers (event + warm)")
                        + " polling every 1 s",
                    )
    finally:
        topology.stop()
    return 1 if failed else 0


def _sqlite_throughput(args: argparse.Namespace) -> int:
    """The same throughput measure on `runbooks up` (its SQLite server, one runner)."""
    with runbooks_up([], None, []) as stack:
        blocks = [f"bench-db-{i}" for i in range(max(args.alerts, 1))]
        save_db_blocks(stack.api, stack.postgres, blocks)
        named = {stack.proc.pid: "runbooks up (server, gateway, runner, runs)"}
        result = _throughput(
            stack.api,
            stack.webhook,
            stack.deployment_id,
            blocks,
            "`runbooks up`",
            lambda: _cpu_by_group(named, stack.postgres),
            args.phase_timeout,
        )
    _print_throughput([result], "`runbooks up` on SQLite, its default poll")
    return 1 if result["lost"] or result["doubled"] or result["unfinished"] else 0


def _restart_worker(
    topology: TeamTopology, name: str, poll_s: float | None, stock: bool
) -> None:
    """(Re)start a worker polling every poll_s seconds (None: Prefect's default, 10 s): a stock
    one (`runbooks worker --stock`) or ours (`runbooks worker`)."""
    server, queue = WORKERS[name]
    proc = topology.procs.get(name)
    if proc is None:
        proc = topology.start_worker(
            name, topology.api_a if server == "a" else topology.api_b, queue
        )
    proc.stop()
    proc.command = [c for c in proc.command if c != "--stock"] + (["--stock"] if stock else [])
    if poll_s is None:
        proc.env.pop("PREFECT_WORKER_QUERY_SECONDS", None)
    else:
        proc.env["PREFECT_WORKER_QUERY_SECONDS"] = str(poll_s)
    proc.start()
    topology.wait_worker_online(name)


def _latency(
    topology, webhook: str, dep_id: str, poll_s: float | None, n: int, stock: bool = True
) -> tuple[str, list[dict], bool]:
    _restart_worker(topology, "worker-1", poll_s, stock=stock)
    if not stock:  # ours follows the events once it has synced with the pool
        wait_for(
            lambda: "following the events" in topology.procs["worker-1"].tail(20000),
            60,
            "our worker following the events",
        )
    load_before = os.getloadavg()
    # the first sample warms caches and is dropped
    samples = [one_alert(topology.api_a, webhook, dep_id) for _ in range(n + 1)][1:]
    time.sleep(6)  # Prefect's event persister writes events in batches, every 5 s
    add_event_stages(topology.api_a, samples)
    starts = run_starts(topology.api_a, [s["flow_run_id"] for s in samples])
    twice = [run for run, k in starts.items() if k != 1]
    poll = f"poll {poll_s:g} s" if poll_s is not None else "poll default (10 s)"
    label = f"stock worker, {poll}" if stock else f"our worker (event + warm), {poll}"
    print(
        f"\nteam topology trigger latency, {n} alerts, 1 {label} "
        f"(load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after)"
    )
    print_stages(samples)
    print(f"runs started more than once: {len(twice)}", flush=True)
    return label, samples, bool(twice)


def _print_side_by_side(columns: list[tuple[str, list[dict]]]) -> None:
    """Every latency phase in one table: p50 / p95 / p99 of each stage, one column a phase."""
    if not columns:
        return
    print("\nalert -> first task on the team topology, p50 / p95 / p99 (s), side by side")
    width = max(len(name) for name, _ in STAGES)
    print(
        f"| {'webhook POST to the gateway ->'.ljust(width)} | "
        + " | ".join(c for c, _ in columns)
        + " |"
    )
    print(f"|{'-' * (width + 2)}|" + "|".join("---" for _ in columns) + "|")
    for name, key in STAGES:
        cells = []
        for _, samples in columns:
            values = [s[key] for s in samples if s.get(key) is not None]
            cells.append(
                " / ".join(f"{percentile(values, q):.2f}" for q in (50, 95, 99)) if values else "-"
            )
        print(f"| {name.ljust(width)} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def _flow_runs(api: str, dep_id: str, since: datetime) -> list[dict]:
    runs: list[dict] = []
    while True:
        page = httpx.post(
            f"{api}/flow_runs/filter",
            timeout=30,
            json={
                "flow_runs": {
                    "deployment_id": {"any_": [dep_id]},
                    "expected_start_time": {"after_": since.isoformat()},
                },
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 200,
                "offset": len(runs),
            },
        ).json()
        runs += page
        if len(page) < 200:
            return runs


def _fingerprint(run: dict) -> str | None:
    return ((run["parameters"].get("params") or {}).get("alert") or {}).get("fingerprint")


def _throughput(api, webhook, dep_id, blocks, workers, cpu_by_group, timeout_s) -> dict:
    tag = uuid.uuid4().hex[:6]
    fingerprints = {f"{tag}{i:06d}": block for i, block in enumerate(blocks)}
    since = datetime.now(UTC) - timedelta(seconds=1)
    cpu_before = cpu_by_group()
    t0 = time.time()
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for fp, block in fingerprints.items():
            labels = {
                "alertname": "PostgresTooManyConnections",
                "database": block,
                "severity": "critical",
            }
            http.post(webhook, json=alertmanager_body(fp, labels)).raise_for_status()
    fired_s = time.time() - t0
    timeline: list[tuple[float, dict[str, int]]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        runs = [r for r in _flow_runs(api, dep_id, since) if _fingerprint(r) in fingerprints]
        states = collections.Counter(r["state"]["name"] for r in runs)
        timeline.append((time.time() - t0, dict(states)))
        done = [r for r in runs if r["state"]["type"] in TERMINAL]
        if len(done) >= len(fingerprints) or time.monotonic() > deadline:
            break
        time.sleep(1)
    cpu_after = cpu_by_group()
    wall_s = time.time() - t0
    per_alert = collections.Counter(_fingerprint(r) for r in runs)
    ends = [datetime.fromisoformat(r["end_time"]).timestamp() for r in done if r.get("end_time")]
    starts = [
        datetime.fromisoformat(r["start_time"]).timestamp() for r in runs if r.get("start_time")
    ]
    created = [datetime.fromisoformat(r["created"]).timestamp() for r in runs]
    last_s = (max(ends) - t0) if ends else None
    started_twice = [r for r, k in run_starts(api, [r["id"] for r in runs]).items() if k > 1]
    return {
        "workers": workers,
        "alerts": len(fingerprints),
        "fired_s": fired_s,
        "runs": len(runs),
        "completed": sum(1 for r in runs if r["state"]["type"] == "COMPLETED"),
        "states": dict(collections.Counter(r["state"]["name"] for r in runs)),
        "lost": sum(1 for fp in fingerprints if per_alert[fp] == 0),
        "doubled": sum(1 for fp in fingerprints if per_alert[fp] > 1) + len(started_twice),
        "unfinished": len(fingerprints) - len(done),
        "last_created_s": (max(created) - t0) if created else None,
        "first_start_s": (min(starts) - t0) if starts else None,
        "last_s": last_s,
        "runs_per_min": len(done) / last_s * 60 if last_s else 0.0,
        "run_s": [
            datetime.fromisoformat(r["end_time"]).timestamp()
            - datetime.fromisoformat(r["start_time"]).timestamp()
            for r in done
            if r.get("end_time") and r.get("start_time")
        ],
        "timeline": timeline,
        "wall_s": wall_s,
        "cpu": {k: cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0) for k in cpu_after},
    }


def _print_throughput(
    results: list[dict], where: str = "team topology, stock process workers polling every 1 s"
) -> None:
    print(f"\nthroughput: {results[0]['alerts']} distinct alerts on distinct targets, {where}")
    rows = [
        ("alerts posted in", lambda r: f"{r['fired_s']:.1f} s"),
        ("last run created after", lambda r: _s(r["last_created_s"])),
        ("first run started after", lambda r: _s(r["first_start_s"])),
        ("last run finished after", lambda r: _s(r["last_s"])),
        ("runs / minute", lambda r: f"{r['runs_per_min']:.1f}"),
        (
            "run duration p50 / p95 (start->end)",
            lambda r: (
                f"{percentile(r['run_s'], 50):.1f} / {percentile(r['run_s'], 95):.1f} s"
                if r["run_s"]
                else "-"
            ),
        ),
        ("runs / completed", lambda r: f"{r['runs']} / {r['completed']}"),
        (
            "lost / doubled / unfinished",
            lambda r: f"{r['lost']} / {r['doubled']} / {r['unfinished']}",
        ),
    ]
    groups = sorted(
        {g for r in results for g, v in r["cpu"].items() if v >= 1},
        key=lambda g: -results[-1]["cpu"].get(g, 0),
    )
    for g in groups:
        rows.append((f"CPU s: {g}", lambda r, g=g: f"{r['cpu'].get(g, 0.0):.0f}"))
    rows.append(
        (
            "CPU s: total / (2 cores x wall)",
            lambda r: f"{sum(r['cpu'].values()):.0f} / {2 * r['wall_s']:.0f}",
        )
    )
    width = max(len(k) for k, _ in rows)
    print(f"| {'workers'.ljust(width)} | " + " | ".join(str(r["workers"]) for r in results) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("---" for _ in results) + "|")
    for name, fmt in rows:
        print(f"| {name.ljust(width)} | " + " | ".join(fmt(r) for r in results) + " |")
    for r in results:
        print(f"\nrun states over time, {r['workers']} worker(s) (s after the first POST: states)")
        step = max(1, len(r["timeline"]) // 15)
        for t, states in r["timeline"][::step] + r["timeline"][-1:]:
            print(f"  {t:6.1f}  " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    sys.stdout.flush()


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _cpu_by_group(named: dict[int, str], postgres: PostgresServer) -> dict[str, float]:
    """CPU seconds (user + system, own and reaped children's) of every live process, summed by the
    nearest ancestor named in `named`, this script or `postgres`; the rest by command name."""
    names = {**named, os.getpid(): "this bench (alerts, polling)"}
    with contextlib.suppress(OSError, ValueError):
        pidfile = postgres.datadir / "postmaster.pid"
        names[int(pidfile.read_text().split()[0])] = "postgres (Prefect's database, targets)"
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(entry.name)] = (int(fields[1]), comm, sum(int(x) for x in fields[11:15]) / tick)
    cpu: dict[str, float] = collections.defaultdict(float)
    for pid, (_, comm, used) in procs.items():
        ancestor, group = pid, None
        while ancestor in procs and group is None:
            group = names.get(ancestor)
            ancestor = procs[ancestor][0]
        group = group or f"other: {comm}"
        if group.startswith("worker-"):
            group = "workers + their flow-run processes"
        cpu[group] += used
    return dict(cpu)
