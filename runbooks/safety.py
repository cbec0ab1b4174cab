"""Guard rails every runbook opts into with two lines: a per-target lock and guarded actions.

```python
server = Target("postgres", f"{db.host}:{db.port}", get_system_identifier(db))
with report.guard(server) as guard:                  # lock the target
    ...checks...
    guard.act("terminate idle connections",
              lambda dry_run: terminate_idle_connections(db, idle, criteria, dry_run),
              budget=Budget(max_actions=3, window_s=3600),
              approval=lambda plan: "sessions inside a transaction lose their work" if ... else None)
    guard.verify("free connections restored", probe, ok, timeout_s=30)
```

What the guard does, in order, for each action:

1. **Lock** (``report.guard``, runbooks.locks): a Prefect global concurrency limit of 1 slot per
   target, held with a lease that the run renews and that expires if the run dies, plus a record of
   the holder. A second run on the same target waits (then re-checks from scratch) or stops, per
   ``params.safety.on_busy_target``; a holder whose run ended or whose process is gone is released at
   once; a run that gives up waiting escalates and names the holder.
2. **Plan**: the mutating task runs with ``dry_run=True``; every planned change becomes a
   ``runbook.action.planned`` event. In dry-run (or observe mode) the guard stops here.
3. **Budget**: at most N executions per target and action in any sliding window, counted in a ledger
   kept in a Prefect Variable (``runbooks_budget_<target>``), so it survives flow and server restarts and
   is visible in the UI. Read and written under the target lock, so two runs cannot both spend the last
   slot. Prefect's rate limits were the first choice but their decay is ``floor(rate * seconds since last
   update)`` and a *denied* attempt updates the row, so alerts re-firing every few minutes would keep a
   spent budget from ever refilling; a ledger gives the exact rule an SRE states ("3 per hour").
   Spent: nothing happens, ``runbook.action.skipped``, and the run escalates once per spent budget.
4. **Approval** (runbooks.approvals): when ``approval(plan)`` names a danger, the run suspends with
   the plan in the UI's resume form, keeping its target's lock; approve/reject with a reason goes into
   the report; no answer before ``approval_timeout_s`` rejects and escalates. The suspended run holds
   no process, so restarts lose nothing; once answered it starts again, re-checks everything and acts
   only if its new plan is within the approved one (otherwise it asks again).
5. **Execute**: where the deployment opted in (``safety.silence_block``), the alert that started
   the run is silenced in Alertmanager first, and the silence is expired when the guard lets go
   of the target, before any escalation (runbooks.silences). The task runs again for real (it re-plans against the live state, so a stale plan never
   applies); ``runbook.action.executed`` / ``.skipped`` / ``.failed`` events, one per action, with the
   target as the event's resource.
6. **Verify** (``guard.verify``): re-check the symptom until a deadline; the alert's own
   ``alert.resolved`` event also counts. Failure raises ``VerificationFailed`` (run FAILED, escalated).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Generic, TypeVar

import httpx
from prefect import get_client
from prefect.context import FlowRunContext
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import Pause, PrefectException
from prefect.variables import Variable
from pydantic import BaseModel, Field

from runbooks.approvals import Approval, ConfirmedApproval, confirmation_missing, request_approval
from runbooks.audit import ActionRow, emit_action, scrub
from runbooks.errors import ApprovalRejected, ApprovalTimedOut, BudgetSpent, TargetBusy
from runbooks.escalation import flow_run_url
from runbooks.locks import HolderStatus, LockBusy, LockHolder, TargetLock, put_variable
from runbooks.params import OnBusyTarget, SafetyParams
from runbooks.results import ChangeSet
from runbooks.silences import RunSilence, why_not_silence
from runbooks.text import artifact_key, escape_cell
from runbooks.waiting import poll_until

if TYPE_CHECKING:
    from runbooks.report import IncidentReport

T = TypeVar("T")

SKIP_PATIENCE_S = 3.0
# an approved plan is re-checked on resume; a plan that grew since asks again, this many times
MAX_APPROVAL_ROUNDS = 3


# --- targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a runbook acts on: one broker, database, job, pod, gateway or event store.

    ``name`` is how people know it (``host:port``, a URL), shown in reports; ``identity`` is what
    the system says it is (e.g. PostgreSQL's ``system_identifier``), so blocks that reach one
    server by different host names share its lock, budget and events. Empty: the name.
    """

    kind: str
    name: str
    identity: str = ""

    @property
    def key(self) -> str:
        """What locks, budgets and events are keyed on."""
        return self.identity or self.name

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"

    @property
    def resource_id(self) -> str:
        """The Prefect event resource id of this target (events: ``runbook.action.*``)."""
        return f"runbook.target.{self.kind}.{self.key}"

    @property
    def slug(self) -> str:
        """A name Prefect accepts for limits and variables: [a-z0-9_-], unique per target."""
        readable = re.sub(r"[^a-z0-9]+", "-", f"{self.kind}-{self.key}".lower()).strip("-")[:80]
        digest = hashlib.sha256(f"{self.kind}\0{self.key}".encode()).hexdigest()[:10]
        return f"{readable}-{digest}"

    @property
    def lock_name(self) -> str:
        return f"runbooks-lock-{self.slug}"


