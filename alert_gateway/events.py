"""An alert as a Prefect event: `alert.firing` / `alert.resolved` on resource `alert.<fingerprint>`."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from alert_gateway.models import Alert

# Fixed forever: changing it would give every re-sent alert a new event id.
EVENT_NAMESPACE = uuid.UUID("5b0f4a43-8d2e-4c1c-9a55-2f0e0c7a1e13")

# Prefect's server silently drops events larger than this (PREFECT_EVENTS_MAXIMUM_SIZE_BYTES).
PREFECT_MAX_EVENT_BYTES = 1_500_000

# Labels in Prefect's own namespace would override the resource's identity.
_RESERVED_PREFIX = "prefect."
_RENAMED_PREFIX = "alert.label."


class EventTooLarge(ValueError):
    """The alert would exceed Prefect's event size limit."""


def event_id(fingerprint: str, status: str, starts_at: str) -> uuid.UUID:
    """The same alert (fingerprint, status, start) is always the same event."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{fingerprint}|{status}|{starts_at}")


def resource_labels(alert: Alert) -> dict[str, str]:
    """The event's resource: its id, its name (the alertname) and the alert's labels."""
    resource = {
        "prefect.resource.id": f"alert.{alert.fingerprint}",
        "prefect.resource.name": alert.alertname or alert.fingerprint,
    }
    for name, value in alert.labels.items():
        if name.startswith(_RESERVED_PREFIX):
            name = _RENAMED_PREFIX + name
        resource.setdefault(name, value)
    return resource


def build_event(alert: Alert, occurred: datetime | None = None) -> dict[str, Any]:
    """The Prefect event (JSON-ready) for one alert.

    `occurred` is when the gateway received the alert, not `startsAt`: Alertmanager re-sends a
    firing alert with its original start hours later, and Prefect reads events by when they
    occurred.
    """
    event = {
        "id": str(event_id(alert.fingerprint, alert.status, alert.starts_at)),
        "occurred": (occurred or datetime.now(UTC)).isoformat(),
        "event": f"alert.{alert.status}",
        "resource": resource_labels(alert),
        "payload": {
            "annotations": alert.annotations,
            "startsAt": alert.starts_at,
            "endsAt": alert.ends_at,
            "generatorURL": alert.generator_url,
            "groupKey": alert.group_key,
            "receiver": alert.receiver,
            "source": alert.source,
        },
    }
    return _without_nul(event)


def encode_event(event: dict[str, Any]) -> str:
    """The event as the JSON stored in the spool; raises `EventTooLarge` past Prefect's limit."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode()) > PREFECT_MAX_EVENT_BYTES:
        raise EventTooLarge(
            f"alert {event['resource']['prefect.resource.id']} is larger than a Prefect event "
            f"may be ({PREFECT_MAX_EVENT_BYTES} bytes)"
        )
    return text


def _without_nul(value: Any) -> Any:
    """Replace NUL characters: PostgreSQL (Prefect's production database) cannot store them."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value
