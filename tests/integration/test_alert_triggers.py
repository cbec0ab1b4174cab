"""prefect.yaml's triggers: an `alert.firing` event starts the matching runbook with parameters
templated from the alert's labels; other alerts start nothing."""

from __future__ import annotations

import time
import typing
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL

from deployments.catalog import PROJECT_ROOT, load_catalog
from deployments.simulate import simulate
from tests.conftest import runs_of

# deployment -> (alert labels, parameters the run must get)
CASES = {
    "kafka-cluster-down": (
        {"alertname": "KafkaBrokerDown", "namespace": "streaming", "kafka_cluster": "prod-kafka"},
        {"kafka_block": "prod-kafka", "namespace": "streaming"},
    ),
    "kafka-consumer-lag-high": (
        {
            "alertname": "KafkaConsumerLagHigh",
            "kafka_cluster": "prod-kafka",
            "consumergroup": "billing",
        },
        {"kafka_block": "prod-kafka", "group": "billing"},
    ),
    "dlq-growing": (
        {"alertname": "KafkaDlqGrowing", "kafka_cluster": "prod-kafka", "topic": "payments.DLT"},
        {"kafka_block": "prod-kafka", "dlq_topic": "payments.DLT"},
    ),
    "kafka-topics-validate": (
        {"alertname": "KafkaTopicMissing", "kafka_cluster": "prod-kafka"},
        {"kafka_block": "prod-kafka"},
    ),
    "producer-not-sending": (
        {
            "alertname": "KafkaTopicNoNewMessages",
            "kafka_cluster": "prod-kafka",
            "topic": "match-events-raw",
        },
        {"kafka_block": "prod-kafka", "topic": "match-events-raw"},
    ),
    "kafka-topic-backup": (
        {"alertname": "KafkaTopicBackupMissing", "kafka_cluster": "prod-kafka", "topic": "orders"},
        {"kafka_block": "prod-kafka", "topic": "orders"},
    ),
    "database-backup": (
        {"alertname": "PostgresBackupMissing", "database": "orders-db", "datname": "orders"},
        {"db_block": "orders-db", "database": "orders"},
    ),
    "flink-job-crashed": (
        {"alertname": "FlinkJobFailed", "job_name": "enrichment-job", "flink_cluster": "flink-eu"},
        {"flink_block": "flink-eu", "job_name": "enrichment-job", "topic": "match-events-raw"},
    ),
    "stadium-network-flap": (
        {"alertname": "GatewayWalBacklog", "gateway": "wembley-gw-1"},
        {"gateway_block": "wembley-gw-1"},
    ),
    "db-connection-pool-exhausted": (
        {"alertname": "PostgresTooManyConnections", "database": "orders-db"},
        {"db_block": "orders-db"},
    ),
    "event-processing-stuck": (
        {"alertname": "EventsStuckInProcessing", "event_store": "events"},
        {"event_store_block": "events"},
    ),
    "service-not-responding": (
        {
            "alertname": "KubePodCrashLooping",
            "namespace": "shop",
            "pod": "orders-api-7d9f8b6c5d-x2k4q",
            "deployment": "orders-api",
            "container": "api",
            "runbooks_platform": "kubernetes/prod",
        },
        {
            "platform": "kubernetes/prod",
            "service": "orders-api",
            "namespace": "shop",
            "container": "api",
        },
    ),
    "service-oom": (
        {"alertname": "ContainerOOMKilled", "service": "web", "runbooks_platform": "docker/edge-1"},
        {"platform": "docker/edge-1", "service": "web", "namespace": None, "container": None},
    ),
    "rollback-bad-deploy": (
        {
            "alertname": "ServiceHighErrorRate",
            "namespace": "shop",
            "deployment": "orders-api",
            "runbooks_platform": "kubernetes/default",
        },
        {"platform": "kubernetes/default", "service": "orders-api", "namespace": "shop"},
    ),
    "service-high-memory": (
        {
            "alertname": "ContainerMemoryHigh",
            "service": "web",
            "runbooks_platform": "docker/edge-1",
        },
        {"platform": "docker/edge-1", "service": "web", "namespace": None},
    ),
    "consumers-too-slow": (
        {
            "alertname": "KafkaConsumersTooSlow",
            "kafka_cluster": "prod-kafka",
            "consumergroup": "stream-processor",
            "service": "stream-processor",
            "namespace": "streaming",
            "runbooks_platform": "kubernetes/default",
        },
        {
            "kafka_block": "prod-kafka",
            "group": "stream-processor",
            "platform": "kubernetes/default",
            "service": "stream-processor",
            "namespace": "streaming",
        },
    ),
    "event-store-slow": (
        {"alertname": "EventStoreSlowQueries", "event_store": "orders-events"},
        {"event_store_block": "orders-events"},
    ),
    "redis-degraded": (
        {"alertname": "RedisRejectedConnections", "redis": "sessions-cache"},
        {"redis_block": "sessions-cache"},
    ),
    "mysql-not-writing": (
        {"alertname": "MySQLTableNotWritten", "database": "market-db", "table": "moving_averages"},
        {"db_block": "market-db", "table": "moving_averages"},
    ),
    "slo-report": (
        {"alertname": "SLOErrorBudgetBurn", "prometheus": "main"},
        {"prometheus_block": "main"},
    ),
    "circuit-breaker-open": (
        {
            "alertname": "CircuitBreakerOpen",
            "instance": "orders:8082",
            "name": "inventory",
            "actuator_url": "http://orders:8082/actuator",
        },
        {"actuator_url": "http://orders:8082/actuator", "breaker": "inventory"},
    ),
    "service-health-sweep": (
        {
            "alertname": "MultipleServicesDown",
            "environment": "prod",
            "prometheus": "main",
            "runbooks_platform": "kubernetes/prod",
        },
        {
            "prometheus_block": "main",
            "alertmanager_block": "default",
            "platform": "kubernetes/prod",
        },
    ),
    "e2e-latency-high": (
        {"alertname": "E2ELatencyHigh", "prometheus": "main"},
        {"prometheus_block": "main"},
    ),
    "push-delivery-degraded": (
        {"alertname": "PushDeliveryRateLow", "provider": "fcm", "prometheus": "main"},
        {"prometheus_block": "main", "db_block": "default"},
    ),
    "aws-resources-missing": (
        {"alertname": "SqsQueueMissing", "aws_account": "localstack", "queue_name": "match-events"},
        {"aws_block": "localstack", "queue": "match-events"},
    ),
    "spark-streaming-job-failed": (
        {"alertname": "SparkStreamingJobFailed", "spark_app": "counts-eu"},
        {"spark_block": "counts-eu"},
    ),
    "flink-job-degraded": (
        {"alertname": "FlinkJobBackpressured", "job_name": "enrichment-job", "flink_cluster": "flink-eu"},
        {"flink_block": "flink-eu", "job_name": "enrichment-job"},
    ),
}


