"""Issue #17 part 2: approvals answered from Slack, and four eyes.

Real components: the alert gateway served by uvicorn (its /slack/interactions endpoint checks
the signature and resumes the run through the Prefect test server's REST API), a real PostgreSQL
whose sessions db-connection-pool-exhausted terminates (one inside a transaction: the step needs
approval), and a Slack stand-in that receives the Block Kit messages and message updates and
clicks buttons the way Slack does (signed form posts), including wrongly signed, stale and
replayed requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prefect.blocks.notifications import SlackWebhook
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from alert_gateway import GatewaySettings
from flows.postgres.db_connection_pool_exhausted import db_connection_pool_exhausted
from runbooks.report import Outcome
from tests.conftest import unique
from tests.gateway_proc import TOKEN, serving
from tests.integration.test_safety import Sessions
from tests.integration.test_safety import params as pool_params
from tests.pg_env import Env, env  # noqa: F401 - env: a fixture
from tests.receivers import HttpReceiver
from tests.slack_standin import SIGNING_SECRET, buttons, click_body, post_click

pytestmark = pytest.mark.integration

APPROVE, REJECT = "runbooks_approve", "runbooks_reject"


@pytest.fixture
def sessions(env: Env) -> Iterator[Sessions]:
    s = Sessions(env)
    yield s
    s.close()


@pytest.fixture
def slack_channel() -> Iterator[tuple[HttpReceiver, str]]:
    """The incoming webhook the approval requests go to, saved as Prefect's Slack Webhook block."""
    with HttpReceiver() as receiver:
        name = unique("slack-approvals")
        SlackWebhook(url=SecretStr(f"{receiver.url}/services/T1/B1/x")).save(name)
        yield receiver, name


@pytest.fixture
def responses() -> Iterator[HttpReceiver]:
    """Where Slack's response_url points: the message updates land here."""
    with HttpReceiver() as receiver:
        yield receiver


@pytest.fixture
def gateway(tmp_path, responses: HttpReceiver) -> Iterator[str]:
    settings = GatewaySettings(
        token=SecretStr(TOKEN),
        spool_path=tmp_path / "spool.sqlite3",
        prefect_api_url=PREFECT_API_URL.value(),
        slack_signing_secret=SecretStr(SIGNING_SECRET),
        slack_response_url_prefixes=(f"{responses.url}/actions/",),
    )
    with serving(settings) as url:
        yield url


def start_run(env: Env, sessions: Sessions, channel: str, **safety: Any):
    """The pool runbook on sessions of which one is inside a transaction: it asks for approval."""
    conns = [*sessions.idle(2), sessions.in_transaction()]
    sessions.settle()
    p = pool_params(
        env, env.block(), include_idle_in_transaction=True,
        safety={"approval_slack_block": channel, "budget_max_actions": 1000, **safety},
    )  # fmt: skip
    out: list = []
    thread = threading.Thread(
        target=lambda: out.append(db_connection_pool_exhausted(params=p, return_state=True)),
        daemon=True,
    )
    thread.start()
    return thread, out, sessions.pids(conns)


def wait_for_message(receiver: HttpReceiver, n: int) -> dict[str, Any]:
    return receiver.wait_for(n, timeout_s=60)[n - 1].json()


def test_approved_in_slack_the_run_acts_and_the_message_says_so(
    env: Env,
    sessions: Sessions,
    slack_channel: tuple[HttpReceiver, str],
    responses: HttpReceiver,
    gateway: str,
) -> None:
    channel, block = slack_channel
    thread, out, everyone = start_run(env, sessions, block)
    message = wait_for_message(channel, 1)
    assert "Approval needed: terminate idle connections" in message["text"]
    plan = message["blocks"][1]["text"]["text"]
    assert "inside a transaction" in plan and "terminate_backend" in plan
    assert set(buttons(message)) == {APPROVE, REJECT, "runbooks_open"}
    assert "/runs/flow-run/" in buttons(message)["runbooks_open"]["url"]
    assert everyone <= env.live_pids(), "nothing happens before the answer"

    body = click_body(message, APPROVE, "U0ALICE", "alice", f"{responses.url}/actions/1")
    reply = post_click(gateway, body)
    assert reply.status_code == 200 and reply.json()["ok"], reply.text
    thread.join(90)

    state = out[0]
    summary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert set(summary.terminate.terminated) == everyone
    assert not everyone & env.live_pids()
    assert (
        "| terminate idle connections | approved | alice (Slack U0ALICE) | approved in Slack |"
        in (summary.report)
    )
    (update,) = responses.wait_for(1)
    assert update.path == "/actions/1"
    assert update.json()["replace_original"] is True
    assert update.json()["text"].startswith("Approved by alice (Slack U0ALICE)")


