"""Runbook ``pre-deployment-checklist`` (seed 003 "Pre-Deployment Checklist"): each item of the
seed's list checked against the live systems, with its evidence; the run FAILS when an item fails,
so a pipeline can gate a deployment on it:

    prefect deployment run pre-deployment-checklist/pre-deployment-checklist --watch

exits non-zero when the run fails. Items whose systems are not configured are reported as such
and do not fail the gate. Read-only: it changes nothing and pages nobody (a failed checklist stops
a deployment, it is not an incident).
"""

from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from prefect import flow
from prefect.blocks.core import Block
from prefect.states import Completed, Failed, State
from pydantic import BaseModel, Field

from blocks.aws import AwsAccount
from blocks.escalation import EscalationPolicy
from blocks.event_store import EventStore
from blocks.kafka import KafkaCluster
from blocks.prometheus import AlertmanagerServer, PrometheusServer
from runbooks.params import OptionalBlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from tasks.alert_routing import unrouted
from tasks.alertmanager import AlertmanagerUnavailable, alertmanager_config
from tasks.aws_resources import read_aws_resources, read_localstack_health
from tasks.aws_resources_decisions import QueueSpec, health_problems
from tasks.aws_resources_decisions import Status as AwsStatus
from tasks.aws_resources_decisions import TopicSpec as AwsTopicSpec
from tasks.aws_resources_decisions import decide_all as decide_aws
from tasks.checklist_decisions import (
    Item,
    ItemResult,
    ItemStatus,
    alerts_item,
    gate,
    health_item,
    kafka_item,
    metrics_item,
    not_configured,
    topics_item,
)
from tasks.event_store import probe_event_store
from tasks.health_endpoints import probe_endpoints
from tasks.health_endpoints_decisions import HealthEndpoint
from tasks.kafka import check_isr
from tasks.kafka_topics import TopicSpec, decide_all, read_topics
from tasks.prometheus import PrometheusUnavailable, measure, scrape_targets
from tasks.slo_decisions import SEED_OBJECTIVES

RUNBOOK = "pre-deployment-checklist"
B = TypeVar("B", bound=Block)


class ChecklistParams(RunbookParams):
    """Run form of the pre-deployment checklist: each item is checked when its system is given."""

    health_endpoints: list[HealthEndpoint] = Field(
        default_factory=list,
        description="Every service's health endpoint (plain, Spring actuator, Go): item 'All "
        "services pass health checks'.",
    )
    aws_block: OptionalBlockName = Field(
        None,
        description="'Runbooks AWS Account' block (AWS or LocalStack): item 'LocalStack services "
        "are running' and the declared queues and topics.",
    )
    aws_queues: list[QueueSpec] = Field(
        default_factory=list, description="SQS queues that must exist (item 'topics/queues exist')."
    )
    aws_topics: list[AwsTopicSpec] = Field(
        default_factory=list, description="SNS topics (and subscriptions) that must exist."
    )
    kafka_block: OptionalBlockName = Field(
        None, description="'Runbooks Kafka Cluster' block: item 'Kafka cluster is healthy'."
    )
    topics: list[TopicSpec] = Field(
        default_factory=list,
        description="Declared topics that must exist as specified (item 'topics/queues exist').",
    )
    event_store_block: OptionalBlockName = Field(
        None, description="'Runbooks Event Store' block: item 'MongoDB (the event store) is accessible'."
    )
    prometheus_block: OptionalBlockName = Field(
        None, description="'Runbooks Prometheus Server' block: item 'Metrics dashboards are configured'."
    )
    dashboard_queries: list[str] = Field(
        default_factory=lambda: [o.for_window("5m") for o in SEED_OBJECTIVES],
        description="PromQL the dashboards show: each must return data (default: the SLO table's).",
    )
    alertmanager_block: OptionalBlockName = Field(
        None, description="'Runbooks Alertmanager' block: item 'Alert notifications are set up'."
    )
    runbook_alerts: list[str] = Field(
        default_factory=list,
        description="Alerts that must reach the runbooks gateway; empty: every alert a trigger in "
        "prefect.yaml starts a runbook on.",
    )
    gateway_path: str = Field(
        "/alerts/alertmanager",
        pattern=r"^/[A-Za-z0-9/_.-]*$",
        description="Path of the gateway's Alertmanager webhook, as Alertmanager's receiver calls it.",
    )


