"""Issue #17 part 1: the alert is silenced in the real Alertmanager while its runbook acts on it.

Real components: Alertmanager (Debian's, on a free port) holding the alerts, a real PostgreSQL whose
idle sessions db-connection-pool-exhausted terminates, the Prefect test server, a Slack stand-in
for escalations, and a victim process killed by SIGKILL while it acts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from blocks.escalation import EscalationPolicy
from blocks.prometheus import AlertmanagerServer
from flows.postgres.db_connection_pool_exhausted import db_connection_pool_exhausted
from runbooks.params import AlertContext
from runbooks.report import Outcome
from tests.alertmanager import Alertmanager, firing, start_alertmanager
from tests.conftest import read_incident_report, unique
from tests.integration.test_safety import Sessions
from tests.integration.test_safety import params as pool_params
from tests.pg_env import Env, env  # noqa: F401 - env: a fixture
from tests.receivers import HttpReceiver, save_slack_standin

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ALERTNAME = "PostgresPoolExhausted"


@pytest.fixture(scope="module")
def alertmanager() -> Iterator[Alertmanager]:
    server = start_alertmanager({"route": {"receiver": "null"}, "receivers": [{"name": "null"}]})
    yield server
    server.stop()


@pytest.fixture
def am_block(alertmanager: Alertmanager) -> str:
    name = unique("am")
    AlertmanagerServer(url=alertmanager.url, timeout_s=5).save(name)
    return name


@pytest.fixture
def sessions(env: Env) -> Iterator[Sessions]:
    s = Sessions(env)
    yield s
    s.close()


def params(env: Env, block: str, **overrides: Any) -> Any:
    """The pool runbook's parameters; the tests act on one server often, so no budget limit."""
    safety = {"budget_max_actions": 1000, **overrides.pop("safety", {})}
    return pool_params(env, block, safety=safety, **overrides)


def alert_labels(**extra: str) -> dict[str, str]:
    return {"alertname": ALERTNAME, "instance": f"db-{uuid.uuid4().hex[:8]}", **extra}


def context(labels: dict[str, str]) -> AlertContext:
    return AlertContext(
        alertname=labels["alertname"],
        fingerprint=uuid.uuid4().hex,
        status="firing",
        labels=labels,
    )


def alert_state(am: Alertmanager, labels: dict[str, str]) -> dict[str, Any]:
    (found,) = [a for a in am.alerts() if a["labels"] == labels]
    return found["status"]


def ours(am: Alertmanager, labels: dict[str, str]) -> list[dict[str, Any]]:
    """Silences whose matchers are exactly these labels."""
    silences = httpx.get(f"{am.url}/api/v2/silences", timeout=5).json()
    wanted = sorted((k, v) for k, v in labels.items())
    return [s for s in silences if sorted((m["name"], m["value"]) for m in s["matchers"]) == wanted]


class Watcher:
    """Polls Alertmanager while a run goes: which silences each alert was silenced by."""

    def __init__(self, am: Alertmanager, *alerts: dict[str, str]):
        self.am, self.alerts = am, alerts
        self.seen: list[set[str]] = [set() for _ in alerts]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            current = self.am.alerts()
            for i, labels in enumerate(self.alerts):
                for a in current:
                    if a["labels"] == labels:
                        self.seen[i] |= set(a["status"]["silencedBy"])
            time.sleep(0.02)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_the_alert_is_silenced_while_the_runbook_acts_and_notifies_again_after(
    env: Env, sessions: Sessions, alertmanager: Alertmanager, am_block: str
) -> None:
    # a label value that would be a wide regex if it were one: it is matched literally
    labels = alert_labels(cluster=".*")
    other = {**labels, "cluster": "prod-eu"}  # the same alert on another cluster: not ours
    alertmanager.post_alerts([firing(labels), firing(other)])
    victims = sessions.idle(3)
    sessions.settle()
    before = sessions.pids(victims)

    p = params(
        env, env.block(), alert=context(labels),
        safety={"silence_block": am_block, "silence_max_s": 600},
    )  # fmt: skip
    with Watcher(alertmanager, labels, other) as watched:
        state = db_connection_pool_exhausted(params=p, return_state=True)

    summary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert not before & env.live_pids(), "the runbook terminated the idle sessions"
    (silence,) = ours(alertmanager, labels)
    assert watched.seen[0] == {silence["id"]}, "silenced while the run acted"
    assert watched.seen[1] == set(), "an alert with another label set is never silenced"
    assert silence["status"]["state"] == "expired"
    assert alert_state(alertmanager, labels)["silencedBy"] == [], "it notifies again"
    assert silence["createdBy"] == "runbooks/db-connection-pool-exhausted"
    run_id = str(state.state_details.flow_run_id)
    assert f"[run {run_id}]" in silence["comment"] and "at the latest" in silence["comment"]
    assert {(m["name"], m["value"], m["isRegex"], m["isEqual"]) for m in silence["matchers"]} == {
        (k, v, False, True) for k, v in labels.items()
    }
    report = read_incident_report(run_id)
    assert f"silenced {ALERTNAME} in Alertmanager while acting (silence {silence['id']}" in report
    assert f"silence {silence['id']} expired" in report


