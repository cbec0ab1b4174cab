"""What the service runbooks share: which service (parameters), its lock target, how its state
reads in a report. The platform is behind tasks.workloads; nothing here branches on it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from runbooks.params import (
    OptionalNamespace,
    OptionalServiceName,
    PlatformRef,
    RunbookParams,
    ServiceName,
)
from runbooks.quantities import format_memory
from runbooks.report import IncidentReport
from runbooks.safety import Target
from tasks.http_probe import HealthProbe, HealthUrl, probe_health
from tasks.workloads import (
    Instance,
    WorkloadBackend,
    WorkloadRef,
    WorkloadStatus,
    workload_logs,
    workload_status,
)


class ServiceParams(RunbookParams):
    """Which service a runbook acts on, and where it runs."""

    platform: PlatformRef = Field(
        "docker/default",
        description="Where the service runs: kubernetes/<block>, docker/<block> or "
        "supervisord/<block>, naming a Runbooks Kubernetes Cluster, Docker Host or Supervisor "
        "block.",
    )
    service: ServiceName = Field(
        description="The service: a Kubernetes Deployment/StatefulSet, a Compose service (or "
        "container) name, or a supervisord program/group."
    )
    namespace: OptionalNamespace = Field(
        None, description="Kubernetes namespace; empty: the block's. Ignored elsewhere."
    )
    kind: Literal["Deployment", "StatefulSet"] = Field(
        "Deployment", description="Kubernetes workload kind. Ignored elsewhere."
    )
    container: OptionalServiceName = Field(
        None, description="Container within the pod (Kubernetes); empty: the first."
    )

    def ref(self) -> WorkloadRef:
        return WorkloadRef(
            name=self.service, namespace=self.namespace, kind=self.kind, container=self.container
        )

    def target(self) -> Target:
        """One lock, budget and event stream per service on its platform block."""
        where = f"{self.namespace}/" if self.namespace else ""
        kind = f"{self.kind.lower()}/" if self.platform.startswith("kubernetes/") else ""
        return Target("service", f"{self.platform}:{where}{kind}{self.service}")


class HealthCheckParams(BaseModel):
    """The service's own health endpoint, where it has one."""

    health_url: HealthUrl | None = Field(
        None,
        description="The service's health endpoint (http or https), probed with GET; 2xx is "
        "healthy. Empty: the platform's own view (running, ready) decides.",
    )
    health_timeout_s: float = Field(
        5, gt=0, le=60, description="A health probe that takes longer has failed."
    )


def observe_service(
    backend: WorkloadBackend, ref: WorkloadRef, params: HealthCheckParams
) -> tuple[WorkloadStatus, HealthProbe | None]:
    """The service as its platform shows it, and its health endpoint's answer (if it has one)."""
    health = probe_health(params.health_url, params.health_timeout_s) if params.health_url else None
    return workload_status(backend, ref), health


def describe_instance(i: Instance) -> str:
    state = i.state + ("" if i.ready is None else ", ready" if i.ready else ", not ready")
    extra = []
    if i.restarts:
        extra.append(f"{i.restarts} restarts")
    if i.oom_killed:
        extra.append("last exit OOMKilled")
    elif i.exit_code not in (None, 0) and not i.running:
        extra.append(f"exit code {i.exit_code}")
    if i.memory_usage_bytes is not None:
        extra.append(
            f"memory {format_memory(i.memory_usage_bytes)} of {format_memory(i.memory_limit_bytes)}"
        )
    return f"{i.name} ({state}{'; ' + ', '.join(extra) if extra else ''})"


def record_status(report: IncidentReport, status: WorkloadStatus) -> None:
    """The service's instances as checks: running, ready, killed for memory."""
    report.evidence(f"{status.service} on {status.platform}", status)
    if not report.check("service exists", status.exists, f"{status.service} on {status.platform}"):
        return
    down = [i for i in status.instances if not i.running or i.ready is False]
    wanted = status.desired_replicas
    counted = f"{len(status.running)} running" + (
        f" of {wanted} wanted" if wanted is not None else ""
    )
    report.check(
        "instances running",
        bool(status.instances) and not down and (wanted is None or len(status.running) >= wanted),
        f"{counted}: " + ("; ".join(map(describe_instance, status.instances)) or "none"),
    )
    oom = status.oom_killed
    report.check(
        "no instance killed for memory",
        not oom,
        ", ".join(f"{i.name} OOMKilled at {_when(i.finished_at)}" for i in oom) or "none",
    )


def record_logs(
    report: IncidentReport, backend: WorkloadBackend, ref: WorkloadRef, lines: int
) -> None:
    """The last lines each instance wrote, as evidence (what a person reads first)."""
    try:
        logs = workload_logs(backend, ref, lines=lines)
    except Exception as exc:  # noqa: BLE001 - evidence is best effort; the finding stands without it
        report.step(f"logs not read: {type(exc).__name__}: {exc}"[:300])
        return
    for name, text in logs.items():
        report.evidence(f"last {lines} log lines of {name}", text)


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at else "an unknown time"
