"""Incident report: the markdown artifact every runbook run leaves in the Prefect UI.

Shaped like the seed runbooks' templates (seed 002 "Incident Report", seed 004 "Incident
Documentation Template"): header facts, summary, timeline with timestamps, symptoms checked,
actions taken or planned, evidence, outcome and follow-ups.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar

import httpx
from prefect import get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.exceptions import Pause, PrefectException
from prefect.settings import PREFECT_UI_URL
from prefect.states import Completed, Failed
from pydantic import BaseModel

from runbooks.alert_claims import MAX_ATTEMPTS, Verdict, claim_alert_event
from runbooks.audit import ActionRow, group_rows, scrub, table_row
from runbooks.errors import (
    ApprovalRejected,
    ApprovalTimedOut,
    BudgetSpent,
    DuplicateAlertRun,
    Escalation,
    TargetBusy,
    VerificationFailed,
)
from runbooks.escalation import EscalationKind, flow_run_url
from runbooks.params import RunbookParams
from runbooks.results import ChangeSet
from runbooks.safety import Guard, Target, guard
from runbooks.severity import Response, SeverityLevel, parse_start, response_verdict, run_severity
from runbooks.text import artifact_key, compact_list, escape_cell, summarize_values

# A deployment (or run) tagged `observe` only plans: a runbook new to production runs like this first.
OBSERVE_TAG = "observe"
# Every run that changes nothing on purpose (dry-run or observe) carries this tag.
DRY_RUN_TAG = "dry-run"

P = ParamSpec("P")
R = TypeVar("R")


class Outcome(StrEnum):
    RESOLVED = "RESOLVED"
    NO_ACTION_NEEDED = "NO ACTION NEEDED"
    PLANNED = "DRY-RUN: PLANNED ONLY"
    WAITING = "WAITING (SELF-HEALING)"
    HANDED_OFF = "HANDED OFF"  # to another runbook's run, which acts under its own guard
    TARGET_BUSY = "NOT ACTED: TARGET BUSY"
    DUPLICATE = "NOT ACTED: DUPLICATE ALERT"  # the alert event already started another run
    AWAITING_APPROVAL = "WAITING FOR APPROVAL"
    WOULD_ESCALATE = "DRY-RUN: WOULD ESCALATE"
    ESCALATED = "ESCALATED"
    FAILED = "FAILED"


# how loud the run's last line is: an escalation is an expected outcome, not a crash
_OUTCOME_LOG_LEVEL = {
    Outcome.ESCALATED: logging.ERROR,
    Outcome.FAILED: logging.ERROR,
    Outcome.WOULD_ESCALATE: logging.WARNING,
    Outcome.TARGET_BUSY: logging.WARNING,
}


# how the final state's message of a dry-run that would have escalated begins
WOULD_ESCALATE = "Would escalate to a human: "


class Notify(StrEnum):
    """Who hears how a run ended."""

    PAGE = "page"  # the escalation policy's channels: humans take over
    OBSERVE = "observe"  # the policy's quiet channel for what dry-runs found; never pages
    NOBODY = "nobody"


@dataclass(frozen=True)
class Ending:
    """How a run that stopped on an exception ends: its outcome, who is told, which state."""

    outcome: Outcome
    conclusion: str
    kind: EscalationKind | None
    notify: Notify
    # foreseen by the runbook (escalation, failed verification): the run ends in a state with a
    # clear message instead of a raised exception, so no traceback is logged for it
    expected: bool

    def state(self, exc: BaseException) -> State | None:
        """The run's final state; None for an unexpected error, whose traceback must show."""
        if not self.expected:
            return None
        if self.outcome in (Outcome.WOULD_ESCALATE, Outcome.DUPLICATE):
            return Completed(message=self.conclusion)
        # the exception as the state's data: calling the flow directly still raises it
        return Failed(message=self.conclusion, data=exc)


