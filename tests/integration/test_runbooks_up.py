"""`runbooks up` (what `make up` runs): server, gateway, blocks, every deployment served; an
Alertmanager webhook runs a runbook end to end; Ctrl-C or SIGTERM stops it all; after `kill -9`
of it alone, none of its processes is left."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from prefect.blocks.notifications import SlackWebhook
from prefect.settings import PREFECT_API_URL, temporary_settings
from psycopg import sql
from pydantic import SecretStr

from blocks.postgres import PostgresDatabase
from deployments.catalog import load_catalog
from tests.conftest import read_incident_report
from tests.pg_env import free_connections
from tests.receivers import HttpReceiver
from tests.servers import PostgresServer, free_port
from tests.slack_standin import SIGNING_SECRET, click_body, post_click
from tests.up import poll

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_TOKEN = "up-test-token-" + uuid.uuid4().hex


@pytest.fixture
def runbooks_up(tmp_path: Path):
    port, gateway_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
        RUNBOOKS_GATEWAY_TOKEN=GATEWAY_TOKEN,
        RUNBOOKS_GATEWAY_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
        RUNBOOKS_GATEWAY_SLACK_SIGNING_SECRET=SIGNING_SECRET,
        RUNBOOKS_GATEWAY_SLACK_RESPONSE_URL_PREFIXES='["http://127.0.0.1:"]',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "up", "--port", str(port),
         "--gateway-port", str(gateway_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    yield port, gateway_port, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_up_serves_every_runbook_and_stops_cleanly(runbooks_up, postgres: PostgresServer) -> None:
    port, gateway_port, proc = runbooks_up
    api = f"http://127.0.0.1:{port}/api"
    expected = {spec.name for spec in load_catalog()}
    assert expected, "prefect.yaml declares no deployment"

    def deployments():
        names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()}
        return names if expected <= names else None

    served = poll(deployments, 180, "every deployment of prefect.yaml registered")
    assert expected <= served

    triggered = {spec.name for spec in load_catalog() if spec.triggers}

    def automations():
        found = httpx.post(f"{api}/automations/filter", json={}, timeout=5).json()
        return found if len(found) >= len(triggered) else None

    assert all(a["enabled"] for a in poll(automations, 60, "an automation per trigger"))

    # maintenance schedules: Prefect's scheduler creates the upcoming runs of scheduled deployments
    scheduled = {spec.name for spec in load_catalog() if spec.schedules}

    def scheduled_runs():
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=5, json={
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
        ids = {d["id"]: d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()}
        names = {ids.get(r["deployment_id"]) for r in runs}
        return names if scheduled <= names else None

    assert scheduled <= poll(scheduled_runs, 90, "the scheduler created the scheduled runs")

    block_types = {b["slug"] for b in httpx.post(f"{api}/block_types/filter", json={}, timeout=5).json()}
    assert "runbooks-kafka-cluster" in block_types

    ui = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert ui.status_code == 200 and "<html" in ui.text.lower()

    # an alert event runs the served runbook to completion, in a fork of the warm server
    with temporary_settings(updates={PREFECT_API_URL: api}):
        PostgresDatabase(
            host="127.0.0.1", port=postgres.port, dbname="postgres", user=postgres.user,
            password=postgres.password,
        ).save("up-test-db", overwrite=True)
    time.sleep(2)  # automations load shortly after the deployments are created
    accepted = httpx.post(
        f"http://127.0.0.1:{gateway_port}/alerts/alertmanager", timeout=10,
        headers={"Authorization": f"Bearer {GATEWAY_TOKEN}"},
        json={
            "version": "4", "groupKey": "{}:{alertname=\"PostgresTooManyConnections\"}",
            "status": "firing", "receiver": "runbooks", "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "truncatedAlerts": 0,
            "alerts": [{
                "status": "firing", "fingerprint": "0123456789abcdef",
                "labels": {"alertname": "PostgresTooManyConnections", "database": "up-test-db",
                           "severity": "critical"},
                "annotations": {"summary": "connections near max_connections"},
                "startsAt": datetime.now(UTC).isoformat(), "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
            }],
        },
    )
    assert accepted.status_code == 202, accepted.text

    def finished_run():
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=5, json={
            "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}}).json()
        return runs[0] if runs else None

    run = poll(finished_run, 90, "the alert's runbook run finished")
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["params"]["db_block"] == "up-test-db"
    assert run["parameters"]["params"]["alert"]["fingerprint"] == "0123456789abcdef"
    report = httpx.post(f"{api}/artifacts/filter", timeout=5, json={
        "artifacts": {"flow_run_id": {"any_": [run["id"]]}, "type": {"any_": ["markdown"]}}}).json()
    assert "Database Connection Pool Exhausted" in report[0]["data"]
    assert postgres.password not in report[0]["data"]

    # a maintenance run the scheduler created runs when its time comes, and reports
    _scheduled_maintenance_runs(api)

    # a pipeline gates a deployment on the checklist: the CLI's exit status is the run's
    _checklist_gates_a_pipeline(api)

    # a manual run (the UI's run form) that needs approval pauses in the served process; the
    # answer given through the API the UI's resume form uses lets it act
    _approve_a_manual_run(api, postgres, gateway_port)

    # Ctrl-C in the terminal signals the whole foreground process group
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert f"Prefect UI: http://127.0.0.1:{port}" in out
    for name in expected:
        assert name in out
    assert f"alert gateway: http://127.0.0.1:{gateway_port}/alerts/alertmanager" in out
    assert GATEWAY_TOKEN not in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{gateway_port}/healthz", timeout=2)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)


def _scheduled_maintenance_runs(api: str) -> None:
    """The scheduler's next daily and weekly maintenance runs, brought forward to now, are picked
    up by the served runner and complete with their reports (pointed at this test's database)."""
    now = datetime.now(UTC).isoformat()
    overrides = {
        "daily-maintenance": {
            "checks": [{"task": "Check database connections",
                        "runbook": "db-connection-pool-exhausted",
                        "parameters": {"db_block": "up-test-db"}}],
            "alertmanager_block": None,
        },
        "weekly-maintenance": {"checks": [], "prometheus_block": None, "database_block": "up-test-db"},
        # its changing runbooks start as their own runs: one, in dry-run, with its own report
        "monthly-maintenance": {
            "dry_run": True, "prometheus_block": None,
            "runs": [{"task": "Connection pool review", "runbook": "db-connection-pool-exhausted",
                      "parameters": {"db_block": "up-test-db"}}],
        },
    }
    ids = {}
    for name, params in overrides.items():
        [deployment] = httpx.post(f"{api}/deployments/filter", timeout=5, json={
            "deployments": {"name": {"any_": [name]}}}).json()
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=5, json={
            "flow_runs": {"deployment_id": {"any_": [deployment["id"]]},
                          "state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
        run = min(runs, key=lambda r: r["next_scheduled_start_time"])
        assert run["auto_scheduled"]
        httpx.patch(f"{api}/flow_runs/{run['id']}", timeout=5, json={"parameters": {"params": {
            **params, "safety": {"escalation_block": None}}}}).raise_for_status()
        httpx.post(f"{api}/flow_runs/{run['id']}/set_state", timeout=5, json={
            "state": {"type": "SCHEDULED", "name": "Scheduled",
                      "state_details": {"scheduled_time": now}},
            "force": True}).raise_for_status()
        ids[name] = run["id"]

    def final(run_id: str) -> dict:
        return httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]

    for name, run_id in ids.items():
        poll(lambda r=run_id: final(r)["type"] in ("COMPLETED", "FAILED", "CRASHED"), 120,
             f"the scheduled {name} ran")
        assert final(run_id)["type"] == "COMPLETED", final(run_id)["message"]
        with temporary_settings(updates={PREFECT_API_URL: api}):
            report = read_incident_report(run_id)
        assert "| Reported by | maintenance schedule |" in report
        if name == "daily-maintenance":
            assert "| Check database connections | OK | Check database connections " in report
            assert "Every task passed: 1 check(s) clean." in report
        elif name == "weekly-maintenance":
            assert "| Database sizes | OK | Database sizes: postgres " in report
        else:
            assert "STARTED: started as its own run (dry-run)" in report
            started = [r for r in httpx.post(f"{api}/flow_runs/filter", timeout=5, json={
                "flow_runs": {"tags": {"all_": ["handed-off"]}}}).json()]
            assert started and started[0]["parameters"]["params"]["dry_run"] is True
            poll(lambda first=started[0]["id"]: final(first)["type"] == "COMPLETED", 120,
                 "the started runbook's own run completed")


def _checklist_gates_a_pipeline(api: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def gate(url: str) -> subprocess.CompletedProcess:
        params = {"params": {"health_endpoints": [{"service": "prefect", "url": url}],
                             "safety": {"escalation_block": None}}}
        return subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), "deployment", "run",
             "pre-deployment-checklist/pre-deployment-checklist", "--params", json.dumps(params),
             "--watch", "--watch-timeout", "180"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
        )

    passing = gate(f"{api}/health")
    assert passing.returncode == 0, passing.stdout[-2000:] + passing.stderr[-2000:]
    failing = gate(f"http://127.0.0.1:{free_port()}/health")
    assert failing.returncode == 1, failing.stdout[-2000:] + failing.stderr[-2000:]
    assert "Failed" in failing.stdout + failing.stderr


def _approve_a_manual_run(api: str, postgres: PostgresServer, gateway_port: int) -> None:
    """The run suspends for approval (no process waits); the request goes to Slack, and the
    Approve click comes back through the gateway, which resumes the run: the served runner
    starts it again and it acts."""
    db = f"up_approval_{uuid.uuid4().hex[:8]}"
    slack, responses = HttpReceiver().start(), HttpReceiver().start()
    with temporary_settings(updates={PREFECT_API_URL: api}):
        SlackWebhook(url=SecretStr(f"{slack.url}/services/T/B/X")).save("up-slack", overwrite=True)
    admin = psycopg.connect(postgres.conninfo(), autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    victim = psycopg.connect(postgres.conninfo(dbname=db), application_name="up-victim")
    victim.execute("SELECT 1")  # left idle inside its transaction
    try:
        pid = victim.info.backend_pid
        free = free_connections(admin)
        time.sleep(1.2)
        [deployment] = httpx.post(f"{api}/deployments/filter", timeout=5, json={
            "deployments": {"name": {"any_": ["db-connection-pool-exhausted"]}}}).json()
        created = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=10, json={
            "parameters": {"params": {
                "db_block": "up-test-db", "idle_threshold_s": 1, "databases": [db],
                "include_idle_in_transaction": True, "target_headroom_percent": 0,
                # the run's own session takes the slot the victim frees: exhausted until it is gone
                "min_free_connections": free, "verify_timeout_s": 20,
                "safety": {"approval_poll_s": 1, "escalation_block": None,
                           "approval_slack_block": "up-slack"},
            }},
        })
        created.raise_for_status()
        run_id = created.json()["id"]

        def state() -> str:
            return httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]

        poll(lambda: state() == "PAUSED", 90, "the run paused for approval")
        keyset = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["state_details"][
            "run_input_keyset"]

        def form_saved() -> bool:  # the run saves its resume form (schema, then plan) after pausing
            return httpx.get(f"{api}/flow_runs/{run_id}/input/{keyset['description']}", timeout=5).is_success

        poll(form_saved, 30, "the resume form with the plan")
        plan = httpx.get(f"{api}/flow_runs/{run_id}/input/{keyset['description']}", timeout=5).json()
        assert f"pid={pid}" in plan and "inside a transaction" in plan
        assert pid in {p for (p,) in admin.execute("SELECT pid FROM pg_stat_activity").fetchall()}
        (request,) = slack.wait_for(1, timeout_s=30)
        message = request.json()
        assert f"pid={pid}" in str(message["blocks"])
        click = click_body(message, "runbooks_approve", "U0CAROL", "carol", f"{responses.url}/a")
        answered = post_click(f"http://127.0.0.1:{gateway_port}", click)
        assert answered.status_code == 200 and answered.json()["ok"], answered.text
        # resumed, rescheduled, picked up by the served runner and run: under a loaded 2-core CI
        # (17 deployments served) this took over 60 s once
        poll(lambda: state() in ("COMPLETED", "FAILED", "CRASHED"), 120, "the approved run finished")
        final = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]
        assert final["type"] == "COMPLETED", final["message"]
        live = {p for (p,) in admin.execute("SELECT pid FROM pg_stat_activity").fetchall()}
        assert pid not in live
        with temporary_settings(updates={PREFECT_API_URL: api}):
            latest = read_incident_report(run_id)
        assert "| terminate idle connections | approved | carol (Slack U0CAROL) | approved in Slack |" in latest
        assert responses.wait_for(1)[0].json()["text"].startswith("Approved by carol")
    finally:
        slack.stop()
        responses.stop()
        victim.close()
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
        admin.close()


