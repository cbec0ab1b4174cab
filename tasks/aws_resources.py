"""AWS resources (or LocalStack's) against their spec: read the declared SQS queues, SNS topics and
subscriptions and CloudWatch metrics; re-create what is missing.

Every mutating task re-reads the account and plans from what it finds, so a retried or re-run task
creates nothing twice (CreateQueue, CreateTopic and Subscribe are idempotent too); with
``dry_run`` it returns the plan without changing anything. Requests have boto3's timeouts and
standard-mode retries (the block's), so the tasks add no retries of their own.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from botocore.exceptions import ClientError
from prefect import task

from blocks.aws import AwsAccount
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.aws_resources_decisions import (
    Action,
    AwsLocation,
    AwsResources,
    MetricSpec,
    MetricState,
    QueueSpec,
    QueueState,
    SubscriptionState,
    TopicSpec,
    TopicState,
    decide_all,
    plan_creations,
)

_NO_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_NO_TOPIC = {"NotFound", "NotFoundException"}


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


@task(**runbook_task_options())
def read_localstack_health(account: AwsAccount) -> dict[str, Any]:
    """LocalStack's health answer, e.g. {"services": {"sqs": "running", ...}, "version": ...}."""
    assert account.health_url
    response = httpx.get(account.health_url, timeout=account.timeout_s)
    response.raise_for_status()
    return response.json()


def _location(account: AwsAccount) -> AwsLocation:
    sts = account.get_client("sts")
    who = sts.get_caller_identity()
    return AwsLocation(
        account=who["Account"],
        region=sts.meta.region_name,
        partition=who["Arn"].split(":")[1],
        endpoint=account.endpoint(),
    )


def _read_queue(sqs: Any, name: str) -> QueueState:
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    except ClientError as exc:
        if _code(exc) in _NO_QUEUE:
            return QueueState(name=name, exists=False)
        raise
    return QueueState(name=name, exists=True, url=url, attributes=attributes.get("Attributes", {}))


def _read_topic(sns: Any, location: AwsLocation, spec: TopicSpec) -> TopicState:
    arn = location.topic_arn(spec.name)
    try:
        attributes = sns.get_topic_attributes(TopicArn=arn)["Attributes"]
        pages = sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=arn)
        listed = [s for page in pages for s in page.get("Subscriptions", [])]
    except ClientError as exc:
        if _code(exc) in _NO_TOPIC:
            return TopicState(name=spec.name, exists=False)
        raise
    with_attributes = {
        (s.protocol, location.endpoint_arn(s)) for s in spec.subscriptions if s.attributes
    }
    subscriptions = []
    for s in listed:
        confirmed = s["SubscriptionArn"] != "PendingConfirmation"
        attrs = (
            sns.get_subscription_attributes(SubscriptionArn=s["SubscriptionArn"])["Attributes"]
            if confirmed and (s["Protocol"], s["Endpoint"]) in with_attributes
            else {}
        )
        subscriptions.append(
            SubscriptionState(
                protocol=s["Protocol"],
                endpoint=s["Endpoint"],
                arn=s["SubscriptionArn"],
                attributes=attrs,
            )
        )
    return TopicState(
        name=spec.name, exists=True, attributes=attributes, subscriptions=subscriptions
    )


def _read(account: AwsAccount, queues: list[QueueSpec], topics: list[TopicSpec]) -> AwsResources:
    location = _location(account)
    sqs = account.get_client("sqs") if queues else None
    sns = account.get_client("sns") if topics else None
    return AwsResources(
        location=location,
        queues={q.name: _read_queue(sqs, q.name) for q in queues},
        topics={t.name: _read_topic(sns, location, t) for t in topics},
    )


@task(**runbook_task_options())
def read_aws_resources(
    account: AwsAccount, queues: list[QueueSpec], topics: list[TopicSpec]
) -> AwsResources:
    """The account and region, and each declared queue (all attributes) and topic (attributes,
    subscriptions)."""
    return _read(account, queues, topics)


def _apply(account: AwsAccount, action: Action, changes: list[Change]) -> None:
    if action is Action.CREATE_QUEUE:
        sqs = account.get_client("sqs")
        for c in changes:
            sqs.create_queue(QueueName=c.target, Attributes=c.detail["attributes"])
    elif action is Action.SET_REDRIVE_POLICY:
        sqs = account.get_client("sqs")
        for c in changes:
            url = sqs.get_queue_url(QueueName=c.detail["queue"])["QueueUrl"]
            policy = {k: str(v) for k, v in c.detail["RedrivePolicy"].items()}
            sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": json.dumps(policy)})
    elif action is Action.CREATE_TOPIC:
        sns = account.get_client("sns")
        for c in changes:
            sns.create_topic(Name=c.target, Attributes=c.detail["attributes"])
    else:
        sns = account.get_client("sns")
        location = _location(account)
        for c in changes:
            sns.subscribe(
                TopicArn=location.topic_arn(c.detail["topic"]),
                Protocol=c.detail["protocol"],
                Endpoint=c.detail["endpoint"],
                Attributes=c.detail["attributes"],
                ReturnSubscriptionArn=True,
            )


