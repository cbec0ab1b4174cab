"""The Kubernetes workload backend's decisions (tasks/kubernetes_apps.py), as pure functions.

Whether a rollout restart is needed or done already, how to scale next to an autoscaler, the
memory limit to write, what ``kubectl rollout undo`` writes back, and what a pod's status says
as an ``Instance``. Unit-tested with data tables (tests/unit/test_kubernetes_apps_decisions.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import V1Container, V1ContainerStateTerminated, V1Pod
from kubernetes.utils import parse_quantity

from runbooks.errors import Escalation
from tasks.kubernetes import pod_state
from tasks.workloads import Instance, Unsupported, WorkloadEvent

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
HASH_LABEL = "pod-template-hash"
# what `kubectl rollout undo` keeps of the Deployment's own annotations instead of taking the
# ReplicaSet's (k8s.io/kubectl rollback.go annotationsToSkip)
ROLLBACK_KEEPS = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        REVISION,
        REVISION_HISTORY,
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "deprecated.deployment.rollback.to",
    }
)


# decisions ---------------------------------------------------------------------------------


def whole_second(at: datetime) -> datetime:
    """``at`` in UTC to the second: the API's timestamps have no finer precision."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).replace(microsecond=0)


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time as kubectl writes it (``Z`` or an offset); None when it is not one."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def restart_skip_reason(
    restarted_at: str | None,
    since: datetime,
    rolled_out_at: datetime | None,
    pods_created: list[datetime],
) -> str | None:
    """Why a rollout restart would be a second one (a note), or None when it is needed.

    Done already: a restart recorded (``restartedAt``) at or after ``since``, a revision rolled
    out then (it replaces every pod), or every pod created then. Times compare to the second,
    the precision the API keeps, so a restart in the same second as ``since`` counts as after.
    """
    floor = whole_second(since)
    recorded = parse_time(restarted_at)
    if recorded is not None and recorded >= floor:
        return f"a rollout restart was recorded at {restarted_at}, after {floor.isoformat()}"
    if rolled_out_at is not None and whole_second(rolled_out_at) >= floor:
        return (
            f"the current revision rolled out at {rolled_out_at.isoformat()}, after "
            f"{floor.isoformat()}: its pods are new"
        )
    if pods_created and all(whole_second(c) >= floor for c in pods_created):
        return f"every pod was created after {floor.isoformat()}"
    return None


@dataclass(frozen=True)
class ScalePlan:
    change: bool
    note: str | None = None


def scale_plan(current: int, wanted: int, autoscaler: tuple[int, int] | None) -> ScalePlan:
    """Whether to set ``wanted`` replicas; ``Unsupported`` when an autoscaler would undo it.

    ``autoscaler``: the (min, max) of the HPA that targets the workload. Outside those bounds
    the HPA puts the count back at its next sync: raise (or lower) its minimum instead.
    """
    if wanted < 0:
        raise ValueError(f"replicas must be 0 or more, not {wanted}")
    if autoscaler is not None:
        low, high = autoscaler
        if wanted < low or wanted > high:
            raise Unsupported(
                f"a HorizontalPodAutoscaler keeps the replicas within {low}..{high}: it would "
                f"undo a scale to {wanted}; change its minimum instead (set_autoscaler_min)"
            )
    if wanted == current:
        return ScalePlan(False, f"already {current} replicas")
    if autoscaler is not None:
        return ScalePlan(
            True, "a HorizontalPodAutoscaler manages the replicas and moves them by its metrics "
            "(raise its minimum to keep them)"
        )
    return ScalePlan(True)


def autoscaler_min_plan(current_min: int, maximum: int, wanted: int) -> ScalePlan:
    """Whether to set the HPA's ``minReplicas`` to ``wanted``.

    Never above its ``maxReplicas``: the maximum caps what the service may cost, and raising
    it is a human's decision, so that is ``Unsupported``.
    """
    if wanted < 1:
        raise Unsupported(f"an autoscaler's minimum is at least 1, not {wanted}")
    if wanted > maximum:
        raise Unsupported(
            f"minimum {wanted} is above the autoscaler's maximum {maximum}: raising the maximum "
            "is for a human to decide"
        )
    if wanted == current_min:
        return ScalePlan(False, f"the autoscaler's minimum is {current_min} already")
    if wanted < current_min:
        return ScalePlan(True, f"lowers the autoscaler's minimum from {current_min}")
    return ScalePlan(True)


def quantity_bytes(text: str | None) -> int | None:
    """A memory quantity (``512Mi``, ``1G``, ``129e6``) in bytes; None for none."""
    if text is None:
        return None
    return int(parse_quantity(text))


