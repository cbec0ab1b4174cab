"""An alert as a Prefect event: `alert.firing` / `alert.resolved` on resource `alert.<fingerprint>`.

The event id decides what is new, both in the gateway's spool and in Prefect (which stores an id
once and fires its triggers once per id). A firing alert gets one id per *episode*: the number
of whole cooldowns between its `startsAt` and the moment the gateway receives it. Alertmanager
re-sends a firing alert with its original `startsAt` (group_interval, repeat_interval); within
one episode the re-send is the same event, in a later one it is a new event, so an alert still
firing after its runbook run crashed or ended without fixing it starts another run.

The episode is counted from `startsAt`, not from when this gateway first saw the alert, so
gateways that do not share a spool (behind a load balancer) give the same id to the same
re-send, and Prefect keeps it once. Only copies that reach them on either side of an episode
boundary (``startsAt + k * cooldown``), within the copies' spread plus the gateways' clock skew,
become two events. A resolved alert has one id per (fingerprint, startsAt), whenever it comes.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

from alert_gateway.models import Alert, parse_timestamp

# Fixed forever: changing it would give every re-sent alert a new event id.
EVENT_NAMESPACE = uuid.UUID("5b0f4a43-8d2e-4c1c-9a55-2f0e0c7a1e13")

# The payload field naming the alert's own event id, whatever id a delivery attempt sends it under
# (``delivery_body``): runbooks claim the alert by it (prefect.yaml's ``alert_context``).
ALERT_EVENT_ID = "alertEventId"

# Prefect's server silently drops events larger than this (PREFECT_EVENTS_MAXIMUM_SIZE_BYTES).
PREFECT_MAX_EVENT_BYTES = 1_500_000

# Labels in Prefect's own namespace would override the resource's identity.
_RESERVED_PREFIX = "prefect."
_RENAMED_PREFIX = "alert.label."


class EventTooLarge(ValueError):
    """The alert would exceed Prefect's event size limit."""


def event_id(fingerprint: str, status: str, starts_at: str, episode: int = 0) -> uuid.UUID:
    """The same alert (fingerprint, status, start) in the same episode is always the same event.

    Episode 0 has no suffix: it is the id the gateway gave before episodes existed, so an alert
    delivered before an upgrade is not a new event after it.
    """
    name = f"{fingerprint}|{status}|{starts_at}"
    if episode:
        name += f"|{episode}"
    return uuid.uuid5(EVENT_NAMESPACE, name)


def firing_episode(status: str, starts_at: str, received: float, cooldown_s: float) -> int:
    """Which cooldown window since ``starts_at`` the alert was received in (0 for the first).

    Resolved alerts and a disabled cooldown (0) stay in episode 0: a re-sent resolved alert is
    evidence for a runbook already running, not a new incident, and without a window there is
    nothing to count re-sends in. A start in the future (the sender's clock ahead) is episode 0.
    """
    if status != "firing" or cooldown_s <= 0:
        return 0
    elapsed = received - parse_timestamp(starts_at).timestamp()
    return max(0, math.floor(elapsed / cooldown_s))


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


def build_event(
    alert: Alert, occurred: datetime | None = None, cooldown_s: float = 0.0
) -> dict[str, Any]:
    """The Prefect event (JSON-ready) for one alert, its id in the episode of ``occurred``.

    `occurred` is when the gateway received the alert, not `startsAt`: Alertmanager re-sends a
    firing alert with its original start hours later, and Prefect reads events by when they
    occurred. The id is fixed here, once, and travels in the spooled body: delivery retries and
    a restarted gateway send the same id, whatever the time then.
    """
    occurred = occurred or datetime.now(UTC)
    episode = firing_episode(alert.status, alert.starts_at, occurred.timestamp(), cooldown_s)
    eid = str(event_id(alert.fingerprint, alert.status, alert.starts_at, episode))
    event = {
        "id": eid,
        "occurred": occurred.isoformat(),
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
            ALERT_EVENT_ID: eid,
        },
    }
    return _without_nul(event)


def delivery_id(alert_event_id: str, attempt: int) -> str:
    """The event id delivery attempt ``attempt`` (1, 2, ...) sends an alert's event under.

    The first attempt sends the alert's own id; every later one a new id derived from it. Why:
    Prefect's event publisher (prefect-redis, ``deduplicate_by="id"``) sets an event id's
    deduplication key before it appends the event to its stream, so an API server that dies
    between the two has "seen" an event it never published; the gateway's attempt failed, and a
    retry under the same id would be dropped as a duplicate for 5 minutes with a 200, the alert
    lost (issue #16). Under a new id it is published. When the failed attempt had in fact been
    published (the answer was lost), Prefect now has the alert twice: both events carry
    ``payload.alertEventId``, the id runbooks claim the alert by (runbooks/alert_claims.py), so
    the second run stops without acting. Derived, not random: every gateway and a restarted one
    name attempt n of an alert alike."""
    if attempt <= 1:
        return alert_event_id
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{alert_event_id}|delivery {attempt}"))


def delivery_body(alert_event_id: str, body: str, attempt: int) -> str:
    """The spooled event ``body`` as delivery attempt ``attempt`` sends it (see ``delivery_id``)."""
    if attempt <= 1:
        return body
    event = json.loads(body)
    event["id"] = delivery_id(alert_event_id, attempt)
    # a body spooled before the field existed gets it now: the claim must see the alert's id
    event.setdefault("payload", {}).setdefault(ALERT_EVENT_ID, alert_event_id)
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


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
