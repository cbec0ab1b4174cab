"""The pre-deployment checklist's verdicts and the Alertmanager routing walk, as data tables."""

from __future__ import annotations

import pytest

from tasks.alert_routing import receivers_for, route_matches, unrouted
from tasks.checklist_decisions import (
    Item,
    ItemResult,
    ItemStatus,
    alerts_item,
    gate,
    kafka_item,
    metrics_item,
    topics_item,
)
from tasks.kafka import ClusterHealth, PartitionState
from tasks.kafka_topics import TopicAction, TopicDecision
from tasks.prometheus import Measurement, ScrapeTarget

MATCH_CASES = [
    ({"matchers": ['alertname =~ "A|B"']}, {"alertname": "A"}, True),
    ({"matchers": ['alertname =~ "A|B"']}, {"alertname": "AB"}, False),  # anchored
    ({"matchers": ['alertname = "A"', 'severity != "info"']}, {"alertname": "A"}, True),
    ({"matchers": ['severity != "info"']}, {"severity": "info"}, False),
    ({"matchers": ['team !~ "db.*"']}, {"team": "dba"}, False),
    ({"matchers": ["alertname=A"]}, {"alertname": "A"}, True),  # unquoted
    ({"matchers": ['msg = "say \\"hi\\""']}, {"msg": 'say "hi"'}, True),
    ({"match": {"alertname": "A"}}, {"alertname": "A"}, True),
    ({"match_re": {"service": "api-.*"}}, {"service": "web"}, False),
    ({}, {"alertname": "A"}, True),
]


@pytest.mark.parametrize(("route", "labels", "expected"), MATCH_CASES)
def test_route_matches(route: dict, labels: dict, expected: bool) -> None:
    assert route_matches(route, labels) is expected


CONFIG = {
    "route": {
        "receiver": "null",
        "routes": [
            {"receiver": "audit", "matchers": ['severity = "critical"'], "continue": True},
            {"receiver": "gw", "matchers": ['alertname =~ "KafkaBrokerDown|RedisDown"'],
             "routes": [{"receiver": "gw-db", "match": {"alertname": "RedisDown"}}]},
            {"receiver": "gw", "matchers": ['alertname = "Late"']},
        ],
    },
    "receivers": [
        {"name": "null"},
        {"name": "audit", "webhook_configs": [{"url": "http://audit/hook"}]},
        {"name": "gw", "webhook_configs": [{"url": "http://gateway:8080/alerts/alertmanager"}]},
        {"name": "gw-db", "webhook_configs": [{"url": "http://gateway:8080/alerts/alertmanager/"}]},
    ],
}

RECEIVER_CASES = [
    ({"alertname": "KafkaBrokerDown"}, ["gw"]),
    ({"alertname": "KafkaBrokerDown", "severity": "critical"}, ["audit", "gw"]),  # continue
    ({"alertname": "RedisDown"}, ["gw-db"]),  # the deepest matching route
    ({"alertname": "Late"}, ["gw"]),
    ({"alertname": "Other"}, ["null"]),
]


@pytest.mark.parametrize(("labels", "receivers"), RECEIVER_CASES)
def test_receivers_for(labels: dict, receivers: list[str]) -> None:
    assert receivers_for(CONFIG, labels) == receivers


def test_unrouted() -> None:
    names = ["KafkaBrokerDown", "RedisDown", "Late", "Other"]
    assert unrouted(CONFIG, names, "/alerts/alertmanager") == ["Other"]


def _health(**overrides) -> ClusterHealth:
    fields = dict(reachable=True, cluster_id="c", controller_id=1, broker_ids=[1, 2, 3],
                  expected_brokers=3, topics=4, partitions=12)
    return ClusterHealth(**(fields | overrides))


