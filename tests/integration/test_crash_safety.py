"""Processes die (issue #9): `runbooks up` killed the way machines die, then started again.

- A pending approval survives Ctrl-C and SIGKILL of every process of ours: the run stays suspended,
  and the approval given after the restart makes it act.
- A run SIGKILLed while it holds its target's lock does not hold it forever: after the restart the
  next run on that target releases the dead holder's lock and acts; a run that gives up on a live
  holder escalates and names it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from psycopg import sql

from blocks.escalation import EscalationPolicy
from blocks.postgres import PostgresDatabase
from runbooks.locks import LEASE_S
from tests.pg_env import free_connections
from tests.receivers import HttpReceiver, save_slack_standin
from tests.servers import PostgresServer
from tests.up import RunbooksUp, poll

# each test starts `runbooks up` once or twice (about 10 s each on an idle machine)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[RunbooksUp]:
    server = RunbooksUp(home=tmp_path / "prefect-home")
    yield server
    server.stop()
    print("runbooks up output (shown by pytest when the test failed):\n" + server.log_tail())


@contextmanager
def idle_session(postgres: PostgresServer, *, in_transaction: bool) -> Iterator[tuple[str, int]]:
    """A database of its own with one idle session (inside a transaction or not)."""
    db = f"crash_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    victim = psycopg.connect(
        postgres.conninfo(dbname=db), application_name="crash-victim", autocommit=not in_transaction
    )
    victim.execute("SELECT 1")
    try:
        yield db, victim.info.backend_pid
    finally:
        victim.close()
        with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def live_pids(postgres: PostgresServer) -> set[int]:
    with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
        return {p for (p,) in admin.execute("SELECT pid FROM pg_stat_activity").fetchall()}


def save_db_block(up: RunbooksUp, postgres: PostgresServer, name: str = "crash-db") -> str:
    with temporary_settings(updates={PREFECT_API_URL: up.api}):
        PostgresDatabase(
            host="127.0.0.1",
            port=postgres.port,
            dbname="postgres",
            user=postgres.user,
            password=postgres.password,
        ).save(name, overwrite=True)
    return name


def pool_params(postgres: PostgresServer, db: str, **overrides) -> dict:
    """Exhausted until the one idle session of ``db`` is gone (the run's own session takes its slot)."""
    with psycopg.connect(postgres.conninfo(), autocommit=True) as admin:
        # the run's own session takes this admin session's slot: one more is free once the
        # idle session is gone
        free = free_connections(admin) + 1
    params = {
        "db_block": "crash-db",
        "idle_threshold_s": 1,
        "databases": [db],
        "include_idle_in_transaction": True,
        "target_headroom_percent": 0,
        "min_free_connections": free,
        "verify_timeout_s": 20,
        "safety": {"approval_poll_s": 1, "escalation_block": None},
    }
    params.update(overrides)
    return params


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_pending_approval_survives_a_restart(up: RunbooksUp, postgres: PostgresServer, how: str) -> None:
    up.start()
    save_db_block(up, postgres)
    with idle_session(postgres, in_transaction=True) as (db, pid):
        time.sleep(1.2)
        run_id = up.start_run(pool_params(postgres, db))
        up.wait_suspended(run_id)
        keyset = up.run(run_id)["state"]["state_details"]["run_input_keyset"]
        poll(
            lambda: (
                httpx.get(
                    f"{up.api}/flow_runs/{run_id}/input/{keyset['description']}", timeout=5
                ).is_success
            ),
            30,
            "the resume form saved",
        )

        if how == "ctrl-c":
            up.interrupt()
        else:
            up.kill_everything()
        assert pid in live_pids(postgres)

        up.start()
        state = up.run(run_id)["state"]
        # still suspended: no process of ours was holding the pending approval
        assert (state["type"], state["name"]) == ("PAUSED", "Suspended"), state
        resumed = up.api_call(
            "POST", f"/flow_runs/{run_id}/resume",
            json={
                "run_input": {"approve": True, "approver": "dana", "reason": "after the restart"}
            },
        )
        assert resumed.get("status") == "ACCEPT", resumed
        final = up.wait_final(run_id)
        assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
        assert pid not in live_pids(postgres)
        report = up.report(run_id)
        assert "| terminate idle connections | approved | dana | after the restart |" in report
        assert "taken back" in report  # the lock kept while suspended went back to the same run


def test_killed_holder_releases_its_lock_and_busy_runs_escalate(
    up: RunbooksUp, postgres: PostgresServer, slack: HttpReceiver
) -> None:
    # a lease longer than the restart takes: what frees the lock must be the next run seeing
    # that the holder's process is gone, not the lease running out meanwhile
    up.env["RUNBOOKS_LOCK_LEASE_S"] = "600"
    up.start()
    save_db_block(up, postgres)
    with temporary_settings(updates={PREFECT_API_URL: up.api}):
        EscalationPolicy(notification_blocks=[save_slack_standin(slack)]).save("crash-oncall")
    with idle_session(postgres, in_transaction=False) as (db, pid):
        time.sleep(1.2)
        # holds the lock: terminates the idle session, then waits in verification for a headroom
        # the server can never have
        holder = up.start_run(
            pool_params(postgres, db, min_free_connections=10_000, verify_timeout_s=600)
        )
        poll(lambda: pid not in live_pids(postgres), 90, "the holder acted")
        assert up.run(holder)["state"]["type"] == "RUNNING"

        # a run that gives up waiting for a live holder escalates and names it
        busy = up.start_run(
            pool_params(
                postgres,
                db,
                safety={"busy_wait_s": 3, "escalation_block": "crash-oncall", "approval_poll_s": 1},
            )
        )
        final = up.wait_final(busy)
        assert final["state"]["type"] == "FAILED", final["state"]
        report = up.report(busy)
        holder_name = up.run(holder)["name"]
        assert "NOT ACTED: TARGET BUSY" in report
        assert holder_name in report and f"/runs/flow-run/{holder}" in report
        [page] = slack.wait_for(1, timeout_s=30)
        assert "did not act" in page.body.decode() and holder_name in page.body.decode()

    # a power cut while the holder is mid-run
    up.kill_everything()
    up.start()
    with idle_session(postgres, in_transaction=False) as (db, pid):
        time.sleep(1.2)
        nxt = up.start_run(pool_params(postgres, db))
        final = up.wait_final(nxt)
        assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
        assert pid not in live_pids(postgres)
        report = up.report(nxt)
        # released at once (its process is gone), not after the lease expired
        assert "its process is gone" in report and holder_name in report


def test_unanswered_approval_times_out_and_escalates(
    up: RunbooksUp, postgres: PostgresServer, slack: HttpReceiver
) -> None:
    """A suspended run has no process to notice its deadline: the serving process resumes it."""
    up.start()
    save_db_block(up, postgres)
    with temporary_settings(updates={PREFECT_API_URL: up.api}):
        EscalationPolicy(notification_blocks=[save_slack_standin(slack)]).save("crash-oncall")
    with idle_session(postgres, in_transaction=True) as (db, pid):
        time.sleep(1.2)
        run_id = up.start_run(
            pool_params(
                postgres,
                db,
                safety={
                    "approval_timeout_s": 5,
                    "escalation_block": "crash-oncall",
                    "approval_poll_s": 1,
                },
            )
        )
        up.wait_suspended(run_id)
        final = up.wait_final(run_id, timeout_s=90)
        assert final["state"]["type"] == "FAILED", final["state"]
        assert pid in live_pids(postgres)  # nobody approved: nothing was touched
        report = up.report(run_id)
        assert "| terminate idle connections | timed out |" in report
        [page] = slack.wait_for(1, timeout_s=30)
        assert "approval timed out" in page.body.decode()
        # the lock it kept while suspended was given back
        assert up.lock_slots() == [0]


def test_dead_holders_lease_survives_a_server_restart_and_expires(
    up: RunbooksUp, postgres: PostgresServer
) -> None:
    """With nobody waiting, the server itself frees a dead holder's slot after a restart."""
    up.start()
    save_db_block(up, postgres)
    with idle_session(postgres, in_transaction=False) as (db, pid):
        time.sleep(1.2)
        holder = up.start_run(
            pool_params(postgres, db, min_free_connections=10_000, verify_timeout_s=600)
        )
        poll(lambda: pid not in live_pids(postgres), 90, "the holder acted")
        assert up.run(holder)["state"]["type"] == "RUNNING"

    assert up.lock_slots() == [1]
    up.kill_everything()
    up.start()
    # stock Prefect kept the lease in the server's memory: this slot stayed taken forever.
    # Bound: the lease (renewed until the kill) + the repossessor's loop, plus the restart itself
    poll(lambda: up.lock_slots() == [0], LEASE_S + 15 + 60, "the dead holder's slot freed")