def _served(api: str) -> None:
    expected = {spec.name for spec in load_catalog()}

    def deployments():
        found = httpx.post(f"{api}/deployments/filter", timeout=5, json={}).json()
        return expected <= {d["name"] for d in found}

    poll(deployments, 300, "every runbook registered")
    time.sleep(3)  # the runner starts (and installs its signal handlers) right after


def test_sigterm_stops_up_cleanly(runbooks_up) -> None:
    port, gateway_port, proc = runbooks_up
    api = f"http://127.0.0.1:{port}/api"
    _served(api)
    proc.send_signal(signal.SIGTERM)  # as `systemctl stop` or `docker stop` does: to us alone
    out, _ = proc.communicate(timeout=60)  # stderr included
    assert "was never awaited" not in out, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert "stopping" in out  # the way Ctrl-C stops it
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{gateway_port}/healthz", timeout=2)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, tuple[int, int]]:
    """Every process below `root`: pid -> (parent pid, start time)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat[1:]
    below: dict[int, tuple[int, int]] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - set(below)
        below.update({pid: table[pid] for pid in frontier})
    return below


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()[:300]
    except OSError:
        return b""


def _alive(pid: int, started: int) -> bool:
    """The same process (not a reused pid) still exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def test_kill_9_of_up_alone_leaves_none_of_its_processes(
    runbooks_up, postgres: PostgresServer
) -> None:
    port, _, proc = runbooks_up
    api = f"http://127.0.0.1:{port}/api"
    _served(api)
    with temporary_settings(updates={PREFECT_API_URL: api}):
        PostgresDatabase(
            host="127.0.0.1",
            port=postgres.port,
            dbname="postgres",
            user=postgres.user,
            password=postgres.password,
        ).save("orphans-db", overwrite=True)
    db = f"orphans_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(postgres.conninfo(), autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    victim = psycopg.connect(
        postgres.conninfo(dbname=db), application_name="orphans-victim", autocommit=True
    )
    victim.execute("SELECT 1")  # idle: terminated without asking for approval
    tree: dict[int, tuple[int, int]] = {}
    try:
        time.sleep(1.2)
        [deployment] = httpx.post(
            f"{api}/deployments/filter",
            timeout=5,
            json={"deployments": {"name": {"any_": ["db-connection-pool-exhausted"]}}},
        ).json()
        created = httpx.post(
            f"{api}/deployments/{deployment['id']}/create_flow_run",
            timeout=10,
            json={
                "parameters": {
                    "params": {
                        "db_block": "orphans-db",
                        "idle_threshold_s": 1,
                        "databases": [db],
                        "target_headroom_percent": 0,
                        # never reached: the run keeps verifying for 10 minutes
                        "min_free_connections": 10_000,
                        "verify_timeout_s": 600,
                        "safety": {"escalation_block": None},
                    }
                },
            },
        )
        created.raise_for_status()
        run_id = created.json()["id"]
        pid = victim.info.backend_pid

        def verifying() -> bool:
            live = {p for (p,) in admin.execute("SELECT pid FROM pg_stat_activity").fetchall()}
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]
            return pid not in live and state == "RUNNING"

        poll(verifying, 120, "the run terminated the idle session and is verifying")
        tree = _descendants(proc.pid)
        # the flow run's process, forked from the fork server that `runbooks up` started
        assert any(b"multiprocessing.forkserver" in _cmdline(ppid) for ppid, _ in tree.values()), {
            p: _cmdline(p) for p in tree
        }

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while (
            left := [p for p, (_, t) in tree.items() if _alive(p, t)]
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, {p: _cmdline(p) for p in left}
    finally:
        for p, (_, started) in tree.items():
            if _alive(p, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        victim.close()
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
        admin.close()
