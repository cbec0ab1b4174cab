"""The gateway (real uvicorn) forwarding to the session's Prefect server: grouped, resolved,
unicode and very long alerts arrive as events exactly once; re-sent and cooled-down alerts do not;
an alert still firing after the cooldown is a new event that starts another run; delivery starts
the moment an alert is accepted."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from alert_gateway import GatewaySettings
from alert_gateway.forwarder import PRUNE_INTERVAL_S
from tests.conftest import runs_of
from tests.gateway_proc import (
    TOKEN,
    alert,
    alert_ids,
    alertmanager_notification,
    metric,
    post_alerts,
    prefect_events,
    read_events,
    serving,
    started_now,
    wait_for_events,
    wait_until_delivered,
)


def settings_for(tmp_path: Path, **overrides: object) -> GatewaySettings:
    return GatewaySettings(
        token=SecretStr(TOKEN),
        spool_path=tmp_path / "spool.sqlite3",
        prefect_api_url=PREFECT_API_URL.value(),
        **overrides,
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[str]:
    with serving(settings_for(tmp_path)) as url:
        yield url


def test_grouped_notification_reaches_prefect_exactly_once(gateway: str) -> None:
    long_annotation = "Broker kafka-2 unreachable; détails: ✓ 日本語 🚨 " * 6000  # ~300 KB
    started = started_now()
    alerts = [
        alert(
            "KafkaBrokerDown",
            starts_at=started,
            pod=f"kafka-{i}",
            équipe="données ✓",
            名前="ブローカー",
        )
        for i in range(30)
    ]
    alerts += [alert("KafkaBrokerDown", status="resolved", pod=f"old-{i}") for i in range(9)]
    alerts.append(
        alert("KafkaBrokerDown", starts_at=started, annotations={"description": long_annotation})
    )
    notification = alertmanager_notification(*alerts)

    reply = post_alerts(gateway, notification)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["accepted"] == 40 and body["deduplicated"] == 0
    ids = body["event_ids"]
    assert len(set(ids)) == 40

    events = wait_for_events(PREFECT_API_URL.value(), ids)
    assert alert_ids(events) == sorted(ids)  # each exactly once
    by_id = {e["payload"]["alertEventId"]: e for e in events}

    first = by_id[ids[0]]
    assert first["event"] == "alert.firing"
    assert first["resource"]["prefect.resource.id"].startswith("alert.")
    assert first["resource"]["prefect.resource.name"] == "KafkaBrokerDown"
    assert first["resource"]["équipe"] == "données ✓"
    assert first["resource"]["名前"] == "ブローカー"
    assert first["resource"]["pod"] == "kafka-0"
    assert first["payload"]["receiver"] == "runbooks"
    assert first["payload"]["source"] == "alertmanager"
    assert first["payload"]["startsAt"] == started
    occurred = datetime.fromisoformat(first["occurred"])
    assert abs(datetime.now(UTC) - occurred) < timedelta(minutes=1)
    assert {by_id[i]["event"] for i in ids[30:39]} == {"alert.resolved"}
    assert by_id[ids[39]]["payload"]["annotations"]["description"] == long_annotation

    # Alertmanager re-sends the same group (e.g. after a timeout): nothing new is forwarded
    again = post_alerts(gateway, notification)
    assert again.status_code == 202
    assert again.json() == {"accepted": 0, "deduplicated": 40, "event_ids": ids}
    wait_until_delivered(gateway)
    assert metric(gateway, "runbooks_gateway_events_forwarded") == 40
    assert metric(gateway, "runbooks_gateway_alerts_received", source="alertmanager") == 80
    assert metric(gateway, "runbooks_gateway_alerts_deduplicated", reason="duplicate") == 40
    assert metric(gateway, "runbooks_gateway_forward_latency_seconds_count") == 40
    assert metric(gateway, "runbooks_gateway_spool_depth") == 0
    assert len(wait_for_events(PREFECT_API_URL.value(), ids, timeout_s=0)) == 40


def test_delivery_starts_as_soon_as_an_alert_is_accepted(gateway: str) -> None:
    """No polling interval between the 202 and the POST to Prefect: accepting an alert wakes the
    forwarder, which otherwise sleeps PRUNE_INTERVAL_S (600 s). How fast is the benchmark's
    business (python -m bench trigger-latency: about 0.01 s); a bound far below 600 s and far
    above a loaded machine's hiccups proves the wake without timing it (the session's Prefect
    server once took over 30 s to answer, in a run overloaded by duplicated heavy servers)."""
    assert PRUNE_INTERVAL_S >= 600
    latencies = []
    for _ in range(5):
        reply = post_alerts(gateway, alertmanager_notification(alert("LatencyProbe")))
        assert reply.status_code == 202
        latencies.append(wait_until_delivered(gateway, timeout_s=120))
    assert max(latencies) < 120, latencies
    assert metric(gateway, "runbooks_gateway_forward_latency_seconds_count") == 5


def test_refiring_within_cooldown_is_held_back_but_resolved_passes(gateway: str) -> None:
    labels = {"pod": "kafka-1", "run": uuid.uuid4().hex}
    first = post_alerts(gateway, alertmanager_notification(alert("KafkaBrokerDown", **labels)))
    refire = post_alerts(
        gateway,
        alertmanager_notification(
            alert("KafkaBrokerDown", starts_at="2026-11-22T03:04:00Z", **labels)
        ),
    )
    resolved = post_alerts(
        gateway,
        alertmanager_notification(
            alert("KafkaBrokerDown", status="resolved", starts_at="2026-11-22T03:04:00Z", **labels)
        ),
    )
    assert (first.json()["accepted"], refire.json()["accepted"], resolved.json()["accepted"]) == (
        1,
        0,
        1,
    )
    assert refire.json()["deduplicated"] == 1
    [first_id], [refire_id], [resolved_id] = (
        r.json()["event_ids"] for r in (first, refire, resolved)
    )

    events = wait_for_events(PREFECT_API_URL.value(), [first_id, resolved_id])
    assert alert_ids(events) == sorted([first_id, resolved_id])
    # delivery is in order: once the resolved event is in, a forwarded re-fire would be too
    assert prefect_events(PREFECT_API_URL.value(), [refire_id]) == []
    assert metric(gateway, "runbooks_gateway_events_forwarded") == 2
    assert metric(gateway, "runbooks_gateway_alerts_deduplicated", reason="cooldown") == 1


def test_alert_still_firing_after_the_cooldown_starts_another_run(
    tmp_path: Path, deployment_ids: dict[str, str]
) -> None:
    """Issue #9: the runbook run for an alert crashed (or ended without fixing it) and
    Alertmanager keeps re-sending the alert with its original startsAt. Within the cooldown a
    re-send is held back; after it, it is a new event, and the deployment's trigger starts a
    second run."""
    cooldown_s = 2.0
    fingerprint = uuid.uuid4().hex[:16]
    with serving(settings_for(tmp_path, cooldown_s=cooldown_s)) as gateway:
        # started now, so the first two posts are well inside the first 2 s episode
        crashed = alert(
            "FlinkJobFailed",
            starts_at=started_now(),
            job_name="enrichment-job",
            flink_cluster="flink-eu",
        )
        notification = alertmanager_notification({**crashed, "fingerprint": fingerprint})
        first = post_alerts(gateway, notification).json()
        resent = post_alerts(gateway, notification).json()  # e.g. a group_interval re-send
        time.sleep(cooldown_s + 0.2)
        still_firing = post_alerts(gateway, notification).json()
        resent_again = post_alerts(gateway, notification).json()
        wait_until_delivered(gateway)
        assert metric(gateway, "runbooks_gateway_events_forwarded") == 2
    assert [r["accepted"] for r in (first, resent, still_firing, resent_again)] == [1, 0, 1, 0]
    [first_id], [later_id] = first["event_ids"], still_firing["event_ids"]
    assert resent["event_ids"] == [first_id]
    assert later_id != first_id

    api = PREFECT_API_URL.value()
    assert alert_ids(wait_for_events(api, [first_id, later_id])) == sorted([first_id, later_id])
    events = read_events(api, {"resource": {"id": [f"alert.{fingerprint}"]}})
    assert alert_ids(events) == sorted([first_id, later_id])
    assert {e["event"] for e in events} == {"alert.firing"}
    assert {e["payload"]["startsAt"] for e in events} == {crashed["startsAt"]}

    def runs() -> list[dict[str, Any]]:
        return [
            r
            for r in runs_of(deployment_ids["flink-job-crashed"])
            if (r["parameters"]["params"].get("alert") or {}).get("fingerprint") == fingerprint
        ]

    # a liveness bound, not a speed goal: Prefect's trigger service lags on a loaded machine
    deadline = time.monotonic() + 90
    while len(runs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(runs()) == 2  # one per event: Prefect has only these two for this alert


def test_concurrent_copies_of_an_alert_become_one_event(gateway: str) -> None:
    """Sixteen senders (Alertmanager replicas in a cluster all notify) post the same alert at once."""
    notification = alertmanager_notification(
        alert("KafkaBrokerDown", starts_at=started_now(), pod="kafka-3")
    )
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: post_alerts(gateway, notification), range(16)))
    assert {r.status_code for r in replies} == {202}
    assert sorted(r.json()["accepted"] for r in replies) == [0] * 15 + [1]
    assert len({r.json()["event_ids"][0] for r in replies}) == 1
    wait_until_delivered(gateway)
    assert metric(gateway, "runbooks_gateway_events_forwarded") == 1
    assert len(wait_for_events(PREFECT_API_URL.value(), replies[0].json()["event_ids"])) == 1


def test_grafana_notification_reaches_prefect(gateway: str) -> None:
    run = uuid.uuid4().hex[:8]
    notification = {
        "receiver": "My Super Webhook",
        "status": "firing",
        "orgId": 1,
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "High memory usage",
                    "team": "blue",
                    "zone": "us-1",
                    "run": run,
                },
                "annotations": {"summary": "This alert was triggered for zone us-1"},
                "startsAt": "2021-10-12T09:51:03.157076+02:00",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "https://play.grafana.org/alerting/1afz29v7z/edit",
                "silenceURL": "https://play.grafana.org/alerting/silence/new",
                "dashboardURL": "",
                "panelURL": "",
                "values": {"B": 44.23943737541908, "C": 1},
            }
        ],
        "groupLabels": {},
        "commonLabels": {"team": "blue"},
        "commonAnnotations": {},
        "externalURL": "https://play.grafana.org/",
        "version": "1",
        "groupKey": '{}:{alertname="High memory usage"}',
        "truncatedAlerts": 0,
        "title": "[FIRING:1]",
        "state": "alerting",
        "message": "**Firing**",
    }
    reply = post_alerts(gateway, notification, path="/alerts/grafana")
    assert reply.status_code == 202, reply.text
    [event] = wait_for_events(PREFECT_API_URL.value(), reply.json()["event_ids"])
    assert event["event"] == "alert.firing"
    assert event["resource"]["alertname"] == "High memory usage"
    assert event["resource"]["run"] == run
    assert event["payload"]["source"] == "grafana"
    assert event["payload"]["startsAt"] == "2021-10-12T09:51:03.157076+02:00"
    assert metric(gateway, "runbooks_gateway_alerts_received", source="grafana") == 1


def test_health_and_openapi_document_both_endpoints(gateway: str) -> None:
    assert httpx.get(f"{gateway}/healthz", timeout=5).json() == {"status": "ok", "spool_depth": 0}
    doc = httpx.get(f"{gateway}/openapi.json", timeout=5).json()
    for path, schema in (
        ("/alerts/alertmanager", "AlertmanagerWebhook"),
        ("/alerts/grafana", "GrafanaWebhook"),
    ):
        post = doc["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{schema}"
        assert {"202", "400", "401", "413", "415", "422"} <= set(post["responses"])
    assert "startsAt" in doc["components"]["schemas"]["AlertmanagerAlert"]["required"]
