"""The aws-resources-missing runbook against a real moto server (SQS, SNS, CloudWatch): a deleted
queue is re-created with its redrive policy and a re-run changes nothing; dry-run creates nothing;
a missing subscription is re-created and delivers; drift is reported, not changed; a stopped
metric and an unreachable endpoint escalate with nothing changed."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect_aws import AwsCredentials

from blocks.aws import AwsAccount
from flows.aws.aws_resources_missing import (
    AwsResourcesMissingParams,
    AwsResourcesMissingSummary,
    aws_resources_missing,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.conftest import read_actions_table, read_incident_report, runs_of, unique
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.servers import free_port

pytestmark = pytest.mark.integration


class Account:
    """Uniquely named resources in the session's moto, and a saved AWS block pointing at it."""

    def __init__(self, moto: MotoServer, endpoint_url: str | None = None):
        self.moto = moto
        self.sqs, self.sns, self.cw = (
            moto.client("sqs"),
            moto.client("sns"),
            moto.client("cloudwatch"),
        )
        self.block = unique("aws")
        AwsAccount(
            credentials=AwsCredentials(
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
                region_name=moto.region,
            ),
            endpoint_url=endpoint_url or moto.endpoint_url,
            timeout_s=2,
            max_attempts=2,
        ).save(self.block, overwrite=True)
        self.queue, self.dlq, self.topic = unique("orders"), unique("orders-dlq"), unique("events")
        self.namespace = unique("EventProcessing")

    def specs(self, **overrides: Any) -> dict[str, Any]:
        """A queue with a DLQ (redrive after 4 receives), and a topic feeding the queue."""
        return {
            "queues": [
                {"name": self.dlq, "attributes": {"MessageRetentionPeriod": 1209600}},
                {
                    "name": self.queue,
                    "attributes": {"VisibilityTimeout": 45},
                    "dead_letter_queue": self.dlq,
                    "max_receive_count": 4,
                },
            ],
            "topics": [
                {
                    "name": self.topic,
                    "attributes": {"DisplayName": "Match events"},
                    "subscriptions": [
                        {
                            "protocol": "sqs",
                            "endpoint": self.queue,
                            "attributes": {"RawMessageDelivery": True},
                        }
                    ],
                }
            ],
            **overrides,
        }

    def params(self, **overrides: Any) -> AwsResourcesMissingParams:
        values = {
            "aws_block": self.block,
            **self.specs(),
            # one moto account for every test: its remediation budget would run out
            "safety": SafetyParams(escalation_block=None, budget_max_actions=1000),
            "verify_timeout_s": 10,
        }
        return AwsResourcesMissingParams(**{**values, **overrides})

    def run(self, **overrides: Any) -> tuple[Any, AwsResourcesMissingSummary | None, str]:
        state = aws_resources_missing(params=self.params(**overrides), return_state=True)
        summary = state.result(raise_on_failure=False)
        report = read_incident_report(state.state_details.flow_run_id)
        return state, summary if isinstance(summary, AwsResourcesMissingSummary) else None, report

    # what moto has

    def queue_url(self, name: str) -> str | None:
        try:
            return self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except self.sqs.exceptions.QueueDoesNotExist:
            return None

    def attributes(self, name: str) -> dict[str, str]:
        url = self.queue_url(name)
        assert url, f"queue {name} missing"
        return self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]

    def arn(self, name: str) -> str:
        return self.attributes(name)["QueueArn"]

    def topic_arn(self) -> str:
        return f"arn:aws:sns:{self.moto.region}:123456789012:{self.topic}"

    def subscriptions(self) -> list[dict[str, str]]:
        return self.sns.list_subscriptions_by_topic(TopicArn=self.topic_arn())["Subscriptions"]

    def snapshot(self) -> dict[str, Any]:
        """Every resource of this test as moto has it (None: missing)."""
        queues = {}
        for name in (self.queue, self.dlq):
            url = self.queue_url(name)
            queues[name] = None
            if url:
                attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])[
                    "Attributes"
                ]
                queues[name] = {k: v for k, v in attrs.items() if not k.startswith("Approximate")}
        topics = {t["TopicArn"] for t in self.sns.list_topics()["Topics"]}
        subs = (
            sorted((s["Protocol"], s["Endpoint"]) for s in self.subscriptions())
            if self.topic_arn() in topics
            else None
        )
        return {"queues": queues, "topic": self.topic_arn() in topics, "subscriptions": subs}

    def create_all(self) -> None:
        """Everything as declared, the way a setup script would."""
        state, summary, report = self.run()
        assert summary and summary.outcome is Outcome.RESOLVED, report