class ChecklistSummary(BaseModel):
    passed: bool
    items: list[ItemResult]
    report: str = Field(description="The report, as markdown.")


@flow(
    name=RUNBOOK,
    description="The pre-deployment checklist: services healthy, Kafka healthy, event store "
    "accessible, topics and queues as declared, metrics and alert routing in place; fails when "
    "an item fails so a pipeline can gate on it.",
)
@ends_as_reported
def pre_deployment_checklist(params: ChecklistParams) -> State:
    with incident_report(
        runbook=RUNBOOK, title="Pre-Deployment Checklist", severity="P4", params=params
    ) as report:
        items = [
            _item(Item.HEALTH, lambda: _health(params)),
            _item(Item.LOCALSTACK, lambda: _localstack(params)),
            _item(Item.KAFKA, lambda: _kafka(params)),
            _item(Item.STORE, lambda: _store(params)),
            _item(Item.TOPICS, lambda: _topics(params)),
            _item(Item.METRICS, lambda: _metrics(params)),
            _item(Item.ALERTS, lambda: _alerts(params)),
        ]
        for result in items:
            report.check(
                result.item.value, result.status is not ItemStatus.FAIL, f"{result.status.value}: {result.evidence}"
            )
        report.evidence("checklist", [r.line() for r in items])
        passed, text = gate(items)
        summary = ChecklistSummary(passed=passed, items=items, report="")
        if passed:
            report.finish(Outcome.NO_ACTION_NEEDED, f"Checklist passed: {text}.")
            summary.report = report.to_markdown()
            return Completed(message=text, data=summary)
        _follow_ups(report, items)
        report.finish(Outcome.FAILED, f"Checklist failed, do not deploy: {text}.")
        summary.report = report.to_markdown()
        # FAILED for the pipeline, without an escalation: a deployment stops, nobody is paged
        return Failed(message=f"Checklist failed: {text}", data=summary)


class _NotSaved(Exception):
    """A block the checklist was told to use is not saved: that item fails, the others go on."""


def _load(cls: type[B], name: str) -> B:
    try:
        return cls.load(name)
    except ValueError:
        raise _NotSaved(f"the {cls.get_block_type_name()!r} block {name!r} is not saved") from None


def _item(item: Item, check: Callable[[], ItemResult]) -> ItemResult:
    try:
        return check()
    except _NotSaved as exc:
        return ItemResult(item=item, status=ItemStatus.FAIL, evidence=str(exc))


def _health(params: ChecklistParams) -> ItemResult:
    if not params.health_endpoints:
        return not_configured(Item.HEALTH, "health_endpoints")
    return health_item(probe_endpoints(params.health_endpoints))


def _kafka(params: ChecklistParams) -> ItemResult:
    if not params.kafka_block:
        return not_configured(Item.KAFKA, "kafka_block")
    return kafka_item(check_isr(_load(KafkaCluster, params.kafka_block)))


