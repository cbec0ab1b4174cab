"""The spool on a real SQLite file: WAL + full sync, dedup and cooldown in one transaction,
a still-firing alert re-sent after the cooldown as a new event, undelivered events surviving a
reopen, one gateway per spool, pruning."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from alert_gateway.events import build_event, encode_event
from alert_gateway.models import Alert
from alert_gateway.spool import Decision, NewEvent, Spool, SpoolLocked

F, D, C = Decision.FORWARD, Decision.DUPLICATE, Decision.COOLDOWN


def ev(n: int, fingerprint: str = "fp", status: str = "firing") -> NewEvent:
    return NewEvent(f"id-{n}", fingerprint, status, f'{{"n":{n}}}')


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.sqlite3")
    yield s
    s.close()


def rows(path: Path) -> list[tuple]:
    """What is on disk, read by a separate connection (not through the spool)."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, state, body FROM events ORDER BY seq").fetchall()


def test_spool_is_wal_with_full_sync(spool: Spool) -> None:
    with sqlite3.connect(spool.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_accept_stores_new_events_and_decides_duplicates_and_cooldown(spool: Spool) -> None:
    decisions = spool.accept(
        [
            ev(1, "a"),
            ev(1, "a"),
            ev(2, "a"),
            ev(3, "b"),
            ev(4, "a", "resolved"),
            ev(4, "a", "resolved"),
        ],
        now=1000.0,
        cooldown_s=300,
    )
    assert decisions == [F, D, C, F, F, D]
    assert [(i, s) for i, s, _ in rows(spool.path)] == [
        ("id-1", "pending"),
        ("id-3", "pending"),
        ("id-4", "pending"),
    ]
    # cooldown counts from the last *forwarded* firing, not from the suppressed one
    assert spool.accept([ev(5, "a")], now=1299.0, cooldown_s=300) == [C]
    assert spool.accept([ev(6, "a")], now=1300.0, cooldown_s=300) == [F]
    assert spool.accept([ev(7, "a")], now=1301.0, cooldown_s=300) == [C]


STARTED = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)

# Alertmanager re-sends one alert (startsAt 03:00, cooldown 300 s) at these seconds after its start:
# status, seconds, decision, which event it is (the same letter: the same id; None: held back)
RESEND_TIMELINE = [
    ("firing", 30, F, "a"),  # group_wait
    ("firing", 31, D, "a"),  # an Alertmanager replica's copy
    ("firing", 299, D, "a"),
    ("firing", 310, C, None),  # episode 1, but only 280 s after the forwarded one
    ("firing", 330, F, "b"),  # the run crashed, the alert still fires: a new event
    ("firing", 335, D, "b"),
    ("firing", 600, C, None),  # episode 2, 270 s after the last forwarded
    ("firing", 629.9, C, None),
    ("firing", 630, F, "c"),
    ("firing", 14_430, F, "d"),  # repeat_interval 4h: episode 48
    ("firing", 14_431, D, "d"),
    ("resolved", 14_500, F, "r"),  # resolved passes the cooldown...
    ("resolved", 14_560, D, "r"),
    ("resolved", 90_000, D, "r"),  # ...once per start, however late the re-send
]


def test_still_firing_alert_is_a_new_event_once_per_cooldown(spool: Spool) -> None:
    alert = Alert(
        source="alertmanager",
        status="firing",
        fingerprint="fp",
        labels={"alertname": "A"},
        annotations={},
        starts_at="2026-11-22T03:00:00Z",
        ends_at=None,
        generator_url="",
        group_key="",
        receiver="runbooks",
    )
    ids: dict[str, str] = {}
    for status, seconds, expected, which in RESEND_TIMELINE:
        received = STARTED + timedelta(seconds=seconds)
        event = build_event(alert.model_copy(update={"status": status}), received, cooldown_s=300)
        new = NewEvent(event["id"], "fp", status, encode_event(event))
        assert spool.accept([new], now=received.timestamp(), cooldown_s=300) == [expected], seconds
        if which is not None:
            assert ids.setdefault(which, event["id"]) == event["id"], seconds
    assert len(set(ids.values())) == len(ids)  # a, b, c, d and r are five events
    assert [e.id for e in spool.pending(10)] == [ids[w] for w in "abcdr"]


def test_delivered_event_stays_a_duplicate(spool: Spool) -> None:
    spool.accept([ev(1)], now=1000.0, cooldown_s=0)
    spool.mark_delivered(["id-1"], now=1001.0)
    assert spool.depth() == 0
    assert spool.accept([ev(1)], now=5000.0, cooldown_s=0) == [D]
    assert rows(spool.path)[0][1] == "delivered"


