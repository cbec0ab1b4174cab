"""The runbooks on a team's topology (issue #16): PostgreSQL-backed Prefect, two API servers sharing
events and leases through Redis, `runbooks deploy`, two of our workers (`runbooks worker`)
(tests/team_topology.py).

db-connection-pool-exhausted against the session's real PostgreSQL (tests/pg_env.py): real idle
sessions, really terminated, by runs that workers started. The test talks to API server B (no
services); worker-1 talks to A, worker-2 to B; the triggers, scheduler and every other service run
only on A: events and leases cross between them through Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import redis
from prefect import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.approvals import Approver
from tests.conftest import read_actions_table, read_incident_report
from tests.integration.test_alert_triggers import post_alert_event
from tests.integration.test_db_connection_pool import IDLE_S, Crowd, crowd, params  # noqa: F401
from tests.pg_env import Env, env, wait_until  # noqa: F401 - env: a fixture
from tests.team_topology import HEARTBEAT_SECONDS, PROJECT_ROOT, TeamTopology

pytestmark = pytest.mark.integration

DEPLOYMENT = "db-connection-pool-exhausted"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
APPROVE = {"approve": True, "approver": "alice", "reason": "batch job is hung"}


@pytest.fixture
def team(team_topology: TeamTopology) -> Iterator[TeamTopology]:
    """The topology with both workers up; this test's Prefect calls go to API server B."""
    for name, api, queue in (
        ("worker-1", team_topology.api_a, "w1"),
        ("worker-2", team_topology.api_b, "w2"),
    ):
        if not team_topology.procs[name].alive:
            team_topology.start_worker(name, api, queue)
            team_topology.wait_worker_online(name)
    with temporary_settings(updates={PREFECT_API_URL: team_topology.api_b}):
        yield team_topology


def api(path: str, body: dict | None = None) -> Any:
    url = f"{PREFECT_API_URL.value()}{path}"
    resp = (
        httpx.post(url, json=body, timeout=10) if body is not None else httpx.get(url, timeout=10)
    )
    resp.raise_for_status()
    return resp.json()


def deployment_runs(name: str = DEPLOYMENT) -> list[dict]:
    """Every run of a deployment (by default this module's test deployment)."""
    return api("/flow_runs/filter", {"deployments": {"name": {"any_": [name]}}})


def first_new_run(before: set[str]) -> dict | None:
    """A run of the test deployment whose id is not in ``before`` (None while there is none)."""
    return next((r for r in deployment_runs() if r["id"] not in before), None)


def deployment_id() -> str:
    (found,) = api("/deployments/filter", {"deployments": {"name": {"any_": [DEPLOYMENT]}}})
    return found["id"]


def start_run(p: Any, queue: str) -> str:
    """A run of the deployment with these parameters, in one worker's own queue."""
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            uuid.UUID(deployment_id()),
            parameters={"params": p.model_dump(mode="json")},
            work_queue_name=queue,
        )
    return str(run.id)


def wait_state(run_id: str, types: set[str], timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        run = api(f"/flow_runs/{run_id}")
        if run["state_type"] in types:
            return run
        assert time.monotonic() < deadline, (
            f"run {run_id} still {run['state_type']} ({run['state_name']}) after {timeout_s}s"
        )
        time.sleep(0.3)


def worker_of(run: dict) -> str:
    return run["labels"].get("prefect.worker.name")


def applied_targets(run_id: str) -> set[str]:
    return {
        r["target"] for r in read_actions_table(run_id, timeout_s=5) if r["status"] == "applied"
    }


def test_deploy_is_idempotent(team: TeamTopology) -> None:
    """A second `runbooks deploy` keeps the pool, the deployments' ids and the automations'."""
    before_deployments = {d["name"]: d["id"] for d in api("/deployments/filter", {})}
    before_automations = {a["name"]: a["id"] for a in api("/automations/filter", {})}
    again = subprocess.run(
        [sys.executable, "-m", "serving.cli", "deploy", "--api-url", team.api_a],
        env=team.client_env(team.api_a),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "created work pool" not in again.stdout
    after_deployments = {d["name"]: d["id"] for d in api("/deployments/filter", {})}
    after_automations = {a["name"]: a["id"] for a in api("/automations/filter", {})}
    assert after_deployments == before_deployments
    assert after_automations == before_automations
    assert "runbooks: crash flow runs without heartbeats" in after_automations
    (pool,) = api("/work_pools/filter", {"work_pools": {"name": {"any_": ["runbooks"]}}})
    assert pool["type"] == "process"
    deployment = api(f"/deployments/{deployment_id()}")
    assert deployment["work_pool_name"] == "runbooks"
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}
    ]
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 7 * * 1"]