def decide_ending(exc: BaseException, dry_run: bool, cancelled: bool = False) -> Ending:
    """The ending of a run stopped by ``exc``; a dry-run never pages (its findings are observed).

    ``cancelled``: a person cancelled the run (Prefect's cancellation), which needs no page.
    """
    quiet = Notify.OBSERVE if dry_run else Notify.PAGE
    if isinstance(exc, DuplicateAlertRun):  # the run that has the alert acts and reports
        return Ending(
            Outcome.DUPLICATE, f"Stopped without acting: {exc}.", None, Notify.NOBODY, True
        )
    if isinstance(exc, TargetBusy):  # gave up waiting for another run: nobody may be fixing it
        if dry_run:
            return Ending(
                Outcome.WOULD_ESCALATE,
                f"{WOULD_ESCALATE}{exc} (dry-run: nobody was paged)",
                EscalationKind.TARGET_BUSY,
                quiet,
                expected=True,
            )
        return Ending(
            Outcome.TARGET_BUSY,
            f"Stopped without acting, escalated: {exc}.",
            EscalationKind.TARGET_BUSY,
            quiet,
            expected=True,
        )
    if isinstance(exc, Escalation | VerificationFailed):
        kind = _escalation_kind(exc)
        notify = quiet if not isinstance(exc, BudgetSpent) or exc.notify else Notify.NOBODY
        if dry_run:
            return Ending(
                Outcome.WOULD_ESCALATE,
                f"{WOULD_ESCALATE}{exc} (dry-run: nobody was paged)",
                kind,
                notify,
                expected=True,
            )
        if kind is EscalationKind.VERIFICATION_FAILED:
            return Ending(Outcome.FAILED, f"Verification failed: {exc}", kind, notify, True)
        return Ending(Outcome.ESCALATED, f"Escalated to a human: {exc}", kind, notify, True)
    conclusion = f"Run failed: {type(exc).__name__}: {exc}"
    if not isinstance(exc, Exception):
        if cancelled:  # a person cancelled it: they know
            return Ending(Outcome.FAILED, conclusion, None, Notify.NOBODY, expected=False)
        # Ctrl-C or SIGTERM of the serving process: the run stops half way and nobody would know
        # (best effort: the process is on its way out)
        return Ending(
            Outcome.FAILED,
            f"Run interrupted ({type(exc).__name__}) before it finished",
            EscalationKind.INTERRUPTED,
            quiet,
            expected=False,
        )
    return Ending(Outcome.FAILED, conclusion, EscalationKind.FAILED, quiet, expected=False)


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
    # the severity policy's level for this run (runbooks.severity) and why it is that one
    severity_level: SeverityLevel | None = None
    severity_why: str = ""
    ended_at: datetime | None = None

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

    def describe_severity(self) -> str:
        if self.severity_level is None:
            return self.severity
        why = f"; {self.severity_why}" if self.severity_why != "the runbook's" else ""
        return self.severity_level.describe() + why

    def incident_start(self) -> datetime:
        """When the incident started: the alert's startsAt, else when this run started."""
        alert = self.params.alert
        return (parse_start(alert.starts_at) if alert else None) or self.started_at

    def describe_response(self) -> str:
        """The severity's response-time target and whether this run kept it."""
        assert self.severity_level is not None
        outcome = None if self.params.dry_run or self.outcome is None else self.outcome.value
        _, words = response_verdict(
            self.severity_level,
            self.incident_start(),
            self.ended_at or datetime.now(UTC),
            outcome,
        )
        return f"{self.severity_level.target()}: {words}"

    def finish(self, outcome: Outcome, conclusion: str) -> None:
        """Record how the run ended; the log line is as loud as the outcome (ERROR: escalated)."""
        self.outcome = outcome
        self.conclusion = conclusion
        self.ended_at = datetime.now(UTC)
        text = f"outcome {outcome.value}: {conclusion}"
        self.timeline.append(_Entry(datetime.now(UTC), text))
        get_run_logger().log(_OUTCOME_LOG_LEVEL.get(outcome, logging.INFO), text)

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
            "| Field | Value |",
            "|---|---|",
            f"| Runbook | `{self.runbook}` |",
            f"| Severity | {escape_cell(self.describe_severity())} |",
            *(
                [f"| Response target | {escape_cell(self.describe_response())} |"]
                if self.severity_level
                else []
            ),
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
        lines += [f"- {clock(e.at)} - {escape_cell(e.text)}" for e in self.timeline]
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
            lines += [
                "| Step | Action | Count | Targets | Status | Before → after |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {g.step} | {g.action} | {g.count} | {escape_cell(compact_list(g.targets))} "
                f"| {escape_cell(g.status)} | {escape_cell(before_after(g.before, g.after))} |"
                for g in group_rows(self.rows)
            ]
        else:
            lines.append(nothing_done(self.outcome))
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
                table=[table_row(g) for g in group_rows(self.rows)],
                key=artifact_key(f"actions-{self.runbook}"),
                description=f"{self.title}: actions and their before/after state ({status})",
            )


