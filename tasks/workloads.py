"""Services wherever they run: one small interface, three backends (issue #12).

The seeds run their services three ways: on Kubernetes (``kubectl rollout restart``, scale,
HPA), on Docker Compose hosts (``docker-compose restart <service>``, ``docker inspect``) and as
supervised processes (``pkill -f stream_processor.py; python ... &``). A runbook asks "restart
service X" or "is X OOMKilled"; the *platform block* says where X runs, and runbooks never branch
on the backend:

- ``kubernetes/<block>``: a Runbooks Kubernetes Cluster block; a service is a Deployment or a
  StatefulSet (``WorkloadRef.kind``) in a namespace (tasks/kubernetes_apps.py);
- ``docker/<block>``: a Runbooks Docker Host block; a service is the containers labelled
  ``com.docker.compose.service=<name>``, or one container of that name (tasks/docker_engine.py);
- ``supervisord/<block>``: a Runbooks Supervisor block; a service is a supervisord program or
  process group (tasks/supervisord.py).

Each backend implements ``WorkloadBackend``; what one cannot do (a supervised process has no
memory limit, Docker keeps no revision history) it says in ``WorkloadStatus.capabilities`` and
refuses with ``Unsupported``, so that a runbook reports "not possible here" and escalates.

Every change is idempotent in the same way: it takes ``since``, the moment the run observed the
state it planned from, and leaves alone what already changed after it (an instance that started
after ``since`` was restarted already, by an earlier attempt of the same task or by someone
else), so a retried or re-run flow never restarts twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

from prefect import task
from prefect.blocks.core import Block
from pydantic import BaseModel, Field

from runbooks.params import OptionalNamespace, OptionalServiceName, PlatformRef, ServiceName
from runbooks.results import ChangeSet
from runbooks.retry import runbook_task_options


class Unsupported(Exception):
    """The backend cannot do this (e.g. roll back a supervised process): escalate, don't retry."""


class Capability(StrEnum):
    """What a backend can do besides status, restart, events and logs."""

    SCALE = "scale"
    AUTOSCALER = "autoscaler"
    MEMORY_LIMIT = "memory_limit"
    ROLLBACK = "rollback"


