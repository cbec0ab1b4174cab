"""Escalation: tell humans when a runbook could not finish on its own.

A runbook escalates when it failed, its verification failed, its action budget is spent, an
approval was rejected or timed out. ``send_escalation`` sends one ``EscalationMessage`` to every
channel of an ``EscalationPolicy`` block, concurrently and independently (a dry-run's message
only to the policy's ``observe_notification_blocks``: a dry-run never pages):

- saved Prefect notification blocks (``SlackWebhook``, ``CustomWebhookNotificationBlock``, ...),
  sent with their own ``notify(body, subject)``;
- an AWS SNS topic (boto3; Subject cut to SNS's 100 ASCII characters, Message = the text body,
  MessageAttributes runbook/kind/severity for subscription filter policies);
- a generic webhook receiving the message as JSON, with an optional Bearer token.

HTTP channels are retried on transient errors only (connect errors, timeouts, 5xx, 429) with
exponential backoff and jitter. A failing channel is logged (never with secrets: URLs are cut to
scheme://host) and returned as ``Delivery(ok=False)``; nothing raises.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import re
import time
import unicodedata
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import prefect.blocks.notifications  # noqa: F401  registers Prefect's notification block types
from prefect.blocks.abstract import NotificationError
from pydantic import BaseModel, Field

from runbooks.backoff import backoff_delay

if TYPE_CHECKING:
    from blocks.escalation import EscalationPolicy

SNS_SUBJECT_MAX = 100
# SNS allows 256 KiB per message, attributes included
SNS_MESSAGE_MAX_BYTES = 250_000
RETRY_AFTER_MAX_S = 30.0

T = TypeVar("T")


class EscalationKind(StrEnum):
    FAILED = "failed"
    VERIFICATION_FAILED = "verification_failed"
    ESCALATED = "escalated"
    BUDGET_SPENT = "budget_spent"
    REJECTED = "rejected"
    APPROVAL_TIMEOUT = "approval_timeout"
    TARGET_BUSY = "target_busy"
    INTERRUPTED = "interrupted"


# what the subject line says happened
_KIND_PHRASE: dict[EscalationKind, str] = {
    EscalationKind.FAILED: "failed",
    EscalationKind.VERIFICATION_FAILED: "failed verification",
    EscalationKind.ESCALATED: "escalated",
    EscalationKind.BUDGET_SPENT: "escalated: budget spent",
    EscalationKind.REJECTED: "escalated: action rejected",
    EscalationKind.APPROVAL_TIMEOUT: "escalated: approval timed out",
    EscalationKind.TARGET_BUSY: "did not act: target held by another run",
    EscalationKind.INTERRUPTED: "interrupted",
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cut(text: str, max_length: int) -> str:
    if len(text) <= max_length:
        return text
    if max_length <= 3:
        return text[:max_length]
    return text[: max_length - 3].rstrip() + "..."


class EscalationMessage(BaseModel):
    """What on-call needs to take over: which runbook, on what, why, what was tried, where the run is."""

    runbook: str = Field(min_length=1, description="Runbook slug, e.g. 'kafka-cluster-down'.")
    title: str = Field(description="Human title of the runbook.")
    severity: str = Field(description="Severity of the incident, e.g. 'P1'.")
    response: str = Field(
        "", description="The severity's response target, e.g. 'page on-call now, respond within 5 min'."
    )
    ticket: bool = Field(
        False,
        description="A ticket-level severity (P3, P4): goes to the policy's ticket channels "
        "instead of its paging ones, where it has any.",
    )
    kind: EscalationKind
    reason: str = Field(description="Why the runbook stopped, one or a few sentences.")
    target: str | None = Field(None, description="What the runbook acted on.")
    tried: list[str] = Field(
        default_factory=list, description="Actions tried or planned, human-readable."
    )
    trigger: str = Field("", description="What started the run, e.g. the alert.")
    run_url: str | None = Field(None, description="Link to the flow run in the Prefect UI.")
    flow_run_id: str | None = None
    dry_run: bool = Field(
        False,
        description="What a dry-run or observe run found: sent only to the policy's observe "
        "channels, never to the paging ones.",
    )

    def subject(self, max_length: int | None = None) -> str:
        """One line, e.g. ``[P1] kafka-cluster-down escalated: budget spent on broker-2``."""
        severity = _one_line(self.severity)
        parts = [f"[{severity}]"] if severity else []
        phrase = _KIND_PHRASE[self.kind]
        if self.dry_run:
            parts.append("[dry-run]")
            if self.kind is not EscalationKind.FAILED:
                phrase = f"would have {phrase}"
        parts += [_one_line(self.runbook), phrase]
        if self.target and self.target.strip():
            parts += ["on", _one_line(self.target)]
        line = " ".join(parts)
        return _cut(line, max_length) if max_length is not None else line

    def text(self) -> str:
        """Plain-text body (readable as markdown) with every field and the run link."""
        lines = [
            self.subject(),
            "",
            f"Runbook: {_one_line(self.title)} ({self.runbook})"
            if self.title.strip()
            else f"Runbook: {self.runbook}",
            f"Severity: {self.severity or '-'}"
            + (f" ({_one_line(self.response)})" if self.response else ""),
            f"Outcome: {self.kind.value}",
            *(["Mode: dry-run (nothing was changed, nobody was paged)"] if self.dry_run else []),
            f"Target: {self.target or '-'}",
            f"Trigger: {self.trigger or '-'}",
            f"Reason: {self.reason or '-'}",
        ]
        if self.tried:
            lines.append("Tried:")
            lines += [f"- {_one_line(item)}" for item in self.tried]
        else:
            lines.append("Tried: nothing")
        if self.run_url:
            lines.append(f"Run: {self.run_url}")
        elif self.flow_run_id:
            lines.append(f"Run: flow run {self.flow_run_id} (no Prefect UI URL configured)")
        else:
            lines.append("Run: -")
        return "\n".join(lines)


class Delivery(BaseModel):
    """Outcome of one channel. ``detail`` never contains secrets."""

    channel: str
    ok: bool
    detail: str


# --- helpers --------------------------------------------------------------------------------


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def flow_run_url(flow_run_id: object | None) -> str | None:
    """The flow run's page in the Prefect UI, or None without a configured UI URL or run id."""
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    if not base or flow_run_id is None:
        return None
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _with_run_link(message: EscalationMessage) -> EscalationMessage:
    """Fill flow_run_id (from the current flow run) and run_url when the caller left them out."""
    if message.run_url:
        return message
    flow_run_id = message.flow_run_id
    if flow_run_id is None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            flow_run_id = str(ctx.flow_run.id)
    if flow_run_id is None:
        return message
    return message.model_copy(
        update={"flow_run_id": flow_run_id, "run_url": flow_run_url(flow_run_id)}
    )


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)


