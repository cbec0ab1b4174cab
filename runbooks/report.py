"""Incident report: the markdown artifact every runbook run leaves in the Prefect UI.

Shaped like the seed runbooks' templates (seed 002 "Incident Report", seed 004 "Incident
Documentation Template"): header facts, summary, timeline with timestamps, symptoms checked,
actions taken or planned, evidence, outcome and follow-ups.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_UI_URL
from pydantic import BaseModel

from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import RunbookParams
from runbooks.results import ChangeSet


class Outcome(StrEnum):
    RESOLVED = "RESOLVED"
    NO_ACTION_NEEDED = "NO ACTION NEEDED"
    PLANNED = "DRY-RUN: PLANNED ONLY"
    WAITING = "WAITING (SELF-HEALING)"
    ESCALATED = "ESCALATED"
    FAILED = "FAILED"


@dataclass
class _Entry:
    at: datetime
    text: str


@dataclass
class _Check:
    name: str
    ok: bool
    observed: str


@dataclass
class IncidentReport:
    """Collects what a run checked, changed and saw; publishes it as a markdown artifact."""

    runbook: str
    title: str
    severity: str
    params: RunbookParams
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    timeline: list[_Entry] = field(default_factory=list)
    checks: list[_Check] = field(default_factory=list)
    changes: list[tuple[str, ChangeSet]] = field(default_factory=list)
    evidence_items: list[tuple[str, Any]] = field(default_factory=list)
    outcome: Outcome | None = None
    conclusion: str = ""
    follow_ups: list[str] = field(default_factory=list)

    def step(self, text: str) -> None:
        """Add a timeline entry and log it on the run."""
        self.timeline.append(_Entry(datetime.now(UTC), text))
        get_run_logger().info(text)

    def check(self, name: str, ok: bool, observed: str) -> bool:
        """Record a symptom check; returns ``ok`` so it can sit in an ``if``."""
        self.checks.append(_Check(name, ok, observed))
        self.step(f"check {name}: {'OK' if ok else 'FAILING'} ({observed})")
        return ok

    def record(self, label: str, changes: ChangeSet) -> ChangeSet:
        """Record what a mutating task changed or, in dry-run, would change."""
        self.changes.append((label, changes))
        self.step(f"{label}: {changes.summary()}")
        return changes

    def evidence(self, label: str, data: Any) -> None:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        self.evidence_items.append((label, data))

    def finish(self, outcome: Outcome, conclusion: str) -> None:
        self.outcome = outcome
        self.conclusion = conclusion
        self.step(f"outcome {outcome.value}: {conclusion}")

    # rendering -------------------------------------------------------------------------

    def to_markdown(self) -> str:
        mode = "DRY-RUN (nothing changed)" if self.params.dry_run else "LIVE"
        run_link = _run_link()
        lines = [
            f"## Incident Report - {self.started_at:%Y-%m-%d} - {self.title}",
            "",
            "| | |",
            "|---|---|",
            f"| Runbook | `{self.runbook}` |",
            f"| Severity | {self.severity} |",
            f"| Date/Time | {self.started_at:%Y-%m-%d %H:%M:%S} UTC |",
            f"| Reported by | {_escape(describe_trigger(self.params))} |",
            f"| Mode | {mode} |",
            f"| Outcome | **{self.outcome.value if self.outcome else 'IN PROGRESS'}** |",
        ]
        if run_link:
            lines.append(f"| Flow run | [{run_link}]({run_link}) |")
        lines += ["", "### Summary", self.conclusion or "Run did not finish.", ""]
        lines += ["### Timeline"]
        lines += [f"- {e.at:%H:%M:%S}Z - {_escape(e.text)}" for e in self.timeline]
        lines += ["", "### Symptoms checked"]
        if self.checks:
            lines += ["| Check | Result | Observed |", "|---|---|---|"]
            lines += [
                f"| {c.name} | {'OK' if c.ok else 'FAILING'} | {_escape(c.observed)} |"
                for c in self.checks
            ]
        else:
            lines.append("None recorded.")
        heading = "Actions planned (dry-run)" if self.params.dry_run else "Actions taken"
        lines += ["", f"### {heading}"]
        rows = [
            (label, ch, "applied" if ch in cs.applied else "planned only")
            for label, cs in self.changes
            for ch in cs.planned
        ]
        if rows:
            lines += ["| Step | Action | Target | Status |", "|---|---|---|---|"]
            lines += [
                f"| {label} | {ch.action} | {_escape(ch.target)} | {status} |"
                for label, ch, status in rows
            ]
        else:
            lines.append("No change was needed or made.")
        notes = [n for _, cs in self.changes for n in cs.notes]
        lines += [f"- note: {_escape(n)}" for n in notes]
        lines += ["", "### Evidence"]
        for label, data in self.evidence_items:
            lines += [f"**{label}**", "```json", json.dumps(data, indent=2, default=str), "```"]
        if not self.evidence_items:
            lines.append("None recorded.")
        if self.follow_ups:
            lines += ["", "### Action Items"] + [f"1. [ ] {f}" for f in self.follow_ups]
        return "\n".join(lines) + "\n"

    def publish(self) -> None:
        create_markdown_artifact(
            markdown=self.to_markdown(),
            key=_artifact_key(f"incident-{self.runbook}"),
            description=f"{self.title}: {self.outcome.value if self.outcome else 'in progress'}",
        )


@contextmanager
def incident_report(
    runbook: str, title: str, severity: str, params: RunbookParams
) -> Iterator[IncidentReport]:
    """Open a report for the run; it is published however the run ends, then errors re-raise."""
    report = IncidentReport(runbook=runbook, title=title, severity=severity, params=params)
    report.step(f"runbook {runbook} started ({describe_trigger(params)})")
    try:
        yield report
    except Escalation as exc:
        report.finish(Outcome.ESCALATED, f"Escalated to a human: {exc}")
        raise
    except VerificationFailed as exc:
        report.finish(Outcome.FAILED, f"Verification failed: {exc}")
        raise
    except BaseException as exc:
        report.finish(Outcome.FAILED, f"Run failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        report.publish()


def describe_trigger(params: RunbookParams) -> str:
    """Who or what started this run: an alert, a schedule, an automation or a person."""
    if params.alert and (params.alert.alertname or params.alert.fingerprint):
        a = params.alert
        return f"alert {a.alertname or '?'} ({a.status or 'firing'}, fingerprint {a.fingerprint or '?'})"
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    if run is None:
        return "direct call"
    if run.auto_scheduled:
        return "maintenance schedule"
    if run.created_by is not None:
        who = run.created_by.display_value or run.created_by.id
        return f"{run.created_by.type.lower()} {who}"
    return "manual run" if run.deployment_id else "direct call"


def _run_link() -> str | None:
    ctx = FlowRunContext.get()
    base = PREFECT_UI_URL.value()
    if ctx is None or ctx.flow_run is None or not base:
        return None
    return f"{base.rstrip('/')}/runs/flow-run/{ctx.flow_run.id}"


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
