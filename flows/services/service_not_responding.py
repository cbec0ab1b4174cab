"""Service runbook ``service-not-responding``: seed 002 scenario 1 "Service Not Responding"
(health check fails, 502/503), seed 001's mitigation "restart the service", seed 004 section 4.4
"restart producer".

Probe the service's health endpoint and read its state where it runs (``docker-compose ps``,
``kubectl get``, ``supervisorctl status``) with its last log lines. An instance killed for memory
takes the OOM path (service-oom's: raise the limit with approval, or escalate); otherwise the
service is restarted (at most 3 times an hour), and the run waits until every instance runs and
the health endpoint answers again. A service that does not come back, or keeps needing restarts,
is escalated with its last log lines as evidence.
"""

from datetime import UTC, datetime
from enum import StrEnum

from prefect import flow
from pydantic import BaseModel, Field

from flows.services.common import (
    HealthCheckParams,
    ServiceParams,
    describe_instance,
    observe_service,
    record_logs,
    record_status,
)
from flows.services.service_oom import OomPlan, OomPolicy, fix_oom
from runbooks.errors import Escalation, VerificationFailed
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard
from tasks.http_probe import HealthProbe
from tasks.workloads import (
    WorkloadBackend,
    WorkloadRef,
    WorkloadStatus,
    load_backend,
    restart_workload,
)

# issue #12: "budget: 3 per hour per service"; a fourth restart in the hour is a crash loop
RESTART_BUDGET = Budget(max_actions=3, window_s=3600)


class ServiceNotRespondingParams(ServiceParams, HealthCheckParams):
    """Parameters of the service-not-responding runbook."""

    ready_timeout_s: float = Field(
        120,
        gt=0,
        le=1800,
        description="After the restart, how long the service may take to answer.",
    )
    poll_interval_s: float = Field(
        2, gt=0, le=60, description="Pause between checks after the restart."
    )
    log_lines: int = Field(
        50, ge=0, le=1000, description="Log lines per instance kept as evidence."
    )
    oom: OomPolicy = Field(
        default_factory=OomPolicy,
        title="OOM policy",
        description="What to do when an instance was killed for memory (the service-oom path).",
    )


class Verdict(StrEnum):
    HEALTHY = "healthy"
    MISSING = "missing"
    NO_INSTANCES = "no instances"
    OOM = "killed for memory"
    RESTART = "not responding"


class Diagnosis(BaseModel):
    verdict: Verdict
    reason: str


def diagnose(status: WorkloadStatus, health: HealthProbe | None) -> Diagnosis:
    """What the health probe and the platform's state together say (pure; tests/unit tables)."""
    if not status.exists:
        return Diagnosis(
            verdict=Verdict.MISSING, reason=f"{status.platform} does not know {status.service}"
        )
    down = [i for i in status.instances if not i.running or i.ready is False]
    failing = health is not None and not health.ok
    probe = f"health endpoint {health.describe()}" if health is not None else "no health endpoint"
    if not status.instances or status.desired_replicas == 0:
        return Diagnosis(
            verdict=Verdict.NO_INSTANCES,
            reason=f"{status.service} has no instance to restart (scaled to zero or removed); {probe}",
        )
    if not down and not failing:
        return Diagnosis(
            verdict=Verdict.HEALTHY,
            reason=f"all {len(status.instances)} instance(s) running; {probe}",
        )
    oom = [i for i in status.oom_killed if i in down or failing]
    if oom:
        return Diagnosis(
            verdict=Verdict.OOM,
            reason=f"{', '.join(i.name for i in oom)} killed for memory (OOMKilled); {probe}",
        )
    named = "; ".join(map(describe_instance, down)) if down else "every instance runs"
    return Diagnosis(verdict=Verdict.RESTART, reason=f"{probe}; {named}")


class Recovery(BaseModel):
    """One look after the restart."""

    status: WorkloadStatus
    health: HealthProbe | None

    @property
    def up(self) -> bool:
        return diagnose(self.status, self.health).verdict is Verdict.HEALTHY

    def describe(self) -> str:
        return diagnose(self.status, self.health).reason


class ServiceNotRespondingResult(BaseModel):
    outcome: Outcome
    diagnosis: Diagnosis | None
    oom_plan: OomPlan | None = None
    restarted: list[str] = Field(default_factory=list, description="What was restarted.")
    verified: bool = False
    report: str


