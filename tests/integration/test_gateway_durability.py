"""Nothing accepted is lost, and an alert is delivered again only when an attempt of it may have
reached Prefect (then under an id of its own naming the alert's, which runbooks claim it by):
Prefect down then up, the gateway SIGKILLed mid-stream, and killed between Prefect's 2xx and
marking the event delivered.

Prefect is a real `prefect server start` (own PREFECT_HOME, basic auth on) for the outage tests,
and the session's server otherwise. A small HTTP relay between the gateway and Prefect slows
deliveries down (so a kill finds events in flight) or SIGKILLs the gateway at an exact moment.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from alert_gateway import GatewaySettings
from alert_gateway.events import delivery_id
from deployments.catalog import load_catalog, to_runner_deployments
from tests.gateway_proc import (
    TOKEN,
    GatewayProcess,
    alert,
    alert_ids,
    alertmanager_notification,
    delivered_as,
    metric,
    post_alerts,
    prefect_events,
    serving,
    started_now,
    wait_for_events,
    wait_until_delivered,
)
from tests.servers import PrefectServer, free_port, wait_for_port

PREFECT_AUTH = "gateway:prefect-pw-77"


class OwnPrefect(PrefectServer):
    """A Prefect server of this module's own, with basic auth and a small label limit."""

    def __init__(self, home: Path) -> None:
        super().__init__(
            home=home,
            extra_env={
                "PREFECT_SERVER_UI_ENABLED": "false",
                "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH,
                "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
                # small enough to make Prefect itself refuse an event (see the rejection test)
                "PREFECT_SERVER_EVENTS_MAXIMUM_LABELS_PER_RESOURCE": "12",
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.3",
                **{
                    f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false"
                    for s in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "TRIGGERS")
                },
            },
        )

    def events(self, ids: list[str], timeout_s: float = 20) -> list[dict[str, Any]]:
        headers = {"Authorization": "Basic " + base64.b64encode(PREFECT_AUTH.encode()).decode()}
        deadline = time.monotonic() + timeout_s
        while True:
            resp = httpx.post(
                f"{self.api_url}/events/filter",
                json={"filter": {"id": {"id": ids}}, "limit": 50},
                headers=headers,
                timeout=10,
            )
            resp.raise_for_status()
            found = resp.json()["events"]
            if len(found) >= len(ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


@pytest.fixture(scope="module")
def own_prefect() -> Iterator[OwnPrefect]:
    server = OwnPrefect(home=Path(tempfile.mkdtemp(prefix="gateway-prefect-")))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.home, ignore_errors=True)


