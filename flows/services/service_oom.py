"""Service runbook ``service-oom``: seed 001 "Service out of memory", seed 002 scenario 1 "if
container keeps crashing, check for OOM; increase memory limits if needed".

Find the service's instances killed for exceeding their memory limit (the platform's OOMKilled
state and its OOM events), then, with approval, raise the limit by a factor within a cap
(Kubernetes: the pod template, which rolls the pods; Docker: the containers), or add an instance
where the service scales and the policy prefers it; verify that no instance is killed for memory
again within a window. A service with no limit, at the cap, or on a platform that sets no limits
(supervisord) is escalated: a bigger limit is not the answer there.
"""

import math
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Self

from prefect import flow
from pydantic import BaseModel, Field, model_validator

from flows.services.common import ServiceParams, record_logs, record_status
from runbooks.errors import Escalation, VerificationFailed
from runbooks.quantities import MIB, MemorySize, format_memory
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.results import ChangeSet
from runbooks.safety import Budget, Guard
from tasks.workloads import (
    Capability,
    WorkloadBackend,
    WorkloadEvent,
    WorkloadRef,
    WorkloadStatus,
    load_backend,
    restart_workload,
    scale_workload,
    set_memory_limit,
    workload_events,
    workload_status,
)

# raising a limit twice a day for the same service means a leak or a load change: a human looks
RAISE_BUDGET = Budget(max_actions=2, window_s=86400)
OOM_EVENT_REASONS = frozenset({"oom", "oomkilled", "oomkilling"})


class OomPolicy(BaseModel):
    """How far automation may go against out-of-memory kills."""

    memory_factor: float = Field(
        1.5, gt=1, le=4, description="New limit = current limit x this, rounded up to a MiB."
    )
    memory_cap: MemorySize = Field(
        4 * 1024 * MIB, description="No limit is raised above this; at it, the run escalates."
    )
    prefer_scale: bool = Field(
        False,
        description="Add an instance instead of raising the limit where the platform scales the "
        "service (load spread over more instances needs less memory each).",
    )
    max_replicas: int = Field(
        10, ge=1, le=1000, description="Never scale the service beyond this many instances."
    )
    lookback_s: float = Field(
        3600,
        gt=0,
        le=7 * 86400,
        description="OOM kills older than this are history, not the incident.",
    )
    verify_window_s: float = Field(
        300,
        gt=0,
        le=3600,
        description="After the change, how long no instance may be killed for memory.",
    )
    poll_interval_s: float = Field(
        5, gt=0, le=60, description="Pause between checks while verifying."
    )


class ServiceOomParams(ServiceParams, OomPolicy):
    """Parameters of the service-oom runbook."""

    @model_validator(mode="after")
    def _cap_is_a_limit(self) -> Self:
        if self.memory_cap < 16 * MIB:
            raise ValueError("memory_cap below 16Mi is no service's limit; write it like 4Gi")
        return self


class OomAction(StrEnum):
    RAISE_LIMIT = "raise memory limit"
    SCALE = "add an instance"
    ESCALATE = "escalate"


class OomPlan(BaseModel):
    """What to do about a service killed for memory, and why."""

    action: OomAction
    reason: str
    limit_bytes: int | None = Field(None, description="The limit now (per instance).")
    new_limit_bytes: int | None = None
    replicas: int | None = Field(None, description="Instances after scaling.")


def next_limit(current: int, factor: float, cap: int) -> int:
    """``current x factor``, rounded up to a whole MiB, never above ``cap``."""
    return min(math.ceil(current * factor / MIB) * MIB, cap)


def plan_oom_fix(status: WorkloadStatus, policy: OomPolicy) -> OomPlan:
    """Raise the limit, add an instance, or escalate (pure; the cases are tests/unit tables)."""
    limit = status.memory_limit_bytes
    running = len(status.running)
    replicas = max(status.desired_replicas or 0, running)
    if policy.prefer_scale and status.can(Capability.SCALE) and replicas < policy.max_replicas:
        return OomPlan(
            action=OomAction.SCALE,
            reason=f"{replicas} instance(s), the policy prefers scaling out: one more shares the load",
            limit_bytes=limit,
            replicas=replicas + 1,
        )
    if not status.can(Capability.MEMORY_LIMIT):
        return OomPlan(
            action=OomAction.ESCALATE,
            reason=f"{status.platform} sets no memory limit on {status.service}: the kill came from "
            "the host's OOM killer, so the host is out of memory; a limit cannot be raised here",
        )
    if limit is None:
        return OomPlan(
            action=OomAction.ESCALATE,
            reason=f"{status.service} has no memory limit: the kill came from the host/node OOM "
            "killer (the machine is out of memory), not from a limit to raise",
        )
    if limit >= policy.memory_cap:
        return OomPlan(
            action=OomAction.ESCALATE,
            reason=f"its limit {format_memory(limit)} is already at the cap "
            f"{format_memory(policy.memory_cap)}: more memory is a decision for a person (a leak?)",
            limit_bytes=limit,
        )
    new = next_limit(limit, policy.memory_factor, policy.memory_cap)
    return OomPlan(
        action=OomAction.RAISE_LIMIT,
        reason=f"limit {format_memory(limit)} x {policy.memory_factor:g} = {format_memory(new)}"
        + (" (the cap)" if new == policy.memory_cap else ""),
        limit_bytes=limit,
        new_limit_bytes=new,
    )