@flow(
    name="service-not-responding",
    description="Health check fails: probe the endpoint, read the service's state and logs where "
    "it runs (Kubernetes, Docker, supervisord); OOMKilled takes the OOM path, else restart (3 "
    "per hour), wait until it answers; escalate what does not come back, with its logs.",
)
@ends_as_reported
def service_not_responding(params: ServiceNotRespondingParams) -> ServiceNotRespondingResult:
    diagnosis: Diagnosis | None = None
    oom_plan: OomPlan | None = None
    restarted: list[str] = []
    verified = False
    with incident_report(
        runbook="service-not-responding",
        title="Service not responding",
        severity="P2",
        params=params,
    ) as report:
        backend = load_backend(params.platform)
        ref = params.ref()
        with report.guard(params.target()) as guard:
            observed_at = datetime.now(UTC)
            status, health = observe_service(backend, ref, params)
            if health is not None:
                report.check(
                    "health endpoint answers", health.ok, f"{health.url}: {health.describe()}"
                )
            record_status(report, status)
            diagnosis = diagnose(status, health)
            report.evidence("diagnosis", diagnosis)
            report.step(f"diagnosis {diagnosis.verdict}: {diagnosis.reason}")
            if diagnosis.verdict is Verdict.HEALTHY:
                report.finish(
                    Outcome.NO_ACTION_NEEDED,
                    f"{params.service} answers: {diagnosis.reason}. Nothing was restarted.",
                )
            else:
                if params.log_lines:
                    record_logs(report, backend, ref, params.log_lines)
                if diagnosis.verdict is Verdict.MISSING:
                    raise Escalation(
                        f"{diagnosis.reason}: check the alert's labels and the platform block "
                        f"{params.platform}; nothing was restarted"
                    )
                if diagnosis.verdict is Verdict.NO_INSTANCES:
                    raise Escalation(
                        f"{diagnosis.reason}: someone scaled it down or removed it; starting it "
                        "again is a person's decision"
                    )
                if diagnosis.verdict is Verdict.OOM:
                    report.step(
                        "an instance was killed for memory: taking the OOM path, not a restart"
                    )
                    oom_plan, verified = fix_oom(report, guard, backend, ref, status, params.oom)
                else:
                    restarted, verified = _restart_and_verify(
                        report, guard, backend, ref, params, observed_at
                    )
    return ServiceNotRespondingResult(
        outcome=report.outcome or Outcome.FAILED,
        diagnosis=diagnosis,
        oom_plan=oom_plan,
        restarted=restarted,
        verified=verified,
        report=report.to_markdown(),
    )


def _restart_and_verify(
    report: IncidentReport,
    guard: Guard,
    backend: WorkloadBackend,
    ref: WorkloadRef,
    params: ServiceNotRespondingParams,
    observed_at: datetime,
) -> tuple[list[str], bool]:
    report.follow_ups += [
        f"Read why {ref.describe()} stopped answering in the log lines above (a crash, a hung "
        "dependency, a full disk), and fix that cause: a restart only buys time",
        "If it needed a restart before, look for a resource leak (memory, threads, connections)",
    ]
    changes = guard.act(
        f"restart {ref.describe()}",
        # only instances not started since the run looked: a retry never restarts twice
        lambda dry_run: restart_workload(backend, ref, since=observed_at, dry_run=dry_run),
        budget=RESTART_BUDGET,
    )
    if params.dry_run:
        planned = ", ".join(c.target for c in changes.planned) or "nothing (see notes)"
        report.finish(
            Outcome.PLANNED,
            f"Would restart {planned} and wait up to {params.ready_timeout_s:.0f}s for it to "
            "answer. Nothing was changed.",
        )
        return [], False
    restarted = [c.target for c in changes.applied]
    back = guard.verify(
        "service answers after the restart",
        lambda: Recovery.model_validate(
            dict(zip(("status", "health"), observe_service(backend, ref, params), strict=True))
        ),
        lambda seen: seen.up,
        timeout_s=params.ready_timeout_s,
        interval_s=params.poll_interval_s,
        describe=Recovery.describe,
    )
    last = back.last
    assert last is not None
    report.evidence("after the restart", last.status)
    if not back.ok:
        if params.log_lines:
            record_logs(report, backend, ref, params.log_lines)
        raise VerificationFailed(
            f"{ref.describe()} still not responding {back.elapsed_s:.0f}s after the restart "
            f"({last.describe()}); its last log lines are in the evidence"
        )
    did = (
        f"Restarted {', '.join(restarted)}"
        if restarted
        else "Nothing needed restarting (see notes)"
    )
    report.finish(
        Outcome.RESOLVED,
        f"{did}; {back.elapsed_s:.1f}s later "
        + (
            "the alert resolved."
            if back.by == "alert.resolved"
            else f"it answers: {last.describe()}."
        ),
    )
    return restarted, True