@contextmanager
def incident_report(
    runbook: str, title: str, severity: str, params: RunbookParams
) -> Iterator[IncidentReport]:
    """Open a report for the run; it is published however the run ends.

    Escalations, failed verifications and other errors re-raise after the escalation policy was
    notified; a flow wrapped in ``ends_as_reported`` then ends in the state the report decided
    (FAILED with the reason, no traceback), other errors keep their traceback. A dry-run (or
    observe) run pages nobody: what would escalate completes it as "would escalate". A run that
    stopped because another run holds its target ends normally: nothing was changed.
    """
    level, why = run_severity(severity, params.alert.severity if params.alert else None)
    report = IncidentReport(
        runbook=runbook,
        title=title,
        severity=level.name,
        params=params,
        severity_level=level,
        severity_why=why,
    )
    report.trigger = describe_trigger(params)
    if OBSERVE_TAG in _run_tags() and not params.dry_run:
        params.dry_run = True
        report.observe_mode = True
    report.step(f"runbook {runbook} started ({report.trigger})")
    if params.dry_run:
        _mark_dry_run(report.observe_mode)
    if report.observe_mode:
        report.step("observe mode (tag 'observe'): every step plans only, nothing is changed")
    if _resumed():
        report.step(
            "resumed after an approval request was answered (or timed out): every check runs "
            "again against the live system before anything is changed"
        )
    try:
        claim_alert(report, params)
        yield report
    except Pause:
        # suspended for approval: the run starts again once answered (runbooks.approvals)
        report.outcome = Outcome.AWAITING_APPROVAL
        report.conclusion = "Suspended until someone approves or rejects the plan below."
        raise
    except TargetBusy as exc:
        if exc.escalate:
            _end(report, params, exc)
            raise
        report.finish(Outcome.TARGET_BUSY, f"Stopped without acting: {exc}.")
    except BaseException as exc:
        _end(report, params, exc)
        raise
    finally:
        report.publish()


def _end(report: IncidentReport, params: RunbookParams, exc: BaseException) -> None:
    """Record how the run ends, tell whom the ending says, keep the state for the flow."""
    ending = decide_ending(exc, params.dry_run, cancelled=_cancelled(exc))
    report.finish(ending.outcome, ending.conclusion)
    _notify(report, ending, str(exc) if ending.expected else f"{type(exc).__name__}: {exc}")
    _ending.set((exc, ending.state(exc)))


# The ending the report decided for the exception it re-raised, for ``ends_as_reported``.
_ending: ContextVar[tuple[BaseException, State | None] | None] = ContextVar(
    "runbook_ending", default=None
)


def ends_as_reported(fn: Callable[P, R]) -> Callable[P, R | State]:
    """Let a runbook flow end as its incident report decided, without a traceback for the foreseen.

    Prefect logs any exception leaving a flow as "Encountered exception during execution" with
    its traceback at ERROR. An escalation is a foreseen outcome, not a crash: returning a
    ``Failed`` state instead ends the run FAILED with the reason as its message and one log line
    (the report's outcome); returning ``Completed`` ends a dry-run that would escalate. Any other
    error still raises and keeps its traceback. Goes between ``@flow`` and the function.
    """

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R | State:
        # Prefect pickles a served flow's function by value, its module-level names by
        # reference: the work (and the ContextVar, which cannot be pickled) stays out of here
        return _call_as_reported(fn, *args, **kwargs)

    return run