class PrefectRelay:
    """An HTTP relay in front of Prefect's API: records the event ids of every delivery, can
    delay each one, and can SIGKILL a process right after Prefect accepted a delivery."""

    def __init__(self, target_api_url: str, delay_s: float = 0.0):
        self.target = target_api_url.rstrip("/")
        self.delay_s = delay_s
        self.kill_pid: int | None = None
        self.deliveries: list[list[str]] = []  # event ids Prefect took, per delivery
        self.alerts: list[list[str]] = []  # the alerts they are (payload.alertEventId)
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(relay.delay_s)
                upstream = httpx.post(
                    relay.target + self.path.removeprefix("/api"),
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=10,
                )
                if upstream.is_success:
                    events = json.loads(body)
                    relay.deliveries.append([e["id"] for e in events])
                    relay.alerts.append([e["payload"]["alertEventId"] for e in events])
                    if relay.kill_pid is not None:
                        os.kill(relay.kill_pid, signal.SIGKILL)
                        relay.kill_pid = None
                with contextlib.suppress(OSError):  # the gateway may be dead by now
                    self.send_response(upstream.status_code)
                    self.send_header("Content-Length", str(len(upstream.content)))
                    self.end_headers()
                    self.wfile.write(upstream.content)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        wait_for_port(self.server.server_port)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/api"

    def sent_ids(self) -> list[str]:
        return [i for delivery in self.deliveries for i in delivery]

    def sent_alerts(self) -> list[str]:
        return [i for delivery in self.alerts for i in delivery]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def spool_states(path: Path) -> dict[str, str]:
    """Event id -> state, read from the spool file itself."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT id, state FROM events").fetchall())


def gateway_settings(
    own_prefect: OwnPrefect, tmp_path: Path, auth: str = PREFECT_AUTH, **overrides: float
) -> GatewaySettings:
    """A gateway spooling in ``tmp_path`` and forwarding to ``own_prefect`` with ``auth``."""
    return GatewaySettings(
        token=SecretStr(TOKEN),
        spool_path=tmp_path / "spool.sqlite3",
        prefect_api_url=own_prefect.api_url,
        prefect_api_auth_string=SecretStr(auth),
        **overrides,
    )


def test_prefect_down_then_up_delivers_everything_once(
    own_prefect: OwnPrefect, tmp_path: Path
) -> None:
    settings = gateway_settings(own_prefect, tmp_path, backoff_max_s=1.0)
    with serving(settings) as gateway:
        before = post_alerts(
            gateway, alertmanager_notification(alert("PrefectOutage", phase="before"))
        )
        [before_id] = before.json()["event_ids"]
        assert len(own_prefect.events([before_id])) == 1

        own_prefect.stop()
        during = []
        for i in range(10):
            reply = post_alerts(
                gateway,
                alertmanager_notification(
                    alert("PrefectOutage", phase=f"during-{i}"),
                    alert("PrefectOutage", status="resolved"),
                ),
            )
            assert reply.status_code == 202  # accepted: it is in the spool
            during += reply.json()["event_ids"]
        time.sleep(1.5)
        assert httpx.get(f"{gateway}/healthz", timeout=5).json()["spool_depth"] == 20
        assert metric(gateway, "runbooks_gateway_forward_failures", reason="unreachable") >= 2

        own_prefect.start()
        wait_until_delivered(gateway, timeout_s=30)
        assert metric(gateway, "runbooks_gateway_events_forwarded") == 21
        assert metric(gateway, "runbooks_gateway_spool_depth") == 0
        # each retried after failed attempts: under an id of its own, naming the alert's
        sent = delivered_as(settings.spool_path, during)
        assert all(sent[i] != i for i in during)
        events = own_prefect.events(list(sent.values()), timeout_s=30)
        assert alert_ids(events) == sorted(during)  # every one, once

    # Prefect's event store keeps one event per id, across its own restarts: a re-delivery of an
    # event it stored before the outage does not add a second one
    headers = {"Authorization": "Basic " + base64.b64encode(PREFECT_AUTH.encode()).decode()}
    again = {
        "id": before_id,
        "occurred": "2026-11-22T04:00:00Z",
        "event": "alert.firing",
        "resource": {"prefect.resource.id": "alert.re-delivered"},
    }
    httpx.post(
        f"{own_prefect.api_url}/events", json=[again], headers=headers, timeout=10
    ).raise_for_status()
    time.sleep(1.5)  # > the persister's flush interval
    [stored] = own_prefect.events([before_id], timeout_s=0)
    assert stored["resource"]["prefect.resource.id"] != "alert.re-delivered"


def test_event_prefect_refuses_is_set_aside_and_others_pass(
    own_prefect: OwnPrefect, tmp_path: Path
) -> None:
    settings = gateway_settings(own_prefect, tmp_path)
    many_labels = {f"label_{i}": str(i) for i in range(20)}  # this Prefect allows 12 per resource
    with serving(settings) as gateway:
        reply = post_alerts(
            gateway,
            alertmanager_notification(
                alert("Refused", n="1"), alert("Refused", **many_labels), alert("Refused", n="3")
            ),
        )
        good_1, refused, good_3 = reply.json()["event_ids"]
        assert sorted(e["id"] for e in own_prefect.events([good_1, good_3])) == sorted(
            [good_1, good_3]
        )
        deadline = time.monotonic() + 10
        while (
            spool_states(settings.spool_path)[refused] == "pending" and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert spool_states(settings.spool_path) == {
            good_1: "delivered",
            refused: "rejected",
            good_3: "delivered",
        }
        assert metric(gateway, "runbooks_gateway_forward_failures", reason="rejected") == 1
        assert metric(gateway, "runbooks_gateway_spool_depth") == 0
    with sqlite3.connect(settings.spool_path) as db:
        [error] = db.execute("SELECT last_error FROM events WHERE id = ?", (refused,)).fetchone()
    assert "maximum number of labels" in error


def test_wrong_prefect_credentials_keep_alerts_until_fixed(
    own_prefect: OwnPrefect, tmp_path: Path
) -> None:
    def settings(auth: str) -> GatewaySettings:
        return gateway_settings(own_prefect, tmp_path, auth=auth, backoff_max_s=0.5)

    with serving(settings("gateway:wrong-password")) as gateway:
        [event_id] = post_alerts(gateway, alertmanager_notification(alert("Misconfigured"))).json()[
            "event_ids"
        ]
        deadline = time.monotonic() + 10
        while metric(gateway, "runbooks_gateway_forward_failures", reason="http_401") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert spool_states(tmp_path / "spool.sqlite3") == {event_id: "pending"}
    with serving(settings(PREFECT_AUTH)) as gateway:  # fixed and restarted: it goes through
        wait_until_delivered(gateway, timeout_s=20)
        [sent] = delivered_as(tmp_path / "spool.sqlite3", [event_id]).values()
        assert alert_ids(own_prefect.events([sent])) == [event_id]


def test_gateway_killed_mid_stream_delivers_every_acknowledged_alert_once(tmp_path: Path) -> None:
    api = PREFECT_API_URL.value()
    relay = PrefectRelay(api, delay_s=0.15)  # slow deliveries: the kill finds events in the spool
    gateway = GatewayProcess(spool_path=tmp_path / "spool.sqlite3", prefect_api_url=relay.api_url)
    run = uuid.uuid4().hex[:8]
    started = started_now()  # a notification re-sent after the restart is the same event
    notifications = [
        alertmanager_notification(
            *(
                alert("StreamTest", starts_at=started, run=run, seq=str(i), part=str(j))
                for j in range(1 + i % 3)
            )
        )
        for i in range(80)
    ]
    acked: dict[int, list[str]] = {}
    try:
        gateway.start()

        def send(i: int) -> None:
            try:
                reply = httpx.post(
                    f"{gateway.url}/alerts/alertmanager",
                    json=notifications[i],
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=5,
                )
            except httpx.TransportError:
                return  # not acknowledged: Alertmanager would send it again
            if reply.status_code == 202:
                acked[i] = reply.json()["event_ids"]
            if len(acked) >= 30:
                gateway.kill()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(send, range(len(notifications))))
        assert gateway.proc is not None and gateway.proc.returncode == -signal.SIGKILL
        pending_at_kill = [i for i, s in spool_states(gateway.spool_path).items() if s == "pending"]
        assert 30 <= len(acked) < len(notifications)
        assert pending_at_kill, "the kill found nothing in flight: the test proves nothing"

        gateway.start()  # same spool, same port
        for i in sorted(set(range(len(notifications))) - set(acked)):  # the sender retries
            reply = post_alerts(gateway.url, notifications[i])
            assert reply.status_code == 202
            acked[i] = reply.json()["event_ids"]

        every_id = [i for ids in acked.values() for i in ids]
        assert len(set(every_id)) == len(every_id) == sum(1 + i % 3 for i in range(80))
        wait_until_delivered(gateway.url, timeout_s=30)
        # what was pending at the kill went again under an id of its own (an attempt of it may
        # have been in flight); the rest under the alert's id
        sent_as = delivered_as(gateway.spool_path, every_id)
        assert {i for i in every_id if sent_as[i] != i} == set(pending_at_kill)
        events = wait_for_events(api, list(sent_as.values()), timeout_s=30)
        assert set(alert_ids(events)) == set(every_id)  # every acknowledged alert stored
        # the relay saw what the gateway sent: every alert; an alert twice only if it was in
        # flight at the kill (Prefect then has it twice, both naming the alert: runbooks claim
        # it once, tests/integration/test_team_gateways.py); no other alert was sent twice
        sent = relay.sent_alerts()
        assert set(sent) == set(every_id)
        resent = {i for i in sent if sent.count(i) > 1}
        assert resent <= set(pending_at_kill)
        stored = alert_ids(wait_for_events(api, relay.sent_ids(), timeout_s=30))
        assert {i for i in stored if stored.count(i) > 1} <= resent
    finally:
        gateway.kill()
        relay.close()


def test_crash_after_prefect_took_the_event_resends_it_as_the_same_alert(
    tmp_path: Path,
) -> None:
    """The window at-least-once delivery cannot close: Prefect has the event, the gateway dies
    before noting it. The restarted gateway cannot know whether its attempt got through (nor
    whether Prefect only recorded the id as seen: alert_gateway.events.delivery_id), so it sends
    the alert again under an id of its own that names the alert's. Prefect has it twice and its
    trigger creates two runs, both for the same alert: the runbook claims the alert by that id,
    so one run acts and the other stops before acting (run end to end, with real workers, in
    tests/integration/test_team_gateways.py::test_a_retry_after_prefects_loss_window...)."""
    api = PREFECT_API_URL.value()
    [spec] = [s for s in load_catalog() if s.name == "flink-job-crashed"]
    deployment_id = str(to_runner_deployments([spec])[0].apply())
    time.sleep(2)  # the trigger service loads new automations every few seconds

    relay = PrefectRelay(api)
    gateway = GatewayProcess(spool_path=tmp_path / "spool.sqlite3", prefect_api_url=relay.api_url)
    fingerprint = uuid.uuid4().hex[:16]
    crashed = {
        **alert("FlinkJobFailed", job_name="enrichment-job", flink_cluster="flink-eu"),
        "fingerprint": fingerprint,
    }
    try:
        gateway.start()
        assert gateway.proc is not None
        relay.kill_pid = gateway.proc.pid
        reply = post_alerts(gateway.url, alertmanager_notification(crashed))
        assert reply.status_code == 202
        [event_id] = reply.json()["event_ids"]
        gateway.proc.wait(10)
        assert relay.sent_ids() == [event_id]
        assert spool_states(gateway.spool_path) == {event_id: "pending"}  # died before noting it

        gateway.start()
        deadline = time.monotonic() + 10
        while len(relay.sent_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = delivery_id(event_id, 2)
        assert relay.sent_ids() == [event_id, again]  # a new event ...
        assert relay.sent_alerts() == [event_id, event_id]  # ... of the same alert
        assert alert_ids(wait_for_events(api, [event_id, again])) == [event_id, event_id]

        def runs() -> list[dict[str, Any]]:
            resp = httpx.post(
                f"{api}/flow_runs/filter",
                json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}},
                timeout=10,
            )
            resp.raise_for_status()
            return [
                r
                for r in resp.json()
                if (r["parameters"]["params"].get("alert") or {}).get("fingerprint") == fingerprint
            ]

        deadline = time.monotonic() + 30
        while len(runs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        time.sleep(3)  # room for a third run, if anything were to start one
        # both runs claim the same alert (runbooks/alert_claims.py): one acts, one stops
        assert [r["parameters"]["params"]["alert"]["event_id"] for r in runs()] == [event_id] * 2
        assert prefect_events(api, [event_id])[0]["resource"]["flink_cluster"] == "flink-eu"
    finally:
        gateway.kill()
        relay.close()


def test_second_gateway_on_the_same_spool_refuses_to_start(tmp_path: Path) -> None:
    first = GatewayProcess(
        spool_path=tmp_path / "spool.sqlite3", prefect_api_url=PREFECT_API_URL.value()
    )
    second = GatewayProcess(spool_path=first.spool_path, prefect_api_url=PREFECT_API_URL.value())
    try:
        first.start()
        with pytest.raises(RuntimeError, match="in use by another gateway"):
            second.start()
    finally:
        first.kill()
        second.kill()
