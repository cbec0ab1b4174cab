"""An approval pause whose answer from the Prefect API was lost still pauses, and is answered.

CI saw it on a busy SQLite-backed server: the run proposed PAUSED, the server stored it, the answer
never reached the client, the client retried the same proposal, and Prefect rejected the retry as
"This run has already made this state transition." (``PreventDuplicateTransitions``), which
``propose_state_sync`` raises as ``Pause``: the runbook crashed instead of waiting for its human.

Here a real HTTP proxy in front of the real test server forwards the run's first PAUSED proposal,
lets the server store it, and answers the client 503, so Prefect's own client retries it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings

from runbooks.approvals import Approval, request_approval
from tests.approvals import Approver
from tests.servers import free_port, wait_for_port

pytestmark = pytest.mark.integration

FLOW = "approval-lost-answer-probe"


class LosingProxy:
    """Forwards every request to the Prefect API; the first PAUSED proposal's answer is lost."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.paused_proposals: list[str] = []  # the server's answer to each PAUSED proposal
        self._server = uvicorn.Server(
            uvicorn.Config(
                self._app, host="127.0.0.1", port=self.port, log_level="warning", interface="asgi3"
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        self._thread.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _app(self, scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "websocket":  # events: not what this proxy is about, refused
            await send({"type": "websocket.close", "code": 1000})
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"].removeprefix("/api")
        query = scope["query_string"].decode()
        url = f"{self.upstream}{path}" + (f"?{query}" if query else "")
        headers = {
            k.decode(): v.decode()
            for k, v in scope["headers"]
            if k.decode().lower() not in {"host", "content-length"}
        }
        async with httpx.AsyncClient(timeout=30) as client:
            upstream = await client.request(scope["method"], url, content=body, headers=headers)
        status, content = upstream.status_code, upstream.content
        if path.endswith("/set_state") and _proposed_type(body) == "PAUSED":
            self.paused_proposals.append(upstream.json().get("status", "?"))
            if len(self.paused_proposals) == 1:
                # stored by the server, answer lost on the way back: the client retries on 503
                status, content = 503, b'{"detail": "answer lost by the test proxy"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": content})


def _proposed_type(body: bytes) -> str | None:
    try:
        return json.loads(body)["state"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


@pytest.fixture
def proxy() -> Iterator[LosingProxy]:
    proxy = LosingProxy(PREFECT_API_URL.value())
    proxy.start()
    yield proxy
    proxy.stop()


@flow(name=FLOW)
def ask() -> dict | None:
    answer = request_approval(
        Approval.with_initial_data(description="Approve the probe's step?"),
        key="lost-answer-step",
        timeout_s=60,
        poll_s=1,
        plan=["drop nothing (probe)"],
        before_suspending=lambda deadline: None,
    )
    return answer.form.model_dump(include={"approve", "approver"}) if answer.form else None


def test_a_pause_stored_but_unanswered_still_waits_for_the_human(proxy: LosingProxy) -> None:
    approver = Approver(FLOW, {"approve": True, "approver": "alice", "reason": "probe"})
    approver.start()
    with temporary_settings({PREFECT_API_URL: proxy.url}):
        result = ask()
    approver.join(10)
    assert approver.error is None and approver.description == "Approve the probe's step?"
    assert result == {"approve": True, "approver": "alice"}
    # the first proposal was stored (its answer lost), the client's retry was the duplicate
    assert proxy.paused_proposals[:2] == ["ACCEPT", "REJECT"], proxy.paused_proposals
