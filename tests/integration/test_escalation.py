"""Escalation reaches real receivers: a local HTTP server standing in for Slack (through Prefect's
Custom Webhook notification block, Slack's incoming-webhook JSON shape), a moto SNS topic read back
through a subscribed SQS queue, and a generic JSON webhook."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError
from prefect import flow
from prefect.blocks.notifications import SlackWebhook
from prefect.blocks.system import Secret
from prefect_aws import AwsCredentials

from blocks.escalation import EscalationPolicy
from runbooks.escalation import (
    SNS_SUBJECT_MAX,
    Delivery,
    EscalationKind,
    EscalationMessage,
    send_escalation,
)
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.receivers import HttpReceiver, save_slack_standin
from tests.servers import free_port

pytestmark = pytest.mark.integration

TOKEN = "tok-" + uuid.uuid4().hex  # never to be seen in logs or deliveries


@pytest.fixture
def webhook() -> Iterator[HttpReceiver]:
    with HttpReceiver() as receiver:
        yield receiver


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def aws_credentials(moto: MotoServer) -> AwsCredentials:
    return AwsCredentials(
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=moto.region,
    )


def message(**kw) -> EscalationMessage:
    fields = {
        "runbook": "kafka-cluster-down",
        "title": "Kafka cluster down",
        "severity": "P1",
        "kind": EscalationKind.BUDGET_SPENT,
        "reason": "restart budget (2 per hour) spent; broker still down",
        "target": "kafka-broker-2",
        "tried": ["restart pod kafka-broker-2", "restart pod kafka-broker-2 (again)"],
        "trigger": "alert KafkaBrokerDown (firing, fingerprint abc123)",
    }
    return EscalationMessage(**{**fields, **kw})


def assert_carries_everything(text: str, msg: EscalationMessage) -> None:
    for fragment in [msg.runbook, msg.target, *msg.tried, msg.trigger, msg.reason, msg.run_url]:
        assert fragment and fragment in text, f"{fragment!r} missing from\n{text}"


def test_all_three_channels_deliver(
    moto: MotoServer, slack: HttpReceiver, webhook: HttpReceiver
) -> None:
    topic_arn, queue_url = moto.topic_with_queue()
    policy_name = unique("oncall")
    EscalationPolicy(
        notification_blocks=[save_slack_standin(slack)],
        sns_topic_arn=topic_arn,
        aws_endpoint_url=moto.endpoint_url,
        aws_credentials=aws_credentials(moto),
        webhook_url=f"{webhook.url}/escalations",
        webhook_token=TOKEN,
    ).save(policy_name)
    # as a runbook does it: the saved policy (nested AWS credentials block included), in a flow run
    policy = EscalationPolicy.load(policy_name)

    @flow(name="escalating-runbook")
    def escalating_runbook() -> tuple[list[Delivery], str]:
        from prefect.runtime import flow_run

        return send_escalation(message(), policy), flow_run.id

    deliveries, flow_run_id = escalating_runbook()

    assert [d.channel for d in deliveries] == [
        f"notification:{policy.notification_blocks[0]}",
        f"sns:{topic_arn}",
        f"webhook:{webhook.url}",
    ]
    assert all(d.ok for d in deliveries), deliveries
    # the run link was filled in from the flow run the escalation was sent from
    run_url_end = f"/runs/flow-run/{flow_run_id}"
    sent = message(flow_run_id=str(flow_run_id), run_url=run_url_end)

    # Slack stand-in: Slack's incoming-webhook JSON, subject as the headline
    [slack_req] = slack.wait_for(1)
    assert slack_req.method == "POST" and slack_req.path == "/services/T000/B000/XXXX"
    slack_text = slack_req.json()["text"]
    assert slack_text.startswith(f"*{sent.subject()}*\n")
    assert "\nRun: http" in slack_text and run_url_end in slack_text
    assert_carries_everything(slack_text, sent)

    # SNS, read back through the subscribed queue
    [note] = moto.read_sns_notifications(queue_url)
    assert note["Subject"] == sent.subject()
    assert note["Message"] == slack_text.split("\n", 1)[1]  # the same body everywhere
    assert_carries_everything(note["Message"], sent)
    assert note["MessageAttributes"]["runbook"] == {"Type": "String", "Value": "kafka-cluster-down"}
    assert note["MessageAttributes"]["kind"] == {"Type": "String", "Value": "budget_spent"}
    assert note["MessageAttributes"]["severity"] == {"Type": "String", "Value": "P1"}

    # generic webhook: structured JSON, Bearer token
    [hook_req] = webhook.wait_for(1)
    assert hook_req.path == "/escalations"
    assert hook_req.header("authorization") == f"Bearer {TOKEN}"
    assert hook_req.header("content-type") == "application/json"
    body = hook_req.json()
    assert body["run_url"].startswith("http") and body["run_url"].endswith(run_url_end)
    assert body["flow_run_id"] == str(flow_run_id)
    assert EscalationMessage.model_validate(body) == message(
        flow_run_id=str(flow_run_id), run_url=body["run_url"]
    )


def test_a_failing_channel_does_not_stop_the_others(
    moto: MotoServer, slack: HttpReceiver, webhook: HttpReceiver
) -> None:
    topic_arn, queue_url = moto.topic_with_queue()
    slack.statuses = [500]  # first attempt fails, the retry gets 200
    not_a_notifier = unique("not-a-notifier")
    Secret(value="x").save(not_a_notifier)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    policy = EscalationPolicy(
        notification_blocks=[
            save_slack_standin(slack),
            f"custom-webhook/{unique('missing')}",
            f"secret/{not_a_notifier}",
        ],
        sns_topic_arn=topic_arn,
        aws_endpoint_url=moto.endpoint_url,
        aws_credentials=aws_credentials(moto),
        webhook_url=dead,
        webhook_token=TOKEN,
        retry_backoff_s=0.05,
    )
    msg = message(run_url="https://prefect.example/runs/flow-run/1")

    started = time.monotonic()
    deliveries = send_escalation(msg, policy)
    elapsed = time.monotonic() - started

    assert [d.ok for d in deliveries] == [True, False, False, True, False], deliveries
    slack_ok, missing, not_notifier, sns_ok, dead_hook = deliveries
    assert "after 2 attempts" in slack_ok.detail
    assert [r.status for r in slack.wait_for(2)] == [500, 200]
    assert_carries_everything(slack.requests[1].json()["text"], msg)
    assert "ObjectNotFound" in missing.detail or "Unable to find block" in missing.detail
    assert "TypeError" in not_notifier.detail and "not a notification block" in not_notifier.detail
    assert sns_ok.detail.startswith("published MessageId=")
    assert_carries_everything(moto.read_sns_notifications(queue_url)[0]["Message"], msg)
    assert dead_hook.channel == f"webhook:http://127.0.0.1:{dead.split(':')[2].split('/')[0]}"
    assert dead_hook.detail.startswith("ConnectError")
    assert elapsed < 30  # channels run side by side; nothing waited on a full timeout


@pytest.mark.parametrize(
    ("statuses", "requests", "ok"),
    [
        ([500], 2, True),
        ([502, 503], 3, True),
        ([429], 2, True),
        ([503, 503, 503], 3, False),  # attempts spent
        ([400], 1, False),  # not transient: not retried
        ([401], 1, False),
    ],
)
def test_webhook_retries_only_transient_errors(
    webhook: HttpReceiver, statuses: list[int], requests: int, ok: bool
) -> None:
    webhook.statuses = list(statuses)
    policy = EscalationPolicy(
        webhook_url=f"{webhook.url}/hook", webhook_token=TOKEN, retry_backoff_s=0.02, attempts=3
    )
    [delivery] = send_escalation(message(), policy)
    assert delivery.ok is ok, delivery
    time.sleep(0.2)  # a wrong extra attempt would have arrived by now
    assert len(webhook.requests) == requests
    # every attempt is the same request: same idempotency key, same body, token each time
    assert len({r.header("idempotency-key") for r in webhook.requests}) == 1
    assert len({r.body for r in webhook.requests}) == 1
    assert all(r.header("authorization") == f"Bearer {TOKEN}" for r in webhook.requests)
    if not ok:
        assert delivery.detail == f"HTTP {webhook.requests[-1].status} from {webhook.url}"


def test_secrets_never_reach_logs_or_deliveries(
    webhook: HttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.default_status = 503
    query_secret = "q-" + uuid.uuid4().hex
    dead = f"http://127.0.0.1:{free_port()}/hook?key={query_secret}"
    caplog.set_level(logging.DEBUG)
    deliveries = [
        *send_escalation(
            message(),
            EscalationPolicy(
                webhook_url=f"{webhook.url}/hook?key={query_secret}",
                webhook_token=TOKEN,
                retry_backoff_s=0.02,
            ),
        ),
        *send_escalation(
            message(), EscalationPolicy(webhook_url=dead, webhook_token=TOKEN, retry_backoff_s=0.02)
        ),
    ]
    assert [d.ok for d in deliveries] == [False, False]
    assert webhook.requests and all(
        r.header("authorization") == f"Bearer {TOKEN}" for r in webhook.requests
    )
    ours = [r for r in caplog.records if r.name.startswith("runbooks")]
    assert any("retrying" in r.getMessage() for r in ours), "retries are logged"
    assert any("failed" in r.getMessage() and r.levelno >= logging.ERROR for r in ours)
    assert TOKEN not in caplog.text  # every logger, httpx/httpcore debug included
    for record in ours:
        assert query_secret not in record.getMessage()
    for delivery in deliveries:
        assert TOKEN not in delivery.model_dump_json()
        assert query_secret not in delivery.model_dump_json()


def test_sns_subject_is_cut_to_what_sns_accepts(moto: MotoServer) -> None:
    topic_arn, queue_url = moto.topic_with_queue()
    msg = message(target="namespace/streaming/statefulset/" + "kafka-broker-" * 10 + "2 — ünïcode")
    assert len(msg.subject()) > SNS_SUBJECT_MAX
    with pytest.raises(ClientError, match="Subject"):  # what an uncut subject gets
        moto.client("sns").publish(TopicArn=topic_arn, Subject=msg.subject(), Message="x")

    policy = EscalationPolicy(
        sns_topic_arn=topic_arn,
        aws_endpoint_url=moto.endpoint_url,
        aws_credentials=aws_credentials(moto),
    )
    [delivery] = send_escalation(msg, policy)
    assert delivery.ok, delivery
    [note] = moto.read_sns_notifications(queue_url)
    assert len(note["Subject"]) <= SNS_SUBJECT_MAX
    assert note["Subject"].startswith(
        "[P1] kafka-cluster-down escalated: budget spent on namespace/"
    )
    assert note["Subject"].endswith("...")
    assert msg.target in note["Message"]  # the full target is in the body


def test_sns_failure_is_a_failed_delivery(moto: MotoServer) -> None:
    policy = EscalationPolicy(
        sns_topic_arn=f"arn:aws:sns:{moto.region}:123456789012:{unique('absent')}",
        aws_endpoint_url=moto.endpoint_url,
        aws_credentials=aws_credentials(moto),
    )
    [delivery] = send_escalation(message(), policy)
    assert not delivery.ok
    assert "NotFound" in delivery.detail
    assert SECRET_ACCESS_KEY not in delivery.detail


def test_saved_slack_webhook_block_is_accepted_by_the_policy() -> None:
    """Prefect's SlackWebhook (apprise) only posts to hooks.slack.com: loaded, not sent."""
    name = unique("oncall")
    url = "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
    SlackWebhook(url=url).save(name)
    policy_name = unique("policy")
    EscalationPolicy(notification_blocks=[f"slack-webhook/{name}"]).save(policy_name)

    policy = EscalationPolicy.load(policy_name)
    assert policy.has_channels()
    block = policy.load_notification_block(policy.notification_blocks[0])
    assert isinstance(block, SlackWebhook)
    assert block.url.get_secret_value() == url
    assert url not in repr(policy) and url not in repr(block)


