"""Try an alert before it fires: which runbooks its event would start, with which parameters.

The event is built by the alert gateway's own code (the same labels, resource and id the gateway
would forward); each trigger of prefect.yaml is evaluated by Prefect's own server-side trigger
(``EventTrigger.covers``: event name, resource and related-resource matching) and its parameters
rendered by Prefect's own hydration and Jinja environment, the way a ``run-deployment`` action
renders them. Nothing is emitted: no real trigger sees a simulated event.

What is not evaluated: proactive triggers and reactive thresholds above one (they depend on other
events over time); a match on such a trigger says so instead of claiming a run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from deployments.catalog import RunbookSpec, load_catalog


@dataclass(frozen=True)
class Match:
    """A deployment whose trigger covers the event, and the parameters its run would get."""

    deployment: str
    trigger: str
    parameters: dict[str, Any]
    note: str = ""  # why a match would not start a run at once (thresholds, proactive)


def alert_events(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The Prefect events the gateway would forward for an Alertmanager or Grafana webhook body
    (refused the same way the gateway refuses it: a ValueError naming the problem)."""
    from pydantic import ValidationError

    from alert_gateway.events import build_event
    from alert_gateway.models import AlertmanagerWebhook, GrafanaWebhook, normalise

    model = GrafanaWebhook if _looks_like_grafana(payload) else AlertmanagerWebhook
    try:
        notification = model.model_validate(payload)
    except ValidationError as exc:
        raise ValueError(f"not a valid {model.__name__} payload: {exc}") from None
    return [build_event(alert) for alert in normalise(notification)]


def labels_payload(labels: dict[str, str], status: str = "firing") -> dict[str, Any]:
    """An Alertmanager webhook body (version 4) with one alert of these labels."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "version": "4",
        "groupKey": "{}:" + json.dumps({"alertname": labels.get("alertname", "")}),
        "status": status,
        "receiver": "runbooks",
        "groupLabels": {},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": [
            {
                "status": status,
                "labels": labels,
                "annotations": {},
                "startsAt": now,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                # Alertmanager's is a hash of the labels too (FNV-64a); any stable one will do
                "fingerprint": hashlib.sha256(
                    json.dumps(labels, sort_keys=True).encode()
                ).hexdigest()[:16],
            }
        ],
    }


def simulate(event: dict[str, Any], specs: list[RunbookSpec] | None = None) -> list[Match]:
    """Every deployment trigger that covers ``event``, in prefect.yaml order."""
    from prefect.server.events.schemas.automations import EventTrigger, Posture
    from prefect.server.events.schemas.events import ReceivedEvent

    received = ReceivedEvent.model_validate({**event, "received": datetime.now(UTC)})
    found = []
    for spec in specs if specs is not None else load_catalog():
        for config, client_trigger in zip(spec.triggers, spec.trigger_objects(), strict=True):
            fields = client_trigger.model_dump(
                include={
                    "match",
                    "match_related",
                    "after",
                    "expect",
                    "for_each",
                    "posture",
                    "threshold",
                    "within",
                }  # fmt: skip
            )
            trigger = EventTrigger.model_validate(fields)
            if not trigger.covers(received):
                continue
            note = ""
            if trigger.posture is Posture.Proactive:
                note = "proactive: fires when the expected events do NOT arrive"
            elif trigger.threshold > 1:
                note = f"fires after {trigger.threshold} such events within {trigger.within}"
            parameters = render_parameters(config.get("parameters") or spec.parameters, received)
            found.append(Match(spec.name, config.get("name", ""), parameters, note))
    return found


def render_parameters(parameters: dict[str, Any], event: Any) -> dict[str, Any]:
    """A run-deployment action's parameters rendered for ``event`` by Prefect's own code
    (``RunDeployment.render_parameters``: v1 templates upgraded, hydration, Jinja), with the
    event as the templates' context; a template that needs more (the automation, a flow run)
    fails to render, with Prefect's message."""
    from prefect.server.events.actions import RunDeployment

    class _Simulated(RunDeployment):
        async def _template_context(self, templates: list[str], triggered_action: Any) -> dict:
            return {"event": event}

    action = _Simulated(source="selected", deployment_id=_NIL, parameters=parameters)
    if hasattr(action, "_register_filters_if_needed"):
        action._register_filters_if_needed()
    return asyncio.run(action.render_parameters(None))  # type: ignore[arg-type]


_NIL = "00000000-0000-0000-0000-000000000000"


def _looks_like_grafana(payload: dict[str, Any]) -> bool:
    return "orgId" in payload or "state" in payload and "alerts" in payload and "title" in payload


def describe(matches: list[Match]) -> str:
    """What `runbooks simulate` prints."""
    if not matches:
        return "No runbook would start: no trigger of prefect.yaml matches this alert."
    lines = []
    for m in matches:
        lines.append(
            f"{m.deployment}  (trigger {m.trigger!r})" + (f"  [{m.note}]" if m.note else "")
        )
        lines.append(json.dumps(m.parameters, indent=2, sort_keys=True, default=str))
    return "\n".join(lines)