# --- budget ------------------------------------------------------------------------------------


class Budget(BaseModel):
    """At most ``max_actions`` executions of one action on one target in any ``window_s`` seconds."""

    max_actions: int = Field(ge=1, le=1000)
    window_s: float = Field(gt=0, le=30 * 86400)

    def describe(self) -> str:
        return f"{self.max_actions} per {_duration(self.window_s)}"


class BudgetLedger(BaseModel):
    """When an action was executed on a target; kept in a Prefect Variable between runs."""

    target: str
    action: str
    executed: list[datetime] = Field(default_factory=list)
    escalated_at: datetime | None = None

    def within(self, budget: Budget, now: datetime) -> list[datetime]:
        start = now - timedelta(seconds=budget.window_s)
        return sorted(t for t in self.executed if t > start)


@dataclass(frozen=True)
class BudgetCheck:
    allowed: bool
    used: int
    next_free_at: datetime | None
    notify: bool


def check_budget(ledger: BudgetLedger, budget: Budget, now: datetime) -> BudgetCheck:
    """Whether one more execution fits; when not, whether this is the first refusal to report."""
    recent = ledger.within(budget, now)
    if len(recent) < budget.max_actions:
        return BudgetCheck(True, len(recent), None, notify=False)
    # the oldest execution still in the window frees a slot when it leaves the window
    free_at = recent[-budget.max_actions] + timedelta(seconds=budget.window_s)
    # escalate once per spent budget: again only after a new execution happened since
    notify = ledger.escalated_at is None or ledger.escalated_at < recent[-1]
    return BudgetCheck(False, len(recent), free_at, notify=notify)


def effective_budget(budget: Budget | None, safety: SafetyParams) -> Budget | None:
    """The runbook's budget with the run's overrides applied (a run can't turn budgets off)."""
    if budget is None:
        return None
    return Budget(
        max_actions=safety.budget_max_actions or budget.max_actions,
        window_s=safety.budget_window_s or budget.window_s,
    )


def record_execution(ledger: BudgetLedger, budget: Budget, now: datetime) -> BudgetLedger:
    """The ledger after one more execution; entries older than the window are dropped."""
    return ledger.model_copy(update={"executed": [*ledger.within(budget, now), now]})


def budget_variable(target: Target, action: str) -> str:
    digest = hashlib.sha256(action.encode()).hexdigest()[:6]
    return f"runbooks_budget_{target.slug}_{digest}"


def _load_ledger(target: Target, action: str) -> BudgetLedger:
    raw = Variable.get(budget_variable(target, action), default=None)
    if not raw:
        return BudgetLedger(target=target.label, action=action)
    return BudgetLedger.model_validate(raw)


def _save_ledger(target: Target, ledger: BudgetLedger) -> None:
    put_variable(
        budget_variable(target, ledger.action),
        ledger.model_dump(mode="json"),
        tags=["runbooks", "remediation-budget"],
    )


# --- approval ----------------------------------------------------------------------------------


