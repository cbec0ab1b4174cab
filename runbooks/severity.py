"""Severity policy: the one place that says how urgent an incident is, who hears of it and how fast.

The seeds name severities three ways: seed 002 (and 000) P1-P4 with response times 5 min, 15 min,
1 h and 4 h; seed 001 P0-P3 with the same four times one step down (its P0 "immediate, < 5 min" is
seed 002's P1); seed 004 SEV-1..SEV-4 with the same four meanings; and alerting rules use
Alertmanager's customary `severity` labels (critical, warning, info). This module maps every one
of those names onto four levels, with seed 002's names as the canonical ones, and says for each
how fast a person must respond and how they hear of it: P1 and P2 page on-call now (seed 001:
"P0/P1: page on-call engineer immediately"), P3 and P4 open a ticket (seed 001: "P2: create
ticket, notify team; P3: create ticket, handle during business hours").

A run's severity is the runbook's own unless the alert that started it says it is more urgent:
an alert never makes a run less urgent than its scenario (a 'warning' on a cluster outage still
pages). Seed 001's P1/P2/P3 are not accepted as aliases: they would mean something else than the
P1/P2/P3 every runbook here uses; its P0 is unambiguous and maps to P1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum


class Response(StrEnum):
    PAGE = "page"  # the policy's paging channels, now
    TICKET = "ticket"  # the policy's ticket channels (or, without any, the paging ones)


@dataclass(frozen=True)
class SeverityLevel:
    rank: int  # 1 is the most urgent
    name: str
    meaning: str
    respond_within: timedelta
    response: Response

    def describe(self) -> str:
        return f"{self.name} ({self.meaning})"

    def target(self) -> str:
        how = "page on-call now" if self.response is Response.PAGE else "ticket for the team"
        return f"{how}, respond within {_duration(self.respond_within)}"


LEVELS: tuple[SeverityLevel, ...] = (
    SeverityLevel(1, "P1", "complete outage", timedelta(minutes=5), Response.PAGE),
    SeverityLevel(2, "P2", "major degradation", timedelta(minutes=15), Response.PAGE),
    SeverityLevel(3, "P3", "minor degradation", timedelta(hours=1), Response.TICKET),
    SeverityLevel(4, "P4", "low impact", timedelta(hours=4), Response.TICKET),
)
_BY_RANK = {level.rank: level for level in LEVELS}

# every spelling the seeds and common alerting rules use, lower case, separators removed
_ALIASES: dict[str, int] = {
    "p0": 1,
    "p1": 1,
    "p2": 2,
    "p3": 3,
    "p4": 4,
    "sev1": 1,
    "sev2": 2,
    "sev3": 3,
    "sev4": 4,
    "critical": 1,
    "page": 1,
    "high": 2,
    "error": 2,
    "major": 2,
    "warning": 3,
    "minor": 3,
    "medium": 3,
    "info": 4,
    "low": 4,
    "none": 4,
}


def severity_level(name: str | None) -> SeverityLevel | None:
    """The level a severity name means (P1, SEV-1, sev 1, critical, ...); None if unknown."""
    if not name:
        return None
    key = re.sub(r"[\s_\-]", "", name.strip().lower())
    rank = _ALIASES.get(key)
    return _BY_RANK[rank] if rank else None


def run_severity(runbook_severity: str, alert_severity: str | None) -> tuple[SeverityLevel, str]:
    """The run's level and why: the runbook's, or the alert's when that is more urgent."""
    own = severity_level(runbook_severity)
    if own is None:
        raise ValueError(f"runbook severity {runbook_severity!r} is not a known severity")
    alert = severity_level(alert_severity)
    if alert is not None and alert.rank < own.rank:
        return alert, f"raised from the runbook's {own.name} by the alert's severity {alert_severity!r}"
    if alert_severity and alert is None:
        return own, f"the runbook's; the alert's severity {alert_severity!r} is not a known name"
    return own, "the runbook's"


class Verdict(StrEnum):
    MET = "met"
    MISSED = "missed"
    NOT_COUNTED = "not counted"


# how the run ended -> what it did for the response time: fixed it, or handed it to a person
_FIXED = {"RESOLVED", "NO ACTION NEEDED"}
_HANDED_OVER = {
    "ESCALATED",
    "FAILED",
    "NOT ACTED: TARGET BUSY",
    "WAITING FOR APPROVAL",
    "WAITING (SELF-HEALING)",
    "HANDED OFF",
}


def response_verdict(
    level: SeverityLevel, incident_start: datetime, ended_at: datetime, outcome: str | None
) -> tuple[Verdict, str]:
    """Whether this run kept its severity's response-time target, in words.

    The clock starts when the incident started (the alert's startsAt, else the run's start). A run
    that fixed it (or found nothing to fix) met the target if it ended in time; a run that handed
    it to a person (escalated, failed, waits for approval) met it if the person heard in time,
    and the words say until when they must respond. A dry-run does not count.
    """
    elapsed = max(ended_at - incident_start, timedelta(0))
    deadline = incident_start + level.respond_within
    within = elapsed <= level.respond_within
    verdict = Verdict.MET if within else Verdict.MISSED
    after = f"{_duration(elapsed)} after the incident started"
    if outcome in _FIXED:
        return verdict, f"{verdict.value}: done {after}"
    if outcome in _HANDED_OVER:
        if within:
            return verdict, (
                f"met so far: handed to a person {after}; they must respond by "
                f"{deadline.astimezone(UTC):%H:%M:%S}Z"
            )
        return verdict, f"missed: handed to a person only {after}"
    return Verdict.NOT_COUNTED, "not counted (nothing was meant to change: dry-run or in progress)"


def parse_start(starts_at: str | None) -> datetime | None:
    """An alert's startsAt (RFC 3339) as an aware datetime; None if missing or not a time."""
    if not starts_at:
        return None
    try:
        moment = datetime.fromisoformat(starts_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None or moment.year < 2000:  # Alertmanager's zero time: unknown
        return None
    return moment


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")