def test_alert_event_runs_on_a_worker(team: TeamTopology, env: Env) -> None:
    """An alert event posted to API server B (no services): the triggers service on A sees it
    through Redis, and a worker runs the runbook against the real database it names."""
    with temporary_settings(updates={PREFECT_API_URL: team.api_b}):
        block = env.block()
    before = {r["id"] for r in deployment_runs()}

    post_alert_event({"alertname": "PostgresTooManyConnections", "database": block})

    run = wait_until(lambda: first_new_run(before), timeout_s=60)
    assert run, "the alert started no run"
    run = wait_state(run["id"], FINAL)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert run["parameters"]["params"]["db_block"] == block
    assert worker_of(run) in {"worker-1", "worker-2"}
    # the report of what it found on the real server: nobody idle for 5 minutes, pool healthy
    report = read_incident_report(run["id"])
    assert "PostgresTooManyConnections" in report
    assert env.server.password not in report and env.password not in report


def test_two_runs_on_two_workers_one_lock(team: TeamTopology, env: Env, crowd: Crowd) -> None:
    """Two runs for one database at once, one on each worker: one takes the target's lock and
    pauses for approval (an idle-in-transaction session is among its victims), the other finds
    the target held for that approval and changes nothing; once approved, the holder acts alone."""
    victims = {*crowd.idle_pids, crowd.pid(crowd.idle_in_transaction)}
    p = params(env, env.headroom() + 1, include_idle_in_transaction=True)
    p.safety.busy_wait_s = 60

    runs = [start_run(p, "w1"), start_run(p, "w2")]

    def one_paused_one_done() -> tuple[dict, dict] | None:
        states = [api(f"/flow_runs/{r}") for r in runs]
        paused = [s for s in states if s["state_type"] == "PAUSED"]
        done = [s for s in states if s["state_type"] in FINAL]
        return (paused[0], done[0]) if len(paused) == 1 and len(done) == 1 else None

    found = wait_until(one_paused_one_done, timeout_s=90)
    assert found, [api(f"/flow_runs/{r}")["state_name"] for r in runs]
    holder, other = found
    assert {worker_of(holder), worker_of(other)} == {"worker-1", "worker-2"}
    # the second run's verdict: the target awaits a human's decision, it changed nothing
    assert other["state_type"] == "COMPLETED", other["state"]["message"]
    assert "awaits approval" in read_incident_report(other["id"])
    assert applied_targets(other["id"]) == set()
    assert env.live_pids() >= victims
    # the held lock's lease is in Redis, where both API servers read it (prefect_redis)
    with redis.Redis(port=team.redis_port, socket_timeout=5) as r:
        assert r.keys("*concurrency*lease*")

    approver = Approver(DEPLOYMENT, APPROVE, wait_s=30)
    approver.run()
    assert approver.error is None and str(approver.paused_run) == holder["id"]

    done = wait_state(holder["id"], FINAL)
    assert done["state_type"] == "COMPLETED", done["state"]["message"]
    assert wait_until(lambda: not (env.live_pids() & victims))
    assert len(applied_targets(holder["id"])) == len(victims)
    assert applied_targets(other["id"]) == set()


def test_paused_approval_survives_both_workers_killed(
    team: TeamTopology, env: Env, crowd: Crowd
) -> None:
    """A run suspended for approval; both workers SIGKILLed (with their process groups) and two
    new ones started; the answer resumes the run on a new worker, which acts."""
    victims = {*crowd.idle_pids, crowd.pid(crowd.idle_in_transaction)}
    p = params(env, env.headroom() + 1, include_idle_in_transaction=True)
    run_id = start_run(p, "w1")
    paused = wait_state(run_id, {"PAUSED", *FINAL})
    assert paused["state_type"] == "PAUSED", paused["state"]["message"]
    assert worker_of(paused) == "worker-1"

    team.procs["worker-1"].kill()
    team.procs["worker-2"].kill()
    assert env.live_pids() >= victims  # nothing acted while the question was open
    team.start_worker("worker-3", team.api_a, "w1")
    team.start_worker("worker-4", team.api_b, "w2")
    team.wait_worker_online("worker-3")
    team.wait_worker_online("worker-4")

    approver = Approver(DEPLOYMENT, APPROVE, wait_s=30)
    approver.run()
    assert approver.error is None and str(approver.paused_run) == run_id

    done = wait_state(run_id, FINAL)
    assert done["state_type"] == "COMPLETED", done["state"]["message"]
    assert worker_of(done) in {"worker-3", "worker-4"}
    assert wait_until(lambda: not (env.live_pids() & victims))
    assert len(applied_targets(run_id)) == len(victims)
    for conn in crowd.idle:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    team.procs["worker-3"].stop()
    team.procs["worker-4"].stop()


