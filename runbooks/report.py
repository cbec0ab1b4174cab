"""Incident report: the markdown artifact every runbook run leaves in the Prefect UI.

Shaped like the seed runbooks' templates (seed 002 "Incident Report", seed 004 "Incident
Documentation Template"): header facts, summary, timeline with timestamps, symptoms checked,
actions taken or planned, evidence, outcome and follow-ups.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import Pause
from prefect.settings import PREFECT_UI_URL
from pydantic import BaseModel

from runbooks.audit import ActionRow, scrub
from runbooks.errors import (
    ApprovalRejected,
    ApprovalTimedOut,
    BudgetSpent,
    Escalation,
    TargetBusy,
    VerificationFailed,
)
from runbooks.params import RunbookParams
from runbooks.results import ChangeSet
from runbooks.safety import Guard, Target, guard
from runbooks.text import artifact_key, escape_cell

# A deployment (or run) tagged `observe` only plans: a runbook new to production runs like this first.
OBSERVE_TAG = "observe"


class Outcome(StrEnum):
    RESOLVED = "RESOLVED"
    NO_ACTION_NEEDED = "NO ACTION NEEDED"
    PLANNED = "DRY-RUN: PLANNED ONLY"
    WAITING = "WAITING (SELF-HEALING)"
    TARGET_BUSY = "NOT ACTED: TARGET BUSY"
    AWAITING_APPROVAL = "WAITING FOR APPROVAL"
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
    trigger: str = ""
    observe_mode: bool = False
    target: Target | None = None
    busy: str = ""
    rows: list[ActionRow] = field(default_factory=list)
    approvals: list[tuple[str, str, str, str]] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)

    def guard(self, target: Target) -> AbstractContextManager[Guard]:
        """Lock ``target`` for this run and act on it through the shared guard rails."""
        return guard(self, target)

    def step(self, text: str) -> None:
        """Add a timeline entry and log it on the run."""
        self.timeline.append(_Entry(datetime.now(UTC), text))
        get_run_logger().info(text)

    def check(self, name: str, ok: bool, observed: str) -> bool:
        """Record a symptom check; returns ``ok`` so it can sit in an ``if``."""
        self.checks.append(_Check(name, ok, observed))
        self.step(f"check {name}: {'OK' if ok else 'FAILING'} ({observed})")
        return ok

    def record(
        self,
        label: str,
        changes: ChangeSet,
        *,
        before: ChangeSet | None = None,
        status: str | None = None,
    ) -> ChangeSet:
        """Record what a mutating task changed or, in dry-run, would change.

        ``before`` is the plan made before acting (its details are the "before" state of each
        target); ``status`` overrides the per-change status (e.g. why nothing was applied).
        """
        self.changes.append((label, changes))
        self.step(f"{label}: {changes.summary()}" + (f" ({status})" if status else ""))
        planned_detail = {(c.action, c.target): c.detail for c in (before or changes).planned}
        applied = {(c.action, c.target): c.detail for c in changes.applied}
        for c in changes.planned:
            key = (c.action, c.target)
            if status:
                row_status = status
            elif key in applied:
                row_status = "applied"
            else:
                row_status = "planned (dry-run)" if changes.dry_run else "not applied"
            self.rows.append(
                ActionRow(
                    step=label,
                    action=c.action,
                    target=c.target,
                    status=row_status,
                    before=scrub(planned_detail.get(key, c.detail)),
                    after=scrub(applied[key]) if key in applied else None,
                    note="; ".join(changes.notes)[:300],
                )
            )
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
        if self.observe_mode:
            mode = "OBSERVE (deployment tagged 'observe': plans only, nothing changed)"
        elif self.params.dry_run:
            mode = "DRY-RUN (nothing changed)"
        else:
            mode = "LIVE"
        run_link = _run_link()
        lines = [
            f"## Incident Report - {self.started_at:%Y-%m-%d} - {self.title}",
            "",
            "| | |",
            "|---|---|",
            f"| Runbook | `{self.runbook}` |",
            f"| Severity | {self.severity} |",
            f"| Date/Time | {self.started_at:%Y-%m-%d %H:%M:%S} UTC |",
            f"| Reported by | {escape_cell(self.trigger or describe_trigger(self.params))} |",
            f"| Mode | {mode} |",
            f"| Outcome | **{self.outcome.value if self.outcome else 'IN PROGRESS'}** |",
        ]
        if self.target:
            lines.append(f"| Target | {escape_cell(self.target.label)} |")
        alert = self.params.alert
        if alert and alert.labels:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
            lines.append(f"| Alert labels | {escape_cell(labels)} |")
        if run_link:
            lines.append(f"| Flow run | [{run_link}]({run_link}) |")
        lines += ["", "### Summary", self.conclusion or "Run did not finish.", ""]
        lines += ["### Timeline"]
        lines += [f"- {e.at:%H:%M:%S}Z - {escape_cell(e.text)}" for e in self.timeline]
        lines += ["", "### Symptoms checked"]
        if self.checks:
            lines += ["| Check | Result | Observed |", "|---|---|---|"]
            lines += [
                f"| {c.name} | {'OK' if c.ok else 'FAILING'} | {escape_cell(c.observed)} |"
                for c in self.checks
            ]
        else:
            lines.append("None recorded.")
        heading = "Actions planned (dry-run)" if self.params.dry_run else "Actions taken"
        lines += ["", f"### {heading}"]
        if self.rows:
            lines += ["| Step | Action | Target | Status |", "|---|---|---|---|"]
            lines += [
                f"| {r.step} | {r.action} | {escape_cell(r.target)} | {escape_cell(r.status)} |"
                for r in self.rows
            ]
        else:
            lines.append("No change was needed or made.")
        if self.busy:
            lines.append(f"- {escape_cell(self.busy)}")
        if self.approvals:
            lines += ["", "### Approvals", "| Step | Decision | By | Reason |", "|---|---|---|---|"]
            lines += [
                f"| {step} | {decision} | {escape_cell(who or '-')} | {escape_cell(reason or '-')} |"
                for step, decision, who, reason in self.approvals
            ]
        notes = [n for _, cs in self.changes for n in cs.notes]
        lines += [f"- note: {escape_cell(n)}" for n in notes]
        lines += ["", "### Evidence"]
        for label, data in self.evidence_items:
            lines += [f"**{label}**", "```json", json.dumps(data, indent=2, default=str), "```"]
        if not self.evidence_items:
            lines.append("None recorded.")
        if self.follow_ups:
            lines += ["", "### Action Items"] + [f"1. [ ] {f}" for f in self.follow_ups]
        if self.notified:
            lines += ["", "### Escalation"] + [f"- {escape_cell(n)}" for n in self.notified]
        return "\n".join(lines) + "\n"

    def publish(self) -> None:
        status = self.outcome.value if self.outcome else "in progress"
        create_markdown_artifact(
            markdown=self.to_markdown(),
            key=artifact_key(f"incident-{self.runbook}"),
            description=f"{self.title}: {status}",
        )
        if self.rows and self.outcome is not None:
            create_table_artifact(
                table=[
                    {
                        "step": r.step,
                        "action": r.action,
                        "target": r.target,
                        "status": r.status,
                        "before": json.dumps(r.before, default=str, sort_keys=True),
                        "after": json.dumps(r.after, default=str, sort_keys=True)
                        if r.after is not None
                        else "",
                        "note": r.note,
                    }
                    for r in self.rows
                ],
                key=artifact_key(f"actions-{self.runbook}"),
                description=f"{self.title}: actions and their before/after state ({status})",
            )


@contextmanager
def incident_report(
    runbook: str, title: str, severity: str, params: RunbookParams
) -> Iterator[IncidentReport]:
    """Open a report for the run; it is published however the run ends.

    Escalations, failed verifications and other errors re-raise (the run ends FAILED) after the
    escalation policy was notified. A run that stopped because another run holds its target ends
    normally: the report says so and nothing was changed.
    """
    report = IncidentReport(runbook=runbook, title=title, severity=severity, params=params)
    report.trigger = describe_trigger(params)
    if OBSERVE_TAG in _run_tags() and not params.dry_run:
        params.dry_run = True
        report.observe_mode = True
    report.step(f"runbook {runbook} started ({report.trigger})")
    if report.observe_mode:
        report.step("observe mode (tag 'observe'): every step plans only, nothing is changed")
    if _resumed():
        report.step(
            "resumed after an approval request was answered (or timed out): every check runs "
            "again against the live system before anything is changed"
        )
    try:
        yield report
    except Pause:
        # suspended for approval: the run starts again once answered (runbooks.approvals)
        report.outcome = Outcome.AWAITING_APPROVAL
        report.conclusion = "Suspended until someone approves or rejects the plan below."
        raise
    except TargetBusy as exc:
        report.finish(Outcome.TARGET_BUSY, f"Stopped without acting: {exc}.")
        if exc.escalate:
            _escalate(report, "target_busy", str(exc))
            raise
    except BudgetSpent as exc:
        report.finish(Outcome.ESCALATED, f"Escalated to a human: {exc}")
        if exc.notify:
            _escalate(report, "budget_spent", str(exc))
        raise
    except Escalation as exc:
        report.finish(Outcome.ESCALATED, f"Escalated to a human: {exc}")
        _escalate(report, _escalation_kind(exc), str(exc))
        raise
    except VerificationFailed as exc:
        report.finish(Outcome.FAILED, f"Verification failed: {exc}")
        _escalate(report, "verification_failed", str(exc))
        raise
    except BaseException as exc:
        report.finish(Outcome.FAILED, f"Run failed: {type(exc).__name__}: {exc}")
        if isinstance(exc, Exception):
            _escalate(report, "failed", f"{type(exc).__name__}: {exc}")
        else:
            # Ctrl-C, SIGTERM of the serving process, cancellation: the run stops half way and
            # nobody would know; best effort, the process is on its way out
            _escalate(report, "interrupted", f"the run was interrupted ({type(exc).__name__})")
        raise
    finally:
        report.publish()


def _escalation_kind(exc: Escalation) -> str:
    if isinstance(exc, ApprovalRejected):
        return "rejected"
    if isinstance(exc, ApprovalTimedOut):
        return "approval_timeout"
    return "escalated"


def _escalate(report: IncidentReport, kind: str, reason: str) -> None:
    """Notify the run's escalation policy; a notification problem never hides the run's own error."""
    from blocks.escalation import EscalationPolicy
    from runbooks.escalation import EscalationKind, EscalationMessage, send_escalation

    name = report.params.safety.escalation_block
    logger = get_run_logger()
    if not name:
        report.notified.append("no escalation policy configured for this run: nobody notified")
        return
    try:
        policy = EscalationPolicy.load(name)
    except ValueError:
        report.notified.append(f"escalation policy block {name!r} is not saved: nobody notified")
        logger.warning("escalation policy block %r not found; nobody was notified", name)
        return
    ctx = FlowRunContext.get()
    tried = [
        f"{label}: {ch.action} {ch.target} ({'applied' if ch in cs.applied else 'not applied'})"
        for label, cs in report.changes
        for ch in cs.planned
    ]
    message = EscalationMessage(
        runbook=report.runbook,
        title=report.title,
        severity=report.severity,
        kind=EscalationKind(kind),
        reason=reason,
        target=report.target.label if report.target else None,
        tried=tried,
        trigger=report.trigger,
        run_url=_run_link(),
        flow_run_id=str(ctx.flow_run.id) if ctx and ctx.flow_run else None,
    )
    try:
        deliveries = send_escalation(message, policy)
    except Exception as exc:  # noqa: BLE001 - reported, the run's own error follows
        logger.error("escalation failed: %s", type(exc).__name__)
        report.notified.append(f"escalation failed: {type(exc).__name__}")
        return
    for d in deliveries:
        report.notified.append(f"{d.channel}: {'delivered' if d.ok else 'FAILED'} ({d.detail})")
    if deliveries:
        report.step(
            f"escalated ({kind}) to {sum(d.ok for d in deliveries)}/{len(deliveries)} channel(s)"
        )


def _resumed() -> bool:
    """Whether this run was suspended for approval and started again (runbooks.approvals)."""
    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.empirical_policy.resuming)


def _run_tags() -> set[str]:
    ctx = FlowRunContext.get()
    return set(ctx.flow_run.tags or []) if ctx and ctx.flow_run else set()


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
