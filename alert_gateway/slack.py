"""Approvals answered from Slack: the gateway's ``/slack/interactions`` endpoint.

Slack posts a button click (``block_actions``) as ``payload=<json>`` form data, signed with the
app's signing secret: ``X-Slack-Signature: v0=hex(HMAC-SHA256(secret, "v0:" + timestamp + ":" +
body))`` and ``X-Slack-Request-Timestamp``. A request is taken only when the signature matches
(constant-time compare) and the timestamp is within 5 minutes of now; the same signed request a
second time is refused too (a replay), and even past that memory (a restarted gateway) it could
answer nothing: each button names the run and the pause key of the question it answers, and the
run must still be paused on that very key.

The click resumes the paused run through Prefect's REST API (``POST /flow_runs/{id}/resume``,
what the UI's form does), with the same typed input: approve, approver (the Slack user), reason.
The run itself decides what the answer means (runbooks.safety: four eyes, typed confirmations,
a plan that grew). The Slack message is then updated through the click's ``response_url``.

Prefect is not imported (the gateway restarts fast): its API is called with httpx.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx
from pydantic import SecretStr

from runbooks.backoff import backoff_delay

logger = logging.getLogger("alert_gateway.slack")

MAX_SKEW_S = 300
RESUME_ATTEMPTS = 3
APPROVE = "runbooks_approve"  # the action ids runbooks.slack_approvals puts on its buttons
REJECT = "runbooks_reject"


def signature_problem(
    secret: SecretStr, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> str | None:
    """Why the request is not from Slack (None: it is)."""
    if not timestamp or not signature:
        return "missing X-Slack-Request-Timestamp or X-Slack-Signature"
    try:
        sent = int(timestamp)
    except ValueError:
        return "the timestamp is not a number"
    if abs(now - sent) > MAX_SKEW_S:
        return f"the timestamp is more than {MAX_SKEW_S} s from now (a replay or a wrong clock)"
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = (
        "v0=" + hmac.new(secret.get_secret_value().encode(), base, hashlib.sha256).hexdigest()
    )
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return "the signature does not match"
    return None


class ReplayGuard:
    """Signatures seen in the last ``MAX_SKEW_S`` seconds (older ones fail the timestamp check)."""

    def __init__(self, limit: int = 10_000):
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._limit = limit

    def seen_before(self, signature: str, now: float) -> bool:
        while self._seen and next(iter(self._seen.values())) < now - 2 * MAX_SKEW_S:
            self._seen.popitem(last=False)
        if signature in self._seen:
            return True
        self._seen[signature] = now
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return False


@dataclass(frozen=True)
class Click:
    """One Approve / Reject click."""

    approve: bool
    run_id: str
    pause_key: str
    user: str
    response_url: str | None


def parse_click(body: bytes, response_prefixes: tuple[str, ...]) -> Click | None:
    """The click in a signed interaction request; None for an action that answers nothing
    (e.g. "Open the run"). Raises ValueError for a request that is not one of ours.

    The message is updated only through a response URL under ``response_prefixes`` (Slack's
    own), so not even a signed request can make the gateway post elsewhere."""
    fields = parse_qs(body.decode("utf-8", errors="strict"), strict_parsing=False)
    raw = fields.get("payload")
    if not raw:
        raise ValueError("no payload field")
    try:
        payload = json.loads(raw[0])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the payload is not JSON: {exc.msg}") from None
    if not isinstance(payload, dict) or payload.get("type") != "block_actions":
        raise ValueError("not a block_actions interaction")
    actions = payload.get("actions") or []
    ours = [a for a in actions if isinstance(a, dict) and a.get("action_id") in (APPROVE, REJECT)]
    if not ours:
        return None
    action = ours[0]
    try:
        value = json.loads(action.get("value") or "")
        run_id, pause_key = str(value["run"]), str(value["pause"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError("the button's value is not a runbooks approval") from None
    _check_uuid(run_id)
    user = payload.get("user") or {}
    name = user.get("username") or user.get("name") or ""
    user_id = user.get("id") or ""
    if not user_id:
        raise ValueError("the interaction names no Slack user")
    response_url = payload.get("response_url")
    return Click(
        approve=action["action_id"] == APPROVE,
        run_id=run_id,
        pause_key=pause_key,
        user=f"{name} (Slack {user_id})" if name else f"Slack {user_id}",
        response_url=response_url if _allowed(response_url, response_prefixes) else None,
    )


def _check_uuid(value: str) -> None:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        raise ValueError("the button's run id is not a flow run id") from None


def _allowed(url: Any, prefixes: tuple[str, ...]) -> bool:
    return isinstance(url, str) and ".." not in url and url.startswith(prefixes)


@dataclass(frozen=True)
class Answered:
    """What the click did, for Slack and the log."""

    resumed: bool
    text: str


async def answer(click: Click, api_url: str, headers: dict[str, str], timeout_s: float) -> Answered:
    """Resume the run with the click's answer if it is still waiting on this question."""
    base = api_url.rstrip("/")
    decision = "approved" if click.approve else "rejected"
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as client:
        response = await _retried(client, "GET", f"{base}/flow_runs/{click.run_id}")
        if response.status_code == 404:
            return Answered(False, "This run no longer exists.")
        response.raise_for_status()
        state = response.json().get("state") or {}
        waiting_on = (state.get("state_details") or {}).get("pause_key")
        if state.get("type") != "PAUSED" or waiting_on != click.pause_key:
            return Answered(
                False,
                f"Not {decision}: the run is no longer waiting for this answer "
                f"(it is {state.get('name') or state.get('type') or 'unknown'}).",
            )
        run_input = {
            "approve": click.approve,
            "approver": click.user,
            "reason": f"{decision} in Slack",
        }
        result = await _retried(
            client, "POST", f"{base}/flow_runs/{click.run_id}/resume", {"run_input": run_input}
        )
        result.raise_for_status()
        status = result.json().get("status")
        if status != "ACCEPT":
            reason = (result.json().get("details") or {}).get("reason") or status
            return Answered(False, f"Not {decision}: Prefect refused the answer ({reason}).")
    return Answered(True, f"{decision.capitalize()} by {click.user}; the run goes on.")


async def _retried(
    client: httpx.AsyncClient, method: str, url: str, body: dict[str, Any] | None = None
) -> httpx.Response:
    """One request to Prefect, tried again (twice at most, backoff with jitter) on a transport
    error or a 5xx: a SQLite-backed server answers 500 "database is locked" while the paused run
    writes its form. Retrying a resume is safe: the run's state is read again by the server, and
    a run no longer paused is refused, never resumed twice."""
    for attempt in range(1, RESUME_ATTEMPTS + 1):
        try:
            response = await client.request(method, url, json=body)
        except httpx.TransportError:
            if attempt == RESUME_ATTEMPTS:
                raise
        else:
            if response.status_code < 500 or attempt == RESUME_ATTEMPTS:
                return response
        await asyncio.sleep(backoff_delay(attempt, 0.2, 1.0, random.random()))
    raise AssertionError("unreachable")


async def update_message(url: str, text: str, timeout_s: float) -> None:
    """Replace the Slack message's buttons with what happened (best effort: logged on failure)."""
    message = {
        "replace_original": True,
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}}],
    }
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.post(url, json=message)
        if response.status_code >= 300:
            logger.warning("Slack refused the message update: HTTP %s", response.status_code)
    except httpx.HTTPError as exc:
        logger.warning("could not update the Slack message: %s", type(exc).__name__)


def now() -> float:
    return time.time()
