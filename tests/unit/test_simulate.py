"""`runbooks simulate`: the gateway's event for an alert, evaluated by Prefect's own trigger code
against prefect.yaml (the integration test test_alert_triggers compares every prediction with the
runs the real server starts)."""

from __future__ import annotations

import json

import pytest

from alert_gateway.events import delivery_body
from deployments.simulate import alert_events, labels_payload, simulate
from serving.cli import main

SIMULATE_CASES = [
    # labels, status, deployments that would start
    ({"alertname": "KafkaBrokerDown", "kafka_cluster": "prod"}, "firing", ["kafka-cluster-down"]),
    ({"alertname": "RedisMemoryHigh", "redis": "cache"}, "firing", ["redis-degraded"]),
    ({"alertname": "KafkaBrokerDown"}, "resolved", []),
    ({"alertname": "SomethingElse"}, "firing", []),
    # alertname matching is exact, not a prefix or a pattern
    ({"alertname": "KafkaBrokerDownX"}, "firing", []),
    ({"alertname": "kafkabrokerdown"}, "firing", []),
]


@pytest.mark.parametrize(("labels", "status", "expected"), SIMULATE_CASES)
def test_which_runbooks_an_alert_would_start(labels, status, expected) -> None:
    (event,) = alert_events(labels_payload(labels, status))
    assert [m.deployment for m in simulate(event)] == expected


def test_parameters_are_rendered_from_the_labels() -> None:
    (event,) = alert_events(
        labels_payload({"alertname": "RedisMemoryHigh", "redis": "rate-limits"})
    )
    (match,) = simulate(event)
    params = match.parameters["params"]
    assert params["redis_block"] == "rate-limits"
    assert params["alert"]["alertname"] == "RedisMemoryHigh"
    assert params["alert"]["status"] == "firing"
    assert params["alert"]["fingerprint"] == event["resource"]["prefect.resource.id"][6:]


def test_a_grafana_payload_is_read_like_the_gateway_reads_it() -> None:
    grafana = {
        "receiver": "runbooks", "status": "firing", "orgId": 1, "state": "alerting",
        "title": "[FIRING:1] RedisMemoryHigh", "message": "", "groupKey": "{}",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://g",
        "version": "1", "truncatedAlerts": 0,
        "alerts": [{
            "status": "firing", "labels": {"alertname": "RedisMemoryHigh", "redis": "cache"},
            "annotations": {}, "startsAt": "2026-12-01T03:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "", "fingerprint": "abc123", "silenceURL": "", "dashboardURL": "",
            "panelURL": "", "values": {},
        }],
    }  # fmt: skip
    (event,) = alert_events(grafana)
    assert [m.deployment for m in simulate(event)] == ["redis-degraded"]


def test_cli_prints_matches_and_checks_parameters(capsys, tmp_path) -> None:
    assert main(["simulate", "--labels", "alertname=RedisMemoryHigh", "redis=cache"]) == 0
    out = capsys.readouterr().out
    assert "redis-degraded" in out and '"redis_block": "cache"' in out
    assert "redis-degraded: parameters valid" in out

    # a label that is not a block name: the run would fail, and simulate says so (exit 1)
    assert main(["simulate", "--labels", "alertname=RedisMemoryHigh", "redis=../x"]) == 1
    assert "the run would FAIL on its parameters" in capsys.readouterr().out

    assert main(["simulate", "--labels", "alertname=Nothing"]) == 0
    assert "No runbook would start" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alerts": [{"labels": {}}]}))
    assert main(["simulate", str(bad)]) == 2
    assert "the gateway would refuse this payload" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        main(["simulate", "--labels", "novalue"])
    with pytest.raises(SystemExit, match="one of them"):
        main(["simulate"])


def _alert_cases() -> list[tuple[str, dict[str, str]]]:
    # the labels each trigger's integration test sends (every trigger has one: that test checks)
    from tests.integration.test_alert_triggers import CASES, MORE_CASES

    cases = [(name, labels) for name, (labels, _) in sorted(CASES.items())]
    return cases + [(name, labels) for name, labels, _ in MORE_CASES]


@pytest.mark.parametrize(
    ("deployment", "labels"),
    _alert_cases(),
    ids=lambda v: v if isinstance(v, str) else v["alertname"],
)
def test_every_trigger_renders_parameters_its_runbook_accepts(deployment, labels) -> None:
    """Prefect refuses to create the run of a template that does not render (the alert would be
    lost: "Unable to create flow run from deployment: InvalidJinja()"), and a run whose
    parameters do not validate fails at once: each trigger is rendered here by Prefect's own code
    and its parameters validated by the runbook's model, with the event fields a run claims."""
    import typing
    import uuid

    from prefect.flows import load_flow_from_entrypoint

    from deployments.catalog import load_catalog
    from serving.simulate_command import PROJECT_ROOT

    (event,) = alert_events(labels_payload({**labels, "severity": "critical"}))
    matches = [m for m in simulate(event) if m.deployment == deployment]
    assert matches, f"{labels['alertname']} does not start {deployment}"
    spec = next(s for s in load_catalog() if s.name == deployment)
    flow = load_flow_from_entrypoint(str(PROJECT_ROOT / spec.entrypoint))
    model = typing.get_type_hints(flow.fn)["params"]
    for match in matches:
        params = model.model_validate(match.parameters["params"])
        assert params.alert.event_id == uuid.UUID(event["id"])
        assert params.alert.event_occurred is not None
    # the gateway's second delivery attempt sends the alert under a new event id: the run still
    # claims the alert by the alert's own id (alert_gateway.events.delivery_id)
    retried = json.loads(delivery_body(event["id"], json.dumps(event), attempt=2))
    assert retried["id"] != event["id"]
    for match in (m for m in simulate(retried) if m.deployment == deployment):
        params = model.model_validate(match.parameters["params"])
        assert params.alert.event_id == uuid.UUID(event["id"])
