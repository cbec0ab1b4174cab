"""Service runbook ``rollback-bad-deploy``: seed 001 "rollback deployment if recent change" and its
triage step "review recent deployments".

The alert (error rate, failing health) says the service is unwell; the platform's rollout history
says whether it changed recently. A service whose current revision was rolled out within
``rollout_window_s`` and that is failing is rolled back to the revision before, after approval
(what ``kubectl rollout undo`` does: that revision's pod template becomes the workload's again),
and verified healthy. A service that did not change recently, or has no earlier revision, or runs
where no revision history is kept (a Docker host, supervisord), is escalated: a rollback is not the
answer there, or cannot be done.
"""

from datetime import UTC, datetime, timedelta
from enum import StrEnum

from prefect import flow
from pydantic import BaseModel, Field

from flows.services.common import (
    HealthCheckParams,
    ServiceParams,
    observe_service,
    record_logs,
    record_status,
)
from runbooks.errors import Escalation, VerificationFailed
from runbooks.report import Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget
from tasks.http_probe import HealthProbe
from tasks.workloads import (
    Capability,
    Revision,
    WorkloadStatus,
    load_backend,
    rollback_workload,
    workload_history,
)

# one rollback of a service per hour: a second bad rollout that soon wants a person
ROLLBACK_BUDGET = Budget(max_actions=1, window_s=3600)


class RollbackBadDeployParams(ServiceParams, HealthCheckParams):
    """Parameters of the rollback-bad-deploy runbook."""

    rollout_window_s: float = Field(
        3600,
        gt=0,
        le=7 * 86400,
        description="A rollout this recent is a suspect; an older one is not rolled back.",
    )
    ready_timeout_s: float = Field(
        300,
        gt=0,
        le=3600,
        description="After the rollback, how long the service may take to be healthy.",
    )
    poll_interval_s: float = Field(
        5, gt=0, le=60, description="Pause between checks after the rollback."
    )


class RollbackAction(StrEnum):
    NONE = "healthy"
    ROLLBACK = "roll back"
    NO_HISTORY = "no revision history"
    NOT_RECENT = "no recent rollout"
    NO_PREVIOUS = "no earlier revision"


class RollbackPlan(BaseModel):
    action: RollbackAction
    reason: str
    current: int | None = None
    to_revision: int | None = None
    images_now: list[str] = Field(default_factory=list)
    images_back: list[str] = Field(default_factory=list)


def plan_rollback(
    status: WorkloadStatus,
    history: list[Revision],
    failing: str | None,
    now: datetime,
    window_s: float,
) -> RollbackPlan:
    """Roll back, or why not (pure; tests/unit tables). ``failing`` names the symptom, if any."""
    if not failing:
        return RollbackPlan(action=RollbackAction.NONE, reason="the service is healthy")
    if not status.can(Capability.ROLLBACK):
        return RollbackPlan(
            action=RollbackAction.NO_HISTORY,
            reason=f"{failing}, but {status.platform} keeps no revision history of "
            f"{status.service}: there is no earlier version to go back to automatically",
        )
    current = next((r for r in history if r.current), None)
    if current is None:
        return RollbackPlan(
            action=RollbackAction.NO_PREVIOUS, reason=f"{failing}; no current revision found"
        )
    rolled_out = current.created_at or status.rolled_out_at
    age = (now - rolled_out).total_seconds() if rolled_out else None
    if age is None or age > window_s:
        when = f"{age / 60:.0f} min ago" if age is not None else "at an unknown time"
        return RollbackPlan(
            action=RollbackAction.NOT_RECENT,
            reason=f"{failing}; revision {current.revision} was rolled out {when}, outside the "
            f"{window_s / 60:.0f} min window: no recent change to blame",
            current=current.revision,
        )
    earlier = [r for r in history if r.revision < current.revision]
    if not earlier:
        return RollbackPlan(
            action=RollbackAction.NO_PREVIOUS,
            reason=f"{failing}; revision {current.revision} is the first one kept",
            current=current.revision,
        )
    previous = max(earlier, key=lambda r: r.revision)
    return RollbackPlan(
        action=RollbackAction.ROLLBACK,
        reason=f"{failing} since revision {current.revision} was rolled out "
        f"{age / 60:.0f} min ago; revision {previous.revision} ran before it",
        current=current.revision,
        to_revision=previous.revision,
        images_now=current.images,
        images_back=previous.images,
    )


def symptom(
    status: WorkloadStatus, health: HealthProbe | None, alert_firing: str | None
) -> str | None:
    """What says the service is unwell: the probe, instances not ready, or the firing alert."""
    if health is not None and not health.ok:
        return f"health endpoint {health.describe()}"
    down = [i.name for i in status.instances if not i.running or i.ready is False]
    if down:
        return f"{len(down)} instance(s) not ready ({', '.join(down)})"
    if alert_firing:
        return f"alert {alert_firing} firing"
    return None


