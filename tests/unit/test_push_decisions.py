"""push-delivery-degraded's decisions: send results, delivery per provider, status pages, actions."""

from __future__ import annotations

import json

import pytest

from tasks.push_decisions import (
    PageState,
    PushThresholds,
    ResultClass,
    StatusReading,
    classify_result,
    decide_push,
    parse_status_page,
    summarize_delivery,
)

S, STALE, Q, P, OTHER = (
    ResultClass.SUCCESS,
    ResultClass.STALE_TOKEN,
    ResultClass.QUOTA,
    ResultClass.PROVIDER,
    ResultClass.OTHER,
)

RESULTS = [
    ("success", S), ("OK", S), ("200", S),
    ("UNREGISTERED", STALE), ("Unregistered", STALE), ("BadDeviceToken", STALE), ("410", STALE),
    ("registration-token-not-registered", STALE), ("NotRegistered", STALE), ("404", STALE),
    ("QUOTA_EXCEEDED", Q), ("TooManyRequests", Q), ("429", Q), ("message-rate-exceeded", Q),
    ("UNAVAILABLE", P), ("INTERNAL", P), ("InternalServerError", P), ("ServiceUnavailable", P),
    ("Shutdown", P), ("500", P), ("503", P), ("599", P),
    ("INVALID_ARGUMENT", OTHER), ("THIRD_PARTY_AUTH_ERROR", OTHER), ("DeviceTokenNotForTopic", OTHER),
    ("403", OTHER), ("timeout", OTHER), ("", OTHER),
]  # fmt: skip


@pytest.mark.parametrize(("result", "cls"), RESULTS)
def test_classify_result(result: str, cls: ResultClass) -> None:
    assert classify_result(result) is cls


def test_summarize_delivery_per_provider() -> None:
    (apns, fcm) = summarize_delivery(
        [
            ("fcm", "success", 900.0),
            ("fcm", "UNREGISTERED", 60.0),
            ("fcm", "QUOTA_EXCEEDED", 40.0),
            ("apns", "success", 500.0),
            ("apns", "InternalServerError", 0.0),  # no sends in the window: ignored
        ]
    )
    assert (fcm.provider, fcm.sent, fcm.succeeded, fcm.success_rate) == ("fcm", 1000, 900, 0.9)
    assert fcm.by_class == {STALE: 60, Q: 40} and fcm.share(STALE) == 0.6
    assert (apns.success_rate, apns.by_class) == (1.0, {})


STATUSPAGE_OK = {"status": {"indicator": "none", "description": "All Systems Operational"}}
STATUSPAGE_MAJOR = {"status": {"indicator": "major", "description": "Partial System Outage"}}
SUMMARY = {
    "status": {"indicator": "minor", "description": "Minor Service Outage"},
    "components": [
        {"name": "Cloud Messaging", "status": "operational"},
        {"name": "Hosting", "status": "major_outage"},
    ],
}
GOOGLE = [
    {"id": "a1", "begin": "2026-11-30T10:00:00Z", "end": "2026-11-30T11:00:00Z",
     "affected_products": [{"title": "Cloud Messaging"}], "external_desc": "old"},
    {"id": "b2", "begin": "2026-12-01T03:00:00Z",
     "affected_products": [{"title": "Cloud Messaging"}], "external_desc": "FCM sends fail"},
    {"id": "c3", "begin": "2026-12-01T03:00:00Z", "affected_products": [{"title": "Hosting"}]},
]  # fmt: skip
APPLE = {
    "services": [
        {"serviceName": "APNS", "events": [{"eventStatus": "ongoing", "statusType": "Outage",
                                            "message": "Some users are affected"}]},
        {"serviceName": "App Store Connect", "events": []},
    ]
}  # fmt: skip
APPLE_OK = {"services": [{"serviceName": "APNS", "events": [{"eventStatus": "resolved"}]}]}

PAGES = [
    (json.dumps(STATUSPAGE_OK), "", PageState.OPERATIONAL, "All Systems Operational"),
    (json.dumps(STATUSPAGE_MAJOR), "", PageState.DEGRADED, "Partial System Outage"),
    (json.dumps(SUMMARY), "Cloud Messaging", PageState.OPERATIONAL, "Cloud Messaging: operational"),
    (json.dumps(SUMMARY), "Hosting", PageState.DEGRADED, "major_outage"),
    (json.dumps(GOOGLE), "Cloud Messaging", PageState.DEGRADED, "FCM sends fail"),
    (json.dumps(GOOGLE[:1]), "Cloud Messaging", PageState.OPERATIONAL, "no ongoing incident"),
    (json.dumps(GOOGLE[2:]), "Cloud Messaging", PageState.OPERATIONAL, "no ongoing incident"),
    (json.dumps(APPLE), "APNS", PageState.DEGRADED, "ongoing Outage"),
    ("jsonCallback(" + json.dumps(APPLE_OK) + ");", "apns", PageState.OPERATIONAL, "no ongoing"),
    (json.dumps(APPLE), "Push Service", PageState.UNKNOWN, "no service"),
    ("<html>Status</html>", "", PageState.UNKNOWN, "not JSON"),
    (json.dumps({"hello": "world"}), "", PageState.UNKNOWN, "unrecognized"),
]