def approval_request(
    label: str,
    target: Target,
    danger: str,
    plan: ChangeSet,
    confirm: list[str] | None = None,
    required: int = 1,
    approved_by: list[str] | None = None,
) -> str:
    """The markdown shown above the resume form: what would happen and why it needs a human."""
    lines = [
        f"### Approval needed: {label} on {target.label}",
        f"**Why a human must decide:** {danger}",
        "",
        "| Action | Target |",
        "|---|---|",
    ]
    lines += [f"| {c.action} | {escape_cell(c.target)} |" for c in plan.planned]
    lines += ["", "Approve to apply exactly this plan (re-checked against live state first)."]
    if required > 1:
        so_far = ", ".join(escape_cell(a) for a in approved_by or []) or "nobody yet"
        lines += [
            "",
            f"**Four eyes: {required} different people must approve** (approved so far: "
            f"{so_far}); fill in your name as approver. One rejection ends it.",
        ]
    if confirm:
        names = ", ".join(f"`{escape_cell(n)}`" for n in confirm)
        lines += [
            "",
            f"**Data may be lost: to approve, also type {names} in the confirm field.** "
            "An approval without them changes nothing.",
        ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ApproverCount:
    """What one approval adds: the approver counted (None: not counted) and a line for the report."""

    counted: str | None
    note: str


def count_approver(approved_by: list[str], approver: str, required: int) -> ApproverCount:
    """Four eyes: whether ``approver`` counts as one more of the ``required`` different people.

    Names compare without case or surrounding blanks; with one approver required, an approval
    without a name still counts (as "someone"), as it always has.
    """
    name = " ".join(approver.split())
    if required <= 1:
        who = name or "someone"
        return ApproverCount(who, f"approved by {who}")
    if not name:
        return ApproverCount(
            None,
            f"an approval without a name does not count: {required} different people must approve",
        )
    if name.casefold() in {a.casefold() for a in approved_by}:
        return ApproverCount(
            None, f"{name} approved again: the same person counts once; another person must approve"
        )
    left = required - len(approved_by) - 1
    more = f"; {left} more approver(s) needed (four eyes)" if left > 0 else ""
    return ApproverCount(name, f"approved by {name} ({len(approved_by) + 1} of {required}){more}")


# --- verification ------------------------------------------------------------------------------


@dataclass
class Verification(Generic[T]):
    ok: bool
    last: T | None
    by: str  # "check" or "alert.resolved" or "" when not verified
    elapsed_s: float


def alert_resolved_since(fingerprint: str, since: datetime) -> bool:
    """Whether Prefect holds an ``alert.resolved`` event for this alert that occurred after ``since``."""
    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(
                occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(1)),
                event=EventNameFilter(name=["alert.resolved"]),
                resource=EventResourceFilter(id=[f"alert.{fingerprint}"]),
            ),
            limit=1,
        )
    return bool(page.events)


# --- the guard ---------------------------------------------------------------------------------