class RollbackResult(BaseModel):
    outcome: Outcome
    plan: RollbackPlan | None
    verified: bool = False
    report: str


@flow(
    name="rollback-bad-deploy",
    description="Service failing after a recent rollout: compare the rollout history with the "
    "symptom, roll back to the previous revision after approval, verify health; escalate when "
    "nothing changed recently or the platform keeps no history.",
)
@ends_as_reported
def rollback_bad_deploy(params: RollbackBadDeployParams) -> RollbackResult:
    plan: RollbackPlan | None = None
    verified = False
    with incident_report(
        runbook="rollback-bad-deploy", title="Bad deploy", severity="P2", params=params
    ) as report:
        backend = load_backend(params.platform)
        ref = params.ref()
        with report.guard(params.target()) as guard:

            def look() -> tuple[WorkloadStatus, HealthProbe | None]:
                return observe_service(backend, ref, params)

            status, health = look()
            if health is not None:
                report.check(
                    "health endpoint answers", health.ok, f"{health.url}: {health.describe()}"
                )
            record_status(report, status)
            history = workload_history(backend, ref) if status.can(Capability.ROLLBACK) else []
            report.evidence("rollout history", [r.model_dump(mode="json") for r in history])
            for r in sorted(history, key=lambda r: r.revision, reverse=True)[:5]:
                report.step(
                    f"revision {r.revision}{' (current)' if r.current else ''}: "
                    f"{', '.join(r.images) or 'no image'}, rolled out {r.created_at}"
                )
            firing = (
                params.alert.alertname if params.alert and params.alert.status == "firing" else None
            )
            plan = plan_rollback(
                status,
                history,
                symptom(status, health, firing),
                datetime.now(UTC),
                params.rollout_window_s,
            )
            report.evidence("rollback plan", plan)
            report.step(f"plan: {plan.action}: {plan.reason}")
            if plan.action is RollbackAction.NONE:
                report.finish(
                    Outcome.NO_ACTION_NEEDED, f"{ref.describe()} is healthy: nothing rolled back."
                )
            elif plan.action is not RollbackAction.ROLLBACK:
                record_logs(report, backend, ref, 50)
                report.follow_ups.append(
                    "Look at what else changed (configuration, dependencies, traffic) and at the "
                    "log lines above"
                )
                raise Escalation(f"{ref.describe()}: {plan.reason}; nothing was rolled back")
            else:
                to_revision = plan.to_revision
                assert to_revision is not None
                guard.act(
                    f"roll back {ref.describe()} to revision {to_revision}",
                    lambda dry_run: rollback_workload(
                        backend, ref, to_revision=to_revision, dry_run=dry_run
                    ),
                    budget=ROLLBACK_BUDGET,
                    approval=lambda _plan: (
                        f"rolls {ref.describe()} back from revision {plan.current} "
                        f"({', '.join(plan.images_now)}) to {to_revision} ({', '.join(plan.images_back)}): "
                        "the pods are replaced, and whatever the bad rollout fixed is undone too"
                    ),
                )
                report.follow_ups += [
                    f"Find what broke in revision {plan.current} before rolling forward again",
                    "Pin the rolled-back version in the deployment's source (git, Helm values): "
                    "the next deploy from it brings the bad version back",
                ]
                if params.dry_run:
                    report.finish(
                        Outcome.PLANNED,
                        f"Would roll {ref.describe()} back to revision {to_revision} ({plan.reason}). "
                        "Nothing was changed.",
                    )
                else:
                    # replaced instances start after the change; 5 s for the platform's clock
                    since = (guard.acted_at or datetime.now(UTC)) - timedelta(seconds=5)
                    back = guard.verify(
                        "service healthy after the rollback",
                        look,
                        lambda seen: (
                            symptom(*seen, None) is None
                            and all(
                                i.started_at is None or i.started_at >= since
                                for i in seen[0].running
                            )
                            and len(seen[0].running) >= (seen[0].desired_replicas or 1)
                        ),
                        timeout_s=params.ready_timeout_s,
                        interval_s=params.poll_interval_s,
                        describe=lambda seen: (
                            symptom(*seen, None)
                            or f"{len(seen[0].running)} instance(s) running on the rolled-back revision"
                        ),
                    )
                    if not back.ok:
                        record_logs(report, backend, ref, 50)
                        raise VerificationFailed(
                            f"{ref.describe()} still unwell {back.elapsed_s:.0f}s after rolling back to "
                            f"revision {to_revision}: the rollout was not the (only) cause"
                        )
                    verified = True
                    report.finish(
                        Outcome.RESOLVED,
                        f"{plan.reason}: rolled back to revision {to_revision}; healthy "
                        f"{back.elapsed_s:.0f}s later.",
                    )
    return RollbackResult(
        outcome=report.outcome or Outcome.FAILED,
        plan=plan,
        verified=verified,
        report=report.to_markdown(),
    )