@pytest.mark.parametrize(("body", "component", "state", "words"), PAGES)
def test_parse_status_page(body: str, component: str, state: PageState, words: str) -> None:
    got, detail = parse_status_page(body, component)
    assert got is state, detail
    assert words in detail


def page(provider: str, state: PageState) -> StatusReading:
    return StatusReading(provider=provider, url="http://status", state=state, detail=state.value)


HEALTHY_APNS = ("apns", "success", 1000.0)
T = PushThresholds(min_success_rate=0.99, min_sends=100, cause_share=0.2, max_stale_share=0.2)

# (counts, status pages, stale tokens, stale share, prune, degraded, words in escalations)
DECISIONS = [
    # stale tokens cause the failures and the table holds them: prune, nothing to escalate
    ([("fcm", "success", 950.0), ("fcm", "UNREGISTERED", 50.0), HEALTHY_APNS], [], 40, 0.04, True, ["fcm"], []),
    # provider 5xx: escalate naming the provider; nothing to prune
    ([("fcm", "success", 1000.0), ("apns", "success", 900.0), ("apns", "503", 100.0)], [], 0, 0.0, False, ["apns"], ["provider apns is failing"]),
    # few 5xx but the status page says degraded: the provider's
    ([("fcm", "success", 950.0), ("fcm", "INVALID_ARGUMENT", 45.0), ("fcm", "INTERNAL", 5.0), HEALTHY_APNS],
     [page("fcm", PageState.DEGRADED)], 0, 0.0, False, ["fcm"], ["provider fcm is failing", "INVALID_ARGUMENT"]),
    # quota
    ([("fcm", "success", 900.0), ("fcm", "QUOTA_EXCEEDED", 100.0), HEALTHY_APNS], [], 0, 0.0, False, ["fcm"], ["quota (429"]),
    # stale and provider: prune and escalate
    ([("fcm", "success", 900.0), ("fcm", "UNREGISTERED", 50.0), ("fcm", "UNAVAILABLE", 50.0)], [], 30, 0.01, True, ["fcm"], ["provider fcm"]),
    # healthy, a few stale tokens: nothing
    ([("fcm", "success", 999.0), ("fcm", "UNREGISTERED", 1.0), HEALTHY_APNS], [], 5, 0.01, False, [], []),
    # healthy but a large stale share: prune anyway
    ([("fcm", "success", 1000.0), HEALTHY_APNS], [], 500, 0.5, True, [], []),
    # under target on too few sends: not judged
    ([("fcm", "success", 8.0), ("fcm", "503", 2.0)], [], 0, 0.0, False, [], []),
    # stale tokens cause failures but the table could not be read
    ([("fcm", "success", 900.0), ("fcm", "UNREGISTERED", 100.0)], [], None, None, False, ["fcm"], ["could not be read"]),
    # no metrics at all
    ([], [], 0, None, False, [], ["no push sends"]),
    # an unknown status page is no failure
    ([("fcm", "success", 1000.0), HEALTHY_APNS], [page("fcm", PageState.UNKNOWN)], 0, 0.0, False, [], []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("counts", "pages", "stale", "share", "prune", "degraded", "escalations"), DECISIONS
)
def test_decide_push(
    counts: list,
    pages: list[StatusReading],
    stale: int | None,
    share: float | None,
    prune: bool,
    degraded: list[str],
    escalations: list[str],
) -> None:
    decision = decide_push(summarize_delivery(counts), pages, stale, share, T)
    assert (decision.prune, decision.degraded) == (prune, degraded), decision.reason
    text = " | ".join(decision.escalate)
    assert all(w in text for w in escalations), text
    assert bool(decision.escalate) == bool(escalations), text


def test_status_page_trouble_with_healthy_delivery_is_a_note() -> None:
    decision = decide_push(
        summarize_delivery([("fcm", "success", 1000.0)]),
        [page("fcm", PageState.DEGRADED)],
        0,
        0.0,
        T,
    )
    assert not decision.escalate and "fcm's status page reports a problem" in decision.notes[0]