# The zombie-run automation (runbooks deploy) crashes a run 3 heartbeat intervals after its last
# heartbeat; the run's first heartbeat is at its start, so this bounds the time from the kill.
CRASH_BOUND_S = 3 * HEARTBEAT_SECONDS + 30
# The next run for the target: picked up (worker poll 1 s), started (a cold interpreter), the
# dead holder's lock released at once (same host: its pid is gone), sessions terminated.
NEXT_RUN_BOUND_S = 60


def test_worker_machine_death_while_holding_the_lock(
    team: TeamTopology, env: Env, crowd: Crowd
) -> None:
    """worker-1 and its run SIGKILLed while the run holds the database's lock (it terminated the
    idle sessions and is verifying): the next run for the database, on worker-2, takes the lock
    the dead run left and acts within NEXT_RUN_BOUND_S; the dead run is marked CRASHED by the
    heartbeat automation within CRASH_BOUND_S of the kill."""
    # more free slots than terminating can give: the run stays in its verification, lock held
    p = params(env, env.headroom() + 10, verify_timeout_s=300)
    dying = start_run(p, "w1")
    assert wait_until(lambda: not (env.live_pids() & crowd.idle_pids), timeout_s=90), api(
        f"/flow_runs/{dying}"
    )["state_name"]
    run = api(f"/flow_runs/{dying}")
    assert run["state_type"] == "RUNNING" and worker_of(run) == "worker-1"
    run_pid = int(run["infrastructure_pid"].rsplit(":", 1)[-1])

    # machine death: the worker, and the run's process (a session of its own)
    team.procs["worker-1"].kill()
    os.killpg(os.getpgid(run_pid), signal.SIGKILL)
    killed_at = time.monotonic()

    fresh = [env.connect(env.app_role, "victim-idle") for _ in range(3)]
    try:
        fresh_pids = {c.info.backend_pid for c in fresh}
        time.sleep(IDLE_S + 0.5)  # the sessions must be idle past the threshold to be victims
        next_run = start_run(params(env, env.headroom() + 1), "w2")
        done = wait_state(next_run, FINAL, timeout_s=NEXT_RUN_BOUND_S)
        assert done["state_type"] == "COMPLETED", done["state"]["message"]
        assert worker_of(done) == "worker-2"
        assert not (env.live_pids() & fresh_pids)
        assert applied_targets(next_run) and applied_targets(next_run).isdisjoint(
            applied_targets(dying)
        )
        report = read_incident_report(next_run)
        assert "released the lock of" in report and "its process is gone" in report

        remaining = CRASH_BOUND_S - (time.monotonic() - killed_at)
        crashed = wait_state(dying, FINAL, timeout_s=max(remaining, 1))
        assert crashed["state_type"] == "CRASHED"
        assert "No heartbeat" in crashed["state"]["message"]
    finally:
        for conn in fresh:
            conn.close()


def test_unanswered_approval_times_out_on_a_worker(
    team: TeamTopology, env: Env, crowd: Crowd
) -> None:
    """Nobody answers: at the deadline `runbooks worker`'s watcher resumes the suspended run, which
    records the timeout, touches nothing and fails (escalates)."""
    p = params(env, env.headroom() + 1, include_idle_in_transaction=True)
    p.safety.approval_timeout_s = 5
    p.safety.escalation_block = None
    run_id = start_run(p, "w2")
    paused = wait_state(run_id, {"PAUSED", *FINAL})
    assert paused["state_name"] == "Suspended", paused["state"]["message"]

    final = wait_state(run_id, FINAL, timeout_s=60)
    assert final["state_type"] == "FAILED", final["state"]
    assert env.live_pids() >= {*crowd.idle_pids, crowd.pid(crowd.idle_in_transaction)}
    assert "| terminate idle connections | timed out |" in read_incident_report(run_id)
    assert applied_targets(run_id) == set()
