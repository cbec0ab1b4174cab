"""The audit trail of guarded actions: `runbook.action.*` events and the actions table rows."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefect.events import emit_event
from pydantic import BaseModel, SecretStr

from runbooks.text import compact_list, cut, summarize_values

if TYPE_CHECKING:
    from runbooks.report import IncidentReport
    from runbooks.results import Change
    from runbooks.safety import Target

_SECRET_KEY = re.compile(r"pass(word)?|secret|token|api[_-]?key|credential|private", re.I)

# The UI's table artifact never wraps a cell and scrolls sideways past its page's ~880 px (at a
# 1440 px window, beside the navigation and details panes): these widths, in characters, keep
# every column in view (checked in Chromium). The report and the events carry the full text.
TABLE_WIDTHS = {"action": 20, "n": 3, "targets": 30, "status": 16, "before": 18, "after": 14}
# An event names its targets in full up to this many; Prefect refuses events over 1.5 MB.
EVENT_MAX_CHANGES = 200
# The feed shows an event's resource name on one line
EVENT_NAME_MAX = 200


def scrub(value: Any) -> Any:
    """A copy safe for events and artifacts: secret-looking keys and SecretStr values masked."""
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {
            k: "**********" if _SECRET_KEY.search(str(k)) else scrub(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


# `password=...`, `"token": "..."`, `api_key: ...` inside free text (exception messages, payloads)
# Each starts at a literal (the secret's name, `://`): a leading wildcard would be tried at every
# position of long texts (DLQ triage scrubs thousands of error messages).
_SECRET_ASSIGNMENT = re.compile(
    r"""(?P<key>(?:pass(?:word|wd)?|pwd|secret|token|api[_-]?key|credential|private[_-]?key)"""
    r"""[\w.-]*["']?\s*[=:]\s*)(?P<quote>["'])?(?P<value>(?(quote)[^"']*|[^"'\s,;&}]+))""",
    re.I,
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>://[^/\s:@]+:)[^@\s/]+@")


def scrub_text(text: str) -> str:
    """Free text with secret-looking values masked: ``key=value`` pairs whose key names a secret,
    bearer/basic credentials and passwords in URLs."""
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['key']}{m['quote'] or ''}**********", text)
    text = _BEARER.sub(lambda m: f"{m[1]} **********", text)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}**********@", text)


@dataclass
class ActionRow:
    """One change of the actions table: one target's before/after state."""

    step: str
    action: str
    target: str
    status: str
    before: Any = None
    after: Any = None
    note: str = ""


@dataclass
class ActionGroup:
    """Identical changes (same step, action, status and note) on several targets."""

    step: str
    action: str
    status: str
    note: str
    targets: list[str] = field(default_factory=list)
    before: list[Any] = field(default_factory=list)
    after: list[Any] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.targets)


def group_rows(rows: Sequence[ActionRow]) -> list[ActionGroup]:
    """Rows doing the same thing with the same result, as one group each, in first-seen order."""
    groups: dict[tuple[str, str, str, str], ActionGroup] = {}
    for r in rows:
        key = (r.step, r.action, r.status, r.note)
        group = groups.setdefault(key, ActionGroup(*key))
        group.targets.append(r.target)
        group.before.append(r.before)
        group.after.append(r.after)
    return list(groups.values())


def table_row(group: ActionGroup) -> dict[str, str]:
    """One row of the actions table artifact: short cells, states summarized, never raw JSON."""
    cells = {
        "action": group.action,
        "n": str(group.count),
        "targets": compact_list(group.targets, TABLE_WIDTHS["targets"]),
        # why a change failed or was skipped is worth the room of a column of its own
        "status": f"{group.status}: {group.note}" if group.note else group.status,
        "before": summarize_values(group.before),
        "after": summarize_values(group.after),
    }
    return {name: cut(text, TABLE_WIDTHS[name]) for name, text in cells.items()}


def describe_action(action: str, targets: Sequence[str], on: str, reason: str = "") -> str:
    """What an event's feed line says: ``terminate_backend ×25 on postgres db:5432: pid={1, 2, …}``."""
    times = f" ×{len(targets)}" if len(targets) > 1 else ""
    text = f"{action}{times} on {on}: {compact_list(list(targets), 120)}"
    return cut(text + (f" ({reason})" if reason else ""), EVENT_NAME_MAX)


def emit_action(
    status: str,
    target: Target,
    report: IncidentReport,
    step: str,
    changes: Sequence[Change],
    reason: str = "",
) -> None:
    """``runbook.action.<status>`` events: one per action of a step, naming all its targets.

    One event per change made 25 terminations 50 events that all read "Runbook action executed";
    one per action reads "terminate_backend ×25 on postgres ...: pid={...}". Prefect's feed shows
    the event name and the resource's ``prefect.resource.name`` only, so that name says what, on
    what and which targets; the resource id stays the target's, so filtering by target still
    finds every action on it. The run, its flow and deployment are related by Prefect itself
    (links in the feed); the alert that started the run is related as ``alert``. The payload
    lists every change with its scrubbed state.
    """
    by_action: dict[str, list[Change]] = {}
    for change in changes:
        by_action.setdefault(change.action, []).append(change)
    alert = report.params.alert
    related = (
        [
            {
                "prefect.resource.id": f"alert.{alert.fingerprint}",
                "prefect.resource.role": "alert",
                "prefect.resource.name": alert.alertname or alert.fingerprint,
            }
        ]
        if alert and alert.fingerprint
        else []
    )
    for action, group in by_action.items():
        summary = describe_action(action, [c.target for c in group], target.label, reason)
        emit_event(
            event=f"runbook.action.{status}",
            resource={
                "prefect.resource.id": target.resource_id,
                "prefect.resource.name": summary,
                "runbook.target.kind": target.kind,
                "runbook.target.name": target.name,
                "runbook.name": report.runbook,
                "runbook.step": step,
                "runbook.action": action,
                "runbook.count": str(len(group)),
                "runbook.mode": "dry-run" if report.params.dry_run else "live",
            },
            related=related,
            payload=scrub(
                {
                    "summary": summary,
                    "runbook": report.runbook,
                    "step": step,
                    "action": action,
                    "status": status,
                    "target": target.label,
                    "count": len(group),
                    "changes": [
                        {"target": c.target, "detail": c.detail} for c in group[:EVENT_MAX_CHANGES]
                    ],
                    "changes_not_listed": max(len(group) - EVENT_MAX_CHANGES, 0),
                    "dry_run": report.params.dry_run,
                    "reason": reason,
                    "trigger": report.trigger,
                }
            ),
        )