def _localstack(params: ChecklistParams) -> ItemResult:
    if not params.aws_block:
        return not_configured(Item.LOCALSTACK, "aws_block")
    account = _load(AwsAccount, params.aws_block)
    problems: list[str] = []
    if account.health_url:
        try:
            problems += health_problems(read_localstack_health(account))
        except Exception as exc:  # noqa: BLE001 - any failure to read health is the finding
            problems.append(f"health endpoint: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        live = read_aws_resources(account, [], [])
    except (BotoCoreError, ClientError) as exc:
        problems.append(f"the API does not answer: {type(exc).__name__}: {str(exc)[:200]}")
        return ItemResult(item=Item.LOCALSTACK, status=ItemStatus.FAIL, evidence="; ".join(problems))
    where = f"account {live.location.account}, region {live.location.region}"
    if problems:
        return ItemResult(item=Item.LOCALSTACK, status=ItemStatus.FAIL, evidence=f"{where}: " + "; ".join(problems))
    health = "health: sqs, sns, cloudwatch running; " if account.health_url else ""
    return ItemResult(item=Item.LOCALSTACK, status=ItemStatus.PASS, evidence=f"{health}API answers ({where})")


def _topics(params: ChecklistParams) -> ItemResult:
    kafka = bool(params.kafka_block and params.topics)
    aws = bool(params.aws_block and (params.aws_queues or params.aws_topics))
    if not (kafka or aws):
        return not_configured(Item.TOPICS, "kafka_block with declared topics, or aws_block with queues")
    decisions = []
    if kafka:
        states = read_topics(_load(KafkaCluster, params.kafka_block), params.topics)
        decisions = decide_all(params.topics, states, False, [])
    missing = None
    if aws:
        try:
            live = read_aws_resources(_load(AwsAccount, params.aws_block), params.aws_queues, params.aws_topics)
        except (BotoCoreError, ClientError) as exc:
            return ItemResult(item=Item.TOPICS, status=ItemStatus.FAIL, evidence=f"AWS: {type(exc).__name__}: {str(exc)[:200]}")
        missing = [
            f"{d.kind.value} {d.name}"
            for d in decide_aws(params.aws_queues, params.aws_topics, live)
            if d.status is AwsStatus.MISSING
        ]
    return topics_item(decisions, missing)


def _store(params: ChecklistParams) -> ItemResult:
    if not params.event_store_block:
        return not_configured(Item.STORE, "event_store_block")
    probe = probe_event_store(_load(EventStore, params.event_store_block))
    return ItemResult(
        item=Item.STORE,
        status=ItemStatus.PASS if probe.ok else ItemStatus.FAIL,
        evidence=probe.describe(),
    )


def _metrics(params: ChecklistParams) -> ItemResult:
    if not params.prometheus_block:
        return not_configured(Item.METRICS, "prometheus_block")
    server = _load(PrometheusServer, params.prometheus_block)
    try:
        targets = scrape_targets(server)
        measurements = [measure(server, q) for q in params.dashboard_queries]
    except PrometheusUnavailable as exc:
        return ItemResult(item=Item.METRICS, status=ItemStatus.FAIL, evidence=f"Prometheus: {exc}")
    return metrics_item(targets, measurements)


def _alerts(params: ChecklistParams) -> ItemResult:
    if not params.alertmanager_block:
        return not_configured(Item.ALERTS, "alertmanager_block")
    from deployments.catalog import runbook_alertnames

    expected = params.runbook_alerts or runbook_alertnames()
    try:
        config = alertmanager_config(_load(AlertmanagerServer, params.alertmanager_block))
    except AlertmanagerUnavailable as exc:
        return ItemResult(item=Item.ALERTS, status=ItemStatus.FAIL, evidence=f"Alertmanager: {exc}")
    policy_name = params.safety.escalation_block or ""
    try:
        channels = bool(policy_name) and EscalationPolicy.load(policy_name).has_channels()
    except ValueError:  # not saved
        channels = False
    return alerts_item(unrouted(config, expected, params.gateway_path), len(expected), channels, policy_name)


def _follow_ups(report: IncidentReport, items: list[ItemResult]) -> None:
    advice = {
        Item.HEALTH: "Bring the failing services back (service-not-responding) before deploying.",
        Item.LOCALSTACK: "Start LocalStack / restore AWS access; aws-resources-missing re-creates queues.",
        Item.KAFKA: "Fix the Kafka cluster first (kafka-cluster-down).",
        Item.STORE: "Make the event store reachable with the block's credentials.",
        Item.TOPICS: "Create or fix the topics (kafka-topics-validate) and queues (aws-resources-missing).",
        Item.METRICS: "Fix the scrape targets or the metrics the dashboards read.",
        Item.ALERTS: "Route the runbook alerts to the gateway (examples/alertmanager.yml) and give "
        "the escalation policy a channel.",
    }
    for r in items:
        if r.status is ItemStatus.FAIL:
            report.follow_ups.append(f"{r.item.value}: {advice[r.item]}")
