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

1. **Lock** (``report.guard``): a Prefect global concurrency limit of 1 slot per target, held with a
   lease that Prefect renews while the run lives and expires if the run dies. A second run on the same
   target waits (then re-checks from scratch) or stops, per ``params.safety.on_busy_target``.
2. **Plan**: the mutating task runs with ``dry_run=True``; every planned change becomes a
   ``runbook.action.planned`` event. In dry-run (or observe mode) the guard stops here.
3. **Budget**: at most N executions per target and action in any sliding window, counted in a ledger
   kept in a Prefect Variable (``runbooks_budget_<target>``), so it survives flow and server restarts and
   is visible in the UI. Read and written under the target lock, so two runs cannot both spend the last
   slot. Prefect's rate limits were the first choice but their decay is ``floor(rate * seconds since last
   update)`` and a *denied* attempt updates the row, so alerts re-firing every few minutes would keep a
   spent budget from ever refilling; a ledger gives the exact rule an SRE states ("3 per hour").
   Spent: nothing happens, ``runbook.action.skipped``, and the run escalates once per spent budget.
4. **Approval**: when ``approval(plan)`` names a danger, the run pauses with ``wait_for_input`` and shows
   the plan in the UI's resume form; approve/reject with a reason goes into the report; no answer
   before ``approval_timeout_s`` rejects and escalates.
5. **Execute**: the task runs again for real (it re-plans against the live state, so a stale plan never
   applies); ``runbook.action.executed`` / ``.skipped`` / ``.failed`` events, one per action, with the
   target as the event's resource.
6. **Verify** (``guard.verify``): re-check the symptom until a deadline; the alert's own
   ``alert.resolved`` event also counts. Failure raises ``VerificationFailed`` (run FAILED, escalated).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from prefect import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectException
from prefect.input import RunInput, keyset_from_paused_state
from prefect.states import Paused
from prefect.utilities.engine import propose_state_sync
from prefect.variables import Variable
from pydantic import BaseModel, Field

from runbooks.audit import ActionRow, emit_action, scrub
from runbooks.errors import ApprovalRejected, ApprovalTimedOut, BudgetSpent, TargetBusy
from runbooks.params import OnBusyTarget, SafetyParams
from runbooks.results import ChangeSet
from runbooks.text import artifact_key, escape_cell
from runbooks.waiting import poll_until

if TYPE_CHECKING:
    from runbooks.report import IncidentReport

T = TypeVar("T")

LOCK_LEASE_S = 120.0
SKIP_PATIENCE_S = 3.0
# Prefect's own pause outlives the approval deadline by this much (see pause_for_approval)
PAUSE_GRACE_S = 60


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
    Variable.set(
        budget_variable(target, ledger.action),
        ledger.model_dump(mode="json"),
        tags=["runbooks", "remediation-budget"],
        overwrite=True,
    )


# --- approval ----------------------------------------------------------------------------------


class Approval(RunInput):
    """The resume form of a run waiting for approval of a destructive step."""

    approve: bool = Field(False, description="Tick to let the run apply the plan shown above.")
    approver: str = Field("", description="Who decides (name or handle), for the report.")
    reason: str = Field("", description="Why; goes into the incident report.")


def approval_request(label: str, target: Target, danger: str, plan: ChangeSet) -> str:
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
    return "\n".join(lines)


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
    _approvals: int = field(default=0, repr=False)

    def act(
        self,
        label: str,
        change: Callable[[bool], ChangeSet],
        *,
        budget: Budget | None = None,
        approval: Callable[[ChangeSet], str | None] | None = None,
    ) -> ChangeSet:
        """Plan, check budget and approval, execute; returns what was applied (or planned)."""
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
        if danger:
            self._ask_approval(label, plan, danger)

        if budget and ledger is not None:
            # spent before acting: a run that dies halfway still counts its attempt
            _save_ledger(self.target, record_execution(ledger, budget, datetime.now(UTC)))
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

    def _refuse(self, label: str, plan: ChangeSet, reason: str) -> None:
        emit_action("skipped", self.target, self.report, label, plan.planned, reason)
        skipped = plan.model_copy(update={"notes": [*plan.notes, f"not applied: {reason}"]})
        self.report.record(label, skipped, status=reason)

    def _ask_approval(self, label: str, plan: ChangeSet, danger: str) -> None:
        report = self.report
        safety = report.params.safety
        description = approval_request(label, self.target, danger, plan)
        report.step(f"{label}: waiting up to {safety.approval_timeout_s}s for approval ({danger})")
        report.publish()  # the plan is in the UI while the run waits
        self._approvals += 1
        answer = pause_for_approval(
            Approval.with_initial_data(description=description),
            key=f"approval-{self._approvals}-{artifact_key(label)}",
            timeout_s=safety.approval_timeout_s,
            poll_s=safety.approval_poll_s,
        )
        if answer is None:
            reason = f"approval timed out after {safety.approval_timeout_s}s"
            report.approvals.append((label, "timed out", "", reason))
            self._refuse(label, plan, reason)
            raise ApprovalTimedOut(
                f"{label} on {self.target.label} needs approval ({danger}); nobody answered "
                f"within {safety.approval_timeout_s}s"
            )
        who = answer.approver or "someone"
        if not answer.approve:
            report.approvals.append((label, "rejected", who, answer.reason))
            self._refuse(label, plan, f"rejected by {who}: {answer.reason or 'no reason given'}")
            raise ApprovalRejected(
                f"{label} on {self.target.label} rejected by {who}: "
                f"{answer.reason or 'no reason given'}"
            )
        report.approvals.append((label, "approved", who, answer.reason))
        report.step(f"{label}: approved by {who} ({answer.reason or 'no reason given'})")