URP = PartitionState(topic="t", partition=0, leader=1, replicas=[1, 2], isr=[1])
KAFKA_CASES = [
    (_health(), ItemStatus.PASS, "3 broker(s), controller 1, 12 partitions in sync"),
    (_health(reachable=False, error="timed out"), ItemStatus.FAIL, "not reachable: timed out"),
    (_health(broker_ids=[1, 2]), ItemStatus.FAIL, "2 of 3 brokers"),
    (_health(controller_id=None), ItemStatus.FAIL, "no active controller"),
    (_health(under_replicated=[URP]), ItemStatus.FAIL, "1 under-replicated partition(s)"),
    (_health(offline=[URP]), ItemStatus.FAIL, "1 partition(s) without a leader"),
]


@pytest.mark.parametrize(("health", "status", "evidence"), KAFKA_CASES)
def test_kafka_item(health: ClusterHealth, status: ItemStatus, evidence: str) -> None:
    result = kafka_item(health)
    assert result.status is status and evidence in result.evidence


TOPIC_CASES = [
    ([TopicDecision(topic="a")], None, ItemStatus.PASS, "1 topic(s) as declared"),
    ([TopicDecision(topic="a", actions=[TopicAction.CREATE])], None, ItemStatus.FAIL, "topics missing: a"),
    ([TopicDecision(topic="a", drifted={"retention.ms": ("1", "2")},
                    actions=[TopicAction.SET_CONFIGS])], None, ItemStatus.FAIL, "not as declared: a"),
    ([TopicDecision(topic="a")], ["orders-queue"], ItemStatus.FAIL, "missing in AWS: orders-queue"),
    ([TopicDecision(topic="a")], [], ItemStatus.PASS, "and the declared queues"),
]


@pytest.mark.parametrize(("decisions", "queues", "status", "evidence"), TOPIC_CASES)
def test_topics_item(decisions, queues, status: ItemStatus, evidence: str) -> None:
    result = topics_item(decisions, queues)
    assert result.status is status and evidence in result.evidence


UP = ScrapeTarget(job="api", instance="a:1", health="up")
DOWN = ScrapeTarget(job="api", instance="b:1", health="down", last_error="refused")
METRIC_CASES = [
    ([UP], [Measurement(query="q", value=1)], ItemStatus.PASS, "1 target(s) up"),
    ([UP, DOWN], [], ItemStatus.FAIL, "1 target(s) down: api/b:1"),
    ([], [], ItemStatus.FAIL, "scrapes no target"),
    ([UP], [Measurement(query="q", problem="no data")], ItemStatus.FAIL, "no data for 'q'"),
]


@pytest.mark.parametrize(("targets", "measurements", "status", "evidence"), METRIC_CASES)
def test_metrics_item(targets, measurements, status: ItemStatus, evidence: str) -> None:
    result = metrics_item(targets, measurements)
    assert result.status is status and evidence in result.evidence


ALERT_CASES = [
    ([], True, ItemStatus.PASS, "3 runbook alert(s) routed"),
    (["X"], True, ItemStatus.FAIL, "not routed to the runbooks gateway: X"),
    ([], False, ItemStatus.FAIL, "has no channel"),
]


@pytest.mark.parametrize(("missing", "channels", "status", "evidence"), ALERT_CASES)
def test_alerts_item(missing, channels: bool, status: ItemStatus, evidence: str) -> None:
    result = alerts_item(missing, 3, channels, "default")
    assert result.status is status and evidence in result.evidence


def _r(item: Item, status: ItemStatus) -> ItemResult:
    return ItemResult(item=item, status=status, evidence="e")


GATE_CASES = [
    ([_r(Item.KAFKA, ItemStatus.PASS)], True, "1 of 1 items pass"),
    ([_r(Item.KAFKA, ItemStatus.PASS), _r(Item.STORE, ItemStatus.FAIL)], False,
     "1 of 2 items pass; FAILED: MongoDB is accessible"),
    ([_r(Item.KAFKA, ItemStatus.NOT_CONFIGURED)], True,
     "0 of 1 items pass; not configured: Kafka cluster is healthy"),
]


@pytest.mark.parametrize(("results", "passed", "text"), GATE_CASES)
def test_gate(results, passed: bool, text: str) -> None:
    assert gate(results) == (passed, text)
