"""A stand-in for Slack in tests: receives the approval messages (an incoming webhook) and the
message updates (response URLs), and clicks buttons the way Slack does: a ``block_actions``
payload as form data, signed with the app's signing secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

import httpx

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


def sign(body: bytes, timestamp: int, secret: str = SIGNING_SECRET) -> dict[str, str]:
    """Slack's request signature headers for ``body`` sent at ``timestamp``."""
    base = b"v0:" + str(timestamp).encode() + b":" + body
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": str(timestamp),
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": "application/x-www-form-urlencoded",
    }


def buttons(message: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The buttons of a posted message by action id."""
    (actions,) = [b for b in message["blocks"] if b["type"] == "actions"]
    return {e["action_id"]: e for e in actions["elements"]}


def click_body(
    message: dict[str, Any], action_id: str, user_id: str, username: str, response_url: str
) -> bytes:
    button = buttons(message)[action_id]
    payload = {
        "type": "block_actions",
        "user": {"id": user_id, "username": username, "name": username, "team_id": "T1"},
        "api_app_id": "A1",
        "container": {"type": "message", "message_ts": "1700000000.000100"},
        "response_url": response_url,
        "actions": [
            {
                "action_id": action_id,
                "block_id": "runbooks_approval",
                "value": button["value"],
                "type": "button",
                "action_ts": str(time.time()),
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


def post_click(
    gateway: str, body: bytes, *, timestamp: int | None = None, secret: str = SIGNING_SECRET
) -> httpx.Response:
    headers = sign(body, int(time.time()) if timestamp is None else timestamp, secret)
    return httpx.post(f"{gateway}/slack/interactions", content=body, headers=headers, timeout=30)