def redact_url(url: str) -> str:
    """scheme://host[:port] only: paths and query strings of webhooks often carry tokens."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        return "<url>"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def _redact_urls(text: str) -> str:
    return _URL.sub(lambda m: redact_url(m.group(0)) + "/…", text)


def describe_http_error(exc: BaseException) -> str:
    """A log-safe description of a channel error (no URLs, no secrets)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {redact_url(str(exc.request.url))}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {_redact_urls(str(exc)) or 'no detail'}"
    if isinstance(exc, NotificationError):
        return (
            f"NotificationError: {_redact_urls(exc.log.strip())[:500] or 'notify returned failure'}"
        )
    return f"{type(exc).__name__}: {_redact_urls(str(exc))[:500]}"


def is_transient_http_error(exc: BaseException) -> bool:
    """Worth another attempt: connect errors, timeouts, dropped connections, HTTP 5xx and 429."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


def _retry_after_s(exc: BaseException) -> float | None:
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 429:
        value = exc.response.headers.get("retry-after", "")
        try:
            return min(max(float(value), 0.0), RETRY_AFTER_MAX_S)
        except ValueError:
            return None
    return None


def with_retries(
    call: Callable[[], T], channel: str, attempts: int, backoff_s: float
) -> tuple[T, int]:
    """Run ``call`` up to ``attempts`` times while it fails transiently (``is_transient_http_error``;
    a 429's Retry-After is honoured); returns (result, attempts used)."""
    for attempt in range(1, attempts + 1):
        try:
            return call(), attempt
        except Exception as exc:
            if attempt == attempts or not is_transient_http_error(exc):
                raise
            delay = _retry_after_s(exc)
            if delay is None:
                delay = backoff_delay(attempt, backoff_s, math.inf, random.random())
            _logger().warning(
                "escalation via %s: attempt %d/%d failed (%s); retrying in %.1fs",
                channel,
                attempt,
                attempts,
                describe_http_error(exc),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# --- channels -------------------------------------------------------------------------------


def _send_notification_block(ref: str, message: EscalationMessage, policy: EscalationPolicy) -> str:
    block = policy.load_notification_block(ref)
    body, subject = message.text(), message.subject()

    def notify() -> None:
        # apprise-based blocks only report failure when asked to raise
        with block.raise_on_failure():
            block.notify(body, subject, _sync=True)

    _, used = with_retries(notify, f"notification:{ref}", policy.attempts, policy.retry_backoff_s)
    return f"notified via {type(block).__name__}" + (f" after {used} attempts" if used > 1 else "")


def sns_subject(message: EscalationMessage) -> str:
    """The subject as SNS accepts it: printable ASCII, one line, at most 100 characters."""
    ascii_text = unicodedata.normalize("NFKD", message.subject()).encode("ascii", "ignore").decode()
    printable = "".join(ch for ch in ascii_text if ch.isprintable())
    return _cut(_one_line(printable), SNS_SUBJECT_MAX) or _cut(message.runbook, SNS_SUBJECT_MAX)


def sns_body(message: EscalationMessage) -> str:
    text = message.text()
    raw = text.encode()
    if len(raw) <= SNS_MESSAGE_MAX_BYTES:
        return text
    marker = "\n... (truncated)"
    return raw[: SNS_MESSAGE_MAX_BYTES - len(marker)].decode(errors="ignore") + marker


def _publish_sns(message: EscalationMessage, policy: EscalationPolicy) -> str:
    client = policy.get_sns_client()
    attributes = {
        "runbook": {"DataType": "String", "StringValue": message.runbook},
        "kind": {"DataType": "String", "StringValue": message.kind.value},
    }
    if message.severity.strip():
        attributes["severity"] = {"DataType": "String", "StringValue": message.severity}
    # a subscription filter policy can send tickets somewhere else than pages
    attributes["response"] = {
        "DataType": "String",
        "StringValue": "ticket" if message.ticket else "page",
    }
    resp = client.publish(
        TopicArn=policy.sns_topic_arn,
        Subject=sns_subject(message),
        Message=sns_body(message),
        MessageAttributes=attributes,
    )
    return f"published MessageId={resp['MessageId']}"


def _post_webhook(message: EscalationMessage, policy: EscalationPolicy) -> str:
    assert policy.webhook_url
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "runbooks-escalation",
        # the same key on every attempt: a receiver can drop the duplicate of a retried POST
        "Idempotency-Key": str(uuid.uuid4()),
    }
    if policy.webhook_token is not None:
        headers["Authorization"] = f"Bearer {policy.webhook_token.get_secret_value()}"
    payload = message.model_dump(mode="json")

    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False) as client:

        def post() -> httpx.Response:
            resp = client.post(policy.webhook_url, json=payload, headers=headers)
            resp.raise_for_status()
            return resp

        resp, used = with_retries(
            post, _webhook_channel(policy), policy.attempts, policy.retry_backoff_s
        )
    return f"HTTP {resp.status_code}" + (f" after {used} attempts" if used > 1 else "")