def test_every_deployment_has_a_case() -> None:
    assert set(CASES) == {s.name for s in load_catalog() if s.triggers}


def post_alert_event(
    labels: dict[str, str], event: str = "alert.firing", sent: list[dict] | None = None
) -> str:
    """Post an alert's event to Prefect (as the gateway does); ``sent`` gets the event itself."""
    fingerprint = uuid.uuid4().hex[:16]
    body = [
        {
            "id": str(uuid.uuid4()),
            "occurred": datetime.now(UTC).isoformat(),
            "event": event,
            "resource": {
                "prefect.resource.id": f"alert.{fingerprint}",
                "severity": "critical",
                **labels,
            },
            "payload": {"startsAt": "2026-11-22T03:00:00Z"},
        }
    ]
    httpx.post(f"{PREFECT_API_URL.value()}/events", json=body, timeout=10).raise_for_status()
    if sent is not None:
        sent.extend(body)
    return fingerprint


def params_model(entrypoint: str) -> type:
    flow = load_flow_from_entrypoint(str(PROJECT_ROOT / entrypoint))
    return typing.get_type_hints(flow.fn)["params"]


# the other triggers of deployments with more than one: (deployment, labels, parameters)
MORE_CASES = [
    (
        "service-not-responding",
        {"alertname": "KubeDeploymentReplicasMismatch", "namespace": "shop", "deployment": "cart",
         "runbooks_platform": "kubernetes/default"},
        {"platform": "kubernetes/default", "service": "cart", "namespace": "shop", "container": None},
    ),
    (
        "service-not-responding",
        {"alertname": "ServiceHealthCheckFailed", "service": "web", "runbooks_platform": "docker/edge-1",
         "instance": "http://10.0.0.5:8080/health"},
        {"platform": "docker/edge-1", "service": "web", "health_url": "http://10.0.0.5:8080/health"},
    ),
    (
        "service-oom",
        {"alertname": "KubeContainerOOMKilled", "namespace": "shop", "deployment": "orders-api",
         "container": "api", "runbooks_platform": "kubernetes/default"},
        {"platform": "kubernetes/default", "service": "orders-api", "namespace": "shop", "container": "api"},
    ),
    (
        "service-high-memory",
        {"alertname": "KubeContainerMemoryHigh", "namespace": "shop", "deployment": "orders-api",
         "container": "api", "runbooks_platform": "kubernetes/default"},
        {"platform": "kubernetes/default", "service": "orders-api", "namespace": "shop", "container": "api"},
    ),
    ("redis-degraded", {"alertname": "RedisTooManyClients", "redis": "sessions-cache"},
     {"redis_block": "sessions-cache"}),
    ("redis-degraded", {"alertname": "RedisMemoryHigh", "redis": "rate-limits"},
     {"redis_block": "rate-limits"}),
    ("mysql-not-writing", {"alertname": "MySQLDown", "database": "market-db"},
     {"db_block": "market-db", "table": "moving_averages"}),
    ("mysql-not-writing", {"alertname": "MySQLReadOnly", "database": "market-db"},
     {"db_block": "market-db", "must_be_writable": False}),
    ("aws-resources-missing", {"alertname": "AwsQueueMetricsAbsent", "aws_account": "localstack"},
     {"aws_block": "localstack", "queue": None}),
    ("spark-streaming-job-failed", {"alertname": "SparkStreamingQueryStalled", "spark_app": "counts-eu"},
     {"spark_block": "counts-eu"}),
    ("flink-job-degraded", {"alertname": "FlinkCheckpointsSlow", "job_name": "scores-job", "flink_cluster": "flink-eu"},
     {"flink_block": "flink-eu", "job_name": "scores-job"}),
]  # fmt: skip