def test_pending_is_in_acceptance_order_and_bounded(spool: Spool) -> None:
    spool.accept([ev(n, f"fp{n}") for n in range(10)], now=1.0, cooldown_s=300)
    assert [e.id for e in spool.pending(4)] == ["id-0", "id-1", "id-2", "id-3"]
    spool.mark_delivered(["id-0", "id-2"], now=2.0)
    assert [e.id for e in spool.pending(3)] == ["id-1", "id-3", "id-4"]
    assert spool.pending(1)[0].body == '{"n":1}'
    assert spool.depth() == 8


def test_undelivered_events_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    first = Spool(path)
    first.accept([ev(1, "a"), ev(2, "b")], now=1.0, cooldown_s=300)
    first.mark_delivered(["id-1"], now=2.0)
    first.close()
    again = Spool(path)
    try:
        assert [e.id for e in again.pending(10)] == ["id-2"]
        # dedup and cooldown state survive too
        assert again.accept([ev(1, "a"), ev(3, "b")], now=3.0, cooldown_s=300) == [D, C]
    finally:
        again.close()


def test_attempts_count_failures_and_one_in_flight_at_a_restart(tmp_path: Path) -> None:
    """The attempt number picks the id a delivery goes under (alert_gateway.events.delivery_id):
    an attempt that may have reached Prefect is never repeated under the same id, also when the
    gateway was killed while it was in flight (the reopen counts it)."""
    path = tmp_path / "spool.sqlite3"
    first = Spool(path)
    first.accept([ev(1, "a"), ev(2, "b"), ev(3, "c")], now=1.0, cooldown_s=300)
    assert [e.attempts for e in first.pending(10)] == [0, 0, 0]
    first.record_failure(["id-1"], "Prefect answered 502")
    first.mark_delivered(["id-3"], now=2.0)
    assert [(e.id, e.attempts) for e in first.pending(10)] == [("id-1", 1), ("id-2", 0)]
    first.close()  # as after a SIGKILL: what was in flight is unknown
    again = Spool(path)
    try:
        assert [(e.id, e.attempts) for e in again.pending(10)] == [("id-1", 2), ("id-2", 1)]
        with sqlite3.connect(path) as db:  # the delivered one is left alone
            assert db.execute("SELECT attempts FROM events WHERE id = 'id-3'").fetchone() == (1,)
    finally:
        again.close()


def test_a_second_gateway_cannot_open_the_same_spool(spool: Spool) -> None:
    with pytest.raises(SpoolLocked, match="in use"):
        Spool(spool.path)


def test_rejected_event_leaves_the_queue_but_is_kept(spool: Spool) -> None:
    spool.accept([ev(1, "a"), ev(2, "b")], now=1.0, cooldown_s=300)
    spool.record_failure(["id-1", "id-2"], "Prefect unreachable")
    spool.mark_rejected("id-1", "Prefect refused the event (422)", now=2.0)
    assert [e.id for e in spool.pending(10)] == ["id-2"]
    with sqlite3.connect(spool.path) as db:
        assert db.execute(
            "SELECT state, attempts, last_error FROM events WHERE id = 'id-1'"
        ).fetchone() == (
            "rejected",
            2,
            "Prefect refused the event (422)",
        )


def test_prune_forgets_only_finished_events_past_retention(spool: Spool) -> None:
    spool.accept([ev(1, "a"), ev(2, "b"), ev(3, "c")], now=100.0, cooldown_s=300)
    spool.mark_delivered(["id-1"], now=100.0)
    spool.mark_delivered(["id-2"], now=900.0)
    assert spool.prune(now=1000.0, retention_s=500, cooldown_s=300) == 1
    assert [i for i, _, _ in rows(spool.path)] == ["id-2", "id-3"]  # id-3 is pending: kept
    # the cooldowns of a, b, c (fired at 100) expired at 400
    assert spool.accept([ev(4, "a")], now=1000.0, cooldown_s=300) == [F]


def test_a_failed_transaction_stores_nothing(spool: Spool) -> None:
    bad = NewEvent("id-2", "b", "firing", None)  # type: ignore[arg-type]  # violates NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        spool.accept([ev(1, "a"), bad], now=1.0, cooldown_s=300)
    assert rows(spool.path) == []
    assert spool.accept([ev(1, "a")], now=1.0, cooldown_s=300) == [F]