def test_clicks_not_signed_by_slack_answer_nothing(
    env: Env,
    sessions: Sessions,
    slack_channel: tuple[HttpReceiver, str],
    responses: HttpReceiver,
    gateway: str,
) -> None:
    channel, block = slack_channel
    thread, out, everyone = start_run(env, sessions, block, escalation_block=None)
    message = wait_for_message(channel, 1)
    approve = click_body(message, APPROVE, "U0MALLORY", "mallory", f"{responses.url}/actions/m")

    wrong = post_click(gateway, approve, secret="not-the-signing-secret")
    stale = post_click(gateway, approve, timestamp=int(time.time()) - 301)
    future = post_click(gateway, approve, timestamp=int(time.time()) + 301)
    unsigned = httpx.post(f"{gateway}/slack/interactions", content=approve, timeout=10)
    forged = httpx.post(
        f"{gateway}/slack/interactions",
        content=approve,
        headers={"X-Slack-Request-Timestamp": str(int(time.time())), "X-Slack-Signature": "v0=00"},
        timeout=10,
    )
    assert [r.status_code for r in (wrong, stale, future, unsigned, forged)] == [401] * 5
    assert "signature does not match" in wrong.json()["error"]
    assert (
        "more than 300 s" in stale.json()["error"] and "more than 300 s" in future.json()["error"]
    )
    assert "missing X-Slack" in unsigned.json()["error"]
    time.sleep(2)
    assert thread.is_alive(), "the run still waits for an answer"
    assert everyone <= env.live_pids() and responses.requests == []

    # a signed click that is not one of our buttons
    foreign = click_body(message, APPROVE, "U0BOB", "bob", f"{responses.url}/actions/f").replace(
        b"runbooks_approve", b"someone_elses_button"
    )
    assert post_click(gateway, foreign).json() == {"ok": True}
    garbage = post_click(gateway, b"payload=%7Bnot+json")
    assert garbage.status_code == 400 and "not JSON" in garbage.json()["error"]
    assert thread.is_alive() and everyone <= env.live_pids()

    reject = click_body(message, REJECT, "U0BOB", "bob", f"{responses.url}/actions/b")
    assert post_click(gateway, reject).json()["ok"]
    thread.join(90)
    assert out[0].is_failed() and "rejected by bob (Slack U0BOB)" in out[0].message
    assert everyone <= env.live_pids()


def test_a_rejection_in_slack_changes_nothing_and_a_replay_is_refused(
    env: Env,
    sessions: Sessions,
    slack_channel: tuple[HttpReceiver, str],
    responses: HttpReceiver,
    gateway: str,
) -> None:
    channel, block = slack_channel
    thread, out, everyone = start_run(env, sessions, block, escalation_block=None)
    message = wait_for_message(channel, 1)
    body = click_body(message, REJECT, "U0BOB", "bob", f"{responses.url}/actions/r")
    ts = int(time.time())
    assert post_click(gateway, body, timestamp=ts).status_code == 200
    replay = post_click(gateway, body, timestamp=ts)
    assert replay.status_code == 401 and "already received" in replay.json()["error"]
    thread.join(90)

    state = out[0]
    assert state.is_failed() and "rejected by bob (Slack U0BOB)" in state.message
    assert everyone <= env.live_pids(), "a rejected plan changes nothing"
    (update,) = responses.wait_for(1)
    assert update.json()["text"].startswith("Rejected by bob (Slack U0BOB)")