def format_bytes(size: int) -> str:
    """``size`` as a memory quantity: the largest binary unit that divides it, else bytes."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


@dataclass(frozen=True)
class MemoryPlan:
    limit: str
    request: str | None = None  # the request, lowered to the new limit; None: left as it is
    note: str | None = None


def memory_limit_plan(limit: str | None, request: str | None, wanted_bytes: int) -> MemoryPlan | None:
    """The container's new memory limit, or None when it has that limit already.

    A request above the new limit is lowered to it: the API server refuses a request above
    the limit (422), and the request is what the scheduler reserves.
    """
    if wanted_bytes <= 0:
        raise ValueError(f"a memory limit is a positive number of bytes, not {wanted_bytes}")
    if quantity_bytes(limit) == wanted_bytes:
        return None
    new = format_bytes(wanted_bytes)
    requested = quantity_bytes(request)
    if requested is not None and requested > wanted_bytes:
        return MemoryPlan(new, new, f"memory request {request} lowered to the new limit {new}")
    return MemoryPlan(new)


def template_without_hash(template: dict[str, Any]) -> dict[str, Any]:
    """A ReplicaSet's pod template as its Deployment had it: without ``pod-template-hash``.

    What ``kubectl rollout undo`` writes back into the Deployment (the hash label is the
    ReplicaSet controller's, and the Deployment's selector does not carry it).
    """
    metadata = dict(template.get("metadata") or {})
    labels = {k: v for k, v in (metadata.get("labels") or {}).items() if k != HASH_LABEL}
    if labels:
        metadata["labels"] = labels
    else:
        metadata.pop("labels", None)
    return {**template, "metadata": metadata}


def rollback_annotations(deployment: dict[str, str], replica_set: dict[str, str]) -> dict[str, str]:
    """The Deployment's annotations after ``kubectl rollout undo``: its own bookkeeping ones,
    and the ReplicaSet's others (e.g. ``kubernetes.io/change-cause``)."""
    kept = {k: v for k, v in deployment.items() if k in ROLLBACK_KEEPS}
    return kept | {k: v for k, v in replica_set.items() if k not in ROLLBACK_KEEPS}


def selector_text(match_labels: dict[str, str] | None, expressions: list[Any] | None) -> str:
    """A LabelSelector as ``labelSelector`` query text (``a=b,c in (d,e),!f``)."""
    terms = [f"{k}={v}" for k, v in sorted((match_labels or {}).items())]
    for e in expressions or []:
        values = ",".join(sorted(e.values or []))
        terms.append(
            {
                "In": f"{e.key} in ({values})",
                "NotIn": f"{e.key} notin ({values})",
                "Exists": e.key,
                "DoesNotExist": f"!{e.key}",
            }[e.operator]
        )
    return ",".join(terms)


def pick_container(containers: list[V1Container], wanted: str | None, where: str) -> V1Container:
    """The container ``wanted`` of a pod spec; the first one when none is named."""
    if wanted is None:
        return containers[0]
    found = next((c for c in containers if c.name == wanted), None)
    if found is None:
        names = ", ".join(c.name for c in containers)
        raise Escalation(f"{where} has no container {wanted!r} (it has {names})")
    return found


def pod_instance(pod: V1Pod, container: str | None, usage: dict[str, int] | None) -> Instance:
    """One pod as an ``Instance``: pod-level state and readiness, container-level the rest.

    The container is ``container`` or the pod's first: its restarts, its last termination
    (``state.terminated`` while it is down, else ``lastState.terminated``: ``OOMKilled`` is
    there once the kubelet restarted it), its memory limit and metrics-server's usage of it.
    """
    state = pod_state(pod)
    spec = pick_container(pod.spec.containers, container, f"pod {pod.metadata.name}")
    statuses = (pod.status.container_statuses if pod.status else None) or []
    cs = next((s for s in statuses if s.name == spec.name), None)
    running = cs.state.running if cs and cs.state else None
    last: V1ContainerStateTerminated | None = None
    if cs and cs.state and cs.state.terminated:
        last = cs.state.terminated
    elif cs and cs.last_state and cs.last_state.terminated:
        last = cs.last_state.terminated
    limits = (spec.resources.limits if spec.resources else None) or {}
    started = (
        (running.started_at if running else None)
        or (last.started_at if last else None)
        or (pod.status.start_time if pod.status else None)
        or pod.metadata.creation_timestamp
    )
    return Instance(
        id=pod.metadata.name,
        name=pod.metadata.name,
        state="Terminating" if state.terminating else (state.reason or state.phase),
        running=state.phase == "Running" and running is not None and not state.terminating,
        ready=state.ready,
        started_at=started,
        restarts=cs.restart_count if cs else 0,
        exit_code=last.exit_code if last else None,
        oom_killed=bool(last and last.reason == "OOMKilled"),
        finished_at=last.finished_at if last else None,
        memory_limit_bytes=quantity_bytes(limits.get("memory")),
        memory_usage_bytes=(usage or {}).get(spec.name),
    )


def termination_events(pod: V1Pod, since: datetime) -> list[WorkloadEvent]:
    """Container terminations the pod's status remembers, since ``since``.

    Events expire (an hour by default) and the OOM kill itself is recorded on the node, not
    the pod; the pod's status keeps each container's last termination for as long as it runs.
    """
    found = []
    for cs in (pod.status.container_statuses if pod.status else None) or []:
        for term in (cs.state.terminated if cs.state else None,
                     cs.last_state.terminated if cs.last_state else None):
            if term is None or term.finished_at is None or whole_second(term.finished_at) < whole_second(since):
                continue
            found.append(
                WorkloadEvent(
                    at=term.finished_at,
                    reason=term.reason or "Terminated",
                    message=f"container {cs.name} terminated with exit code {term.exit_code}",
                    instance=pod.metadata.name,
                )
            )
    return found


@dataclass(frozen=True)
class RevisionRecord:
    """A ReplicaSet or ControllerRevision, reduced to what history and rollback need."""

    revision: int
    name: str
    uid: str
    created_at: datetime | None
    template: dict[str, Any]  # API JSON, without the pod-template-hash label
    annotations: dict[str, str]
    replicas: int
    current: bool
    patch: Any = None  # a ControllerRevision's data: the patch that restores it
    # the numbers it had before (deployment.kubernetes.io/revision-history): a rollback moves
    # the ReplicaSet it restores to the next revision number
    earlier: tuple[int, ...] = ()


def find_revision(revisions: list[RevisionRecord], wanted: int) -> RevisionRecord | None:
    """The revision numbered ``wanted``, now or before a rollback renumbered it."""
    return next((r for r in revisions if r.revision == wanted), None) or next(
        (r for r in revisions if wanted in r.earlier), None
    )

