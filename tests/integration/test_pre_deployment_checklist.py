"""pre-deployment-checklist against real systems: a real Kafka broker, PostgreSQL, Prometheus and
Alertmanager (running the example configuration). Healthy, it passes; each broken item fails the
run on that item alone; the report keeps the seed's list with its evidence."""

from __future__ import annotations

import boto3
import psycopg
import pytest
from prefect_aws import AwsCredentials
from psycopg import sql

from blocks.aws import AwsAccount
from blocks.escalation import EscalationPolicy
from blocks.event_store import EventStore
from blocks.kafka import KafkaCluster
from blocks.postgres import PostgresDatabase
from blocks.prometheus import AlertmanagerServer, PrometheusServer
from flows.observability.pre_deployment_checklist import ChecklistParams, pre_deployment_checklist
from runbooks.params import SafetyParams
from tasks.aws_resources_decisions import QueueSpec
from tasks.health_endpoints_decisions import HealthEndpoint
from tasks.kafka_topics import TopicSpec
from tests.alertmanager import gateway_config, start_alertmanager
from tests.conftest import create_topic, read_incident_report, unique
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY
from tests.servers import free_port


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    token = tmp_path_factory.mktemp("am") / "token"
    token.write_text("t0ken\n")
    server = start_alertmanager(gateway_config("http://127.0.0.1:9/alerts/alertmanager", token))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def systems(postgres, kafka_broker, prometheus, alertmanager, moto):
    """Blocks for every system the checklist reads, all healthy."""
    table = unique("events").replace("-", "_")
    with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, status text, updated_at timestamptz)").format(
                sql.Identifier(table)
            )
        )
    database = PostgresDatabase(
        host=postgres.host, port=postgres.port, dbname="postgres", user=postgres.user,
        password=postgres.password, connect_timeout_s=5,
    )
    names = {k: unique(k) for k in ("kafka", "store", "prom", "am", "policy", "aws")}
    AwsAccount(
        credentials=AwsCredentials(aws_access_key_id=ACCESS_KEY_ID,
                                   aws_secret_access_key=SECRET_ACCESS_KEY, region_name=moto.region),
        endpoint_url=moto.endpoint_url, timeout_s=5,
    ).save(names["aws"])
    queue = unique("events-queue")
    boto3.client("sqs", endpoint_url=moto.endpoint_url, region_name=moto.region,
                 aws_access_key_id=ACCESS_KEY_ID,
                 aws_secret_access_key=SECRET_ACCESS_KEY).create_queue(QueueName=queue)
    KafkaCluster(bootstrap_servers=kafka_broker.bootstrap, request_timeout_s=5).save(names["kafka"])
    EventStore(database=database, table=table).save(names["store"])
    PrometheusServer(url=prometheus.url, timeout_s=5).save(names["prom"])
    AlertmanagerServer(url=alertmanager.url, timeout_s=5).save(names["am"])
    EscalationPolicy(webhook_url="http://127.0.0.1:9/page").save(names["policy"])
    topic = create_topic(kafka_broker.bootstrap, unique("match-events"), partitions=3)
    series = unique("dash")
    prometheus.exporter.set_rate("events_processed_total", {"dash": series}, 10)
    query = f'sum(rate(events_processed_total{{dash="{series}"}}[10s]))'
    prometheus.wait_for(query)
    health = [
        HealthEndpoint(service="prometheus", url=f"{prometheus.url}/-/healthy"),
        HealthEndpoint(service="alertmanager", url=f"{alertmanager.url}/-/healthy"),
    ]
    return names, topic, query, table, health, queue


def params(systems, **overrides) -> ChecklistParams:
    names, topic, query, _, health, queue = systems
    fields = dict(
        health_endpoints=health,
        aws_block=names["aws"],
        aws_queues=[QueueSpec(name=queue)],
        kafka_block=names["kafka"],
        topics=[TopicSpec(name=topic, partitions=3, replication_factor=1)],
        event_store_block=names["store"],
        prometheus_block=names["prom"],
        dashboard_queries=[query],
        alertmanager_block=names["am"],
        safety=SafetyParams(escalation_block=names["policy"]),
    )
    return ChecklistParams(**(fields | overrides))


