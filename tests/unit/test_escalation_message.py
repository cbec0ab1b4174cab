"""Escalation message formatting and the pure decisions of sending it (data tables)."""

from __future__ import annotations

import math
import random

import httpx
import pytest
from pydantic import ValidationError

from blocks.escalation import EscalationPolicy
from runbooks.backoff import backoff_delay
from runbooks.escalation import (
    SNS_SUBJECT_MAX,
    EscalationKind,
    EscalationMessage,
    is_transient_http_error,
    redact_url,
    sns_body,
    sns_subject,
)


def msg(**kw) -> EscalationMessage:
    base = {
        "runbook": "kafka-cluster-down",
        "title": "Kafka cluster down",
        "severity": "P1",
        "kind": EscalationKind.BUDGET_SPENT,
        "reason": "restart budget of 2 per hour spent",
        "target": "broker-2",
    }
    return EscalationMessage(**{**base, **kw})


@pytest.mark.parametrize(
    ("overrides", "subject"),
    [
        ({}, "[P1] kafka-cluster-down escalated: budget spent on broker-2"),
        ({"kind": "failed"}, "[P1] kafka-cluster-down failed on broker-2"),
        (
            {"kind": "verification_failed"},
            "[P1] kafka-cluster-down failed verification on broker-2",
        ),
        ({"kind": "escalated"}, "[P1] kafka-cluster-down escalated on broker-2"),
        ({"kind": "rejected"}, "[P1] kafka-cluster-down escalated: action rejected on broker-2"),
        (
            {"kind": "approval_timeout"},
            "[P1] kafka-cluster-down escalated: approval timed out on broker-2",
        ),
        ({"target": None}, "[P1] kafka-cluster-down escalated: budget spent"),
        ({"target": "  "}, "[P1] kafka-cluster-down escalated: budget spent"),
        ({"severity": ""}, "kafka-cluster-down escalated: budget spent on broker-2"),
        (
            {"target": "ns/app\nline two"},
            "[P1] kafka-cluster-down escalated: budget spent on ns/app line two",
        ),
        (
            {"severity": "P2", "runbook": "db-pool"},
            "[P2] db-pool escalated: budget spent on broker-2",
        ),
        # what a dry-run found reads as what would have happened, never as a page
        (
            {"dry_run": True},
            "[P1] [dry-run] kafka-cluster-down would have escalated: budget spent on broker-2",
        ),
        (
            {"dry_run": True, "kind": "verification_failed"},
            "[P1] [dry-run] kafka-cluster-down would have failed verification on broker-2",
        ),
        (
            {"dry_run": True, "kind": "failed"},
            "[P1] [dry-run] kafka-cluster-down failed on broker-2",
        ),
    ],
)
def test_subject(overrides: dict, subject: str) -> None:
    line = msg(**overrides).subject()
    assert line == subject
    assert "\n" not in line


@pytest.mark.parametrize(
    ("target", "max_length", "expected"),
    [
        ("b", 100, "[P1] kafka-cluster-down escalated: budget spent on b"),
        ("b" * 100, 60, "[P1] kafka-cluster-down escalated: budget spent on bbbbbb..."),
        ("b" * 100, 3, "[P1"),
        (None, 46, "[P1] kafka-cluster-down escalated: budget s..."),
        (None, 46, "[P1] kafka-cluster-down escalated: budget s..."),
    ],
)
def test_subject_max_length(target: str | None, max_length: int, expected: str) -> None:
    line = msg(target=target).subject(max_length=max_length)
    assert line == expected
    assert len(line) <= max_length


@pytest.mark.parametrize(
    ("overrides", "expected_lines", "absent"),
    [
        (
            {
                "tried": ["restart broker-2", "reassign partitions (dry-run)"],
                "trigger": "alert KafkaBrokerDown (firing, fingerprint abc)",
                "run_url": "http://ui/runs/flow-run/1",
                "flow_run_id": "1",
            },
            [
                "[P1] kafka-cluster-down escalated: budget spent on broker-2",
                "Runbook: Kafka cluster down (kafka-cluster-down)",
                "Severity: P1",
                "Outcome: budget_spent",
                "Target: broker-2",
                "Trigger: alert KafkaBrokerDown (firing, fingerprint abc)",
                "Reason: restart budget of 2 per hour spent",
                "Tried:",
                "- restart broker-2",
                "- reassign partitions (dry-run)",
                "Run: http://ui/runs/flow-run/1",
            ],
            ["Tried: nothing", "no Prefect UI URL", "Mode:"],
        ),
        ({"dry_run": True}, ["Mode: dry-run (nothing was changed, nobody was paged)"], []),
        (
            {"target": None, "flow_run_id": "abc"},
            [
                "Target: -",
                "Trigger: -",
                "Tried: nothing",
                "Run: flow run abc (no Prefect UI URL configured)",
            ],
            ["Tried:\n"],
        ),
        ({"title": ""}, ["Runbook: kafka-cluster-down", "Run: -"], ["()"]),
        ({"tried": ["multi\nline   action"]}, ["- multi line action"], []),
    ],
)
def test_text(overrides: dict, expected_lines: list[str], absent: list[str]) -> None:
    text = msg(**overrides).text()
    lines = text.splitlines()
    for line in expected_lines:
        assert line in lines, f"{line!r} not in\n{text}"
    for fragment in absent:
        assert fragment not in text


