"""Our worker type, `runbooks-process` (serving/fast_worker.py), on the team topology
(tests/team_topology.py): runs start on their Scheduled event in warm forked interpreters.

For these tests the topology's two workers are stopped (they would race these for the pool's
default queue) and two others of ours serve the pool, both polling only every POLL_S seconds:
`fast-1` is `runbooks worker` talking to API server A; `fast-2` is Prefect's own `prefect worker
start --type runbooks-process` talking to B, finding the type through the `prefect.collections`
entry point pyproject.toml declares. A stock worker (`runbooks worker --stock`) serves a run
beside them; afterwards the topology's workers are started again.
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from serving.deploy_command import WorkingDirectory
from tests.conftest import read_incident_report
from tests.gateway_proc import read_events
from tests.integration.test_alert_triggers import post_alert_event
from tests.integration.test_team_topology import (
    FINAL,
    api,
    deployment_runs,
    first_new_run,
    wait_state,
    worker_of,
)
from tests.pg_env import Env, env, wait_until  # noqa: F401 - env: a fixture
from tests.team_topology import HEARTBEAT_SECONDS, PROJECT_ROOT, Proc, TeamTopology, wait_healthy

# the topology starts within the first test: minutes on a loaded machine
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

POLL_S = 300  # far beyond every wait below: a run started meanwhile came from its event
PICKED_UP = "picked up on its Scheduled event"
TOPOLOGY_WORKERS = {"worker-1": "w1", "worker-2": "w2"}


def _entry_point_path(home: Path) -> str:
    """A directory whose dist-info declares pyproject.toml's `prefect.collections` entry points
    (what installing this package writes), for a process started outside the venv's install."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    points = project["project"]["entry-points"]["prefect.collections"]
    dist = home / "entry-points" / "runbooks_checkout-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: runbooks-checkout\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[prefect.collections]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
    )
    return str(dist.parent)


def _fast_worker(team: TeamTopology, name: str, api_url: str, queue: str, cli: str) -> Proc:
    env = team.client_env(api_url)
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_SECONDS)
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(POLL_S)
    env["PREFECT_WORKER_PREFETCH_SECONDS"] = "5"
    queues = ["--work-queue", "default", "--work-queue", queue]
    if cli == "runbooks":
        command = [sys.executable, "-m", "serving.cli", "worker", "--name", name, *queues]
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), _entry_point_path(team.home)])
        command = [
            *(sys.executable, "-m", "prefect", "worker", "start"),
            *("--pool", "runbooks", "--type", "runbooks-process", "--name", name, *queues),
        ]
    proc = Proc(name, command, env, team.home / f"{name}.log")
    team.procs[name] = proc
    proc.start()
    return proc


def _apply_probe(
    api_url: str, name: str, entrypoint: str, storage: WorkingDirectory | None = None
) -> None:
    """A deployment of a test flow in the `runbooks` pool, pulled from this checkout."""
    import importlib

    from serving.deploy_command import POOL

    path, func = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        deployment = getattr(module, func).to_deployment(
            name=name, work_pool_name=POOL, job_variables={"working_dir": str(PROJECT_ROOT)}
        )
        deployment.entrypoint = entrypoint
        deployment.storage = storage or WorkingDirectory(str(PROJECT_ROOT))
        deployment.apply()


@pytest.fixture(scope="module")
def fast(team_topology: TeamTopology) -> Iterator[TeamTopology]:
    team = team_topology
    for queue in ("f1", "f2"):
        resp = httpx.post(
            f"{team.api_a}/work_pools/runbooks/queues", json={"name": queue}, timeout=10
        )
        assert resp.status_code in (201, 409), resp.text
    _apply_probe(team.api_a, "fast-worker-hold", "tests/fast_worker_probe.py:hold")
    _apply_probe(team.api_a, "fast-worker-append", "tests/pickup_probe.py:append_line")
    for name in TOPOLOGY_WORKERS:
        team.procs[name].stop()
    _fast_worker(team, "fast-1", team.api_a, "f1", cli="runbooks")
    _fast_worker(team, "fast-2", team.api_b, "f2", cli="prefect")
    try:
        team.wait_worker_online("fast-1")
        team.wait_worker_online("fast-2")
        for name in ("fast-1", "fast-2"):
            # the event stream is followed once the worker has synced with its pool
            assert wait_until(
                lambda n=name: "following the events" in team.procs[n].tail(20000), timeout_s=30
            ), team.procs[name].tail()
        with temporary_settings(updates={PREFECT_API_URL: team.api_b}):
            yield team
    finally:
        for name in ("fast-1", "fast-2"):
            team.procs.pop(name).stop()
        for name, queue in TOPOLOGY_WORKERS.items():
            if not team.procs[name].alive:
                team.start_worker(name, team.api_a if name == "worker-1" else team.api_b, queue)
        for name in TOPOLOGY_WORKERS:
            team.wait_worker_online(name)