def test_every_trigger_has_a_case() -> None:
    cased = {(n, labels["alertname"]) for n, (labels, _) in CASES.items()}
    cased |= {(n, labels["alertname"]) for n, labels, _ in MORE_CASES}
    for spec in load_catalog():
        for trigger in spec.triggers:
            alertnames = trigger["match"]["alertname"]
            alertnames = [alertnames] if isinstance(alertnames, str) else alertnames
            assert any((spec.name, a) in cased for a in alertnames), (spec.name, alertnames)


@pytest.mark.parametrize(
    ("name", "labels", "expected"),
    [(n, *CASES[n]) for n in sorted(CASES)] + MORE_CASES,
    ids=[*sorted(CASES), *(f"{n}-{labels['alertname']}" for n, labels, _ in MORE_CASES)],
)
def test_alert_starts_its_runbook_with_labels(
    name: str, labels: dict[str, str], expected: dict[str, object], deployment_ids: dict[str, str]
) -> None:
    before = {r["id"] for r in runs_of(deployment_ids[name])}
    sent: list[dict] = []
    fingerprint = post_alert_event(labels, sent=sent)

    deadline = time.monotonic() + 30
    new: list[dict] = []
    while time.monotonic() < deadline and not new:
        new = [r for r in runs_of(deployment_ids[name]) if r["id"] not in before]
        time.sleep(0.3)
    assert len(new) == 1, f"{name}: expected one run for the alert, got {len(new)}"
    run = new[0]
    assert run["created_by"]["type"] == "AUTOMATION"

    spec = next(s for s in load_catalog() if s.name == name)
    params = params_model(spec.entrypoint).model_validate(run["parameters"]["params"])
    for field, value in expected.items():
        assert getattr(params, field) == value, field
    assert params.alert.alertname == labels["alertname"]
    assert params.alert.fingerprint == fingerprint
    assert params.alert.status == "firing"
    assert params.alert.severity == "critical"
    assert params.alert.starts_at == "2026-11-22T03:00:00Z"
    # what the run claims (runbooks/alert_claims.py): the event that started it
    assert params.alert.event_id == uuid.UUID(sent[0]["id"])
    assert params.alert.event_occurred == datetime.fromisoformat(sent[0]["occurred"])
    assert params.alert.labels["alertname"] == labels["alertname"]
    assert not any(k.startswith("prefect.") for k in params.alert.labels)
    assert params.dry_run is False
    # `runbooks simulate` predicts exactly this: the one deployment, the same parameters
    predicted = simulate(sent[0])
    assert [m.deployment for m in predicted] == [name]
    assert predicted[0].parameters == run["parameters"]