def _webhook_channel(policy: EscalationPolicy) -> str:
    return f"webhook:{redact_url(policy.webhook_url or '')}"


def _channels(
    message: EscalationMessage, policy: EscalationPolicy
) -> list[tuple[str, Callable[[], str]]]:
    if message.dry_run:
        return [
            (f"observe:{ref}", lambda ref=ref: _send_notification_block(ref, message, policy))
            for ref in policy.observe_notification_blocks
        ]
    refs, kind = policy.notification_blocks, "notification"
    if message.ticket and policy.ticket_notification_blocks:
        refs, kind = policy.ticket_notification_blocks, "ticket"
    channels: list[tuple[str, Callable[[], str]]] = [
        (f"{kind}:{ref}", lambda ref=ref: _send_notification_block(ref, message, policy))
        for ref in refs
    ]
    if policy.sns_topic_arn:
        channels.append((f"sns:{policy.sns_topic_arn}", lambda: _publish_sns(message, policy)))
    if policy.webhook_url:
        channels.append((_webhook_channel(policy), lambda: _post_webhook(message, policy)))
    return channels


def _deliver(channel: str, send: Callable[[], str], logger: Any) -> Delivery:
    try:
        detail = send()
    except Exception as exc:
        detail = describe_http_error(exc)
        logger.error("escalation via %s failed: %s", channel, detail)
        return Delivery(channel=channel, ok=False, detail=detail)
    logger.info("escalation via %s: %s", channel, detail)
    return Delivery(channel=channel, ok=True, detail=detail)


def send_escalation(message: EscalationMessage, policy: EscalationPolicy | None) -> list[Delivery]:
    """Send ``message`` to every channel of ``policy`` at once; one Delivery per channel, in order.

    Never raises for a channel's failure. Without a policy or channels, logs a warning and
    returns []. Fills ``flow_run_id``/``run_url`` from the current flow run when left out.
    A dry-run's message goes to the observe channels only.
    """
    logger = _logger()
    message = _with_run_link(message)
    channels = _channels(message, policy) if policy is not None else []
    if not channels:
        logger.warning(
            "escalation of %s (%s) not sent: no escalation policy channels configured%s",
            message.runbook,
            message.kind.value,
            " for dry-run findings" if message.dry_run else "",
        )
        return []
    with ThreadPoolExecutor(max_workers=len(channels), thread_name_prefix="escalation") as pool:
        # each thread runs in a copy of this context: run logger and Prefect client settings
        futures = [
            pool.submit(contextvars.copy_context().run, _deliver, name, send, logger)
            for name, send in channels
        ]
        deliveries = [future.result() for future in futures]
    sent = sum(d.ok for d in deliveries)
    log = logger.info if sent == len(deliveries) else logger.warning
    log(
        "escalation %r delivered to %d of %d channels",
        message.subject(),
        sent,
        len(deliveries),
    )
    return deliveries