@pytest.fixture
def account(moto: MotoServer) -> Account:
    return Account(moto)


def test_deleted_queue_is_recreated_with_its_redrive_policy_and_a_rerun_changes_nothing(
    account: Account,
) -> None:
    account.create_all()
    account.sqs.delete_queue(QueueUrl=account.queue_url(account.queue))
    assert account.queue_url(account.queue) is None

    state, summary, report = account.run()

    assert summary and summary.outcome is Outcome.RESOLVED, report
    attrs = account.attributes(account.queue)
    policy = json.loads(attrs["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == account.arn(account.dlq)
    assert int(policy["maxReceiveCount"]) == 4
    assert attrs["VisibilityTimeout"] == "45"
    missing = {(d.kind.value, d.name) for d in summary.decisions if d.status.value == "missing"}
    assert missing == {
        ("SQS queue", account.queue),
        ("redrive policy", f"{account.queue} -> {account.dlq}"),
    }
    rows = read_actions_table(state.state_details.flow_run_id)
    assert {(r["action"], r["status"]) for r in rows} == {
        ("create_queue", "applied"),
        ("set_redrive_policy", "applied"),
    }
    assert "declared resources read back" in report

    before = account.snapshot()
    again, summary, report = account.run()
    assert summary and summary.outcome is Outcome.NO_ACTION_NEEDED, report
    assert all(d.status.value == "ok" for d in summary.decisions)
    assert read_actions_table(again.state_details.flow_run_id, timeout_s=2) == []
    assert account.snapshot() == before


def test_everything_missing_is_created_in_order_from_nothing(account: Account) -> None:
    """The DLQ exists before the queue's redrive policy names it; the subscription names the
    queue by its ARN, computed from the account."""
    state, summary, report = account.run()

    assert summary and summary.outcome is Outcome.RESOLVED, report
    snap = account.snapshot()
    assert snap["topic"] and snap["subscriptions"] == [("sqs", account.arn(account.queue))]
    policy = json.loads(account.attributes(account.queue)["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == account.arn(account.dlq)
    assert account.attributes(account.dlq)["MessageRetentionPeriod"] == "1209600"


def test_dry_run_creates_nothing(account: Account) -> None:
    account.create_all()
    account.sqs.delete_queue(QueueUrl=account.queue_url(account.queue))
    account.sns.unsubscribe(SubscriptionArn=account.subscriptions()[0]["SubscriptionArn"])
    before = account.snapshot()

    state, summary, report = account.run(dry_run=True)

    assert summary and summary.outcome is Outcome.PLANNED, report
    assert account.snapshot() == before
    assert before["queues"][account.queue] is None and before["subscriptions"] == []
    planned = [line for line in report.splitlines() if "| planned (dry-run) |" in line]
    assert sorted(line.split(" | ")[1] for line in planned) == [
        "create_queue",
        "set_redrive_policy",
        "subscribe",
    ]


def test_missing_subscription_is_recreated_and_delivers(account: Account) -> None:
    account.create_all()
    account.sns.unsubscribe(SubscriptionArn=account.subscriptions()[0]["SubscriptionArn"])
    assert account.subscriptions() == []

    state, summary, report = account.run()

    assert summary and summary.outcome is Outcome.RESOLVED, report
    (sub,) = account.subscriptions()
    assert sub["Endpoint"] == account.arn(account.queue)
    raw = account.sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])
    assert raw["Attributes"]["RawMessageDelivery"] == "true"
    account.sns.publish(TopicArn=account.topic_arn(), Message="goal 87'")
    url = account.queue_url(account.queue)
    bodies: list[str] = []
    deadline = time.monotonic() + 10
    while not bodies and time.monotonic() < deadline:
        got = account.sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", [])
        bodies += [m["Body"] for m in got]
    assert bodies == ["goal 87'"]


def test_drifted_attribute_is_reported_not_changed(account: Account) -> None:
    account.create_all()
    url = account.queue_url(account.queue)
    account.sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "5"})
    before = account.snapshot()

    state, summary, report = account.run()

    assert state.is_failed() and summary is None
    assert "ESCALATED" in report and "VisibilityTimeout is '5', spec '45'" in report
    assert account.snapshot() == before
    assert account.attributes(account.queue)["VisibilityTimeout"] == "5"