def test_unrelated_alert_and_resolved_alert_start_nothing(deployment_ids: dict[str, str]) -> None:
    before = {name: len(runs_of(i)) for name, i in deployment_ids.items()}
    sent: list[dict] = []
    post_alert_event({"alertname": "SomethingElseEntirely"}, sent=sent)
    post_alert_event({"alertname": "KafkaBrokerDown"}, event="alert.resolved", sent=sent)
    assert [simulate(e) for e in sent] == [[], []], "simulate agrees: nothing would start"
    time.sleep(4)
    after = {name: len(runs_of(i)) for name, i in deployment_ids.items()}
    assert after == before


def _api(path: str, body: dict | None = None) -> object:
    url = f"{PREFECT_API_URL.value()}{path}"
    resp = (
        httpx.post(url, json=body, timeout=10) if body is not None else httpx.get(url, timeout=10)
    )
    resp.raise_for_status()
    return resp.json()


def test_automations_are_named_for_the_alerts_they_match(deployment_ids: dict[str, str]) -> None:
    """The UI's Automations page lists automations by name (it describes each trigger only as
    "A custom trigger"): each names its runbook and every alert it matches."""
    automations = _api("/automations/filter", {})
    by_deployment: dict[str, list[dict]] = {}
    for automation in automations:
        for action in automation["actions"]:
            if action.get("type") == "run-deployment":
                by_deployment.setdefault(action["deployment_id"], []).append(automation)
    for spec in load_catalog():
        if not spec.triggers:
            continue
        automations = by_deployment[deployment_ids[spec.name]]
        assert len(automations) == len(spec.triggers), spec.name  # one per trigger
        names = set()
        for trigger in spec.triggers:
            alertnames = trigger["match"]["alertname"]
            alertnames = [alertnames] if isinstance(alertnames, str) else alertnames
            names.add(f"{spec.name} on alert {', '.join(alertnames)}")
        assert {a["name"] for a in automations} == names
        for automation in automations:
            assert automation["description"].startswith(f"Runs {spec.name} when")


def test_deployment_descriptions_name_no_seed_documents(deployment_ids: dict[str, str]) -> None:
    for name, deployment_id in deployment_ids.items():
        description = _api(f"/deployments/{deployment_id}")["description"]
        assert description and "seed" not in description.lower(), (name, description)
