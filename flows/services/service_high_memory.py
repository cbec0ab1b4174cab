"""Service runbook ``service-high-memory``: seed 002 scenario 3 "High Memory Usage" (OOM kills
coming, slow responses): ``docker stats --no-stream``, the Go heap profile
(``/debug/pprof/heap?debug=1``), then restart the service to reclaim memory, or scale it.

Read each instance's memory use against its limit; keep a heap profile as evidence before anything
is restarted (a Go pprof profile, or a JVM heap dump's size from ``/actuator/heapdump``: the
restart destroys what a leak hunt needs); then restart the service (3 per hour) or add an instance
(``relief: scale``), and verify the use is back under the threshold.
"""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from flows.services.common import ServiceParams, record_status
from runbooks.errors import Escalation, VerificationFailed
from runbooks.quantities import format_memory
from runbooks.report import Outcome, ends_as_reported, incident_report
from runbooks.results import ChangeSet
from runbooks.safety import Budget
from tasks.http_probe import HealthUrl, HeapProfile, fetch_heap_profile
from tasks.workloads import (
    Capability,
    Instance,
    WorkloadStatus,
    load_backend,
    restart_workload,
    scale_workload,
    workload_status,
)

RELIEF_BUDGET = Budget(max_actions=3, window_s=3600)


class ServiceHighMemoryParams(ServiceParams):
    """Parameters of the service-high-memory runbook."""

    threshold: float = Field(
        0.9, gt=0, le=1, description="Memory use / limit at or above which an instance is too high."
    )
    pprof_url: HealthUrl | None = Field(
        None, description="Go service: its /debug/pprof/heap URL; the profile is kept as evidence."
    )
    heapdump_url: HealthUrl | None = Field(
        None,
        description="JVM service: its /actuator/heapdump URL; the dump's size is kept (the dump "
        "itself is not stored). A heap dump pauses the JVM while it is written.",
    )
    relief: Literal["restart", "scale"] = Field(
        "restart", description="Restart the service to reclaim memory, or add an instance."
    )
    max_replicas: int = Field(
        10, ge=1, le=1000, description="Never scale beyond this many instances."
    )
    settle_timeout_s: float = Field(
        120,
        gt=0,
        le=1800,
        description="After the change, how long until the use must be under the threshold.",
    )
    poll_interval_s: float = Field(
        5, gt=0, le=60, description="Pause between checks after the change."
    )


class Relief(StrEnum):
    NONE = "nothing to do"
    RESTART = "restart"
    SCALE = "add an instance"
    UNMEASURED = "memory use not measured"


class MemoryPlan(BaseModel):
    action: Relief
    reason: str
    over: list[str] = Field(default_factory=list, description="Instances at or over the threshold.")
    replicas: int | None = None


def usage_ratio(i: Instance) -> float | None:
    if i.memory_usage_bytes is None or not i.memory_limit_bytes:
        return None
    return i.memory_usage_bytes / i.memory_limit_bytes


def describe_use(i: Instance) -> str:
    ratio = usage_ratio(i)
    share = f" ({ratio:.0%})" if ratio is not None else ""
    return f"{i.name} {format_memory(i.memory_usage_bytes)} of {format_memory(i.memory_limit_bytes)}{share}"


def plan_memory_relief(
    status: WorkloadStatus,
    threshold: float,
    relief: str,
    max_replicas: int,
    alert_firing: str | None,
) -> MemoryPlan:
    """Restart, scale, or nothing (pure; tests/unit tables)."""
    running = status.running
    measured = [i for i in running if usage_ratio(i) is not None]
    over = [i.name for i in measured if (usage_ratio(i) or 0) >= threshold]
    if not measured:
        if not alert_firing:
            return MemoryPlan(
                action=Relief.UNMEASURED,
                reason=f"{status.platform} reports no memory use against a limit for "
                f"{status.service}, and no alert measured it",
            )
        over = [i.name for i in running]
        why = f"alert {alert_firing} measured it (the platform reports no use against a limit)"
    elif not over:
        return MemoryPlan(
            action=Relief.NONE,
            reason="every instance under "
            f"{threshold:.0%} of its limit: " + "; ".join(map(describe_use, measured)),
        )
    else:
        why = (
            "; ".join(describe_use(i) for i in measured if i.name in over)
            + f" (threshold {threshold:.0%})"
        )
    replicas = max(status.desired_replicas or 0, len(running))
    if relief == "scale" and status.can(Capability.SCALE) and replicas < max_replicas:
        return MemoryPlan(
            action=Relief.SCALE,
            reason=f"{why}: one more instance shares the load",
            over=over,
            replicas=replicas + 1,
        )
    return MemoryPlan(
        action=Relief.RESTART, reason=f"{why}: a restart reclaims the memory", over=over
    )