class WorkloadRef(BaseModel):
    """Which service, in the platform's own words."""

    name: ServiceName = Field(
        description="Kubernetes Deployment/StatefulSet name, Compose service (or container) "
        "name, or supervisord program/group name."
    )
    namespace: OptionalNamespace = Field(
        None, description="Kubernetes namespace; empty: the block's. Ignored elsewhere."
    )
    kind: Literal["Deployment", "StatefulSet"] = Field(
        "Deployment", description="Kubernetes workload kind: Deployment or StatefulSet."
    )
    container: OptionalServiceName = Field(
        None,
        description="Container of a pod to read limits and logs of; empty: the first one. "
        "Ignored by Docker (one container per instance) and supervisord.",
    )

    def describe(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{where}{self.name}"


class Instance(BaseModel):
    """One running copy of a service: a pod, a container, a supervised process."""

    id: str = Field(description="Pod name, container id (short) or supervisord 'group:name'.")
    name: str = Field(description="What an operator calls it (pod, container or process name).")
    state: str = Field(
        description="The platform's word for it: Running, CrashLoopBackOff, exited, RUNNING, "
        "BACKOFF, FATAL, ..."
    )
    running: bool
    ready: bool | None = Field(
        None, description="Readiness/health as the platform sees it; None when it has none."
    )
    started_at: datetime | None = None
    restarts: int = Field(0, description="Restarts the platform counted (0 where it counts none).")
    pid: int | None = None
    exit_code: int | None = Field(None, description="Exit code of the last termination.")
    oom_killed: bool = Field(
        False, description="Its last termination was a kill for exceeding its memory limit."
    )
    finished_at: datetime | None = Field(None, description="When it last terminated.")
    memory_limit_bytes: int | None = Field(None, description="Limit in force; None: unlimited.")
    memory_usage_bytes: int | None = Field(None, description="Current use, where measured.")


class Autoscaler(BaseModel):
    """A HorizontalPodAutoscaler of the workload."""

    name: str
    min_replicas: int
    max_replicas: int
    current_replicas: int | None = None
    desired_replicas: int | None = None


class Revision(BaseModel):
    """One rollout of the workload (a ReplicaSet / ControllerRevision)."""

    revision: int
    created_at: datetime | None = None
    images: list[str] = Field(default_factory=list)
    current: bool = False


class WorkloadStatus(BaseModel):
    """What ``kubectl get``, ``docker ps``/``inspect`` or ``supervisorctl status`` shows."""

    platform: str = Field(description="kubernetes, docker or supervisord.")
    service: str = Field(description="The service as the report names it.")
    exists: bool = Field(description="The platform knows the service at all.")
    instances: list[Instance] = Field(default_factory=list)
    desired_replicas: int | None = Field(
        None, description="Replicas asked for (spec.replicas, processes configured)."
    )
    memory_limit_bytes: int | None = Field(
        None, description="Memory limit per instance as configured; None: none."
    )
    revision: int | None = Field(None, description="Current rollout revision, where kept.")
    rolled_out_at: datetime | None = Field(
        None, description="When the current revision (or restart) was rolled out, where known."
    )
    autoscaler: Autoscaler | None = None
    capabilities: list[Capability] = Field(default_factory=list)

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    @property
    def running(self) -> list[Instance]:
        return [i for i in self.instances if i.running]

    @property
    def oom_killed(self) -> list[Instance]:
        return [i for i in self.instances if i.oom_killed]


class WorkloadEvent(BaseModel):
    """Something the platform recorded about the service (k8s Events, Docker events, exits)."""

    at: datetime | None
    reason: str = Field(description="Killing, BackOff, OOMKilling, die, oom, restart, EXITED, ...")
    message: str = ""
    instance: str | None = None


@runtime_checkable
class WorkloadBackend(Protocol):
    """One platform's way of doing what runbooks ask of a service.

    Every method takes the service's ``WorkloadRef``. Changes take ``dry_run`` and return a
    ``ChangeSet`` whose ``planned`` is the same in dry-run and for real; they raise
    ``Unsupported`` for what the platform cannot do. Every network call has the block's timeout.
    """

    platform: str

    def status(self, ref: WorkloadRef) -> WorkloadStatus: ...

    def restart(self, ref: WorkloadRef, *, since: datetime, dry_run: bool) -> ChangeSet:
        """Restart every instance that has not started after ``since`` (Kubernetes: a rollout
        restart, unless one was recorded after ``since``)."""
        ...

    def scale(self, ref: WorkloadRef, replicas: int, *, dry_run: bool) -> ChangeSet:
        """Run ``replicas`` instances; a no-op change when it already does."""
        ...

    def set_autoscaler_min(self, ref: WorkloadRef, minimum: int, *, dry_run: bool) -> ChangeSet:
        """Raise (or set) the autoscaler's minimum replicas."""
        ...

    def set_memory_limit(self, ref: WorkloadRef, limit_bytes: int, *, dry_run: bool) -> ChangeSet:
        """Give every instance this memory limit (Kubernetes: the pod template; Docker: update)."""
        ...

    def history(self, ref: WorkloadRef) -> list[Revision]: ...

    def rollback(self, ref: WorkloadRef, *, to_revision: int, dry_run: bool) -> ChangeSet:
        """Restore revision ``to_revision``'s template; a no-op when it is current already."""
        ...

    def events(self, ref: WorkloadRef, *, since: datetime) -> list[WorkloadEvent]: ...

    def logs(self, ref: WorkloadRef, *, lines: int) -> dict[str, str]:
        """The last ``lines`` lines of each instance's output, by instance name."""
        ...


# Block type of each platform, and the backend class that drives it (module:attribute),
# imported when first used so that a runbook on one platform needs no other platform's client.
PLATFORMS: dict[str, tuple[str, str]] = {
    "kubernetes": (
        "blocks.kubernetes:KubernetesCluster",
        "tasks.kubernetes_apps:KubernetesBackend",
    ),
    "docker": ("blocks.docker_host:DockerHost", "tasks.docker_engine:DockerBackend"),
    "supervisord": ("blocks.supervisor:SupervisorHost", "tasks.supervisord:SupervisorBackend"),
}

# Each backend module's test of a transient error (5xx, 429, connection refused, timeouts),
# registered by the module at import: retries happen only on those.
TRANSIENT_CHECKS: list[Callable[[BaseException], bool]] = []


def _attribute(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def platform_block_type(platform: str) -> type[Block]:
    """The block class of ``platform`` (kubernetes, docker or supervisord)."""
    return _attribute(PLATFORMS[platform][0])


def load_backend(ref: PlatformRef) -> WorkloadBackend:
    """The backend of a ``platform/block-name`` parameter, its block loaded."""
    platform, _, name = ref.partition("/")
    block = platform_block_type(platform).load(name)
    backend_type = _attribute(PLATFORMS[platform][1])
    return backend_type(block)


def is_transient(exc: BaseException) -> bool:
    return any(check(exc) for check in TRANSIENT_CHECKS)


_transient = runbook_task_options(Exception, when=is_transient)


@task(**_transient)
def workload_status(backend: WorkloadBackend, ref: WorkloadRef) -> WorkloadStatus:
    """The service's instances, limits, revision and what the platform can do with it."""
    return backend.status(ref)


@task(**_transient)
def restart_workload(
    backend: WorkloadBackend, ref: WorkloadRef, *, since: datetime, dry_run: bool
) -> ChangeSet:
    """Restart the service's instances not started after ``since``."""
    return backend.restart(ref, since=since, dry_run=dry_run)


@task(**_transient)
def scale_workload(
    backend: WorkloadBackend, ref: WorkloadRef, replicas: int, *, dry_run: bool
) -> ChangeSet:
    return backend.scale(ref, replicas, dry_run=dry_run)


@task(**_transient)
def set_autoscaler_min(
    backend: WorkloadBackend, ref: WorkloadRef, minimum: int, *, dry_run: bool
) -> ChangeSet:
    return backend.set_autoscaler_min(ref, minimum, dry_run=dry_run)


@task(**_transient)
def set_memory_limit(
    backend: WorkloadBackend, ref: WorkloadRef, limit_bytes: int, *, dry_run: bool
) -> ChangeSet:
    return backend.set_memory_limit(ref, limit_bytes, dry_run=dry_run)


@task(**_transient)
def workload_history(backend: WorkloadBackend, ref: WorkloadRef) -> list[Revision]:
    return backend.history(ref)


@task(**_transient)
def rollback_workload(
    backend: WorkloadBackend, ref: WorkloadRef, *, to_revision: int, dry_run: bool
) -> ChangeSet:
    return backend.rollback(ref, to_revision=to_revision, dry_run=dry_run)


@task(**_transient)
def workload_events(
    backend: WorkloadBackend, ref: WorkloadRef, *, since: datetime
) -> list[WorkloadEvent]:
    return backend.events(ref, since=since)


@task(**_transient)
def workload_logs(backend: WorkloadBackend, ref: WorkloadRef, *, lines: int = 50) -> dict[str, str]:
    return backend.logs(ref, lines=lines)