def test_a_healthy_platform_passes_every_item(systems) -> None:
    state = pre_deployment_checklist(params(systems), return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.passed
    assert {i.item.value: i.status.value for i in summary.items} == {
        "All services pass health checks": "PASS",
        "LocalStack services are running": "PASS",
        "Kafka cluster is healthy": "PASS",
        "MongoDB is accessible": "PASS",
        "All required topics/queues exist": "PASS",
        "Metrics dashboards are configured": "PASS",
        "Alert notifications are set up": "PASS",
    }
    md = read_incident_report(state.state_details.flow_run_id)
    assert "[x] Alert notifications are set up: PASS (" in md
    assert "runbook alert(s) routed to the gateway" in md


def _broken(systems, item: str, evidence: str) -> dict:
    names, topic, query, table, health, queue = systems
    if item == "All required topics/queues exist" and "AWS" in evidence:
        return {"aws_queues": [QueueSpec(name=queue), QueueSpec(name=unique("never-made"))]}
    if item == "All services pass health checks":
        down = HealthEndpoint(service="orders-api", url=f"http://127.0.0.1:{free_port()}/actuator/health",
                              style="actuator", timeout_s=2)
        return {"health_endpoints": [*health, down]}
    if item == "All required topics/queues exist":
        return {"topics": [TopicSpec(name=topic, partitions=3, replication_factor=1),
                           TopicSpec(name=unique("never-created"), partitions=1, replication_factor=1)]}
    if item == "MongoDB is accessible":
        store = EventStore.load(names["store"])
        broken = unique("store")
        store.model_copy(update={"table": "no_such_table"}).save(broken)
        return {"event_store_block": broken}
    if item == "Metrics dashboards are configured" and "not saved" in evidence:
        return {"prometheus_block": "never-saved-prometheus"}
    if item == "Metrics dashboards are configured":
        return {"dashboard_queries": [query, 'sum(rate(nothing_scraped_total{dash="x"}[1m]))']}
    if item == "Alert notifications are set up":
        return {"runbook_alerts": ["KafkaBrokerDown", "SomeAlertNobodyRoutes"]}
    raise AssertionError(item)


@pytest.mark.parametrize(
    ("item", "evidence"),
    [
        ("All services pass health checks", "1 of 3 down: orders-api down (no answer"),
        ("All required topics/queues exist", "topics missing: never-created"),
        ("All required topics/queues exist", "queues/topics missing in AWS: SQS queue never-made"),
        ("MongoDB is accessible", 'relation "public.no_such_table" does not exist'),
        ("Metrics dashboards are configured", "no data for"),
        ("Metrics dashboards are configured", "block 'never-saved-prometheus' is not saved"),
        ("Alert notifications are set up", "not routed to the runbooks gateway: SomeAlertNobodyRoutes"),
    ],
)
def test_the_run_fails_on_the_one_broken_item(systems, item: str, evidence: str) -> None:
    state = pre_deployment_checklist(
        params(systems, **_broken(systems, item, evidence)), return_state=True
    )

    assert state.is_failed()
    assert f"FAILED: {item}" in state.message and "6 of 7 items pass" in state.message
    md = read_incident_report(state.state_details.flow_run_id)
    assert f"| {item} | FAILING | FAIL: " in md and evidence in md
    assert md.count("| FAILING |") == 1
    assert "**FAILED**" in md and "### Escalation" not in md  # a gate, not a page


def test_unconfigured_items_are_named_and_do_not_fail_the_gate(systems) -> None:
    names = systems[0]
    state = pre_deployment_checklist(
        ChecklistParams(event_store_block=names["store"]), return_state=True
    )
    assert state.is_completed()
    assert "1 of 7 items pass; not configured: All services pass health checks; LocalStack services are running; Kafka" in state.message