def _call_as_reported(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R | State:
    token = _ending.set(None)
    try:
        return fn(*args, **kwargs)
    except (Escalation, VerificationFailed, TargetBusy, DuplicateAlertRun) as exc:
        decided = _ending.get()
        if decided is None or decided[0] is not exc or decided[1] is None:
            raise  # raised outside an incident report: nothing recorded it
        return decided[1]
    finally:
        _ending.reset(token)


def _escalation_kind(exc: Escalation | VerificationFailed) -> EscalationKind:
    if isinstance(exc, VerificationFailed):
        return EscalationKind.VERIFICATION_FAILED
    if isinstance(exc, BudgetSpent):
        return EscalationKind.BUDGET_SPENT
    if isinstance(exc, ApprovalRejected):
        return EscalationKind.REJECTED
    if isinstance(exc, ApprovalTimedOut):
        return EscalationKind.APPROVAL_TIMEOUT
    return EscalationKind.ESCALATED


def dry_run_name(name: str, observe: bool) -> str:
    """The run's name with its mode in front, so the runs list tells it from a live run."""
    prefix = f"{OBSERVE_TAG if observe else DRY_RUN_TAG}: "
    return name if name.startswith(prefix) else prefix + name


def _mark_dry_run(observe: bool) -> None:
    """Tag and rename this run in Prefect: a dry-run must not look like a live run in the UI."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    run = ctx.flow_run
    tags = sorted({*run.tags, DRY_RUN_TAG, *([OBSERVE_TAG] if observe else [])})
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, name=dry_run_name(run.name, observe), tags=tags)
    except (httpx.HTTPError, PrefectException) as exc:
        # a label in the UI is not worth failing the checks the dry-run is for
        get_run_logger().warning("could not mark the run as dry-run in Prefect: %s", exc)


def _notify(report: IncidentReport, ending: Ending, reason: str) -> None:
    """Tell the escalation policy how the run ended; a problem here never hides the run's error.

    Live runs page the policy's channels; dry-run findings go only to its observe channels.
    """
    from blocks.escalation import EscalationPolicy
    from runbooks.escalation import EscalationMessage, send_escalation

    if ending.kind is None or ending.notify is Notify.NOBODY:
        return
    observe = ending.notify is Notify.OBSERVE
    nobody = "dry-run: nobody was paged" if observe else "nobody notified"
    name = report.params.safety.escalation_block
    logger = get_run_logger()
    if not name:
        report.notified.append(f"no escalation policy configured for this run: {nobody}")
        return
    try:
        policy = EscalationPolicy.load(name)
    except ValueError:
        report.notified.append(f"escalation policy block {name!r} is not saved: {nobody}")
        logger.warning("escalation policy block %r not found; %s", name, nobody)
        return
    if observe and not policy.observe_notification_blocks:
        report.notified.append(f"{nobody}; policy {name!r} has no observe channel")
        return
    ctx = FlowRunContext.get()
    message = EscalationMessage(
        runbook=report.runbook,
        title=report.title,
        severity=report.severity,
        response=report.severity_level.target() if report.severity_level else "",
        ticket=bool(report.severity_level and report.severity_level.response is Response.TICKET),
        kind=ending.kind,
        reason=reason,
        target=report.target.label if report.target else None,
        tried=[
            f"{g.step}: {g.action} {compact_list(g.targets)} ({g.status})"
            for g in group_rows(report.rows)
        ],
        trigger=report.trigger,
        run_url=_run_link(),
        flow_run_id=str(ctx.flow_run.id) if ctx and ctx.flow_run else None,
        dry_run=observe,
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
        sent = f"{sum(d.ok for d in deliveries)}/{len(deliveries)}"
        report.step(
            f"dry-run findings ({ending.kind.value}) sent to {sent} observe channel(s)"
            if observe
            else f"escalated ({ending.kind.value}) to {sent} channel(s)"
        )


def _cancelled(exc: BaseException) -> bool:
    """Whether an interrupt is Prefect's cancellation of this run (a person asked for it)."""
    if isinstance(exc, Exception):
        return False
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(ctx.flow_run.id).state
    except (httpx.HTTPError, PrefectException, OSError):
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def claim_alert(report: IncidentReport, params: RunbookParams) -> None:
    """One run per alert event and automation (runbooks.alert_claims): a second run started by a
    redelivered event stops here, before any check or change; the first one goes on."""
    alert = params.alert
    ctx = FlowRunContext.get()
    if alert is None or alert.event_id is None or ctx is None or ctx.flow_run is None:
        return
    run = ctx.flow_run
    claim = claim_alert_event(
        alert.event_id, alert.event_occurred, run.idempotency_key, run.id, run.name
    )
    if claim is None:
        return  # not started by an automation: a person (or a schedule) means this run
    event = f"alert event {claim.event_id}"
    verdict, attempt, holder = claim.decision.verdict, claim.decision.attempt, claim.holder
    if verdict is Verdict.FIRST:
        report.step(f"{event} claimed by this run: a second delivery of it will not act")
    elif verdict is Verdict.OWN:
        report.step(f"{event} is this run's already (claimed before it was resumed)")
    else:
        assert holder is not None
        name = holder.flow_run_name or str(holder.flow_run_id)
        link = flow_run_url(str(holder.flow_run_id))
        other = f"run {name}" + (f" ({link})" if link else "")
        how = claim.holder_state
        if verdict is Verdict.TAKE_OVER:
            report.step(
                f"{event} was claimed by {other}, which ended {how} before finishing: this run "
                f"takes it over (attempt {attempt} of {MAX_ATTEMPTS})"
            )
        elif verdict is Verdict.DUPLICATE:
            raise DuplicateAlertRun(
                f"{event} already started {other} ({how}) from the same automation; Prefect "
                "delivered the event again (at-least-once after a server restart)"
            )
        else:
            raise Escalation(
                f"{event}: its last {attempt} runs ended {how} before finishing (the last: "
                f"{other}); not starting it again"
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


def before_after(before: list[Any], after: list[Any]) -> str:
    """A group's state before and after, summarized, as code (a masked secret is no markdown)."""

    def code(values: list[Any]) -> str:
        text = summarize_values(values)
        return f"`{text.replace('`', chr(39))}`" if text else "-"

    return f"{code(before)} → {code(after)}"


def clock(at: datetime) -> str:
    """Time of day to the millisecond: a run's steps are often less than a second apart."""
    return f"{at:%H:%M:%S}.{at.microsecond // 1000:03d}Z"


# What the actions section says when a run recorded no action, by how the run ended
_NOTHING_DONE: dict[Outcome | None, str] = {
    None: "Nothing was changed so far.",
    Outcome.RESOLVED: "No change was needed or made.",
    Outcome.NO_ACTION_NEEDED: "No change was needed or made.",
    Outcome.PLANNED: "No change was needed: nothing to plan.",
    Outcome.WAITING: "Nothing was changed: waiting for the system to recover by itself.",
    Outcome.HANDED_OFF: "Nothing was changed here: the runbook it was handed to acts, under its "
    "own lock, budget and approvals (see its run).",
    Outcome.TARGET_BUSY: "Nothing was changed: another run is acting on the target.",
    Outcome.DUPLICATE: "Nothing was changed: the run that has this alert acts on it.",
    Outcome.WOULD_ESCALATE: "Nothing was planned: the run would escalate before acting.",
    Outcome.ESCALATED: "Nothing was changed: escalated before acting.",
    Outcome.FAILED: "Nothing was changed: the run failed before acting.",
    Outcome.AWAITING_APPROVAL: "Nothing was changed yet: waiting for a human's approval.",
}


def nothing_done(outcome: Outcome | None) -> str:
    """The actions section of a run that recorded no action: what was (not) done, and why."""
    return _NOTHING_DONE[outcome]


def _run_link() -> str | None:
    ctx = FlowRunContext.get()
    base = PREFECT_UI_URL.value()
    if ctx is None or ctx.flow_run is None or not base:
        return None
    return f"{base.rstrip('/')}/runs/flow-run/{ctx.flow_run.id}"