def pause_for_approval(
    form: type[Approval], *, key: str, timeout_s: int, poll_s: int
) -> Approval | None:
    """Pause this run with a resume form; the answer, or None when nobody answered in time.

    What ``prefect.flow_runs.pause_flow_run(wait_for_input=...)`` does, with two differences an
    approval needs: saving the form tolerates "already exists" (a client retry of a save the
    server had stored; seen on a busy SQLite server), and the deadline is ours while Prefect's
    pause expires ``PAUSE_GRACE_S`` later, so the run can still end with the real reason rather
    than Prefect's "paused and never resumed".
    """
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        raise RuntimeError("approval needs a flow run to pause")
    run_id = ctx.flow_run.id
    proposed = Paused(timeout_seconds=timeout_s + PAUSE_GRACE_S, reschedule=False, pause_key=key)
    keyset = keyset_from_paused_state(proposed)
    proposed.state_details.run_input_keyset = keyset
    with get_client(sync_client=True) as client:
        state = propose_state_sync(client, proposed, flow_run_id=run_id)
        if state.is_running():  # this very pause was answered before (the run was re-run)
            return form.load(keyset)
        if not state.is_paused():
            raise RuntimeError(f"the run cannot pause for approval (state {state.type.value})")
        try:
            form.save(keyset)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 409:
                raise
            _save_input(client, run_id, keyset["description"], form._description)
        deadline = time.monotonic() + timeout_s
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_running():
                return form.load(keyset)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(poll_s, left))


def _save_input(client: Any, run_id: Any, key: str, value: Any) -> None:
    try:
        client.create_flow_run_input(flow_run_id=run_id, key=key, value=json.dumps(value))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 409:
            raise


@contextmanager
def guard(report: IncidentReport, target: Target) -> Iterator[Guard]:
    """Hold the target's lock for the block; wait or stop per ``params.safety`` when it is busy."""
    safety = report.params.safety
    held = ensure_lock(target)
    ctx = FlowRunContext.get()
    holder = (
        ConcurrencyLeaseHolder(type="flow_run", id=ctx.flow_run.id)
        if ctx and ctx.flow_run
        else None
    )
    wait = safety.on_busy_target is OnBusyTarget.WAIT
    # "skip" still allows a moment for the API round trip and a lock being released right now
    patience = safety.busy_wait_s if wait else min(SKIP_PATIENCE_S, safety.busy_wait_s)
    started = time.monotonic()
    stack = ExitStack()
    try:
        stack.enter_context(
            concurrency(
                target.lock_name,
                occupy=1,
                timeout_seconds=patience,
                lease_duration=LOCK_LEASE_S,
                strict=True,
                holder=holder,
                # a lost renewal must not abort a half-applied change; the lease is long
                raise_on_lease_renewal_failure=False,
            )
        )
    except TimeoutError:
        how = f"waited {patience:g}s" if wait else "configured not to wait"
        report.busy = f"{target.label} busy: another run is acting on it ({how})"
        raise TargetBusy(
            f"{target.label} is being acted on by another run ({how}); this run changed nothing"
        ) from None
    waited = time.monotonic() - started
    report.target = target
    report.step(
        f"lock on {target.label} acquired"
        + (f" after waiting {waited:.1f}s for another run to finish" if held else "")
        + (f" after {waited:.1f}s (server slow to answer)" if waited >= 1 and not held else "")
    )
    with stack:
        yield Guard(report, target)


def ensure_lock(target: Target) -> bool:
    """Create the target's one-slot limit if missing (it shows on the UI's Concurrency page).

    Returns whether another run holds it right now.
    """
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(target.lock_name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=target.lock_name, limit=1)
                )
            except ObjectAlreadyExists:
                pass  # created by a concurrent run between the read and the create
            return False
        if limit.limit != 1:
            client.update_global_concurrency_limit(
                target.lock_name, GlobalConcurrencyLimitUpdate(limit=1)
            )
        return limit.active_slots > 0


def _safe_alert_resolved(fingerprint: str | None, since: datetime) -> bool:
    if not fingerprint:
        return False
    try:
        return alert_resolved_since(fingerprint, since)
    except (httpx.HTTPError, PrefectException):
        return False  # the symptom check still decides


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
