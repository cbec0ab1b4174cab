"""Issue #4's guard rails, end to end on the db-connection-pool-exhausted runbook.

Real effects: sessions of a real PostgreSQL terminated or left alone (pg_stat_activity), the lock
and budget held by the real Prefect server (global concurrency limit, Variable), approvals answered
through Prefect's resume-with-input API, escalations read back from a local HTTP receiver standing
in for Slack and from a moto SNS topic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from prefect import tags
from prefect.events import emit_event
from prefect.settings import PREFECT_API_URL
from prefect.variables import Variable
from prefect_aws import AwsCredentials

from blocks.escalation import EscalationPolicy
from flows.postgres.db_connection_pool_exhausted import (
    ConnectionPoolParams,
    ConnectionPoolSummary,
    db_connection_pool_exhausted,
)
from runbooks.params import AlertContext, OnBusyTarget, SafetyParams
from runbooks.report import Outcome
from runbooks.safety import Target, budget_variable
from tests.approvals import Approver
from tests.conftest import read_flow_run, read_incident_report, read_run_logs, unique
from tests.gateway_proc import read_events
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.pg_env import Env, env, wait_until  # noqa: F401 - env: a fixture
from tests.receivers import HttpReceiver, save_slack_standin

pytestmark = pytest.mark.integration

IDLE_S = 0.5
FLOW = "db-connection-pool-exhausted"
STEP = "terminate idle connections"


@pytest.fixture
def oncall(slack: HttpReceiver, moto: MotoServer) -> tuple[str, str]:
    """An escalation policy: Slack stand-in (Prefect's Custom Webhook block) + SNS topic."""
    topic_arn, queue_url = moto.topic_with_queue()
    name = unique("oncall")
    EscalationPolicy(
        notification_blocks=[save_slack_standin(slack)],
        sns_topic_arn=topic_arn,
        aws_endpoint_url=moto.endpoint_url,
        aws_credentials=AwsCredentials(
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=moto.region,
        ),
    ).save(name)
    return name, queue_url


@pytest.fixture
def target(env: Env) -> Iterator[Target]:
    """The server every test acts on, known by its system_identifier; its remediation budget
    starts empty in each test."""
    (identifier,) = env.admin.execute(
        "SELECT system_identifier FROM pg_control_system()"
    ).fetchone()
    t = Target("postgres", f"{env.server.host}:{env.server.port}", str(identifier))
    Variable.unset(budget_variable(t, STEP))
    yield t
    Variable.unset(budget_variable(t, STEP))


class Sessions:
    """Application sessions left idle (the victims), and one inside a transaction."""

    def __init__(self, env: Env):
        self.env = env
        self.conns: list[psycopg.Connection] = []

    def idle(self, n: int) -> list[psycopg.Connection]:
        opened = [self.env.connect(self.env.app_role, "leaky-app") for _ in range(n)]
        self.conns += opened
        return opened

    def in_transaction(self) -> psycopg.Connection:
        conn = self.env.connect(self.env.app_role, "leaky-app", autocommit=False)
        conn.execute("SELECT 1")
        self.conns.append(conn)
        return conn

    def pids(self, conns: list[psycopg.Connection]) -> set[int]:
        return {c.info.backend_pid for c in conns}

    def settle(self) -> None:
        time.sleep(IDLE_S + 0.3)

    def close(self) -> None:
        for c in self.conns:
            c.close()


@pytest.fixture
def sessions(env: Env) -> Iterator[Sessions]:
    s = Sessions(env)
    yield s
    s.close()


def params(env: Env, block: str, **overrides: Any) -> ConnectionPoolParams:
    safety = overrides.pop("safety", {})
    fields = {
        "db_block": block,
        "idle_threshold_s": IDLE_S,
        "databases": [env.db],
        "target_headroom_percent": 0,
        "min_free_connections": env.headroom() + 1,
        "verify_timeout_s": 10,
        "safety": SafetyParams(**({"approval_poll_s": 1, "escalation_block": None} | safety)),
    }
    return ConnectionPoolParams(**(fields | overrides))


def run_in_thread(p: ConnectionPoolParams) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(
        target=lambda: out.append(db_connection_pool_exhausted(params=p, return_state=True)),
        daemon=True,
    )
    thread.start()
    return thread, out


def action_events(target: Target, since: str) -> list[dict]:
    """runbook.action.* events of a target since a time, from the Prefect API (the UI's feed)."""
    return read_events(
        PREFECT_API_URL.value(),
        {
            "occurred": {"since": since},
            "event": {"prefix": ["runbook.action."]},
            "resource": {"id": [target.resource_id]},
        },
    )


def events_settle(target: Target, since: str, check) -> list[dict]:
    """Events are stored asynchronously: wait until the expected ones are there."""
    events: list[dict] = []

    def ready() -> bool:
        nonlocal events
        events = action_events(target, since)
        return check(events)

    wait_until(ready, timeout_s=20)
    return events


def now() -> str:
    return datetime.now(UTC).isoformat()


def count(events: list[dict], name: str) -> int:
    """How many changes the events named ``name`` record (one event lists every target of an
    action in a step)."""
    return sum(e["payload"]["count"] for e in events if e["event"] == name)


def test_budget_stops_a_remediation_loop_and_escalates_once(
    env: Env,
    sessions: Sessions,
    target: Target,
    oncall: tuple[str, str],
    slack: HttpReceiver,
    moto: MotoServer,
) -> None:
    """20 alerts for a pool that a leaky app keeps exhausting: 3 actions, then one escalation."""
    started = now()
    policy, queue_url = oncall
    block = env.block()
    alert = AlertContext(
        alertname="PostgresPoolExhausted",
        fingerprint=uuid.uuid4().hex,
        status="firing",
        labels={"alertname": "PostgresPoolExhausted"},
    )
    terminated: set[int] = set()
    states = []
    leaky: list[psycopg.Connection] = []
    for _ in range(20):
        # the app reconnects whatever was killed: the pool is exhausted again for every alert
        leaky = [c for c in leaky if c.info.backend_pid in env.live_pids()]
        leaky += sessions.idle(3 - len(leaky))
        sessions.settle()
        before = sessions.pids(leaky)
        p = params(env, block, alert=alert, safety={"escalation_block": policy})
        states.append(db_connection_pool_exhausted(params=p, return_state=True))
        gone = before - env.live_pids()
        terminated |= gone

    outcomes = [s.result(raise_on_failure=False) for s in states]
    resolved = [o for o in outcomes if isinstance(o, ConnectionPoolSummary)]
    assert [o.outcome for o in resolved] == [Outcome.RESOLVED] * 3
    assert len(terminated) == 9  # 3 runs x 3 sessions, nothing more
    refused = states[3:]
    assert all(s.is_failed() and "budget of 3 per 1h spent" in s.message for s in refused)
    assert "not notifying again" not in refused[0].message
    assert all("already escalated" in s.message for s in refused[1:])
    # exactly one escalation, on every channel
    [note] = slack.wait_for(1)
    time.sleep(1)
    assert len(slack.requests) == 1
    text = note.json()["text"]
    assert "budget" in text and FLOW in text and target.label in text
    assert "/runs/flow-run/" in text
    [sns] = moto.read_sns_notifications(queue_url)
    assert FLOW in sns["Message"] and "budget" in sns["Message"]
    with pytest.raises(TimeoutError):
        moto.read_sns_notifications(queue_url, timeout_s=2)
    # the ledger lives in the Prefect server, not in any one run
    ledger = Variable.get(budget_variable(target, STEP))
    assert len(ledger["executed"]) == 3 and ledger["escalated_at"]
    events = events_settle(
        target, started, lambda ev: count(ev, "runbook.action.skipped") >= 17 * 3
    )
    assert count(events, "runbook.action.executed") == 9
    # one event per run and status, not one per session: 3 executions, 17 refusals
    assert len([e for e in events if e["event"] == "runbook.action.executed"]) == 3
    skipped = [e for e in events if e["event"] == "runbook.action.skipped"]
    assert len(skipped) == 17
    assert all(
        "remediation budget spent" in e["resource"]["prefect.resource.name"] for e in skipped
    )
    # the alert that started the runs is linked from every action
    links = [[r for r in e["related"] if r["prefect.resource.role"] == "alert"] for e in events]
    assert all(
        [r["prefect.resource.id"] for r in found] == [f"alert.{alert.fingerprint}"]
        for found in links
    )


def test_second_run_waits_for_the_lock_then_finds_nothing_to_do(
    env: Env, sessions: Sessions, target: Target
) -> None:
    """Run 1 holds the target while it waits for approval; run 2 waits, then re-checks."""
    started = now()
    victims = sessions.idle(3)
    in_tx = sessions.in_transaction()
    sessions.settle()
    block = env.block()
    everyone = sessions.pids([*victims, in_tx])
    approver = Approver(FLOW, None)
    approver.start()
    first, first_out = run_in_thread(params(env, block, include_idle_in_transaction=True))
    assert approver.seen_paused.wait(60), approver.error
    second, second_out = run_in_thread(
        params(env, block, include_idle_in_transaction=True, safety={"busy_wait_s": 120})
    )
    time.sleep(3)
    # the approval gate blocks run 1, the lock blocks run 2: nothing has been touched
    assert first.is_alive() and second.is_alive()
    assert everyone <= env.live_pids()
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(
        approver.paused_run,
        run_input={"approve": True, "approver": "alice", "reason": "batch job hung"},
    )
    first.join(60)
    second.join(60)
    first_state, second_state = first_out[0], second_out[0]
    assert first_state.is_completed(), first_state.message
    assert second_state.is_completed(), second_state.message
    one: ConnectionPoolSummary = first_state.result()
    two: ConnectionPoolSummary = second_state.result()
    assert one.outcome is Outcome.RESOLVED
    assert set(one.terminate.terminated) == everyone
    assert two.outcome is Outcome.NO_ACTION_NEEDED and two.terminate is None
    assert "for another run to finish" in two.report
    assert "| terminate idle connections | approved | alice | batch job hung |" in one.report
    # each session was terminated once, by run 1: the audit log says so too, in one event whose
    # feed line (the resource's name) says what, on what and which sessions, without the raw JSON
    events = events_settle(target, started, lambda ev: count(ev, "runbook.action.executed") >= 4)
    [executed] = [e for e in events if e["event"] == "runbook.action.executed"]
    resource = executed["resource"]
    assert resource["prefect.resource.id"] == target.resource_id
    assert resource["prefect.resource.name"].startswith(
        f"terminate_backend ×4 on {target.label}: {env.db} pid={{"
    )
    for pid in everyone:
        assert str(pid) in resource["prefect.resource.name"]
    assert (resource["runbook.action"], resource["runbook.count"]) == ("terminate_backend", "4")
    assert resource["runbook.step"] == STEP and resource["runbook.mode"] == "live"
    payload = executed["payload"]
    assert (payload["action"], payload["status"], payload["count"]) == (
        "terminate_backend",
        "executed",
        4,
    )
    assert {int(c["target"].split("pid=")[1].split()[0]) for c in payload["changes"]} == everyone
    # by which run: Prefect relates the flow run (a link in the feed, with its name)
    [run] = [r for r in executed["related"] if r["prefect.resource.role"] == "flow-run"]
    assert run["prefect.resource.id"] == f"prefect.flow-run.{first_state.state_details.flow_run_id}"
    assert run["prefect.resource.name"]
    # secrets stay out of the audit trail
    assert env.password not in json.dumps(events) and env.password not in one.report


def test_rejection_leaves_the_target_untouched_and_a_busy_target_is_skipped(
    env: Env, sessions: Sessions, target: Target, oncall: tuple[str, str], slack: HttpReceiver
) -> None:
    policy, _ = oncall
    conns = [*sessions.idle(2), sessions.in_transaction()]
    sessions.settle()
    block = env.block()
    everyone = sessions.pids(conns)
    approver = Approver(FLOW, None)
    approver.start()
    first, first_out = run_in_thread(
        params(env, block, include_idle_in_transaction=True, safety={"escalation_block": policy})
    )
    assert approver.seen_paused.wait(60), approver.error
    assert "inside a transaction" in approver.description
    # a second run told not to wait stops at once, changing nothing, and says why
    skip = params(env, block, safety={"on_busy_target": OnBusyTarget.SKIP})
    state = db_connection_pool_exhausted(params=skip, return_state=True)
    assert state.is_completed(), state.message
    assert "NOT ACTED: TARGET BUSY" in read_incident_report(state.state_details.flow_run_id)
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(
        approver.paused_run,
        run_input={"approve": False, "approver": "bob", "reason": "payments batch is running"},
    )
    first.join(60)
    rejected = first_out[0]
    assert rejected.is_failed()
    assert "rejected by bob: payments batch is running" in rejected.message
    assert everyone <= env.live_pids()
    for conn in conns:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    [note] = slack.wait_for(1)
    assert "rejected by bob" in note.json()["text"]


def test_one_server_by_two_host_names_has_one_lock_and_one_budget(
    env: Env, sessions: Sessions, target: Target
) -> None:
    """Issue #9 defect 4: blocks saying 127.0.0.1 and localhost reach one server, so a run
    through either waits for the other and spends the same budget."""
    by_address, by_name = env.block(host="127.0.0.1"), env.block(host="localhost")
    conns = [*sessions.idle(2), sessions.in_transaction()]
    sessions.settle()
    approver = Approver(FLOW, None)
    approver.start()
    first, first_out = run_in_thread(params(env, by_address, include_idle_in_transaction=True))
    assert approver.seen_paused.wait(60), approver.error
    # the other name finds the server locked; without the lock it would act (approval_timeout_s
    # keeps the old code from waiting long for an approval nobody gives)
    skip = params(
        env, by_name, safety={"on_busy_target": OnBusyTarget.SKIP, "approval_timeout_s": 3}
    )
    state = db_connection_pool_exhausted(params=skip, return_state=True)
    assert state.is_completed(), state.message
    busy = read_incident_report(state.state_details.flow_run_id)
    assert "NOT ACTED: TARGET BUSY" in busy
    # named by the run that holds it (the same server, under its other name)
    assert f"postgres localhost:{env.server.port} busy: held by run " in busy
    assert "of db-connection-pool-exhausted since" in busy
    assert sessions.pids(conns) <= env.live_pids()
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(
        approver.paused_run, run_input={"approve": True, "approver": "dave", "reason": "leak"}
    )
    first.join(60)
    assert first_out[0].is_completed(), first_out[0].message
    assert not sessions.pids(conns) & env.live_pids()
    # that termination is counted for the server, whichever name the next block uses
    sessions.idle(2)
    sessions.settle()
    again = params(env, by_name, safety={"budget_max_actions": 1})
    spent = db_connection_pool_exhausted(params=again, return_state=True)
    assert spent.is_failed()
    assert "budget of 1 per 1h spent (1 already)" in spent.message
    assert len(Variable.get(budget_variable(target, STEP))["executed"]) == 1


def test_approval_timeout_rejects_and_escalates(
    env: Env, sessions: Sessions, target: Target, oncall: tuple[str, str], slack: HttpReceiver
) -> None:
    policy, _ = oncall
    conns = [*sessions.idle(1), sessions.in_transaction()]
    sessions.settle()
    p = params(
        env,
        env.block(),
        include_idle_in_transaction=True,
        safety={"escalation_block": policy, "approval_timeout_s": 2},
    )

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_failed()
    assert "nobody answered within 2s" in state.message
    # an expected outcome: one clear log line, no traceback
    logs = read_run_logs(state.state_details.flow_run_id)
    assert not any("Traceback" in log["message"] for log in logs)
    [line] = [log for log in logs if log["level"] >= logging.ERROR]
    assert line["message"].startswith("outcome ESCALATED: Escalated to a human: ")
    report = read_incident_report(state.state_details.flow_run_id)
    assert "nobody answered within 2s" in report and "ESCALATED" in report
    assert "| terminate idle connections | timed out | - |" in report
    assert sessions.pids(conns) <= env.live_pids()
    [note] = slack.wait_for(1)
    assert "approval" in note.json()["text"].lower()


def test_alert_resolved_event_counts_as_verification(
    env: Env, sessions: Sessions, target: Target
) -> None:
    victims = sessions.idle(2)
    sessions.settle()
    fingerprint = uuid.uuid4().hex
    alert = AlertContext(
        alertname="PostgresPoolExhausted", fingerprint=fingerprint, status="firing"
    )
    # more headroom than terminating can give: only the alert resolving can verify the fix
    p = params(
        env, env.block(), alert=alert, min_free_connections=env.headroom() + 50, verify_timeout_s=40
    )

    def resolve_after_action() -> None:
        wait_until(lambda: not (sessions.pids(victims) & env.live_pids()), timeout_s=30)
        emit_event(
            event="alert.resolved",
            resource={
                "prefect.resource.id": f"alert.{fingerprint}",
                "alertname": "PostgresPoolExhausted",
            },
        )

    resolver = threading.Thread(target=resolve_after_action, daemon=True)
    resolver.start()
    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_completed(), state.message
    summary: ConnectionPoolSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert "alert PostgresPoolExhausted resolved" in summary.report


def test_observe_tag_plans_and_changes_nothing(
    env: Env, sessions: Sessions, target: Target
) -> None:
    conns = sessions.idle(3)
    sessions.settle()
    before = env.live_pids()

    with tags("observe"):
        state = db_connection_pool_exhausted(params=params(env, env.block()), return_state=True)

    assert state.is_completed(), state.message
    summary: ConnectionPoolSummary = state.result()
    assert summary.outcome is Outcome.PLANNED
    assert len(summary.terminate.planned) == 3 and summary.terminate.applied == []
    assert "OBSERVE" in summary.report
    run = read_flow_run(state.state_details.flow_run_id)
    assert {"observe", "dry-run"} <= set(run["tags"]) and run["name"].startswith("observe: ")
    time.sleep(0.5)
    assert env.live_pids() == before
    assert sessions.pids(conns) <= env.live_pids()


def test_a_dry_run_that_would_escalate_pages_nobody_and_completes(
    env: Env, target: Target, oncall: tuple[str, str], slack: HttpReceiver, moto: MotoServer
) -> None:
    """The weekly dry-run finds a pool exhausted by busy sessions: a finding, not a page."""
    policy, queue_url = oncall
    block = env.block()

    dry = params(env, block, dry_run=True, safety={"escalation_block": policy})
    state = db_connection_pool_exhausted(params=dry, return_state=True)

    assert state.is_completed(), state.message
    assert state.message.startswith("Would escalate to a human: ")
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| Outcome | **DRY-RUN: WOULD ESCALATE** |" in report
    assert "Nothing was planned: the run would escalate before acting." in report
    run = read_flow_run(state.state_details.flow_run_id)
    assert "dry-run" in run["tags"] and run["name"].startswith("dry-run: ")
    with pytest.raises(TimeoutError):
        moto.read_sns_notifications(queue_url, timeout_s=2)
    assert slack.requests == []

    # the same input, live: pages on every channel and fails, with one log line and no traceback
    live = params(env, block, safety={"escalation_block": policy})
    state = db_connection_pool_exhausted(params=live, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("Escalated to a human: ")
    [page] = slack.wait_for(1)
    assert FLOW in page.json()["text"]
    assert moto.read_sns_notifications(queue_url)
    report = read_incident_report(state.state_details.flow_run_id)
    assert "Nothing was changed: escalated before acting." in report
    logs = read_run_logs(state.state_details.flow_run_id)
    assert not any("Traceback" in log["message"] for log in logs)
    assert [log["message"] for log in logs if log["level"] >= logging.ERROR] == [
        f"outcome ESCALATED: {state.message}"
    ]
