"""aws-resources-missing decisions: per declared queue, redrive policy, topic, subscription and
metric, ok / missing / drifted, and which creations follow (data tables)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from flows.aws.aws_resources_missing import AwsResourcesMissingParams
from tasks.aws_resources_decisions import (
    Action,
    AwsLocation,
    AwsResources,
    Kind,
    MetricSpec,
    MetricState,
    MetricStatus,
    QueueSpec,
    QueueState,
    Status,
    SubscriptionSpec,
    SubscriptionState,
    TopicSpec,
    TopicState,
    decide_all,
    decide_metric,
    decide_queue,
    decide_topic,
    health_problems,
    plan_creations,
    queue_name_problem,
    same_value,
    topic_name_problem,
)

LOC = AwsLocation(account="000000000000", region="us-east-1")
DLQ_ARN = "arn:aws:sqs:us-east-1:000000000000:orders-dlq"
QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:orders"
QUEUE = QueueSpec(
    name="orders",
    attributes={"VisibilityTimeout": 45},
    dead_letter_queue="orders-dlq",
    max_receive_count=4,
)
DLQ = QueueSpec(name="orders-dlq")
REDRIVE = json.dumps({"deadLetterTargetArn": DLQ_ARN, "maxReceiveCount": 4})
OK, MISSING, DRIFTED = Status.OK, Status.MISSING, Status.DRIFTED


def queue(exists: bool = True, **attributes: str) -> QueueState:
    return QueueState(name="orders", exists=exists, attributes=attributes)


# (case, live queue, status of the queue, status of its redrive policy, drifted attributes)
QUEUE_CASES = [
    ("as declared", queue(VisibilityTimeout="45", RedrivePolicy=REDRIVE), OK, OK, []),
    ("missing: queue and policy re-created", queue(exists=False), MISSING, MISSING, []),
    ("exists without its policy: set", queue(VisibilityTimeout="45"), OK, MISSING, []),
    ("attribute drifted", queue(VisibilityTimeout="5", RedrivePolicy=REDRIVE), DRIFTED, OK, ["VisibilityTimeout"]),
    (
        "policy with another count: drift",
        queue(VisibilityTimeout="45", RedrivePolicy=json.dumps({"deadLetterTargetArn": DLQ_ARN, "maxReceiveCount": "9"})),
        OK,
        DRIFTED,
        ["RedrivePolicy"],
    ),
    (
        "policy as AWS spells it (count as a string): same",
        queue(VisibilityTimeout="45", RedrivePolicy=json.dumps({"maxReceiveCount": "4", "deadLetterTargetArn": DLQ_ARN})),
        OK,
        OK,
        [],
    ),
    (
        "policy names another DLQ: drift",
        queue(VisibilityTimeout="45", RedrivePolicy=json.dumps({"deadLetterTargetArn": QUEUE_ARN + "-x", "maxReceiveCount": 4})),
        OK,
        DRIFTED,
        ["RedrivePolicy"],
    ),
    ("policy not JSON: drift", queue(VisibilityTimeout="45", RedrivePolicy="{"), OK, DRIFTED, ["RedrivePolicy"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "state", "queue_status", "redrive_status", "drifted"),
    QUEUE_CASES,
    ids=[c[0] for c in QUEUE_CASES],
)
def test_decide_queue(case, state, queue_status, redrive_status, drifted) -> None:
    q, redrive = decide_queue(QUEUE, state, LOC)
    assert (q.kind, q.status, redrive.kind, redrive.status) == (
        Kind.QUEUE,
        queue_status,
        Kind.REDRIVE,
        redrive_status,
    )
    assert sorted(q.drifted) + sorted(redrive.drifted) == drifted


def test_queue_without_dlq_has_no_redrive_decision() -> None:
    (only,) = decide_queue(DLQ, QueueState(name="orders-dlq", exists=False), LOC)
    assert (only.kind, only.status, only.action) == (Kind.QUEUE, MISSING, Action.CREATE_QUEUE)


SUB = SubscriptionSpec(protocol="sqs", endpoint="orders", attributes={"RawMessageDelivery": True})
TOPIC = TopicSpec(name="events", attributes={"DisplayName": "Events"}, subscriptions=[SUB])


def topic(exists=True, display="Events", subs=None) -> TopicState:
    return TopicState(
        name="events",
        exists=exists,
        attributes={"DisplayName": display, "Owner": "000000000000"},
        subscriptions=subs or [],
    )


def sub(
    arn="arn:aws:sns:us-east-1:000000000000:events:1",
    endpoint=QUEUE_ARN,
    raw="true",
    protocol="sqs",
):
    return SubscriptionState(
        protocol=protocol, endpoint=endpoint, arn=arn, attributes={"RawMessageDelivery": raw}
    )


# (case, live topic, topic status, subscription status, finding fragment)
TOPIC_CASES = [
    ("as declared", topic(subs=[sub()]), OK, OK, None),
    ("topic missing: both re-created", topic(exists=False), MISSING, MISSING, None),
    ("subscription missing", topic(), OK, MISSING, None),
    ("subscribed elsewhere: missing", topic(subs=[sub(endpoint=QUEUE_ARN + "-old")]), OK, MISSING, None),
    ("other protocol: missing", topic(subs=[sub(protocol="lambda")]), OK, MISSING, None),
    ("display name drifted", topic(display="Old", subs=[sub()]), DRIFTED, OK, None),
    ("raw delivery off: drift", topic(subs=[sub(raw="false")]), OK, DRIFTED, None),
    ("pending confirmation: reported", topic(subs=[sub(arn="PendingConfirmation", raw="")]), OK, DRIFTED, "pending"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "state", "topic_status", "sub_status", "finding"),
    TOPIC_CASES,
    ids=[c[0] for c in TOPIC_CASES],
)
def test_decide_topic(case, state, topic_status, sub_status, finding) -> None:
    t, s = decide_topic(TOPIC, state, LOC)
    assert (t.status, s.status) == (topic_status, sub_status)
    assert s.name == "events -> sqs:orders"
    if finding:
        assert any(finding in f for f in s.findings)


def test_creations_come_in_order_with_what_they_create() -> None:
    live = AwsResources(
        location=LOC,
        queues={"orders-dlq": QueueState(name="orders-dlq", exists=False), "orders": queue(False)},
        topics={"events": topic(exists=False)},
    )
    decisions = decide_all([DLQ, QUEUE], [TOPIC], live)
    plan = {a: plan_creations(decisions, [DLQ, QUEUE], [TOPIC], LOC, a) for a in Action}
    assert [c.target for c in plan[Action.CREATE_QUEUE]] == ["orders-dlq", "orders"]
    assert plan[Action.CREATE_QUEUE][1].detail == {"attributes": {"VisibilityTimeout": "45"}}
    (redrive,) = plan[Action.SET_REDRIVE_POLICY]
    assert redrive.detail == {
        "queue": "orders",
        "RedrivePolicy": {"deadLetterTargetArn": DLQ_ARN, "maxReceiveCount": 4},
    }
    (created,) = plan[Action.CREATE_TOPIC]
    assert created.detail == {"attributes": {"DisplayName": "Events"}}
    (subscribed,) = plan[Action.SUBSCRIBE]
    assert subscribed.detail == {
        "topic": "events",
        "protocol": "sqs",
        "endpoint": QUEUE_ARN,
        "attributes": {"RawMessageDelivery": "true"},
    }


NOW = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
METRIC = MetricSpec(namespace="EventProcessing", name="EventThroughput", max_age_s=600)

# (case, listed, newest datapoint, status)
METRIC_CASES = [
    ("recent datapoint", True, NOW - timedelta(seconds=120), MetricStatus.PUBLISHING),
    ("datapoint at the edge of the window (period start)", True, NOW - timedelta(seconds=650), MetricStatus.PUBLISHING),
    ("too old", True, NOW - timedelta(seconds=1800), MetricStatus.STOPPED),
    ("listed, no datapoint", True, None, MetricStatus.STOPPED),
    ("not listed, no datapoint", False, None, MetricStatus.NEVER_SEEN),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "listed", "newest", "status"), METRIC_CASES, ids=[c[0] for c in METRIC_CASES]
)
def test_decide_metric(case, listed, newest, status) -> None:
    state = MetricState(
        metric=METRIC.describe(), listed=listed, newest=newest, datapoints=1 if newest else 0
    )
    assert decide_metric(METRIC, state, NOW).status is status


# (case, LocalStack's health answer, problems)
HEALTH_CASES = [
    ("all running", {"services": {"sqs": "running", "sns": "running", "cloudwatch": "running"}}, []),
    ("available: started on first use", {"services": {"sqs": "available", "sns": "running", "cloudwatch": "available", "s3": "error"}}, []),
    ("sqs in error", {"services": {"sqs": "error", "sns": "running", "cloudwatch": "running"}}, ["sqs is error"]),
    ("sns disabled, cloudwatch not offered", {"services": {"sqs": "running", "sns": "disabled"}}, ["sns is disabled", "cloudwatch is not offered"]),
    ("not a health answer", {"status": "ok"}, ["the answer has no 'services' map"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "health", "problems"), HEALTH_CASES, ids=[c[0] for c in HEALTH_CASES]
)
def test_health_problems(case, health, problems) -> None:
    assert health_problems(health) == problems


# (name, SQS queue name?, SNS topic name?)
NAME_CASES = [
    ("orders", True, True),
    ("orders-dlq_2", True, True),
    ("orders.fifo", True, True),
    ("a" * 80, True, True),
    ("a" * 81, False, True),
    ("a" * 257, False, False),
    ("", False, False),
    ("orders.dlq", False, False),
    ("../orders", False, False),
    ("orders queue", False, False),
    ("orders\n", False, False),
    ("arn:aws:sqs:us-east-1:1:orders", False, False),
]


@pytest.mark.parametrize(("name", "queue_ok", "topic_ok"), NAME_CASES)
def test_names(name: str, queue_ok: bool, topic_ok: bool) -> None:
    assert (queue_name_problem(name) is None, topic_name_problem(name) is None) == (
        queue_ok,
        topic_ok,
    )


# (key, live, spec, same)
VALUE_CASES = [
    ("VisibilityTimeout", "30", "30", True),
    ("VisibilityTimeout", "30", "45", False),
    ("VisibilityTimeout", None, "45", False),
    ("RawMessageDelivery", "true", "True", True),
    ("Policy", '{"b": 1, "a": [1]}', '{"a":[1],"b":1}', True),
    ("Policy", '{"a": 2}', '{"a": 1}', False),
    ("Policy", "{", '{"a": 1}', False),
]


@pytest.mark.parametrize(("key", "live", "spec", "same"), VALUE_CASES)
def test_same_value(key: str, live: str | None, spec: str, same: bool) -> None:
    assert same_value(key, live, spec) is same


# (case, params, error fragment)
PARAM_CASES = [
    ("DLQ not declared", {"queues": [{"name": "orders", "dead_letter_queue": "orders-dlq"}]}, "not declared: orders-dlq"),
    ("queue declared twice", {"queues": [{"name": "a"}, {"name": "a"}]}, "listed more than once"),
    ("own DLQ", {"queues": [{"name": "a", "dead_letter_queue": "a"}]}, "its own dead-letter queue"),
    ("FIFO with a standard DLQ", {"queues": [{"name": "a.fifo", "dead_letter_queue": "b"}, {"name": "b"}]}, "both FIFO"),
    ("unknown attribute", {"queues": [{"name": "a", "attributes": {"RedrivePolicy": "{}"}}]}, "not SQS queue attributes"),
    ("policy not JSON", {"queues": [{"name": "a", "attributes": {"Policy": "allow all"}}]}, "Policy is not JSON"),
    ("bad protocol", {"topics": [{"name": "t", "subscriptions": [{"protocol": "ftp", "endpoint": "x"}]}]}, "protocol 'ftp'"),
    ("sqs endpoint not a queue name", {"topics": [{"name": "t", "subscriptions": [{"protocol": "sqs", "endpoint": "a/b"}]}]}, "not an SQS queue name"),
    ("queue label with a path", {"queues": [{"name": "a"}], "queue": "../a"}, "not an SQS queue name"),
    ("nothing declared", {}, "nothing declared"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "values", "error"), PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_params_refuse(case: str, values: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        AwsResourcesMissingParams(**values)


def test_params_from_yaml_values() -> None:
    """prefect.yaml writes numbers, booleans and mappings; AWS wants strings; an empty label is
    no queue; a .fifo queue is made FIFO."""
    p = AwsResourcesMissingParams(
        queues=[
            {
                "name": "a.fifo",
                "attributes": {"VisibilityTimeout": 30, "ContentBasedDeduplication": True},
            },
            {"name": "b", "attributes": {"Policy": {"Version": "2012-10-17"}}},
        ],
        queue="None",
    )
    assert p.queues[0].attributes == {
        "VisibilityTimeout": "30",
        "ContentBasedDeduplication": "true",
        "FifoQueue": "true",
    }
    assert json.loads(p.queues[1].attributes["Policy"]) == {"Version": "2012-10-17"}
    assert p.queue is None


def test_block_client_has_the_block_timeouts_retries_and_endpoint() -> None:
    from prefect_aws import AwsCredentials

    from blocks.aws import AwsAccount

    account = AwsAccount(
        credentials=AwsCredentials(
            aws_access_key_id="k", aws_secret_access_key="s", region_name="eu-west-1"
        ),
        endpoint_url="http://localstack:4566",
        timeout_s=4,
        max_attempts=2,
    )
    client = account.get_client("sqs")
    config = client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (4, 4)
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert client.meta.endpoint_url == "http://localstack:4566"
    assert client.meta.region_name == "eu-west-1"
    assert AwsAccount(region="us-east-2").get_client("sns").meta.region_name == "us-east-2"
