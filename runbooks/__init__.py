"""Shared machinery for runbook flows: results, incident reports, retries, waiting, errors."""

from runbooks.errors import Escalation, VerificationFailed
from runbooks.report import IncidentReport, incident_report
from runbooks.results import Change, ChangeSet
from runbooks.retry import transient_retries
from runbooks.waiting import PollOutcome, poll_until

__all__ = [
    "Change",
    "ChangeSet",
    "Escalation",
    "IncidentReport",
    "PollOutcome",
    "VerificationFailed",
    "incident_report",
    "poll_until",
    "transient_retries",
]
