"""The audit trail of guarded actions: `runbook.action.*` events and the actions table rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefect.events import emit_event
from pydantic import BaseModel, SecretStr

if TYPE_CHECKING:
    from runbooks.report import IncidentReport
    from runbooks.results import Change
    from runbooks.safety import Target

_SECRET_KEY = re.compile(r"pass(word)?|secret|token|api[_-]?key|credential|private", re.I)


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


@dataclass
class ActionRow:
    """One row of the actions table artifact."""

    step: str
    action: str
    target: str
    status: str
    before: Any = None
    after: Any = None
    note: str = ""


def emit_action(
    status: str,
    target: Target,
    report: IncidentReport,
    step: str,
    change: Change | None,
    reason: str = "",
) -> None:
    """One ``runbook.action.<status>`` event, the target as resource (the UI's event feed is the log)."""
    emit_event(
        event=f"runbook.action.{status}",
        resource={
            "prefect.resource.id": target.resource_id,
            "prefect.resource.name": target.label,
            "runbook.target.kind": target.kind,
            "runbook.target.name": target.name,
            "runbook.name": report.runbook,
        },
        payload=scrub(
            {
                "runbook": report.runbook,
                "step": step,
                "action": change.action if change else step,
                "change_target": change.target if change else target.label,
                "detail": change.detail if change else {},
                "dry_run": report.params.dry_run,
                "reason": reason,
                "trigger": report.trigger,
            }
        ),
    )