@dataclass
class Guard:
    """Acts on one locked target for one run; see the module docstring."""

    report: IncidentReport
    target: Target
    acted_at: datetime | None = None
    lock: TargetLock | None = field(default=None, repr=False)
    silence: RunSilence | None = field(default=None, repr=False)
    _approvals: int = field(default=0, repr=False)

    def act(
        self,
        label: str,
        change: Callable[[bool], ChangeSet],
        *,
        budget: Budget | None = None,
        approval: Callable[[ChangeSet], str | None] | None = None,
        confirm: Callable[[ChangeSet], list[str]] | None = None,
        approvers: int = 1,
    ) -> ChangeSet:
        """Plan, check budget and approval, execute; returns what was applied (or planned).

        ``confirm(plan)`` names what the approver must type to approve (data that would be lost);
        it makes the step need approval even when ``approval`` names no danger. ``approvers``:
        how many different people must approve the step (four eyes: 2); ``safety.min_approvers``
        can raise it for a deployment.
        """
        report = self.report
        budget = effective_budget(budget, report.params.safety)
        plan = change(True)
        emit_action("planned", self.target, report, label, plan.planned)
        if not plan.planned or report.params.dry_run:
            report.record(label, plan)
            return plan

        ledger = _load_ledger(self.target, label) if budget else None
        if budget and ledger is not None:
            verdict = check_budget(ledger, budget, datetime.now(UTC))
            if not verdict.allowed:
                self._refuse(label, plan, f"remediation budget spent ({budget.describe()})")
                if verdict.notify:
                    _save_ledger(
                        self.target, ledger.model_copy(update={"escalated_at": datetime.now(UTC)})
                    )
                free = f"{verdict.next_free_at:%Y-%m-%d %H:%M:%S} UTC"
                raise BudgetSpent(
                    f"{label} on {self.target.label}: budget of {budget.describe()} spent "
                    f"({verdict.used} already); not acting until {free}"
                    + ("" if verdict.notify else "; already escalated, not notifying again"),
                    notify=verdict.notify,
                )

        danger = approval(plan) if approval else None
        names = sorted(confirm(plan)) if confirm else []
        if danger or names:
            self._ask_approval(label, plan, danger or "data would be lost", names, approvers)

        if budget and ledger is not None:
            # spent before acting: a run that dies halfway still counts its attempt
            _save_ledger(self.target, record_execution(ledger, budget, datetime.now(UTC)))
        self._silence_alert()
        self.acted_at = datetime.now(UTC)
        try:
            result = change(False)
        except BaseException as exc:
            emit_action(
                "failed", self.target, report, label, plan.planned, f"{type(exc).__name__}: {exc}"
            )
            report.rows += [
                ActionRow(
                    label, c.action, c.target, "failed", scrub(c.detail), None, str(exc)[:200]
                )
                for c in plan.planned
            ]
            raise
        applied = {(c.action, c.target) for c in result.applied}
        emit_action("executed", self.target, report, label, result.applied)
        not_applied = [c for c in result.planned if (c.action, c.target) not in applied]
        note = "; ".join(result.notes) or "not applied"
        emit_action("skipped", self.target, report, label, not_applied, note)
        report.record(label, result, before=plan)
        return result

    def verify(
        self,
        name: str,
        probe: Callable[[], T],
        ok: Callable[[T], bool],
        *,
        timeout_s: float,
        interval_s: float = 1.0,
        describe: Callable[[T], str] = str,
        give_up: Callable[[T], bool] | None = None,
    ) -> Verification[T]:
        """Re-check the symptom until ``ok`` or the deadline; the alert's resolution also counts.

        ``give_up(value)`` ends the wait early as failed (e.g. the job went FAILED: waiting won't
        help). Records the check in the report; the caller decides what a failure means (raise
        ``VerificationFailed`` with a clear message, which escalates).
        """
        report = self.report
        alert = report.params.alert
        fingerprint = alert.fingerprint if alert and alert.status != "resolved" else None
        watch_alert = bool(fingerprint) and report.params.safety.alert_resolved_verifies
        since = self.acted_at or report.started_at
        resolved = False

        def done(value: T) -> bool:
            nonlocal resolved
            if ok(value) or (give_up is not None and give_up(value)):
                return True
            if watch_alert:
                resolved = _safe_alert_resolved(fingerprint, since)
            return resolved

        outcome = poll_until(probe, done, timeout_s=timeout_s, interval_s=interval_s)
        last = outcome.last
        observed = describe(last) if last is not None else "no reading"
        if outcome.ok and ok(last):
            by = "check"
        elif outcome.ok and resolved:
            by = "alert.resolved"
            observed = f"alert {alert.alertname or fingerprint} resolved; last check: {observed}"
        else:
            by = ""
        report.check(name, bool(by), observed)
        return Verification(bool(by), last, by, outcome.elapsed_s)

    # internals ---------------------------------------------------------------------------

    def _silence_alert(self) -> None:
        """Before the first change: silence the run's alert where the deployment opted in."""
        if self.silence is None:
            return
        run_id = _this_run_id()
        self.silence.start(
            self.report,
            run_id or "outside a flow run",
            flow_run_url(run_id),
            self.report.params.safety.silence_max_s,
        )

    def _refuse(self, label: str, plan: ChangeSet, reason: str) -> None:
        emit_action("skipped", self.target, self.report, label, plan.planned, reason)
        skipped = plan.model_copy(update={"notes": [*plan.notes, f"not applied: {reason}"]})
        self.report.record(label, skipped, status=reason)

    def _ask_approval(
        self,
        label: str,
        plan: ChangeSet,
        danger: str,
        confirm: list[str] | None = None,
        approvers: int = 1,
    ) -> None:
        report = self.report
        safety = report.params.safety
        required = max(approvers, safety.min_approvers)
        items = sorted(c.describe() for c in plan.planned)
        self._approvals += 1
        key = f"approval-{self._approvals}-{artifact_key(label)}"
        approved_by: list[str] = []
        reasons: list[str] = []
        # every round is one suspension with its own key, in the same order in every process,
        # so a resumed run reads the earlier rounds' answers instead of asking again
        for round_ in range(1, MAX_APPROVAL_ROUNDS + 1 + 2 * (required - 1)):
            answer = request_approval(
                (ConfirmedApproval if confirm else Approval).with_initial_data(
                    description=approval_request(
                        label, self.target, danger, plan, confirm, required, approved_by
                    )
                ),
                key=key if round_ == 1 else f"{key}-{round_}",
                timeout_s=safety.approval_timeout_s,
                poll_s=safety.approval_poll_s,
                plan=items,
                before_suspending=lambda deadline: self._suspend(label, danger, deadline),
                on_waiting=lambda pause_key, so_far=list(approved_by): self._announce(
                    label, danger, plan, confirm, required, so_far, pause_key
                ),
            )
            if answer.form is None or not answer.form.approve:
                break
            grown = sorted(set(items) - set(answer.plan or items))
            if grown:
                report.step(
                    f"{label}: the plan grew since it was approved ({', '.join(grown[:5])}"
                    f"{' ...' if len(grown) > 5 else ''}); asking again"
                )
                approved_by, reasons = [], []  # a new plan needs every approval again
                continue
            missing = confirmation_missing(getattr(answer.form, "confirm", ""), confirm or [])
            if missing:
                break  # refused below, naming what was not typed
            progress = count_approver(approved_by, answer.form.approver, required)
            if required > 1:
                report.step(f"{label}: {progress.note}")
            if progress.counted:
                approved_by.append(progress.counted)
                reasons.append(answer.form.reason)
            if len(approved_by) >= required:
                break
        else:
            answer.form = None  # approved plans kept falling behind the live state
        form = answer.form
        if form is None:
            reason = f"approval timed out after {safety.approval_timeout_s}s"
            report.approvals.append((label, "timed out", "", reason))
            self._refuse(label, plan, reason)
            raise ApprovalTimedOut(
                f"{label} on {self.target.label} needs approval ({danger}); nobody answered "
                f"within {safety.approval_timeout_s}s"
            )
        who = form.approver or "someone"
        if not form.approve:
            for earlier, why in zip(approved_by, reasons, strict=True):
                report.approvals.append((label, "approved", earlier, why))
            report.approvals.append((label, "rejected", who, form.reason))
            self._refuse(label, plan, f"rejected by {who}: {form.reason or 'no reason given'}")
            raise ApprovalRejected(
                f"{label} on {self.target.label} rejected by {who}: "
                f"{form.reason or 'no reason given'}"
            )
        missing = confirmation_missing(getattr(form, "confirm", ""), confirm or [])
        if missing:
            reason = f"approved without typing {', '.join(missing)} in the confirm field"
            report.approvals.append((label, "rejected", who, reason))
            self._refuse(label, plan, f"{reason} (by {who})")
            raise ApprovalRejected(
                f"{label} on {self.target.label}: {who} {reason}; nothing was changed"
            )
        for approver, why in zip(approved_by, reasons, strict=True):
            report.approvals.append((label, "approved", approver, why))
        report.step(
            f"{label}: approved by {', '.join(approved_by)} "
            f"({'; '.join(r for r in reasons if r) or 'no reason given'})"
        )

    def _announce(
        self,
        label: str,
        danger: str,
        plan: ChangeSet,
        confirm: list[str] | None,
        required: int,
        approved_by: list[str],
        pause_key: str,
    ) -> None:
        """The run now waits for an answer: post the request to Slack where configured."""
        block = self.report.params.safety.approval_slack_block
        if block is None:
            return
        from runbooks.slack_approvals import post_approval_request

        run_id = _this_run_id()
        try:
            post_approval_request(
                block,
                runbook=self.report.runbook,
                label=label,
                target=self.target.label,
                danger=danger,
                changes=[c.describe() for c in plan.planned],
                run_id=run_id or "",
                run_url=flow_run_url(run_id),
                pause_key=pause_key,
                required=required,
                approved_by=approved_by,
                typing_required=bool(confirm),
            )
        except Exception as exc:  # noqa: BLE001 - the UI's resume form still works
            self.report.step(
                f"{label}: could not post the approval request to Slack ({block}): "
                f"{type(exc).__name__}: {str(exc)[:200]}; answer it in the Prefect UI"
            )
            return
        self.report.step(f"{label}: approval request posted to Slack ({block})")

    def _suspend(self, label: str, danger: str, deadline: datetime) -> None:
        """The run is about to suspend: keep the target locked for it, show the plan."""
        if self.lock is not None:
            self.lock.keep_while_suspended(deadline)
        self.report.step(
            f"{label}: waiting for approval until {deadline:%H:%M:%S}Z ({danger}); the run is "
            "suspended and starts again, re-checking everything, once someone answers"
        )