def test_the_silence_is_gone_before_an_escalation_pages(
    env: Env,
    sessions: Sessions,
    alertmanager: Alertmanager,
    am_block: str,
    slack: HttpReceiver,
) -> None:
    labels = alert_labels()
    alertmanager.post_alerts([firing(labels)])
    sessions.idle(2)
    sessions.settle()
    policy = unique("oncall")
    EscalationPolicy(notification_blocks=[save_slack_standin(slack)]).save(policy)
    # more free connections than the server has: verification fails, the run escalates
    p = params(
        env, env.block(), alert=context(labels), min_free_connections=10_000, verify_timeout_s=2,
        safety={"silence_block": am_block, "escalation_block": policy},
    )  # fmt: skip

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_failed()
    (page,) = slack.wait_for(1)
    (silence,) = ours(alertmanager, labels)
    assert silence["status"]["state"] == "expired"
    # an expired silence's end is when it was expired: before the page went out
    expired_at = datetime.fromisoformat(silence["endsAt"].replace("Z", "+00:00"))
    assert expired_at.timestamp() <= page.at
    assert alert_state(alertmanager, labels)["silencedBy"] == []


@pytest.mark.parametrize(
    ("case", "overrides", "why"),
    [
        ("dry run", {"dry_run": True}, "a dry run changes nothing, so it silences nothing"),
        ("resolved alert", {"status": "resolved"}, "the alert is resolved, not firing"),
        ("silences off", {"silence_block": None}, None),
    ],
)
def test_no_silence_where_the_run_changes_nothing_or_did_not_opt_in(
    env: Env,
    sessions: Sessions,
    alertmanager: Alertmanager,
    am_block: str,
    case: str,
    overrides: dict[str, Any],
    why: str | None,
) -> None:
    labels = alert_labels()
    alertmanager.post_alerts([firing(labels)])
    sessions.idle(2)
    sessions.settle()
    alert = context(labels).model_copy(update={"status": overrides.get("status", "firing")})
    p = params(
        env, env.block(), alert=alert, dry_run=overrides.get("dry_run", False),
        safety={"silence_block": overrides.get("silence_block", am_block)},
    )  # fmt: skip

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.is_completed(), state.message
    assert ours(alertmanager, labels) == [], case
    report = read_incident_report(str(state.state_details.flow_run_id))
    if why:
        assert f"alert not silenced: {why}" in report
    else:
        assert "silence" not in report.lower()


def test_alertmanager_down_is_reported_and_the_fix_goes_on(env: Env, sessions: Sessions) -> None:
    dead = unique("am-dead")
    AlertmanagerServer(url="http://127.0.0.1:9", timeout_s=1).save(dead)
    victims = sessions.idle(2)
    sessions.settle()
    p = params(env, env.block(), alert=context(alert_labels()), safety={"silence_block": dead})

    state = db_connection_pool_exhausted(params=p, return_state=True)

    assert state.result().outcome is Outcome.RESOLVED
    assert not sessions.pids(victims) & env.live_pids()
    report = read_incident_report(str(state.state_details.flow_run_id))
    assert f"could not silence {ALERTNAME} in Alertmanager ({dead})" in report
    assert "acting anyway" in report


def test_a_run_killed_while_acting_leaves_a_silence_that_ends_by_itself(
    alertmanager: Alertmanager, am_block: str
) -> None:
    labels = alert_labels()
    alertmanager.post_alerts([firing(labels)])
    max_s = 6
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.silence_victim", am_block, json.dumps(labels), str(max_s)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={
            **os.environ,
            "PYTHONPATH": str(PROJECT_ROOT),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
        },
    )
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == -9, f"victim did not die by SIGKILL: {err[-2000:]!r}"
    killed_at = time.time()

    (silence,) = ours(alertmanager, labels)
    assert silence["status"]["state"] == "active", "nobody was left to expire it"
    assert alert_state(alertmanager, labels)["silencedBy"] == [silence["id"]]
    ends = datetime.fromisoformat(silence["endsAt"].replace("Z", "+00:00")).timestamp()
    starts = datetime.fromisoformat(silence["startsAt"].replace("Z", "+00:00")).timestamp()
    assert ends - starts <= max_s + 1, "bounded by safety.silence_max_s"

    deadline = killed_at + max_s + 10
    while alert_state(alertmanager, labels)["silencedBy"] and time.time() < deadline:
        time.sleep(0.2)
    assert alert_state(alertmanager, labels)["silencedBy"] == [], "it ended by itself"
    (silence,) = ours(alertmanager, labels)
    assert silence["status"]["state"] == "expired"
    assert datetime.now(UTC).timestamp() >= ends


def test_creating_and_expiring_a_silence_twice_does_it_once(
    alertmanager: Alertmanager, am_block: str
) -> None:
    """A retried task (a timeout that hid a success) neither adds a second silence nor fails."""
    from datetime import timedelta

    from runbooks.silences import silence_matchers
    from tasks.alertmanager import create_silence, expire_silence

    labels = alert_labels()
    alertmanager.post_alerts([firing(labels)])
    server = AlertmanagerServer.load(am_block)
    until = datetime.now(UTC) + timedelta(minutes=5)
    first = create_silence.fn(
        server, silence_matchers(labels), until, "t", "c [run r-1]", "[run r-1]"
    )
    again = create_silence.fn(
        server, silence_matchers(labels), until, "t", "c [run r-1]", "[run r-1]"
    )
    assert again.id == first.id and len(ours(alertmanager, labels)) == 1
    assert alert_state(alertmanager, labels)["silencedBy"] == [first.id]

    assert expire_silence.fn(server, first.id) is True
    assert expire_silence.fn(server, first.id) is False
    assert alert_state(alertmanager, labels)["silencedBy"] == []
    # another run's silence for the same alert is its own
    other = create_silence.fn(
        server, silence_matchers(labels), until, "t", "c [run r-2]", "[run r-2]"
    )
    assert other.id != first.id
    expire_silence.fn(server, other.id)
