"""Slack approvals: request signatures, button clicks, the message, four eyes (pure functions)."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from pydantic import SecretStr

from alert_gateway.slack import ReplayGuard, parse_click, signature_problem
from runbooks.safety import count_approver
from runbooks.slack_approvals import approval_message
from tests.slack_standin import SIGNING_SECRET, sign

SECRET = SecretStr(SIGNING_SECRET)
NOW = 1_700_000_000
BODY = b"payload=%7B%7D"
GOOD = sign(BODY, NOW)

SIGNATURE_CASES = [
    # timestamp, signature, body, now, problem (None: from Slack)
    (str(NOW), GOOD["X-Slack-Signature"], BODY, NOW, None),
    (str(NOW), GOOD["X-Slack-Signature"], BODY, NOW + 300, None),
    (str(NOW), GOOD["X-Slack-Signature"], BODY, NOW - 300, None),
    (str(NOW), GOOD["X-Slack-Signature"], BODY, NOW + 301, "more than 300 s"),
    (str(NOW), GOOD["X-Slack-Signature"], BODY, NOW - 301, "more than 300 s"),
    (str(NOW), GOOD["X-Slack-Signature"], BODY + b"x", NOW, "does not match"),
    (str(NOW + 1), GOOD["X-Slack-Signature"], BODY, NOW, "does not match"),
    (str(NOW), sign(BODY, NOW, "other")["X-Slack-Signature"], BODY, NOW, "does not match"),
    (str(NOW), GOOD["X-Slack-Signature"].upper(), BODY, NOW, "does not match"),
    (str(NOW), "v1=" + GOOD["X-Slack-Signature"][3:], BODY, NOW, "does not match"),
    (None, GOOD["X-Slack-Signature"], BODY, NOW, "missing"),
    (str(NOW), None, BODY, NOW, "missing"),
    ("", GOOD["X-Slack-Signature"], BODY, NOW, "missing"),
    ("soon", GOOD["X-Slack-Signature"], BODY, NOW, "not a number"),
]


@pytest.mark.parametrize(("timestamp", "signature", "body", "now", "problem"), SIGNATURE_CASES)
def test_signature(timestamp, signature, body, now, problem) -> None:
    found = signature_problem(SECRET, timestamp, signature, body, now)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_signature_is_taken_once_within_the_window() -> None:
    guard = ReplayGuard()
    assert guard.seen_before("v0=a", NOW) is False
    assert guard.seen_before("v0=a", NOW + 10) is True
    assert guard.seen_before("v0=b", NOW + 10) is False
    # past twice the window it is forgotten (the timestamp check refuses such a request anyway)
    assert guard.seen_before("v0=a", NOW + 601) is False


RUN = "0b9c1f6e-8d6f-4a57-9d1a-3c1e2f4a5b6c"
PREFIX = ("https://hooks.slack.com/actions/",)


def payload(**overrides) -> bytes:
    body = {
        "type": "block_actions",
        "user": {"id": "U1", "username": "alice"},
        "response_url": "https://hooks.slack.com/actions/T1/1/x",
        "actions": [
            {"action_id": "runbooks_approve", "value": json.dumps({"run": RUN, "pause": "k1"})}
        ],
    } | overrides
    return urlencode({"payload": json.dumps(body)}).encode()


CLICK_CASES = [
    # body, expected (approve, user, response_url kept) or an error fragment, or None (not ours)
    (payload(), (True, "alice (Slack U1)", True)),
    (payload(actions=[{"action_id": "runbooks_reject", "value": json.dumps({"run": RUN, "pause": "k1"})}]),
     (False, "alice (Slack U1)", True)),
    (payload(user={"id": "U2"}), (True, "Slack U2", True)),
    (payload(response_url="https://evil.example/actions/x"), (True, "alice (Slack U1)", False)),
    (payload(response_url="https://hooks.slack.com/actions/../../x"), (True, "alice (Slack U1)", False)),
    (payload(actions=[{"action_id": "runbooks_open"}]), None),
    (payload(type="view_submission"), "not a block_actions"),
    (payload(user={}), "names no Slack user"),
    (payload(actions=[{"action_id": "runbooks_approve", "value": "{}"}]), "not a runbooks approval"),
    (payload(actions=[{"action_id": "runbooks_approve", "value": json.dumps({"run": "../x", "pause": "k"})}]),
     "not a flow run id"),
    (b"payload=%7Bnope", "not JSON"),
    (b"other=1", "no payload"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), CLICK_CASES)
def test_parse_click(body: bytes, expected) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            parse_click(body, PREFIX)
        return
    click = parse_click(body, PREFIX)
    if expected is None:
        assert click is None
        return
    approve, user, kept = expected
    assert click is not None
    assert (click.approve, click.user, click.run_id, click.pause_key) == (approve, user, RUN, "k1")
    assert (click.response_url is not None) is kept


APPROVER_CASES = [
    # approved so far, approver, required, counted, note fragment
    ([], "alice", 1, "alice", "approved by alice"),
    ([], "", 1, "someone", "approved by someone"),
    ([], "alice", 2, "alice", "approved by alice (1 of 2); 1 more approver(s) needed"),
    (["alice"], "bob", 2, "bob", "approved by bob (2 of 2)"),
    (["alice"], "ALICE ", 2, None, "the same person counts once"),
    (["alice"], "  ", 2, None, "without a name does not count"),
    (["alice"], "bob", 3, "bob", "(2 of 3); 1 more"),
]


@pytest.mark.parametrize(("so_far", "approver", "required", "counted", "note"), APPROVER_CASES)
def test_count_approver(so_far, approver, required, counted, note) -> None:
    result = count_approver(so_far, approver, required)
    assert result.counted == counted and note in result.note


MESSAGE = dict(
    runbook="db-connection-pool-exhausted", label="terminate", target="postgres db:5432",
    danger="a <b> & `c`", changes=["terminate_backend pid=1"], run_id=RUN,
    run_url="http://ui/runs/flow-run/x", pause_key="approval-1-terminate",
)  # fmt: skip


def test_the_message_carries_the_run_and_the_question_it_answers() -> None:
    message = approval_message(**MESSAGE)
    (actions,) = [b for b in message["blocks"] if b["type"] == "actions"]
    by_id = {e["action_id"]: e for e in actions["elements"]}
    assert set(by_id) == {"runbooks_approve", "runbooks_reject", "runbooks_open"}
    assert json.loads(by_id["runbooks_approve"]["value"]) == {
        "run": RUN,
        "pause": "approval-1-terminate",
    }
    assert by_id["runbooks_open"]["url"] == "http://ui/runs/flow-run/x"
    text = message["blocks"][1]["text"]["text"]
    # Slack's escapes, and no backtick breaking out of the code spans
    assert "a &lt;b&gt; &amp; 'c'" in text and "`terminate_backend pid=1`" in text
    assert "Four eyes" not in json.dumps(message)


def test_four_eyes_and_long_plans_in_the_message() -> None:
    message = approval_message(
        **MESSAGE | {"changes": [f"c{i}" for i in range(25)]}, required=2, approved_by=["alice"]
    )
    dumped = json.dumps(message)
    assert "Four eyes: 2 different people must approve (approved so far: alice)" in dumped
    assert "and 5 more (see the run)" in dumped
    huge = approval_message(**MESSAGE | {"danger": "x" * 5000})
    assert all(len(b["text"]["text"]) <= 3000 for b in huge["blocks"] if b["type"] == "section")