class ServiceHighMemoryResult(BaseModel):
    outcome: Outcome
    plan: MemoryPlan | None
    profiles: list[HeapProfile] = Field(default_factory=list)
    report: str


@flow(
    name="service-high-memory",
    description="Service memory near its limit: read use vs limit per instance, keep a heap profile "
    "(Go pprof, JVM heap dump size) as evidence, restart or scale the service, verify the use is "
    "back under the threshold.",
)
@ends_as_reported
def service_high_memory(params: ServiceHighMemoryParams) -> ServiceHighMemoryResult:
    plan: MemoryPlan | None = None
    profiles: list[HeapProfile] = []
    with incident_report(
        runbook="service-high-memory", title="High memory usage", severity="P3", params=params
    ) as report:
        backend = load_backend(params.platform)
        ref = params.ref()
        with report.guard(params.target()) as guard:
            observed_at = datetime.now(UTC)
            status = workload_status(backend, ref)
            record_status(report, status)
            firing = (
                params.alert.alertname if params.alert and params.alert.status == "firing" else None
            )
            plan = plan_memory_relief(
                status, params.threshold, params.relief, params.max_replicas, firing
            )
            report.evidence("memory plan", plan)
            report.check("memory use under the threshold", plan.action is Relief.NONE, plan.reason)
            if plan.action is Relief.NONE:
                report.finish(Outcome.NO_ACTION_NEEDED, f"{ref.describe()}: {plan.reason}.")
            elif plan.action is Relief.UNMEASURED:
                raise Escalation(f"{ref.describe()}: {plan.reason}; nothing was restarted")
            else:
                # before the restart: it destroys the heap a leak hunt needs
                for url, kind in ((params.pprof_url, "pprof"), (params.heapdump_url, "heapdump")):
                    if url:
                        profile = fetch_heap_profile(url, kind)
                        profiles.append(profile)
                        report.evidence(f"heap profile ({kind})", profile)
                        report.step(
                            f"heap profile {kind} from {profile.url}: "
                            + (
                                profile.error
                                or f"{format_memory(profile.size_bytes)} read"
                                + (
                                    f", {format_memory(profile.in_use_bytes)} in use"
                                    if profile.in_use_bytes
                                    else ""
                                )
                            )
                        )
                report.follow_ups.append(
                    f"Compare the heap profile kept above with one taken when {ref.name} is fresh: "
                    "what grows is the leak (go tool pprof -diff_base, or a heap dump analyser)"
                )

                def change(dry_run: bool) -> ChangeSet:
                    if plan.action is Relief.SCALE:
                        return scale_workload(backend, ref, plan.replicas, dry_run=dry_run)
                    return restart_workload(backend, ref, since=observed_at, dry_run=dry_run)

                label = (
                    f"scale {ref.describe()} to {plan.replicas} instances"
                    if plan.action is Relief.SCALE
                    else f"restart {ref.describe()} to reclaim memory"
                )
                changes = guard.act(label, change, budget=RELIEF_BUDGET)
                if params.dry_run:
                    report.finish(
                        Outcome.PLANNED, f"Would {label} ({plan.reason}). Nothing was changed."
                    )
                else:
                    settled = guard.verify(
                        "memory use back under the threshold",
                        lambda: workload_status(backend, ref),
                        lambda seen: (
                            bool(seen.running)
                            and plan_memory_relief(
                                seen, params.threshold, "restart", 0, None
                            ).action
                            in (Relief.NONE, Relief.UNMEASURED)
                            and all(i.ready is not False for i in seen.running)
                        ),
                        timeout_s=params.settle_timeout_s,
                        interval_s=params.poll_interval_s,
                        describe=lambda seen: (
                            "; ".join(map(describe_use, seen.running)) or "no instance running"
                        ),
                    )
                    if not settled.ok:
                        raise VerificationFailed(
                            f"{ref.describe()}'s memory use is still at or over {params.threshold:.0%} "
                            f"{settled.elapsed_s:.0f}s after: {label} did not relieve it"
                        )
                    done = (
                        "; ".join(c.describe() for c in changes.applied)
                        or "nothing needed changing"
                    )
                    report.finish(
                        Outcome.RESOLVED,
                        f"{plan.reason}; {done}; {settled.elapsed_s:.0f}s later every instance is under "
                        f"{params.threshold:.0%}.",
                    )
    return ServiceHighMemoryResult(
        outcome=report.outcome or Outcome.FAILED,
        plan=plan,
        profiles=profiles,
        report=report.to_markdown(),
    )