def _probe_run(name: str, parameters: dict[str, Any], queue: str | None = None) -> str:
    (dep,) = api("/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            uuid.UUID(dep["id"]), parameters=parameters, work_queue_name=queue
        )
    return str(run.id)


def _states(run_id: str) -> list[str]:
    return [s["type"] for s in api(f"/flow_run_states/?flow_run_id={run_id}")]


def _picked_up_by(team: TeamTopology, run_id: str) -> set[str]:
    return {n for n in ("fast-1", "fast-2") if f"{run_id} {PICKED_UP}" in team.procs[n].tail(10**6)}


def _seconds(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def test_alert_runs_on_our_worker_from_its_event(fast: TeamTopology, env: Env) -> None:
    """An alert's run is taken on its Scheduled event (both of ours follow the pool's events; the
    poll is POLL_S away) and runs the runbook against the real database: tasks, logs, report."""
    block = env.block()
    before = {r["id"] for r in deployment_runs()}
    post_alert_event({"alertname": "PostgresTooManyConnections", "database": block})

    run = wait_until(lambda: first_new_run(before), timeout_s=60)
    assert run, "the alert started no run"
    run = wait_state(run["id"], FINAL, timeout_s=60)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert worker_of(run) in {"fast-1", "fast-2"}
    assert worker_of(run) in _picked_up_by(fast, run["id"])
    # long before the worker's next poll (no speed claim: the benchmark measures that)
    assert _seconds(run["start_time"]) - _seconds(run["created"]) < POLL_S / 3
    assert _states(run["id"]).count("RUNNING") == 1

    # task runs reach the database through the server's events pipeline (Prefect 3 records
    # them from `prefect.task-run.*` events, here through Redis), logs in the run's last
    # batch: both may land a moment after the flow run's COMPLETED state
    def tasks_done() -> list[dict]:
        tasks = api("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        return tasks if tasks and all(t["state_type"] == "COMPLETED" for t in tasks) else []

    assert wait_until(tasks_done, timeout_s=30), api(
        "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
    )

    def finished_logged() -> bool:
        logs = api("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})
        return any("Finished in state Completed" in entry["message"] for entry in logs)

    assert wait_until(finished_logged, timeout_s=30)
    # the child prepared its workspace from the run and deployment the worker read (no second
    # read): Prefect records the same as for a stock worker's run, the pull step's lines and event
    messages = [
        entry["message"]
        for entry in api(
            "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
        )
    ]
    assert "Running 1 deployment pull step(s)" in messages, messages
    assert "All deployment steps completed successfully" in messages, messages

    def pull_step_events() -> list[dict]:
        return read_events(
            fast.api_a,
            {
                "event": {"name": ["prefect.flow-run.pull-step.executed"]},
                "resource": {"id": [f"prefect.flow-run.{run['id']}"]},
            },
        )

    pulled = wait_until(pull_step_events, timeout_s=30)
    assert [e["payload"]["qualified_name"] for e in pulled] == [
        "prefect.deployments.steps.set_working_directory"
    ], (pulled, [m for m in messages if "pull" in m])
    assert {r["prefect.resource.id"] for r in pulled[0]["related"]} == {
        f"prefect.deployment.{run['deployment_id']}"
    }
    report = read_incident_report(run["id"])
    assert "PostgresTooManyConnections" in report
    assert env.password not in report


def test_two_of_our_workers_start_each_run_once(fast: TeamTopology, tmp_path: Path) -> None:
    """Both workers see every run's event (the default queue is both workers'): each run is
    executed exactly once (one line in its file, one RUNNING state)."""
    files = [tmp_path / f"run-{i}.txt" for i in range(6)]
    runs = [_probe_run("fast-worker-append", {"path": str(f)}) for f in files]
    done = [wait_state(r, FINAL, timeout_s=60) for r in runs]
    assert [d["state_type"] for d in done] == ["COMPLETED"] * len(runs)
    assert [len(f.read_text().splitlines()) for f in files] == [1] * len(files)
    assert all(_states(r).count("RUNNING") == 1 for r in runs)
    assert all(_picked_up_by(fast, r) for r in runs)  # all by event, none by the poll
    # forked from the warm fork server, not a fresh interpreter: the run's parent is not the worker
    worker_pids = {fast.procs[n].proc.pid for n in ("fast-1", "fast-2")}
    assert all(int(d["infrastructure_pid"].rsplit(":", 1)[-1]) not in worker_pids for d in done)


def test_sigkill_of_our_workers_group_kills_its_runs(fast: TeamTopology, tmp_path: Path) -> None:
    """Machine death of our worker: SIGKILL of its process group leaves none of its runs."""
    pid_file = tmp_path / "hold.pid"
    run_id = _probe_run("fast-worker-hold", {"path": str(pid_file), "seconds": 300}, "f1")
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout_s=30)
    run_pid = int(pid_file.read_text())
    assert api(f"/flow_runs/{run_id}")["state_type"] == "RUNNING"
    assert worker_of(api(f"/flow_runs/{run_id}")) == "fast-1"
    fast.procs["fast-1"].kill()
    assert wait_until(lambda: not _alive(run_pid), timeout_s=10), f"run {run_pid} outlived it"
    with get_client(sync_client=True) as client:  # no heartbeat wait: end it for the next tests
        from prefect.states import Crashed

        client.set_flow_run_state(uuid.UUID(run_id), Crashed(message="test"), force=True)
    _fast_worker(fast, "fast-1", fast.api_a, "f1", cli="runbooks")
    fast.wait_worker_online("fast-1")


class SlowPull(WorkingDirectory):
    """The probes' storage with a pull step that marks its start, then takes PULL_S, before the
    usual change of directory: the window in which the test takes the API server away."""

    def __init__(self, directory: str, marker: Path):
        super().__init__(directory)
        self.marker = marker

    def to_pull_step(self) -> list[dict[str, Any]]:  # type: ignore[override]
        script = f"touch {self.marker}\nsleep {PULL_S}"
        return [
            {"prefect.deployments.steps.run_shell_script": {"script": script}},
            super().to_pull_step(),
        ]


PULL_S = 3
STEPS_DONE = "All deployment steps completed successfully"  # the child, then the engine at once
# A stays down this long after the run's workspace step ended: the engine's first request (it
# reads the run, within a second of that line) meets a refused connection
ENGINE_DOWN_S = 5


def test_run_started_while_its_api_server_restarts_completes(
    fast: TeamTopology, tmp_path: Path
) -> None:
    """API server A dies as our worker (fast-1, on A) starts a run and comes back once the run's
    engine has begun: its first request meets a refused connection and waits for A
    (serving/api_restarts.py) instead of exiting 1 (Prefect's client retries a refused
    connection only once it has connected; the worker then marked the run CRASHED: "Flow run
    infrastructure exited with non-zero status code 1"). The run completes, started once; the
    worker takes the next run at once."""
    marker, out = tmp_path / "pulling", tmp_path / "restart.txt"
    slow = SlowPull(str(PROJECT_ROOT), marker)
    _apply_probe(fast.api_a, "fast-worker-slow-pull", "tests/pickup_probe.py:append_line", slow)
    a, worker = fast.procs["api-a"], fast.procs["fast-1"]
    run_id = _probe_run("fast-worker-slow-pull", {"path": str(out)}, "f1")
    try:
        assert wait_until(marker.exists, timeout_s=60), "the run's pull step never began"
        steps_done = worker.tail(10**7).count(STEPS_DONE)
        a.kill()
        # the child's pull-step events wait for A before giving up, so this takes a while
        assert wait_until(
            lambda: worker.tail(10**7).count(STEPS_DONE) > steps_done, timeout_s=180
        ), worker.tail()
        time.sleep(ENGINE_DOWN_S)
        assert not out.exists(), "the run got ahead of the test: A was not down for its start"
    finally:
        if not a.alive:
            a.start()
            wait_healthy(fast.api_a, a)
    run = wait_state(run_id, FINAL, timeout_s=180)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert worker_of(run) == "fast-1"
    assert _states(run_id).count("RUNNING") == 1
    assert len(out.read_text().splitlines()) == 1
    # fast-1 takes the next run at once (its regular poll is POLL_S away): on its event, or by
    # the poll its pickup makes on reconnecting to A, whichever comes first
    after = _probe_run("fast-worker-append", {"path": str(tmp_path / "after.txt")}, "f1")
    again = wait_state(after, FINAL, timeout_s=90)
    assert again["state_type"] == "COMPLETED", again["state"]["message"]
    assert worker_of(again) == "fast-1"


def test_stock_worker_still_serves_the_pool(fast: TeamTopology, tmp_path: Path) -> None:
    """`runbooks worker --stock` beside ours: a run on its own queue, executed once, by it."""
    fast.start_worker("stock-1", fast.api_a, "w1", stock=True)  # w1: worker-1's, stopped
    try:
        fast.wait_worker_online("stock-1")
        out = tmp_path / "stock.txt"
        run = wait_state(_probe_run("fast-worker-append", {"path": str(out)}, "w1"), FINAL, 90)
        assert run["state_type"] == "COMPLETED", run["state"]["message"]
        assert worker_of(run) == "stock-1"
        assert len(out.read_text().splitlines()) == 1
    finally:
        fast.procs.pop("stock-1").stop()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
