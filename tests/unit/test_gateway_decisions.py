"""Pure decisions of the gateway: cooldown/dedup, firing episodes, retry backoff, bearer token
comparison."""

from __future__ import annotations

from datetime import datetime

import pytest
from pydantic import SecretStr

from alert_gateway.auth import bearer_matches
from alert_gateway.events import firing_episode
from alert_gateway.forwarder import within_size
from alert_gateway.spool import Decision, SpooledEvent, decide
from runbooks.backoff import backoff_delay

F, D, C = Decision.FORWARD, Decision.DUPLICATE, Decision.COOLDOWN

# status, event id already spooled, last firing forwarded at, now, cooldown_s -> decision
COOLDOWN_CASES = [
    ("firing", False, None, 1000.0, 300.0, F),  # first time
    ("firing", True, None, 1000.0, 300.0, D),  # re-sent identical alert
    ("firing", True, 990.0, 1000.0, 300.0, D),
    ("firing", True, 0.0, 1000.0, 300.0, D),  # an id already spooled never passes (same episode)
    ("firing", False, 990.0, 1000.0, 300.0, C),  # fired again 10 s later
    ("firing", False, 700.1, 1000.0, 300.0, C),  # just inside the window
    ("firing", False, 700.0, 1000.0, 300.0, F),  # window over
    ("firing", False, 100.0, 1000.0, 300.0, F),
    ("firing", False, 999.0, 1000.0, 0.0, F),  # cooldown disabled
    ("firing", False, 1001.0, 1000.0, 300.0, C),  # clock stepped back: stay conservative
    ("resolved", False, None, 1000.0, 300.0, F),
    ("resolved", False, 999.0, 1000.0, 300.0, F),  # resolved always passes the cooldown
    ("resolved", True, 999.0, 1000.0, 300.0, D),  # ...but a re-sent resolved is the same event
    ("resolved", True, None, 1000.0, 300.0, D),
]


@pytest.mark.parametrize(
    ("status", "spooled", "last", "now", "cooldown", "expected"), COOLDOWN_CASES
)
def test_decide(
    status: str, spooled: bool, last: float | None, now: float, cooldown: float, expected: Decision
) -> None:
    assert decide(status, spooled, last, now, cooldown) is expected


# status, startsAt, received at, cooldown_s -> episode (part of the event id: a new episode is a
# new event, so an alert still firing after its run starts another one)
EPISODE_CASES = [
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T03:00:00Z", 300.0, 0),
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T03:00:30Z", 300.0, 0),  # group_wait
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T03:04:59.999999Z", 300.0, 0),
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T03:05:00Z", 300.0, 1),  # boundary: next one
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T03:05:30Z", 300.0, 1),  # group_interval
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T07:00:30Z", 300.0, 48),  # repeat_interval 4h
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T03:00:05Z", 2.0, 2),
    # the same instant written differently is the same episode
    ("firing", "2026-11-22T05:00:00+02:00", "2026-11-22T03:10:00Z", 300.0, 2),
    ("firing", "2026-11-22t03:00:00z", "2026-11-22T03:10:00Z", 300.0, 2),
    ("firing", "2026-11-22 03:00:00Z", "2026-11-22T03:10:00Z", 300.0, 2),
    # nanoseconds are cut, not rounded up into the next episode
    ("firing", "2026-11-22T02:55:00.999999999Z", "2026-11-22T03:00:00.999999Z", 300.0, 1),
    ("firing", "2026-11-22T03:00:00Z", "2026-11-22T02:59:00Z", 300.0, 0),  # sender's clock ahead
    ("firing", "2026-11-22T03:00:00Z", "2026-11-29T03:00:00Z", 0.0, 0),  # cooldown off: one event
    ("firing", "0001-01-01T00:00:00Z", "2026-11-22T03:00:00Z", 300.0, 213_103_044),  # no overflow
    ("resolved", "2026-11-22T03:00:00Z", "2026-11-22T07:00:30Z", 300.0, 0),  # one id per start
    ("resolved", "2026-11-22T03:00:00Z", "2026-11-22T03:00:00Z", 300.0, 0),
]


@pytest.mark.parametrize(("status", "starts_at", "received", "cooldown", "expected"), EPISODE_CASES)
def test_firing_episode(
    status: str, starts_at: str, received: str, cooldown: float, expected: int
) -> None:
    at = datetime.fromisoformat(received).timestamp()
    assert firing_episode(status, starts_at, at, cooldown) == expected


# failures, initial, max, rand -> delay
BACKOFF_CASES = [
    (1, 0.2, 5.0, 0.0, 0.1),
    (1, 0.2, 5.0, 0.999999, 0.2),
    (2, 0.2, 5.0, 0.0, 0.2),
    (3, 0.2, 5.0, 1.0, 0.8),
    (5, 0.2, 5.0, 1.0, 3.2),
    (6, 0.2, 5.0, 1.0, 5.0),  # capped
    (6, 0.2, 5.0, 0.0, 2.5),
    (10_000, 0.2, 5.0, 1.0, 5.0),  # no overflow after a very long outage
    (3, 1.0, 1.0, 0.5, 0.75),
]


@pytest.mark.parametrize(("failures", "initial", "maximum", "rand", "expected"), BACKOFF_CASES)
def test_backoff_delay(
    failures: int, initial: float, maximum: float, rand: float, expected: float
) -> None:
    assert backoff_delay(failures, initial, maximum, rand) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("failures", range(1, 40))
def test_backoff_stays_within_half_and_full_ceiling(failures: int) -> None:
    ceiling = min(5.0, 0.2 * 2 ** (failures - 1))
    for rand in (0.0, 0.3, 0.7, 0.999):
        assert ceiling / 2 <= backoff_delay(failures, 0.2, 5.0, rand) <= ceiling


# body sizes of the pending events, size limit -> how many go in one delivery
BATCH_SIZE_CASES = [
    ([], 100, 0),
    ([10], 100, 1),
    ([500], 100, 1),  # one oversized event still goes (alone)
    ([50, 50], 100, 2),
    ([50, 51], 100, 1),
    ([50, 50, 1], 100, 2),
    ([500, 1], 100, 1),
    ([1] * 30, 100, 30),
]


@pytest.mark.parametrize(("sizes", "limit", "expected"), BATCH_SIZE_CASES)
def test_within_size(sizes: list[int], limit: int, expected: int) -> None:
    events = [SpooledEvent(f"id-{i}", "x" * size, 0.0) for i, size in enumerate(sizes)]
    assert within_size(events, limit) == events[:expected]


TOKEN = SecretStr("s3cret-Tok")

# Authorization header -> accepted
BEARER_CASES = [
    ("Bearer s3cret-Tok", True),
    ("bearer s3cret-Tok", True),
    ("BEARER s3cret-Tok", True),
    ("Bearer  s3cret-Tok ", True),
    (None, False),
    ("", False),
    ("Bearer", False),
    ("Bearer ", False),
    ("s3cret-Tok", False),
    ("Basic s3cret-Tok", False),
    ("Bearer s3cret-to", False),
    ("Bearer s3cret-Tok2", False),
    ("Bearer s3cret", False),
    ("Bearer S3CRET-TOK", False),
    ("Bearer s3cret-Tök", False),
]


@pytest.mark.parametrize(("header", "ok"), BEARER_CASES)
def test_bearer_matches(header: str | None, ok: bool) -> None:
    assert bearer_matches(header, TOKEN) is ok
