"""Webhook payloads -> normalised alerts -> Prefect events: parsing, fingerprints, event ids, shape."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from alert_gateway.events import (
    PREFECT_MAX_EVENT_BYTES,
    EventTooLarge,
    build_event,
    delivery_body,
    delivery_id,
    encode_event,
    event_id,
)
from alert_gateway.models import (
    MAX_LABELS,
    Alert,
    AlertmanagerWebhook,
    GrafanaWebhook,
    label_fingerprint,
    normalise,
)

# Shape of the webhook_config payload documented by Alertmanager (version 4), values as a real
# Alertmanager 0.25 sends them (the fingerprint is the one it computed for these labels).
ALERTMANAGER_SAMPLE: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}:{alertname="High memory usage"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "runbooks",
    "groupLabels": {"alertname": "High memory usage"},
    "commonLabels": {"alertname": "High memory usage", "team": "blue"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "High memory usage", "team": "blue", "zone": "us-1"},
            "annotations": {"summary": "This alert was triggered for zone us-1"},
            "startsAt": "2026-11-22T03:00:00.123456789Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=mem",
            "fingerprint": "b4ab7c4e8d6676fb",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "High memory usage", "team": "blue", "zone": "eu-1"},
            "annotations": {"summary": "This alert was triggered for zone eu-1"},
            "startsAt": "2026-11-22T02:00:00Z",
            "endsAt": "2026-11-22T02:30:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=mem",
            "fingerprint": "0a1b2c3d4e5f6071",
        },
    ],
}

# Grafana's documented webhook notifier example (unified alerting), trimmed to two alerts.
GRAFANA_SAMPLE: dict[str, Any] = {
    "receiver": "My Super Webhook",
    "status": "firing",
    "orgId": 1,
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "High memory usage", "team": "blue", "zone": "us-1"},
            "annotations": {
                "description": "The system has high memory usage",
                "runbook_url": "https://myrunbook.com/runbook/1234",
                "summary": "This alert was triggered for zone us-1",
            },
            "startsAt": "2021-10-12T09:51:03.157076+02:00",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "https://play.grafana.org/alerting/1afz29v7z/edit",
            "fingerprint": "c6eadffa33fcdf37",
            "silenceURL": "https://play.grafana.org/alerting/silence/new?alertmanager=grafana",
            "dashboardURL": "",
            "panelURL": "",
            "values": {"B": 44.23943737541908, "C": 1},
        },
        {
            "status": "firing",
            "labels": {"alertname": "High CPU usage", "team": "blue", "zone": "eu-1"},
            "annotations": {"summary": "This alert was triggered for zone eu-1"},
            "startsAt": "2021-10-12T09:56:03.157076+02:00",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "https://play.grafana.org/alerting/d1rdpdv7k/edit",
            "fingerprint": "bc97ff14869b13e3",
            "valueString": "[ metric='' labels={} value=14151.331895396988 ]",
        },
    ],
    "groupLabels": {},
    "commonLabels": {"team": "blue"},
    "commonAnnotations": {},
    "externalURL": "https://play.grafana.org/",
    "version": "1",
    "groupKey": '{}:{alertname="High memory usage"}',
    "truncatedAlerts": 0,
    "title": "[FIRING:2]  (blue)",
    "state": "alerting",
    "message": "**Firing**\n\nValue: B=44.2",
}


def test_alertmanager_sample_normalises_to_one_alert_each() -> None:
    alerts = normalise(AlertmanagerWebhook.model_validate(ALERTMANAGER_SAMPLE))
    assert [a.status for a in alerts] == ["firing", "resolved"]
    first = alerts[0]
    assert first == Alert(
        source="alertmanager",
        status="firing",
        fingerprint="b4ab7c4e8d6676fb",
        labels={"alertname": "High memory usage", "team": "blue", "zone": "us-1"},
        annotations={"summary": "This alert was triggered for zone us-1"},
        starts_at="2026-11-22T03:00:00.123456789Z",
        ends_at="0001-01-01T00:00:00Z",
        generator_url="http://prometheus:9090/graph?g0.expr=mem",
        group_key='{}:{alertname="High memory usage"}',
        receiver="runbooks",
    )
    assert alerts[1].ends_at == "2026-11-22T02:30:00Z"


def test_grafana_sample_normalises_and_ignores_grafana_extras() -> None:
    alerts = normalise(GrafanaWebhook.model_validate(GRAFANA_SAMPLE))
    assert [(a.source, a.alertname, a.fingerprint) for a in alerts] == [
        ("grafana", "High memory usage", "c6eadffa33fcdf37"),
        ("grafana", "High CPU usage", "bc97ff14869b13e3"),
    ]
    assert alerts[0].starts_at == "2021-10-12T09:51:03.157076+02:00"
    assert alerts[0].receiver == "My Super Webhook"
    assert alerts[0].annotations["runbook_url"] == "https://myrunbook.com/runbook/1234"


def _mutated(sample: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """The sample with the value at ``path`` replaced, or deleted when ``value`` is ``_DELETE``."""
    data = copy.deepcopy(sample)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()

# (payload model, sample, path changed, new value or _DELETE, error location reported)
INVALID = [
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("version",), _DELETE, ("version",)),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("version",), "3", ("version",)),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("version",), 4, ("version",)),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("alerts",), _DELETE, ("alerts",)),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("alerts",), [], ("alerts",)),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("alerts",), {"a": 1}, ("alerts",)),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "status"),
        _DELETE,
        ("alerts", 0, "status"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "status"),
        "pending",
        ("alerts", 0, "status"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 1, "labels"),
        _DELETE,
        ("alerts", 1, "labels"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 1, "labels"),
        {},
        ("alerts", 1, "labels"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "labels", "zone"),
        1,
        ("alerts", 0, "labels", "zone"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "labels", "zone"),
        None,
        ("alerts", 0, "labels", "zone"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "annotations"),
        ["x"],
        ("alerts", 0, "annotations"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "startsAt"),
        _DELETE,
        ("alerts", 0, "startsAt"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "startsAt"),
        "yesterday",
        ("alerts", 0, "startsAt"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "startsAt"),
        "2026-11-22",
        ("alerts", 0, "startsAt"),
    ),
    # shaped like a time but not one: the event id counts episodes from startsAt
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "startsAt"),
        "2026-13-22T03:00:00Z",
        ("alerts", 0, "startsAt"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "startsAt"),
        "2026-02-30T03:00:00Z",
        ("alerts", 0, "startsAt"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "startsAt"),
        "0000-01-01T00:00:00Z",
        ("alerts", 0, "startsAt"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "startsAt"),
        "2026-11-22T03:00:00+24:00",
        ("alerts", 0, "startsAt"),
    ),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("alerts", 0, "endsAt"), 0, ("alerts", 0, "endsAt")),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "endsAt"),
        "2026-11-22T25:00:00Z",
        ("alerts", 0, "endsAt"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "fingerprint"),
        "",
        ("alerts", 0, "fingerprint"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "fingerprint"),
        "a/b c",
        ("alerts", 0, "fingerprint"),
    ),
    # "|" separates the parts of the event id's name: allowing it would make two alerts collide
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "fingerprint"),
        "a|b",
        ("alerts", 0, "fingerprint"),
    ),
    (
        AlertmanagerWebhook,
        ALERTMANAGER_SAMPLE,
        ("alerts", 0, "fingerprint"),
        "f" * 129,
        ("alerts", 0, "fingerprint"),
    ),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("truncatedAlerts",), -1, ("truncatedAlerts",)),
    (AlertmanagerWebhook, ALERTMANAGER_SAMPLE, ("groupLabels",), "x", ("groupLabels",)),
    (GrafanaWebhook, GRAFANA_SAMPLE, ("alerts",), _DELETE, ("alerts",)),
    (GrafanaWebhook, GRAFANA_SAMPLE, ("alerts", 0, "labels"), _DELETE, ("alerts", 0, "labels")),
    (GrafanaWebhook, GRAFANA_SAMPLE, ("alerts", 1, "startsAt"), _DELETE, ("alerts", 1, "startsAt")),
    (GrafanaWebhook, GRAFANA_SAMPLE, ("alerts", 1, "status"), "alerting", ("alerts", 1, "status")),
    (GrafanaWebhook, GRAFANA_SAMPLE, ("orgId",), "one", ("orgId",)),
]


@pytest.mark.parametrize(("model", "sample", "path", "value", "loc"), INVALID)
def test_invalid_payload_names_the_field(
    model: type, sample: dict, path: tuple, value: Any, loc: tuple
) -> None:
    with pytest.raises(ValidationError) as raised:
        model.model_validate_json(json.dumps(_mutated(sample, path, value)))
    assert loc in [e["loc"][: len(loc)] for e in raised.value.errors()]


# (path changed, new value): optional fields a hand-written alert may leave out
MINIMAL = [
    (("alerts", 0, "fingerprint"), _DELETE),
    (("alerts", 0, "annotations"), _DELETE),
    (("alerts", 0, "endsAt"), _DELETE),
    (("alerts", 0, "generatorURL"), _DELETE),
    (("groupKey",), _DELETE),
    (("receiver",), _DELETE),
    (("status",), _DELETE),
    (("externalURL",), _DELETE),
    (("alerts", 0, "startsAt"), "2026-11-22T03:00:00+05:30"),
    (("alerts", 0, "startsAt"), "2026-11-22 03:00:00Z"),
    (("alerts", 0, "startsAt"), "2026-11-22t03:00:00.5z"),  # RFC 3339 allows lower case
    (("alerts", 0, "unknownField"), {"nested": True}),
]


@pytest.mark.parametrize(("path", "value"), MINIMAL)
def test_optional_fields_may_be_missing_or_vary(path: tuple, value: Any) -> None:
    payload = _mutated(ALERTMANAGER_SAMPLE, path, value)
    assert len(normalise(AlertmanagerWebhook.model_validate_json(json.dumps(payload)))) == 2


def test_too_many_labels_for_prefect_is_invalid() -> None:
    labels = {f"l{i}": "v" for i in range(MAX_LABELS + 1)}
    payload = _mutated(ALERTMANAGER_SAMPLE, ("alerts", 0, "labels"), labels)
    with pytest.raises(ValidationError):
        AlertmanagerWebhook.model_validate(payload)


# labels -> fingerprint that a real Alertmanager 0.25 gave the same labels (POST /api/v2/alerts)
FINGERPRINTS = [
    ({"alertname": "High memory usage", "team": "blue", "zone": "us-1"}, "b4ab7c4e8d6676fb"),
    (
        {
            "alertname": "KafkaBrokerDown",
            "namespace": "streaming",
            "kafka_cluster": "prod-kafka",
            "desc": "é—✓ 日本",
        },
        "bad18f6bc526a957",
    ),
    ({}, "cbf29ce484222325"),
]


@pytest.mark.parametrize(("labels", "fingerprint"), FINGERPRINTS)
def test_missing_fingerprint_is_computed_like_alertmanager(labels: dict, fingerprint: str) -> None:
    assert label_fingerprint(labels) == fingerprint
    assert label_fingerprint(dict(reversed(list(labels.items())))) == fingerprint


def test_alert_without_fingerprint_gets_alertmanagers() -> None:
    payload = _mutated(ALERTMANAGER_SAMPLE, ("alerts", 0, "fingerprint"), _DELETE)
    alerts = normalise(AlertmanagerWebhook.model_validate(payload))
    assert alerts[0].fingerprint == "b4ab7c4e8d6676fb"


# (fingerprint, status, startsAt[, episode]) pairs that must give different event ids
DISTINCT_IDS = [
    (("fp1", "firing", "2026-11-22T03:00:00Z"), ("fp2", "firing", "2026-11-22T03:00:00Z")),
    (("fp1", "firing", "2026-11-22T03:00:00Z"), ("fp1", "resolved", "2026-11-22T03:00:00Z")),
    (("fp1", "firing", "2026-11-22T03:00:00Z"), ("fp1", "firing", "2026-11-22T03:00:01Z")),
    (("fp1", "firing", "2026-11-22T03:00:00Z"), ("fp1", "firing", "2026-11-22T03:00:00.000Z")),
    (("fp1", "firing", "2026-11-22T03:00:00Z", 0), ("fp1", "firing", "2026-11-22T03:00:00Z", 1)),
    (("fp1", "firing", "2026-11-22T03:00:00Z", 1), ("fp1", "firing", "2026-11-22T03:00:00Z", 2)),
    (("fp1", "firing", "2026-11-22T03:00:00Z", 1), ("fp1", "firing", "2026-11-22T03:00:00Z", 11)),
]


@pytest.mark.parametrize(("one", "other"), DISTINCT_IDS)
def test_event_id_differs_when_the_alert_differs(one: tuple, other: tuple) -> None:
    assert event_id(*one) != event_id(*other)


def test_event_id_is_stable_across_processes_and_releases() -> None:
    # pinned: a change here would make every re-sent alert look new to Prefect
    assert event_id("b4ab7c4e8d6676fb", "firing", "2021-10-12T09:51:03.157076+02:00") == uuid.UUID(
        "ef3f6f88-0d89-548a-9493-0720465a76c8"
    )
    alert = ("b4ab7c4e8d6676fb", "firing", "2021-10-12T09:51:03.157076+02:00")
    # episode 0 is the id from before episodes existed
    assert event_id(*alert, 0) == uuid.UUID("ef3f6f88-0d89-548a-9493-0720465a76c8")
    assert event_id(*alert, 3) == uuid.UUID("c1f39fde-83c7-54e2-9d63-49f767f935bc")


def _alert(**changes: Any) -> Alert:
    base = normalise(AlertmanagerWebhook.model_validate(ALERTMANAGER_SAMPLE))[0]
    return base.model_copy(update=changes)


def test_event_shape_matches_the_triggers_in_prefect_yaml() -> None:
    event = build_event(_alert())
    assert event["id"] == str(
        event_id("b4ab7c4e8d6676fb", "firing", "2026-11-22T03:00:00.123456789Z")
    )
    assert event["event"] == "alert.firing"
    assert event["resource"] == {
        "prefect.resource.id": "alert.b4ab7c4e8d6676fb",
        "prefect.resource.name": "High memory usage",
        "alertname": "High memory usage",
        "team": "blue",
        "zone": "us-1",
    }
    assert event["payload"] == {
        "annotations": {"summary": "This alert was triggered for zone us-1"},
        "startsAt": "2026-11-22T03:00:00.123456789Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=mem",
        "groupKey": '{}:{alertname="High memory usage"}',
        "receiver": "runbooks",
        "source": "alertmanager",
        "alertEventId": event["id"],
    }


def test_resent_alert_is_the_same_event_within_an_episode() -> None:
    started = datetime.fromisoformat("2026-11-22T03:00:00.123456Z")  # the sample's startsAt

    def event_at(seconds: float, status: str = "firing") -> dict[str, Any]:
        received = started + timedelta(seconds=seconds)
        return build_event(_alert(status=status), occurred=received, cooldown_s=300)

    first = event_at(30)
    assert event_at(299.9)["id"] == first["id"]
    assert first["id"] == build_event(_alert())["id"]  # episode 0: the id without an episode
    assert event_at(300)["id"] != first["id"]  # still firing a cooldown later: a new event
    assert event_at(300)["id"] == event_at(599)["id"] != event_at(600)["id"]
    assert event_at(300)["occurred"] == (started + timedelta(seconds=300)).isoformat()
    resolved = event_at(30, "resolved")
    assert resolved["event"] == "alert.resolved"
    assert resolved["id"] not in (first["id"], event_at(300)["id"])
    assert event_at(86_400, "resolved")["id"] == resolved["id"]  # one resolved event per start


# alert labels -> resource labels (beyond id and name) that must come out
RESERVED_LABELS = [
    (
        {"alertname": "A", "prefect.resource.id": "x"},
        {"alertname": "A", "alert.label.prefect.resource.id": "x"},
    ),
    (
        {"alertname": "A", "prefect.resource.role": "flow"},
        {"alertname": "A", "alert.label.prefect.resource.role": "flow"},
    ),
    ({"alertname": "A", "prefectish": "ok"}, {"alertname": "A", "prefectish": "ok"}),
]


@pytest.mark.parametrize(("labels", "expected"), RESERVED_LABELS)
def test_labels_cannot_override_the_resource_identity(labels: dict, expected: dict) -> None:
    resource = build_event(_alert(labels=labels))["resource"]
    assert resource["prefect.resource.id"] == "alert.b4ab7c4e8d6676fb"
    assert resource["prefect.resource.name"] == "A"
    assert {k: v for k, v in resource.items() if not k.startswith("prefect.resource.")} == expected


def test_alert_without_alertname_is_named_by_its_fingerprint() -> None:
    resource = build_event(_alert(labels={"job": "x"}))["resource"]
    assert resource["prefect.resource.name"] == "b4ab7c4e8d6676fb"


def test_nul_characters_are_replaced_everywhere() -> None:
    event = build_event(
        _alert(labels={"alertname": "a\x00b", "k\x00": "v"}, annotations={"s": "\x00"})
    )
    text = encode_event(event)
    assert "\\u0000" not in text and "\x00" not in text
    assert event["resource"]["alertname"] == "a\ufffdb"


def test_unicode_and_long_annotations_survive_encoding() -> None:
    long_text = "détails ✓ 日本語 🚨 " * 20_000
    event = build_event(
        _alert(labels={"alertname": "Ünïcødé ✓", "équipe": "数据"}, annotations={"d": long_text})
    )
    decoded = json.loads(encode_event(event))
    assert decoded["payload"]["annotations"]["d"] == long_text
    assert decoded["resource"]["équipe"] == "数据"


def test_event_larger_than_prefect_accepts_is_refused() -> None:
    event = build_event(_alert(annotations={"d": "x" * PREFECT_MAX_EVENT_BYTES}))
    with pytest.raises(EventTooLarge, match="alert.b4ab7c4e8d6676fb"):
        encode_event(event)


# attempt -> (the event id sent is the alert's own, payload names the alert's id)
DELIVERY_CASES = [
    (1, True),
    (2, False),
    (3, False),
    (17, False),
]


@pytest.mark.parametrize(("attempt", "own_id"), DELIVERY_CASES)
def test_a_retried_delivery_goes_under_a_new_id_naming_the_alert(attempt, own_id) -> None:
    """Prefect may have recorded a failed attempt's id as seen without publishing it: a retry
    under the same id would be dropped as its duplicate. Every attempt after the first has an
    id of its own, derived (any gateway names attempt n alike), and the payload keeps the
    alert's id, the one runbooks claim the alert by."""
    event = build_event(_alert())
    body = encode_event(event)
    sent = json.loads(delivery_body(event["id"], body, attempt))
    assert (sent["id"] == event["id"]) is own_id
    assert sent["id"] == delivery_id(event["id"], attempt)
    assert sent["payload"]["alertEventId"] == event["id"]
    assert {k: v for k, v in sent.items() if k != "id"} == {
        k: v for k, v in event.items() if k != "id"
    }
    if attempt == 1:
        assert delivery_body(event["id"], body, attempt) == body  # sent as spooled


def test_delivery_ids_are_distinct_per_attempt_and_alert() -> None:
    alert_ids = [str(build_event(_alert(fingerprint=f"fp{n}"))["id"]) for n in range(3)]
    sent = [delivery_id(a, n) for a in alert_ids for n in range(1, 6)]
    assert len(set(sent)) == len(sent)
    assert all(str(uuid.UUID(s)) == s for s in sent)  # Prefect takes event ids as UUIDs


def test_a_body_spooled_before_the_field_existed_gets_the_alerts_id() -> None:
    event = build_event(_alert())
    del event["payload"]["alertEventId"]
    sent = json.loads(delivery_body(event["id"], encode_event(event), 2))
    assert sent["payload"]["alertEventId"] == event["id"]