def _after(live: AwsResources, change: Change, action: Action) -> dict[str, Any]:
    """What the account shows of a created resource (the audit's "after")."""
    if action is Action.CREATE_QUEUE:
        q = live.queues[change.target]
        return {"exists": q.exists, "url": q.url}
    if action is Action.SET_REDRIVE_POLICY:
        return {
            "RedrivePolicy": live.queues[change.detail["queue"]].attributes.get("RedrivePolicy")
        }
    if action is Action.CREATE_TOPIC:
        t = live.topics[change.target]
        return {"exists": t.exists, "arn": live.location.topic_arn(t.name) if t.exists else None}
    subs = live.topics[change.detail["topic"]].subscriptions
    arns = [
        s.arn
        for s in subs
        if s.protocol == change.detail["protocol"] and s.endpoint == change.detail["endpoint"]
    ]
    return {"subscription_arn": arns[0] if arns else None}


@task(**runbook_task_options())
def create_missing_resources(
    account: AwsAccount,
    queues: list[QueueSpec],
    topics: list[TopicSpec],
    action: Action,
    dry_run: bool,
) -> ChangeSet:
    """Create the declared resources of one kind the account lacks: queues with their attributes,
    redrive policies (after every queue exists), topics, subscriptions."""
    live = _read(account, queues, topics)
    planned = plan_creations(
        decide_all(queues, topics, live), queues, topics, live.location, action
    )
    if dry_run or not planned:
        return ChangeSet(dry_run=dry_run, planned=planned)
    _apply(account, action, planned)
    after = _read(account, queues, topics)
    applied = [c.model_copy(update={"detail": _after(after, c, action)}) for c in planned]
    return ChangeSet(dry_run=False, planned=planned, applied=applied)


# --- CloudWatch -------------------------------------------------------------------------------


def _dimensions(spec: MetricSpec) -> list[dict[str, str]]:
    return [{"Name": k, "Value": v} for k, v in sorted(spec.dimensions.items())]


@task(**runbook_task_options())
def read_metric_activity(
    account: AwsAccount, metrics: list[MetricSpec], now: datetime
) -> list[MetricState]:
    """Per metric: whether ListMetrics knows it (exactly these dimensions), and its samples per
    minute over its max age (GetMetricData, SampleCount)."""
    if not metrics:
        return []
    cw = account.get_client("cloudwatch")
    start = now - timedelta(seconds=max(m.max_age_s for m in metrics) + 60)
    queries = [
        {
            "Id": f"m{i}",
            "MetricStat": {
                "Metric": {
                    "Namespace": m.namespace,
                    "MetricName": m.name,
                    "Dimensions": _dimensions(m),
                },
                "Period": 60,
                "Stat": "SampleCount",
            },
            "ReturnData": True,
        }
        for i, m in enumerate(metrics)
    ]
    results: dict[str, dict[str, Any]] = {}
    for page in cw.get_paginator("get_metric_data").paginate(
        MetricDataQueries=queries, StartTime=start, EndTime=now + timedelta(seconds=60)
    ):
        for r in page["MetricDataResults"]:
            seen = results.setdefault(r["Id"], {"Timestamps": [], "Values": []})
            seen["Timestamps"] += r.get("Timestamps", [])
            seen["Values"] += r.get("Values", [])
    states = []
    for i, m in enumerate(metrics):
        listed = cw.list_metrics(
            Namespace=m.namespace, MetricName=m.name, Dimensions=_dimensions(m)
        ).get("Metrics", [])
        exact = any(
            sorted((d["Name"], d["Value"]) for d in found.get("Dimensions", []))
            == sorted(m.dimensions.items())
            for found in listed
        )
        data = results.get(f"m{i}", {"Timestamps": [], "Values": []})
        window_start = now - timedelta(seconds=m.max_age_s + 60)
        points = [
            (t.astimezone(UTC), v)
            for t, v in zip(data["Timestamps"], data["Values"], strict=True)
            if v > 0 and t >= window_start
        ]
        states.append(
            MetricState(
                metric=m.describe(),
                listed=exact,
                newest=max((t for t, _ in points), default=None),
                datapoints=int(sum(v for _, v in points)),
            )
        )
    return states
