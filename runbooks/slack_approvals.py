"""Approval requests in Slack: a Block Kit message with the plan and Approve / Reject buttons.

The message goes to a Prefect ``SlackWebhook`` block's incoming-webhook URL (Prefect's own block
keeps the URL secret; its ``notify`` sends text only, so the Block Kit JSON is posted here). Slack
sends the button click to the alert gateway's ``/slack/interactions`` endpoint, which checks
Slack's signature and resumes the paused run with the same input the UI's form gives
(alert_gateway.slack). Each button carries the run id and the pause key of the round it answers,
so a click on an old message never answers a later question.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from runbooks.escalation import describe_http_error, with_retries

APPROVE = "runbooks_approve"
REJECT = "runbooks_reject"
POST_TIMEOUT_S = 10.0
POST_ATTEMPTS = 2
POST_BACKOFF_S = 0.5
# Slack's limits: 3000 characters in a section's text, 2000 in a button's value
SECTION_MAX = 2900


def approval_message(
    *,
    runbook: str,
    label: str,
    target: str,
    danger: str,
    changes: list[str],
    run_id: str,
    run_url: str | None,
    pause_key: str,
    required: int = 1,
    approved_by: list[str] | None = None,
    typing_required: bool = False,
) -> dict[str, Any]:
    """The Block Kit message asking for approval (plain data; unit-tested)."""
    shown = changes[:20]
    plan = "\n".join(f"• `{_inline(c)}`" for c in shown)
    if len(changes) > len(shown):
        plan += f"\n… and {len(changes) - len(shown)} more (see the run)"
    text = f"Approval needed: {label} on {target} ({runbook})"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": text[:150]}},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": _cut(f"*Why a human must decide:* {_inline(danger)}\n*Plan:*\n{plan}"),
            },
        },
    ]
    if required > 1:
        so_far = ", ".join(approved_by or []) or "nobody yet"
        blocks.append(
            _context(
                f"Four eyes: {required} different people must approve "
                f"(approved so far: {_inline(so_far)}). One rejection ends it."
            )
        )
    value = json.dumps({"run": run_id, "pause": pause_key}, separators=(",", ":"))
    buttons: list[dict[str, Any]] = []
    if typing_required:
        blocks.append(
            _context(
                "Data may be lost: approving means typing what will be lost, "
                "which only the Prefect UI's form can take."
            )
        )
    else:
        buttons.append(_button("Approve", APPROVE, value, "primary"))
    buttons.append(_button("Reject", REJECT, value, "danger"))
    if run_url:
        buttons.append(
            {
                "type": "button",
                "text": {"type": "plain_text", "text": "Open the run"},
                "url": run_url,
                "action_id": "runbooks_open",
            }
        )
    blocks.append({"type": "actions", "block_id": "runbooks_approval", "elements": buttons})
    return {"text": text, "blocks": blocks}


def post_approval_request(block_name: str, **fields: Any) -> None:
    """Post the request to the Slack Webhook block ``block_name``, retried like an escalation
    (transient errors only, backoff with jitter); a failure raises with a URL-free message (the
    webhook URL is a secret)."""
    from prefect.blocks.notifications import SlackWebhook

    url = SlackWebhook.load(block_name).url.get_secret_value()
    message = approval_message(**fields)

    def post() -> None:
        httpx.post(url, json=message, timeout=POST_TIMEOUT_S).raise_for_status()

    try:
        with_retries(post, f"slack-approvals:{block_name}", POST_ATTEMPTS, POST_BACKOFF_S)
    except httpx.HTTPError as exc:
        raise ConnectionError(
            f"Slack did not take the message: {describe_http_error(exc)}"
        ) from None


def _button(text: str, action_id: str, value: str, style: str) -> dict[str, Any]:
    return {
        "type": "button",
        "text": {"type": "plain_text", "text": text},
        "style": style,
        "action_id": action_id,
        "value": value,
    }


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(text)}]}


def _inline(text: str) -> str:
    """Text from the live system shown in mrkdwn: no backticks breaking out of code, no
    control characters, and Slack's three escaped characters escaped."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).replace("`", "'")
    return cleaned.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str) -> str:
    return text if len(text) <= SECTION_MAX else text[: SECTION_MAX - 1] + "…"