def _safe_alert_resolved(fingerprint: str | None, since: datetime) -> bool:
    if not fingerprint:
        return False
    try:
        return alert_resolved_since(fingerprint, since)
    except (httpx.HTTPError, PrefectException):
        return False  # the symptom check still decides


@contextmanager
def guard(report: IncidentReport, target: Target) -> Iterator[Guard]:
    """Hold the target's lock for the block; wait or stop per ``params.safety`` when it is busy."""
    safety = report.params.safety
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    lock = TargetLock(
        target.lock_name,
        f"runbooks_lock_{target.slug}",
        runbook=report.runbook,
        flow_run_id=run.id if run else None,
        flow_run_name=run.name if run else None,
    )
    wait = safety.on_busy_target is OnBusyTarget.WAIT
    # "skip" still allows a moment for the API round trip and a lock being released right now
    patience = safety.busy_wait_s if wait else min(SKIP_PATIENCE_S, safety.busy_wait_s)
    try:
        got = lock.acquire(patience)
    except LockBusy as exc:
        raise _busy(report, target, exc, wait, patience) from None
    report.target = target
    for stale in got.released_stale:
        report.step(f"released the lock of {target.label} left by {stale}")
    if got.adopted:
        report.step(f"lock on {target.label} taken back (it was kept while waiting for approval)")
    elif got.waited_for is not None:
        report.step(
            f"lock on {target.label} acquired after waiting {got.waited_s:.1f}s for another run "
            f"to finish ({_holder_text(got.waited_for)})"
        )
    else:
        report.step(f"lock on {target.label} acquired")
    params = report.params
    skip = why_not_silence(params.alert, safety.silence_block, params.dry_run)
    silence = RunSilence(safety.silence_block) if skip is None and safety.silence_block else None
    if safety.silence_block and skip:
        report.step(f"alert not silenced: {skip}")
    try:
        with lock.renewed():
            yield Guard(report, target, lock=lock, silence=silence)
    except Pause:
        lock.suspended()  # the lease was kept for the approval: the resumed run adopts it
        raise
    finally:
        if silence is not None:
            silence.end(report)  # before the report escalates: an escalation must page
        lock.release()


def _busy(
    report: IncidentReport, target: Target, exc: LockBusy, wait: bool, patience: float
) -> TargetBusy:
    """Why this run does not act, for the report; whether a human must hear of it."""
    busy = exc.busy
    holder = _holder_text(busy.holder) if busy.holder else "a run that left no record"
    if busy.status is HolderStatus.AWAITING_APPROVAL:
        report.busy = (
            f"{target.label} is held by {holder}, waiting for a human's approval to act on it: "
            "that decision covers this alert too"
        )
        return TargetBusy(f"{target.label} awaits approval in {holder}; this run changed nothing")
    how = f"waited {patience:g}s" if wait else "configured not to wait"
    report.busy = f"{target.label} busy: held by {holder} ({how})"
    # a run that waited and gave up leaves a symptom nobody is fixing: someone must know
    return TargetBusy(
        f"{target.label} is held by {holder} ({how}); this run changed nothing",
        escalate=wait,
    )


def _holder_text(holder: LockHolder) -> str:
    link = flow_run_url(holder.flow_run_id)
    return holder.describe() + (f" ({link})" if link else "")


def _this_run_id() -> str | None:
    """The id of the flow run this code runs in (None outside one)."""
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