def test_four_eyes_two_different_people_must_approve(
    env: Env,
    sessions: Sessions,
    slack_channel: tuple[HttpReceiver, str],
    responses: HttpReceiver,
    gateway: str,
) -> None:
    channel, block = slack_channel
    thread, out, everyone = start_run(env, sessions, block, min_approvers=2)
    first = wait_for_message(channel, 1)
    assert "Four eyes: 2 different people must approve (approved so far: nobody yet)" in str(
        first["blocks"]
    )
    alice = "U0ALICE"
    ok = post_click(
        gateway, click_body(first, APPROVE, alice, "alice", f"{responses.url}/actions/1")
    )
    assert ok.json()["ok"], ok.text

    # the run asks again, saying who approved; alice approving again counts once
    second = wait_for_message(channel, 2)
    assert "approved so far: alice (Slack U0ALICE)" in str(second["blocks"])
    assert everyone <= env.live_pids(), "one approval is not enough"
    post_click(gateway, click_body(second, APPROVE, alice, "alice", f"{responses.url}/actions/2"))
    third = wait_for_message(channel, 3)
    assert "approved so far: alice (Slack U0ALICE)" in str(third["blocks"])
    # a click on an old message answers nothing
    old = post_click(
        gateway, click_body(first, APPROVE, "U0CAROL", "carol", f"{responses.url}/actions/x")
    )
    assert old.status_code == 200 and not old.json()["ok"]
    assert "no longer waiting" in old.json()["text"]
    assert everyone <= env.live_pids()

    post_click(gateway, click_body(third, APPROVE, "U0BOB", "bob", f"{responses.url}/actions/3"))
    thread.join(90)
    summary = out[0].result()
    assert summary.outcome is Outcome.RESOLVED
    assert not everyone & env.live_pids()
    report = summary.report
    assert (
        "| terminate idle connections | approved | alice (Slack U0ALICE) | approved in Slack |"
        in report
    )
    assert (
        "| terminate idle connections | approved | bob (Slack U0BOB) | approved in Slack |"
        in report
    )
    assert "alice (Slack U0ALICE) approved again: the same person counts once" in report
    assert "carol" not in report


def test_four_eyes_one_rejection_ends_it(
    env: Env,
    sessions: Sessions,
    slack_channel: tuple[HttpReceiver, str],
    responses: HttpReceiver,
    gateway: str,
) -> None:
    channel, block = slack_channel
    thread, out, everyone = start_run(env, sessions, block, min_approvers=2, escalation_block=None)
    first = wait_for_message(channel, 1)
    post_click(gateway, click_body(first, APPROVE, "U0ALICE", "alice", f"{responses.url}/a/1"))
    second = wait_for_message(channel, 2)
    post_click(gateway, click_body(second, REJECT, "U0BOB", "bob", f"{responses.url}/a/2"))
    thread.join(90)
    state = out[0]
    assert state.is_failed() and "rejected by bob (Slack U0BOB)" in state.message
    assert everyone <= env.live_pids()


def test_a_step_that_needs_typing_offers_no_approve_button_in_slack() -> None:
    from runbooks.slack_approvals import approval_message

    message = approval_message(
        runbook="redis-degraded", label="flush the database", target="redis r:6379",
        danger="keys are lost", changes=["flushdb db0"], run_id="r", run_url=None,
        pause_key="k", typing_required=True,
    )  # fmt: skip
    assert set(buttons(message)) == {REJECT}
    assert "only the Prefect UI" in str(message["blocks"])


def test_posting_retries_a_transient_error_and_never_shows_the_webhook_url() -> None:
    from runbooks.slack_approvals import post_approval_request

    fields = dict(
        runbook="r", label="l", target="t", danger="d", changes=["c"], run_id="x",
        run_url=None, pause_key="k",
    )  # fmt: skip
    with HttpReceiver(statuses=[503, 200]) as flaky, HttpReceiver(statuses=[404]) as wrong:
        for receiver in (flaky, wrong):
            SlackWebhook(url=SecretStr(f"{receiver.url}/services/T1/B1/secret-part")).save(
                name := unique("slack"), overwrite=True
            )
            receiver.block = name  # type: ignore[attr-defined]
        post_approval_request(flaky.block, **fields)
        assert [r.status for r in flaky.requests] == [503, 200], "one retry after the 503"
        with pytest.raises(ConnectionError) as refused:
            post_approval_request(wrong.block, **fields)
        assert len(wrong.requests) == 1, "a 404 is not retried"
        assert "HTTP 404" in str(refused.value) and "secret-part" not in str(refused.value)
