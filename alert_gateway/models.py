"""Webhook payloads of Alertmanager (v4) and Grafana unified alerting, normalised to one `Alert`.

Field names follow the senders' JSON (camelCase aliases). Only what the gateway needs is
required, so a hand-written test alert is accepted as readily as a real notification; unknown
fields are ignored because both senders add fields over time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

# Prefect allows 500 labels per resource; the gateway adds prefect.resource.id and .name.
MAX_LABELS = 498

Status = Literal["firing", "resolved"]


def parse_timestamp(value: str) -> datetime:
    """A webhook time (RFC 3339) as an aware datetime; nanoseconds are cut to microseconds.

    Upper-cased first: RFC 3339 allows a lower-case "t" and "z", Python's parser does not.
    """
    return datetime.fromisoformat(value.upper())


def _real_time(value: str) -> str:
    # the pattern lets through "2026-13-45T25:00:00Z"; the event id needs the instant itself
    try:
        parse_timestamp(value)
    except ValueError as exc:
        raise ValueError(f"not a real date and time: {exc}") from None
    return value


Timestamp = Annotated[
    str,
    StringConstraints(
        pattern=r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
    ),
    AfterValidator(_real_time),
]
# Becomes part of the resource id `alert.<fingerprint>`, which triggers match with "alert.*".
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
Labels = Annotated[dict[str, str], Field(min_length=1, max_length=MAX_LABELS)]
StringMap = dict[str, str]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class AlertmanagerAlert(_Payload):
    """One alert of an Alertmanager webhook notification."""

    status: Status
    labels: Labels
    annotations: StringMap = Field(default_factory=dict)
    starts_at: Timestamp = Field(alias="startsAt")
    ends_at: Timestamp | None = Field(None, alias="endsAt")
    generator_url: str = Field("", alias="generatorURL")
    fingerprint: Fingerprint | None = Field(
        None, description="Alertmanager's label fingerprint; computed the same way when absent."
    )


class GrafanaAlert(AlertmanagerAlert):
    """One alert of a Grafana notification.

    Grafana adds links (silenceURL, dashboardURL, panelURL) and query values, which the
    gateway does not forward: the generatorURL already leads to the rule.
    """


class _Notification(_Payload):
    group_key: str = Field("", alias="groupKey")
    status: Status | None = None
    receiver: str = ""
    group_labels: StringMap = Field(default_factory=dict, alias="groupLabels")
    common_labels: StringMap = Field(default_factory=dict, alias="commonLabels")
    common_annotations: StringMap = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field("", alias="externalURL")
    truncated_alerts: int = Field(0, ge=0, alias="truncatedAlerts")


class AlertmanagerWebhook(_Notification):
    """Alertmanager's webhook notification, version 4."""

    version: Literal["4"]
    alerts: list[AlertmanagerAlert] = Field(min_length=1)


class GrafanaWebhook(_Notification):
    """Grafana unified alerting's webhook notification (version "1")."""

    version: str = "1"
    org_id: int | None = Field(None, alias="orgId")
    alerts: list[GrafanaAlert] = Field(min_length=1)


Source = Literal["alertmanager", "grafana"]


class Alert(BaseModel):
    """One alert, whichever system sent it: what becomes one Prefect event."""

    model_config = ConfigDict(frozen=True)

    source: Source
    status: Status
    fingerprint: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    ends_at: str | None
    generator_url: str
    group_key: str
    receiver: str

    @property
    def alertname(self) -> str | None:
        return self.labels.get("alertname")


def label_fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's fingerprint of a label set (Prometheus `LabelSet.Fingerprint`).

    FNV-1a 64 over the names in byte order, each name and value followed by the 0xFF
    separator, printed as 16 hex digits: alerts sent without a fingerprint get the one
    Alertmanager would have given them.
    """
    digest = 0xCBF29CE484222325
    for name in sorted(labels):
        for part in (name.encode(), b"\xff", labels[name].encode(), b"\xff"):
            for byte in part:
                digest = ((digest ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


def normalise(notification: AlertmanagerWebhook | GrafanaWebhook) -> list[Alert]:
    """The alerts of a notification, in order, as `Alert`s."""
    source: Source = "grafana" if isinstance(notification, GrafanaWebhook) else "alertmanager"
    return [
        Alert(
            source=source,
            status=alert.status,
            fingerprint=alert.fingerprint or label_fingerprint(alert.labels),
            labels=alert.labels,
            annotations=alert.annotations,
            starts_at=alert.starts_at,
            ends_at=alert.ends_at,
            generator_url=alert.generator_url,
            group_key=notification.group_key,
            receiver=notification.receiver,
        )
        for alert in notification.alerts
    ]