def test_stopped_metric_escalates_with_evidence(account: Account) -> None:
    account.create_all()
    now = datetime.now(UTC)
    dims = [{"Name": "Service", "Value": "event-processor"}]
    account.cw.put_metric_data(
        Namespace=account.namespace,
        MetricData=[
            {"MetricName": "EventThroughput", "Dimensions": dims, "Value": 120, "Timestamp": now},
            # published half an hour ago, then nothing
            {
                "MetricName": "FailedEvents",
                "Dimensions": dims,
                "Value": 1,
                "Timestamp": now - timedelta(minutes=30),
            },
        ],
    )
    metrics = [
        {
            "namespace": account.namespace,
            "name": name,
            "dimensions": {"Service": "event-processor"},
            "max_age_s": 600,
        }
        for name in ("EventThroughput", "FailedEvents")
    ]
    before = account.snapshot()

    state, summary, report = account.run(metrics=metrics)

    assert state.is_failed() and summary is None
    assert f"metric {account.namespace}/FailedEvents{{Service=event-processor}} stopped" in report
    assert "CloudWatch lists the metric" in report
    assert f"{account.namespace}/EventThroughput{{Service=event-processor}}: OK" in report or (
        "1 sample(s) in the last 600s" in report
    )
    assert "CloudWatch metrics" in report  # the evidence
    assert account.snapshot() == before


def test_unreachable_endpoint_escalates_and_changes_nothing(
    account: Account, moto: MotoServer
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    down = Account(moto, endpoint_url=closed)
    down.queue, down.dlq, down.topic = account.queue, account.dlq, account.topic
    AwsAccount.load(down.block).model_copy(
        update={"health_url": f"{closed}/_localstack/health"}
    ).save(down.block, overwrite=True)
    before = account.snapshot()

    started = time.monotonic()
    state, summary, report = down.run()

    assert state.is_failed() and summary is None
    assert "does not answer" in report and "nothing was changed" in report
    assert "LocalStack health" in report
    assert account.snapshot() == before and before["queues"][account.queue] is None
    assert time.monotonic() - started < 60


def test_alert_naming_an_undeclared_queue_escalates(account: Account) -> None:
    """Its attributes and dead-letter queue are unknown: the runbook cannot re-create it."""
    account.create_all()
    stray = unique("stray")

    state, summary, report = account.run(queue=stray)

    assert state.is_failed() and summary is None
    assert f"the alert names queue {stray}, which is not declared" in report
    assert account.queue_url(stray) is None


def test_an_unreachable_localstack_is_handed_to_service_not_responding(
    account: Account, moto: MotoServer, deployment_ids: dict[str, str]
) -> None:
    """Where LocalStack runs is known: the endpoint that does not answer is restarted by
    service-not-responding (its own run, dry-run carried); nothing is created meanwhile."""
    down = Account(moto, endpoint_url=f"http://127.0.0.1:{free_port()}")
    down.queue, down.dlq, down.topic = account.queue, account.dlq, account.topic
    before = account.snapshot()
    seen = {r["id"] for r in runs_of(deployment_ids["service-not-responding"])}

    state, summary, report = down.run(
        dry_run=True, platform="docker/local", service="localstack"
    )

    assert state.is_completed() and summary is not None
    assert summary.outcome is Outcome.HANDED_OFF
    [handed] = [r for r in runs_of(deployment_ids["service-not-responding"]) if r["id"] not in seen]
    params = handed["parameters"]["params"]
    assert (params["platform"], params["service"], params["dry_run"]) == ("docker/local", "localstack", True)
    assert handed["id"] in report and "handed to service-not-responding" in report
    assert account.snapshot() == before
