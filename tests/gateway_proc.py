"""Running the alert gateway in tests (uvicorn in a thread, or a subprocess to SIGKILL), building
webhook payloads, and reading back what reached Prefect."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from alert_gateway import GatewaySettings, create_app
from tests.alertmanager import scrape_metric
from tests.servers import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-gateway-token-6f1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def serving(settings: GatewaySettings) -> Iterator[str]:
    """The gateway app served by real uvicorn on a free port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@dataclass
class GatewayProcess:
    """``python -m alert_gateway`` as a child process that a test can kill and restart."""

    spool_path: Path
    prefect_api_url: str
    port: int = field(default_factory=free_port)
    token: str | None = TOKEN  # None: started with --insecure
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNBOOKS_GATEWAY_")}
        env["RUNBOOKS_GATEWAY_SPOOL_PATH"] = str(self.spool_path)
        env["RUNBOOKS_GATEWAY_PREFECT_API_URL"] = self.prefect_api_url
        if self.token is not None:
            env["RUNBOOKS_GATEWAY_TOKEN"] = self.token
        insecure = ["--insecure"] if self.token is None else []
        with open(self.spool_path.with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "alert_gateway", "--port", str(self.port), *insecure],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"gateway not healthy after {timeout_s}s: {self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut or an OOM kill."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        path = self.spool_path.with_suffix(".log")
        return path.read_text(errors="replace") if path.exists() else ""


def started_now() -> str:
    """A startsAt of this moment. A firing alert re-sent a cooldown (300 s by default) after its
    start is a new event, so a test that re-sends one and expects the same event needs this."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert(
    alertname: str = "GatewayTestAlert",
    status: str = "firing",
    starts_at: str = "2026-11-22T03:00:00Z",
    annotations: dict[str, str] | None = None,
    **labels: str,
) -> dict[str, Any]:
    """One Alertmanager alert; its labels are unique per call unless given a ``run`` label."""
    labels.setdefault("run", uuid.uuid4().hex[:12])
    return {
        "status": status,
        "labels": {"alertname": alertname, **labels},
        "annotations": annotations or {"summary": f"{alertname} is {status}"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-22T03:10:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=up%3D%3D0",
    }


def alertmanager_notification(
    *alerts: dict[str, Any], receiver: str = "runbooks"
) -> dict[str, Any]:
    """An Alertmanager v4 webhook notification carrying ``alerts``."""
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "version": "4",
        "groupKey": '{}:{alertname="GatewayTestAlert"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def post_alerts(
    base_url: str, notification: dict[str, Any], path: str = "/alerts/alertmanager"
) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=notification, headers=AUTH, timeout=10)


def wait_until_delivered(url: str, timeout_s: float = 10) -> float:
    """Seconds until the gateway's spool is empty (Prefect acknowledged every event)."""
    start = time.monotonic()
    while httpx.get(f"{url}/healthz", timeout=5).json()["spool_depth"]:
        assert time.monotonic() - start < timeout_s, "events still undelivered"
        time.sleep(0.005)
    return time.monotonic() - start


def delivered_as(spool_path: Path, wanted: Collection[str]) -> dict[str, str]:
    """Alert event id -> the id its delivered attempt went under (alert_gateway.events
    delivery_id: the alert's own id on a first attempt, a derived one after a failed or unknown
    one), read from the spool file: a delivered row's ``attempts`` is that attempt's number."""
    from alert_gateway.events import delivery_id

    with sqlite3.connect(f"file:{spool_path}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute("SELECT id, attempts FROM events WHERE state = 'delivered'").fetchall()
    wanted = set(wanted)
    return {i: delivery_id(i, n) for i, n in rows if i in wanted}


def alert_ids(events: list[dict[str, Any]]) -> list[str]:
    """The alert each event is, by ``payload.alertEventId`` (alert_gateway.events), sorted."""
    return sorted(e["payload"]["alertEventId"] for e in events)


def prefect_events(api_url: str, event_ids: Collection[str]) -> list[dict[str, Any]]:
    """The events Prefect stored with these ids (every page), read 100 ids at a time (a page's
    next_page URL carries the filter: thousands of ids make it too long)."""
    ids = sorted(event_ids)
    return [
        e
        for start in range(0, len(ids), 100)
        for e in read_events(api_url, {"id": {"id": ids[start : start + 100]}})
    ]


# The session's Prefect server (SQLite, beside a second test process on 2 cores) once answered
# event reads only after more than 10 s, in a run where both processes had started every heavy
# server at once (pytest-xdist ignoring the test groups, since fixed: tests/conftest.py). A test
# waits for a slow server rather than failing on what it does not test; a server that stays
# silent still fails it at its deadline.
READ_TIMEOUT_S = 30


def read_events(api_url: str, event_filter: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event matching a Prefect event filter, following the API's pages of 50."""
    resp = httpx.post(
        f"{api_url}/events/filter",
        json={"filter": event_filter, "limit": 50},
        timeout=READ_TIMEOUT_S,
    )
    resp.raise_for_status()
    page = resp.json()
    events = page["events"]
    while page.get("next_page"):
        resp = httpx.get(page["next_page"], timeout=READ_TIMEOUT_S)
        resp.raise_for_status()
        page = resp.json()
        events.extend(page["events"])
    return events


# delivery attempts a test looks for an alert's event under (alert_gateway.events.delivery_id)
ATTEMPTS_LOOKED_FOR = 6


def wait_for_events(
    api_url: str, event_ids: Collection[str], timeout_s: float = 60
) -> list[dict[str, Any]]:
    """Poll until Prefect has an event for every one of ``event_ids`` (its persister writes every
    few seconds), or the deadline passes (then what it has; ``timeout_s=0`` reads once). An id
    the gateway returned is an alert's: its event may have gone under a later attempt's id (a
    first attempt that timed out on a busy server), so those ids are read too, and an event
    counts for the alert its ``payload.alertEventId`` names."""
    from alert_gateway.events import delivery_id

    wanted = set(event_ids)
    ids = {delivery_id(i, n) for i in wanted for n in range(1, ATTEMPTS_LOOKED_FOR + 1)}
    deadline = time.monotonic() + timeout_s
    events: list[dict[str, Any]] = []
    while True:
        try:
            events = prefect_events(api_url, ids)
        except httpx.TimeoutException:
            if time.monotonic() > deadline:
                raise
        found = {e["id"] for e in events} | {
            (e.get("payload") or {}).get("alertEventId") for e in events
        }
        if found >= wanted or time.monotonic() > deadline:
            return events
        time.sleep(0.25)


def metric(base_url: str, name: str, **labels: str) -> float:
    """The gateway's /metrics sample ``name`` (``_total`` optional) with these labels; 0 if absent."""
    return scrape_metric(f"{base_url}/metrics", name, **labels)