def test_no_policy_or_no_channels_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runbooks.escalation")
    assert send_escalation(message(), None) == []
    assert send_escalation(message(), EscalationPolicy()) == []
    warnings = [r for r in caplog.records if r.name == "runbooks.escalation"]
    assert len(warnings) == 2
    assert all("no escalation policy channels" in r.getMessage() for r in warnings)


def test_a_dry_run_message_never_reaches_the_paging_channels(
    moto: MotoServer, slack: HttpReceiver, webhook: HttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    topic_arn, queue_url = moto.topic_with_queue()
    with HttpReceiver() as observe:
        policy = EscalationPolicy(
            notification_blocks=[save_slack_standin(slack)],
            observe_notification_blocks=[save_slack_standin(observe)],
            sns_topic_arn=topic_arn,
            aws_endpoint_url=moto.endpoint_url,
            aws_credentials=aws_credentials(moto),
            webhook_url=f"{webhook.url}/escalations",
        )
        finding = message(dry_run=True, run_url="https://prefect.example/runs/flow-run/1")

        [delivery] = send_escalation(finding, policy)

        assert (
            delivery.ok and delivery.channel == f"observe:{policy.observe_notification_blocks[0]}"
        )
        [note] = observe.wait_for(1)
        text = note.json()["text"]
        assert text.startswith(f"*{finding.subject()}*") and "[dry-run]" in text
        assert "Mode: dry-run (nothing was changed, nobody was paged)" in text
    time.sleep(1)  # a page would have arrived by now
    assert slack.requests == [] and webhook.requests == []
    with pytest.raises(TimeoutError):
        moto.read_sns_notifications(queue_url, timeout_s=2)

    # no observe channel: the finding goes nowhere, and the paging channels still hear nothing
    caplog.set_level(logging.WARNING, logger="runbooks.escalation")
    policy.observe_notification_blocks = []
    assert send_escalation(finding, policy) == []
    assert "no escalation policy channels configured for dry-run findings" in caplog.text
    time.sleep(0.5)
    assert slack.requests == [] and webhook.requests == []