def oom_events(events: list[WorkloadEvent]) -> list[WorkloadEvent]:
    """The events that record a kill for memory (Docker ``oom``, Kubernetes ``OOMKilling``...)."""
    return [e for e in events if e.reason.lower() in OOM_EVENT_REASONS]


class NewOomCheck(BaseModel):
    """One look after the change: any instance killed for memory since, all running?"""

    status: WorkloadStatus
    new_kills: list[str]
    elapsed_s: float


def new_oom_kills(status: WorkloadStatus, since: datetime) -> list[str]:
    """Instances whose OOM kill happened after ``since`` (an earlier kill is what was fixed)."""
    return [i.name for i in status.oom_killed if i.finished_at is None or i.finished_at > since]


class ServiceOomResult(BaseModel):
    outcome: Outcome
    plan: OomPlan | None
    verified: bool
    report: str


@flow(
    name="service-oom",
    description="Service killed for memory: find OOMKilled instances and their limits, raise the "
    "limit within a cap (approval) or add an instance, verify no new OOM kill in a window; "
    "escalate a service with no limit, at the cap, or on a platform without limits.",
)
@ends_as_reported
def service_oom(params: ServiceOomParams) -> ServiceOomResult:
    plan: OomPlan | None = None
    verified = False
    with incident_report(
        runbook="service-oom", title="Service out of memory", severity="P2", params=params
    ) as report:
        backend = load_backend(params.platform)
        ref = params.ref()
        with report.guard(params.target()) as guard:
            status = workload_status(backend, ref)
            record_status(report, status)
            if not status.exists:
                raise Escalation(
                    f"{params.service} not found on {params.platform}: check the alert's labels "
                    "and the platform block"
                )
            since = datetime.now(UTC) - timedelta(seconds=params.lookback_s)
            kills = oom_events(workload_events(backend, ref, since=since))
            report.check(
                f"OOM events in the last {params.lookback_s:.0f}s",
                not kills,
                "; ".join(f"{e.instance or '?'} {e.reason} at {e.at}" for e in kills) or "none",
            )
            if not status.oom_killed and not kills:
                report.finish(
                    Outcome.NO_ACTION_NEEDED,
                    f"No instance of {params.service} was killed for memory in the last "
                    f"{params.lookback_s:.0f}s: nothing to raise.",
                )
            else:
                plan, verified = fix_oom(report, guard, backend, ref, status, params)
    return ServiceOomResult(
        outcome=report.outcome or Outcome.FAILED,
        plan=plan,
        verified=verified,
        report=report.to_markdown(),
    )


def fix_oom(
    report: IncidentReport,
    guard: Guard,
    backend: WorkloadBackend,
    ref: WorkloadRef,
    status: WorkloadStatus,
    policy: OomPolicy,
) -> tuple[OomPlan, bool]:
    """The OOM path (also taken by service-not-responding): plan, approve, change, verify."""
    plan = plan_oom_fix(status, policy)
    report.evidence("OOM plan", plan)
    report.step(f"OOM plan: {plan.action}: {plan.reason}")
    report.follow_ups += [
        f"Find why {ref.name} needs more memory: a leak grows with uptime, a load change with "
        "traffic (see its memory graph; service-high-memory keeps a heap profile as evidence)",
    ]
    if plan.action is OomAction.ESCALATE:
        record_logs(report, backend, ref, 50)
        raise Escalation(f"{ref.describe()} was killed for memory; {plan.reason}")

    if plan.action is OomAction.SCALE:
        assert plan.replicas is not None
        label = f"scale {ref.describe()} to {plan.replicas} instances"
        changes = guard.act(
            label,
            lambda dry_run: scale_workload(backend, ref, plan.replicas, dry_run=dry_run),
            budget=RAISE_BUDGET,
        )
    else:
        assert plan.new_limit_bytes is not None and plan.limit_bytes is not None
        label = (
            f"raise memory limit of {ref.describe()} from {format_memory(plan.limit_bytes)} "
            f"to {format_memory(plan.new_limit_bytes)}"
        )
        report.follow_ups.insert(
            0,
            f"Write the new limit {format_memory(plan.new_limit_bytes)} into the service's "
            "definition (compose file, manifest, Helm values): the next deploy from it reverts "
            "a change made here",
        )
        changes = guard.act(
            label,
            lambda dry_run: set_memory_limit(backend, ref, plan.new_limit_bytes, dry_run=dry_run),
            budget=RAISE_BUDGET,
            approval=_danger,
        )
    if guard.report.params.dry_run:
        report.finish(
            Outcome.PLANNED,
            f"Would {plan.action} ({plan.reason}) and watch {policy.verify_window_s:.0f}s for "
            "new OOM kills. Nothing was changed.",
        )
        return plan, False
    _start_stopped(report, guard, backend, ref)
    return plan, _verify(report, guard, backend, ref, policy, changes, plan)


