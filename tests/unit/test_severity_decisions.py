"""The severity policy: every name the seeds use maps to one level; the run's level; whether a run
kept its level's response-time target; which channels a ticket goes to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from blocks.escalation import EscalationPolicy
from runbooks.escalation import EscalationKind, EscalationMessage, _channels
from runbooks.severity import (
    Response,
    Verdict,
    parse_start,
    response_verdict,
    run_severity,
    severity_level,
)

NAME_CASES = [
    ("P1", "P1", Response.PAGE, 300),
    ("p2", "P2", Response.PAGE, 900),
    ("P3", "P3", Response.TICKET, 3600),
    ("P4", "P4", Response.TICKET, 14400),
    ("P0", "P1", Response.PAGE, 300),  # seed 001: critical, immediate (< 5 min)
    ("SEV-1", "P1", Response.PAGE, 300),  # seed 004
    ("SEV‑2".replace("‑", "-"), "P2", Response.PAGE, 900),
    ("sev 3", "P3", Response.TICKET, 3600),
    ("SEV_4", "P4", Response.TICKET, 14400),
    ("critical", "P1", Response.PAGE, 300),  # Alertmanager's customary labels
    ("warning", "P3", Response.TICKET, 3600),
    ("info", "P4", Response.TICKET, 14400),
    (" High ", "P2", Response.PAGE, 900),
]


@pytest.mark.parametrize(("name", "level", "response", "seconds"), NAME_CASES)
def test_every_seed_name_maps_to_one_level(
    name: str, level: str, response: Response, seconds: int
) -> None:
    found = severity_level(name)
    assert found is not None
    assert (found.name, found.response, found.respond_within.total_seconds()) == (
        level,
        response,
        seconds,
    )


@pytest.mark.parametrize("name", [None, "", "P5", "sev-9", "urgent!!", "1"])
def test_unknown_names_are_none(name: str | None) -> None:
    assert severity_level(name) is None


RUN_CASES = [
    # runbook's, alert's -> level, why mentions
    ("P2", None, "P2", "the runbook's"),
    ("P2", "critical", "P1", "raised"),
    ("P2", "warning", "P2", "the runbook's"),  # an alert never lowers the scenario's urgency
    ("SEV-2", "info", "P2", "the runbook's"),
    ("P3", "bogus", "P3", "not a known name"),
    ("P4", "P1", "P1", "raised"),
]


@pytest.mark.parametrize(("own", "alert", "level", "why"), RUN_CASES)
def test_run_severity(own: str, alert: str | None, level: str, why: str) -> None:
    found, reason = run_severity(own, alert)
    assert found.name == level
    assert why in reason


def test_an_unknown_runbook_severity_is_a_bug() -> None:
    with pytest.raises(ValueError):
        run_severity("urgent", None)


T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
VERDICT_CASES = [
    # level, seconds from incident start to the run's end, outcome -> verdict, words
    ("P1", 42, "RESOLVED", Verdict.MET, "met: done 42 s after"),
    ("P1", 400, "RESOLVED", Verdict.MISSED, "missed: done 6 min after"),
    ("P2", 600, "NO ACTION NEEDED", Verdict.MET, "met: done 10 min"),
    ("P2", 60, "ESCALATED", Verdict.MET, "respond by 03:15:00Z"),
    ("P1", 301, "ESCALATED", Verdict.MISSED, "missed: handed to a person only 5 min"),
    ("P3", 30, "WAITING FOR APPROVAL", Verdict.MET, "respond by 04:00:00Z"),
    ("P4", 30, "FAILED", Verdict.MET, "respond by 07:00:00Z"),
    ("P1", 30, None, Verdict.NOT_COUNTED, "not counted"),
    ("P1", 30, "DRY-RUN: PLANNED ONLY", Verdict.NOT_COUNTED, "not counted"),
    ("P1", -5, "RESOLVED", Verdict.MET, "done 0 s after"),  # clocks a little apart
]


@pytest.mark.parametrize(("level", "seconds", "outcome", "verdict", "words"), VERDICT_CASES)
def test_response_verdict(
    level: str, seconds: int, outcome: str | None, verdict: Verdict, words: str
) -> None:
    found, text = response_verdict(
        severity_level(level), T0, T0 + timedelta(seconds=seconds), outcome
    )
    assert found is verdict
    assert words in text


START_CASES = [
    ("2026-12-01T03:00:00Z", T0),
    ("2026-12-01T03:00:00.123+00:00", T0 + timedelta(milliseconds=123)),
    ("0001-01-01T00:00:00Z", None),  # Alertmanager's zero time
    ("yesterday", None),
    ("2026-12-01T03:00:00", None),  # no zone: ambiguous
    (None, None),
]


@pytest.mark.parametrize(("text", "expected"), START_CASES)
def test_parse_start(text: str | None, expected: datetime | None) -> None:
    assert parse_start(text) == expected


def _message(ticket: bool) -> EscalationMessage:
    return EscalationMessage(
        runbook="redis-degraded",
        title="Redis Degraded",
        severity="P3" if ticket else "P1",
        kind=EscalationKind.ESCALATED,
        reason="x",
        ticket=ticket,
    )


CHANNEL_CASES = [
    # paging blocks, ticket blocks, ticket? -> channel names
    (["slack-webhook/oncall"], ["custom-webhook/jira"], False, ["notification:slack-webhook/oncall"]),
    (["slack-webhook/oncall"], ["custom-webhook/jira"], True, ["ticket:custom-webhook/jira"]),
    (["slack-webhook/oncall"], [], True, ["notification:slack-webhook/oncall"]),
    ([], ["custom-webhook/jira"], False, []),
]


@pytest.mark.parametrize(("paging", "tickets", "ticket", "expected"), CHANNEL_CASES)
def test_tickets_go_to_the_ticket_channels(
    paging: list[str], tickets: list[str], ticket: bool, expected: list[str]
) -> None:
    policy = EscalationPolicy(notification_blocks=paging, ticket_notification_blocks=tickets)
    assert [name for name, _ in _channels(_message(ticket), policy)] == expected


def test_the_message_says_how_fast_to_respond() -> None:
    level = severity_level("P2")
    message = _message(False).model_copy(update={"severity": "P2", "response": level.target()})
    assert "Severity: P2 (page on-call now, respond within 15 min)" in message.text()