@pytest.mark.parametrize(
    ("subject_target", "expected"),
    [
        ("broker-2", "[P1] kafka-cluster-down escalated: budget spent on broker-2"),
        ("brökér-ü", "[P1] kafka-cluster-down escalated: budget spent on broker-u"),
        ("tab\there", "[P1] kafka-cluster-down escalated: budget spent on tab here"),
        ("日本", "[P1] kafka-cluster-down escalated: budget spent on"),
        ("x" * 200, "[P1] kafka-cluster-down escalated: budget spent on " + "x" * 46 + "..."),
    ],
)
def test_sns_subject(subject_target: str, expected: str) -> None:
    subject = sns_subject(msg(target=subject_target))
    assert subject == expected
    assert len(subject) <= SNS_SUBJECT_MAX
    assert subject.isascii() and subject.isprintable()


def test_sns_body_is_cut_to_the_sns_limit() -> None:
    assert sns_body(msg()) == msg().text()
    huge = msg(tried=["ä" * 1000] * 300)
    body = sns_body(huge)
    assert len(body.encode()) <= 250_000
    assert body.endswith("... (truncated)")


def _status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://hook.example/x?token=t0p")
    return httpx.HTTPStatusError(
        "x", request=request, response=httpx.Response(status, request=request)
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ConnectTimeout("slow"), True),
        (httpx.ReadTimeout("slow"), True),
        (httpx.ReadError("reset"), True),
        (httpx.RemoteProtocolError("closed"), True),
        (_status_error(500), True),
        (_status_error(503), True),
        (_status_error(429), True),
        (_status_error(400), False),
        (_status_error(401), False),
        (_status_error(404), False),
        (httpx.UnsupportedProtocol("ftp"), False),
        (ValueError("bad block"), False),
    ],
    ids=lambda v: (
        v
        if isinstance(v, bool)
        else type(v).__name__ + str(getattr(getattr(v, "response", None), "status_code", ""))
    ),
)
def test_transient_errors(exc: BaseException, transient: bool) -> None:
    assert is_transient_http_error(exc) is transient


@pytest.mark.parametrize(
    ("attempt", "base", "low", "high"),
    [
        (1, 1.0, 0.5, 1.0),
        (2, 1.0, 1.0, 2.0),
        (3, 1.0, 2.0, 4.0),
        (2, 0.1, 0.1, 0.2),
        (4, 0.0, 0.0, 0.0),
    ],
)
def test_backoff_is_exponential_with_jitter(
    attempt: int, base: float, low: float, high: float
) -> None:
    rng = random.Random(7)
    delays = [backoff_delay(attempt, base, math.inf, rng.random()) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    if base:
        assert len(set(delays)) > 100, "jittered"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://hooks.slack.com/services/T0/B0/XYZ", "https://hooks.slack.com"),
        ("http://127.0.0.1:8080/hook?token=abc", "http://127.0.0.1:8080"),
        ("https://user:pw@example.com/p", "https://example.com"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"notification_blocks": ["oncall"]}, "block-type-slug"),
        ({"notification_blocks": ["slack-webhook/"]}, "block-type-slug"),
        ({"notification_blocks": ["Slack Webhook/oncall"]}, "block-type-slug"),
        ({"observe_notification_blocks": ["oncall"]}, "block-type-slug"),
        ({"sns_topic_arn": "escalations"}, "SNS topic ARN"),
        ({"webhook_url": "hook.example/x"}, "http"),
        ({"aws_endpoint_url": "localhost:5000"}, "http"),
        ({"attempts": 0}, "greater than or equal"),
        ({"timeout_s": 0}, "greater than"),
    ],
)
def test_policy_rejects_bad_config(fields: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        EscalationPolicy(**fields)


@pytest.mark.parametrize(
    ("fields", "channels", "region"),
    [
        ({}, False, None),
        ({"notification_blocks": ["slack-webhook/oncall"]}, True, None),
        ({"sns_topic_arn": "arn:aws:sns:eu-west-1:123456789012:esc"}, True, "eu-west-1"),
        (
            {"sns_topic_arn": "arn:aws:sns:eu-west-1:123456789012:esc", "aws_region": "us-east-2"},
            True,
            "us-east-2",
        ),
        ({"webhook_url": "https://hook.example/x"}, True, None),
    ],
)
def test_policy_channels(fields: dict, channels: bool, region: str | None) -> None:
    policy = EscalationPolicy(**fields)
    assert policy.has_channels() is channels
    assert policy.sns_region() == region


def test_webhook_token_is_secret() -> None:
    policy = EscalationPolicy(webhook_url="https://hook.example/x", webhook_token="t0p-s3cret")
    assert "t0p-s3cret" not in repr(policy)
    assert "t0p-s3cret" not in str(policy.model_dump())