def _start_stopped(
    report: IncidentReport, guard: Guard, backend: WorkloadBackend, ref: WorkloadRef
) -> None:
    """Start what the OOM kill left stopped: on a Docker host a container killed for memory stays
    exited after its limit is raised (as after ``docker update``), unless its restart policy
    brings it back; Kubernetes and supervisord start their own."""
    status = workload_status(backend, ref)
    if all(i.running for i in status.instances):
        return
    since = datetime.now(UTC)
    guard.act(
        f"start the stopped instances of {ref.describe()} with the new limit",
        lambda dry_run: restart_workload(backend, ref, since=since, dry_run=dry_run),
    )


def _danger(plan: ChangeSet) -> str | None:
    targets = ", ".join(c.target for c in plan.planned)
    how = {str(c.detail.get("method")) for c in plan.planned if c.detail.get("method")}
    if "recreate" in how:
        effect = "the containers are recreated with it (same name, labels, command, env, mounts)"
    else:
        effect = "the platform replaces or updates the instances (Kubernetes rolls the pods)"
    return (
        f"changes the memory limit of {targets}: {effect}; the service's own definition still "
        "holds the old limit"
    )


def _verify(
    report: IncidentReport,
    guard: Guard,
    backend: WorkloadBackend,
    ref: WorkloadRef,
    policy: OomPolicy,
    changes: ChangeSet,
    plan: OomPlan,
) -> bool:
    acted = guard.acted_at or datetime.now(UTC)
    started = datetime.now(UTC)

    def look() -> NewOomCheck:
        status = workload_status(backend, ref)
        return NewOomCheck(
            status=status,
            new_kills=new_oom_kills(status, acted),
            elapsed_s=(datetime.now(UTC) - started).total_seconds(),
        )

    watched = guard.verify(
        f"no new OOM kill for {policy.verify_window_s:.0f}s",
        look,
        # done early on a new kill (failed), else when the window has passed
        lambda seen: (
            not seen.new_kills
            and seen.elapsed_s >= policy.verify_window_s
            and bool(seen.status.instances)
            and all(i.running for i in seen.status.instances)
        ),
        timeout_s=policy.verify_window_s + policy.poll_interval_s,
        interval_s=policy.poll_interval_s,
        describe=lambda seen: (
            f"new OOM kill of {', '.join(seen.new_kills)}"
            if seen.new_kills
            else f"{len(seen.status.running)} of {len(seen.status.instances)} instance(s) "
            f"running, no OOM kill in {seen.elapsed_s:.0f}s; limit "
            f"{format_memory(seen.status.memory_limit_bytes)}"
        ),
        give_up=lambda seen: bool(seen.new_kills),
    )
    last = watched.last
    assert last is not None
    report.evidence("after the change", last.status)
    if not watched.ok:
        record_logs(report, backend, ref, 50)
        if last.new_kills:
            raise VerificationFailed(
                f"{ref.describe()} was killed for memory again after the change "
                f"({', '.join(last.new_kills)}): more memory did not help; a person must look "
                "(leak, load, or a limit the platform did not apply)"
            )
        raise VerificationFailed(
            f"{ref.describe()} is not running again after the change "
            f"({len(last.status.running)} of {len(last.status.instances)} instance(s) running): "
            "its last log lines are in the evidence"
        )
    done = "; ".join(c.describe() for c in changes.applied) or "nothing needed changing"
    report.finish(
        Outcome.RESOLVED,
        f"{ref.describe()} was killed for memory; {done} ({plan.reason}). No instance was killed "
        f"for memory in the {policy.verify_window_s:.0f}s after.",
    )
    return True
