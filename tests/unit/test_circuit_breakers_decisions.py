"""Resilience4j's actuator JSON read right; a breaker's recovery judged right."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tasks.circuit_breakers_decisions import (
    Breaker,
    BreakerEvent,
    BreakerState,
    WatchVerdict,
    count_reopens,
    group_errors,
    parse_breakers,
    parse_events,
    parse_rate,
    parse_time,
    transitions,
    watch_verdict,
)

OPEN, HALF, SHUT, FORCED = (
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.CLOSED,
    BreakerState.FORCED_OPEN,
)


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        ("50.0%", 50.0),
        ("100.0%", 100.0),
        ("-1.0%", None),
        (" 7.5 % ", 7.5),
        (25, 25.0),
        (None, None),
        ("n/a", None),
    ],
)
def test_parse_rate(value, rate) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize(
    ("value", "when"),
    [
        ("2026-12-01T03:00:00.123456789Z[Etc/UTC]", datetime(2026, 12, 1, 3, 0, 0, 123456, UTC)),
        ("2026-12-01T04:00:00.5+01:00[Europe/Berlin]", datetime(2026, 12, 1, 3, 0, 0, 500000, UTC)),
        ("2026-12-01T03:00:00Z", datetime(2026, 12, 1, 3, 0, tzinfo=UTC)),
        ("2026-12-01T03:00:00", datetime(2026, 12, 1, 3, 0, tzinfo=UTC)),
        ("yesterday", None),
        (None, None),
    ],
)
def test_parse_time(value, when) -> None:
    assert parse_time(value) == when


def test_parse_breakers_reads_the_documented_json() -> None:
    document = {
        "circuitBreakers": {
            "pricing": {
                "failureRate": "-1.0%",
                "slowCallRate": "-1.0%",
                "failureRateThreshold": "50.0%",
                "slowCallRateThreshold": "100.0%",
                "bufferedCalls": 0,
                "failedCalls": 0,
                "slowCalls": 0,
                "slowFailedCalls": 0,
                "notPermittedCalls": 0,
                "state": "CLOSED",
            },
            "inventory": {
                "failureRate": "80.0%",
                "slowCallRate": "0.0%",
                "failureRateThreshold": "50.0%",
                "slowCallRateThreshold": "100.0%",
                "bufferedCalls": 10,
                "failedCalls": 8,
                "slowCalls": 0,
                "slowFailedCalls": 0,
                "notPermittedCalls": 42,
                "state": "OPEN",
            },
            "legacy": {"state": "SOMETHING_NEW"},
        }
    }
    inventory, legacy, pricing = parse_breakers(document)
    assert inventory == Breaker(
        name="inventory",
        state=OPEN,
        failure_rate=80.0,
        failure_rate_threshold=50.0,
        slow_call_rate=0.0,
        slow_call_rate_threshold=100.0,
        buffered_calls=10,
        failed_calls=8,
        not_permitted_calls=42,
    )
    assert inventory.tripped_by() == "failure rate"
    assert inventory.describe() == (
        "inventory OPEN, failure rate 80% (threshold 50%); 8 of 10 buffered calls failed, "
        "42 refused"
    )
    assert pricing.failure_rate is None and pricing.tripped_by() == ""
    assert legacy.state is BreakerState.UNKNOWN


@pytest.mark.parametrize("document", [{}, {"circuitBreakers": []}, [], None])
def test_parse_breakers_refuses_other_json(document) -> None:
    with pytest.raises(ValueError, match="circuitBreakers"):
        parse_breakers(document)


def ev(second: int, type_: str, message: str | None = None, transition: str | None = None):
    return {
        "circuitBreakerName": "inventory",
        "type": type_,
        "creationTime": f"2026-12-01T03:00:{second:02d}.000Z[Etc/UTC]",
        "errorMessage": message,
        "durationInMs": 3,
        "stateTransition": transition,
    }


REFUSED = "java.net.ConnectException: Connection refused"
TIMEOUT = "java.net.SocketTimeoutException: Read timed out"
EVENTS = {
    "circuitBreakerEvents": [
        ev(5, "STATE_TRANSITION", transition="CLOSED_TO_OPEN"),  # out of order on purpose
        ev(1, "ERROR", REFUSED),
        ev(2, "ERROR", TIMEOUT),
        ev(3, "ERROR", REFUSED),
        ev(4, "ERROR", "java.net.ConnectException:   Connection\n refused"),
        ev(6, "NOT_PERMITTED"),
        ev(9, "STATE_TRANSITION", transition="OPEN_TO_HALF_OPEN"),
        ev(10, "SUCCESS"),
        ev(11, "STATE_TRANSITION", transition="HALF_OPEN_TO_CLOSED"),
    ]
}


def test_events_are_sorted_and_errors_grouped() -> None:
    events = parse_events(EVENTS)
    assert [e.created_at.second for e in events] == [1, 2, 3, 4, 5, 6, 9, 10, 11]
    groups = group_errors(events)
    assert [(g.message, g.count) for g in groups] == [(REFUSED, 3), (TIMEOUT, 1)]
    assert groups[0].first_at.second == 1 and groups[0].last_at.second == 4
    assert [e.state_transition for e in transitions(events)] == [
        "CLOSED_TO_OPEN",
        "OPEN_TO_HALF_OPEN",
        "HALF_OPEN_TO_CLOSED",
    ]
    since = datetime(2026, 12, 1, 3, 0, 5, tzinfo=UTC)  # the CLOSED_TO_OPEN itself
    assert [e.state_transition for e in transitions(events, since)] == [
        "OPEN_TO_HALF_OPEN",
        "HALF_OPEN_TO_CLOSED",
    ]


@pytest.mark.parametrize("document", [{}, {"circuitBreakerEvents": {}}, None])
def test_parse_events_refuses_other_json(document) -> None:
    with pytest.raises(ValueError, match="circuitBreakerEvents"):
        parse_events(document)


def transition(name: str) -> BreakerEvent:
    return BreakerEvent(breaker="inventory", type="STATE_TRANSITION", state_transition=name)


@pytest.mark.parametrize(
    ("seen", "moves", "reopens"),
    [
        ([OPEN], [], 0),
        (
            [OPEN, HALF, SHUT],
            [transition("OPEN_TO_HALF_OPEN"), transition("HALF_OPEN_TO_CLOSED")],
            0,
        ),
        # the events show it; the polls missed the short HALF_OPEN
        ([OPEN], [transition("OPEN_TO_HALF_OPEN"), transition("HALF_OPEN_TO_OPEN")], 1),
        # the polls show it; the events' buffer lost it
        ([OPEN, HALF, OPEN, HALF, OPEN], [], 2),
        ([HALF, OPEN], [transition("HALF_OPEN_TO_OPEN")], 1),
    ],
)
def test_count_reopens(seen, moves, reopens) -> None:
    assert count_reopens(seen, moves) == reopens


@pytest.mark.parametrize(
    ("state", "reopens", "tolerated", "out_of_time", "verdict"),
    [
        (SHUT, 0, 0, False, WatchVerdict.CLOSED),
        (SHUT, 3, 0, True, WatchVerdict.CLOSED),  # closed in the end: the reopens are history
        (BreakerState.DISABLED, 0, 0, False, WatchVerdict.CLOSED),
        (OPEN, 0, 0, False, WatchVerdict.WAITING),
        (HALF, 0, 0, False, WatchVerdict.WAITING),
        (OPEN, 0, 0, True, WatchVerdict.STILL_OPEN),
        (HALF, 0, 0, True, WatchVerdict.STILL_OPEN),
        (OPEN, 1, 0, False, WatchVerdict.REOPENED),
        (OPEN, 1, 1, False, WatchVerdict.WAITING),
        (OPEN, 2, 1, False, WatchVerdict.REOPENED),
        (FORCED, 0, 0, False, WatchVerdict.FORCED),
        (BreakerState.UNKNOWN, 0, 0, True, WatchVerdict.STILL_OPEN),
    ],
)
def test_watch_verdict(state, reopens, tolerated, out_of_time, verdict) -> None:
    assert watch_verdict(state, reopens, tolerated, out_of_time) is verdict
