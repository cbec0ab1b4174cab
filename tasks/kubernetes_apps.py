"""Deployments and StatefulSets as workloads: the Kubernetes ``WorkloadBackend`` (issue #12).

Does what an SRE does with ``kubectl`` (tasks/workloads.py drives it as Prefect tasks):

- status: ``kubectl get deploy,rs,pods,hpa`` of the workload: the pods its selector picks and
  its ReplicaSets (StatefulSet: the StatefulSet itself) own, each pod's state, last termination
  (``OOMKilled``), restarts and memory limit (memory use only where metrics-server answers),
  the current revision and when it rolled out, the HorizontalPodAutoscaler that targets it;
- restart: ``kubectl rollout restart`` (the ``kubectl.kubernetes.io/restartedAt`` annotation
  of the pod template); scale: the ``/scale`` subresource (``kubectl scale``); the autoscaler's
  minimum: a patch of the HPA; the memory limit: a patch of the container in the pod template
  (a strategic merge patch, which merges containers by name);
- history and rollback: ``kubectl rollout history`` / ``undo --to-revision``: a Deployment's
  ReplicaSets by their ``deployment.kubernetes.io/revision``, a StatefulSet's
  ControllerRevisions; a rollback restores that revision's pod template exactly as kubectl
  does (a JSON patch replacing ``spec.template``; for a StatefulSet the revision's own data);
- events (``kubectl describe``) and logs (``kubectl logs --tail``, ``--previous`` too for a
  container that restarted: the log of the run that crashed is the evidence).

Every call is one of the official client's typed methods with the block's timeout. Every change
is planned from what the API shows and left alone when already done (a restart recorded after
``since``, the replica count, minimum, limit or revision already in place), so a retried task
never applies it twice. The decisions are pure functions in tasks/kubernetes_apps_decisions.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from blocks.kubernetes import KubernetesCluster
from runbooks.errors import Escalation
from runbooks.results import Change, ChangeSet
from tasks.kubernetes import is_transient_api_error
from tasks.kubernetes_apps_decisions import (
    RESTARTED_AT,
    autoscaler_min_plan,
    find_revision,
    memory_limit_plan,
    pick_container,
    pod_instance,
    quantity_bytes,
    restart_skip_reason,
    rollback_annotations,
    scale_plan,
    termination_events,
    whole_second,
)
from tasks.kubernetes_apps_session import Session
from tasks.workloads import (
    TRANSIENT_CHECKS,
    Autoscaler,
    Capability,
    Revision,
    Unsupported,
    WorkloadEvent,
    WorkloadRef,
    WorkloadStatus,
)

if is_transient_api_error not in TRANSIENT_CHECKS:
    TRANSIENT_CHECKS.append(is_transient_api_error)


class KubernetesBackend:
    """Deployments and StatefulSets of a Kubernetes cluster (a Runbooks Kubernetes Cluster block).

    With a HorizontalPodAutoscaler on the workload prefer ``set_autoscaler_min`` to ``scale``:
    the HPA moves replicas by its metrics, and a scale outside its bounds is refused.
    """

    platform = "kubernetes"

    def __init__(self, cluster: KubernetesCluster) -> None:
        self.cluster = cluster

    # reads ----------------------------------------------------------------------------------

    def status(self, ref: WorkloadRef) -> WorkloadStatus:
        with self._session(ref) as s:
            obj = s.read(missing_ok=True)
            if obj is None:
                return WorkloadStatus(platform=self.platform, service=s.where, exists=False)
            revisions = s.revisions(obj)
            pods = s.pods(obj, revisions)
            hpa = s.autoscaler()
            usage = s.memory_usage(obj)
        container = pick_container(obj.spec.template.spec.containers, ref.container, s.where)
        limits = (container.resources.limits if container.resources else None) or {}
        current = next((r for r in revisions if r.current), None)
        capabilities = [Capability.SCALE, Capability.MEMORY_LIMIT, Capability.ROLLBACK]
        if hpa is not None:
            capabilities.insert(1, Capability.AUTOSCALER)
        return WorkloadStatus(
            platform=self.platform,
            service=s.where,
            exists=True,
            instances=[pod_instance(p, ref.container, usage.get(p.metadata.name)) for p in pods],
            desired_replicas=obj.spec.replicas,
            memory_limit_bytes=quantity_bytes(limits.get("memory")),
            revision=current.revision if current else None,
            rolled_out_at=current.created_at if current else None,
            autoscaler=_autoscaler(hpa) if hpa is not None else None,
            capabilities=capabilities,
        )

    def history(self, ref: WorkloadRef) -> list[Revision]:
        with self._session(ref) as s:
            revisions = s.revisions(s.read())
        return [
            Revision(
                revision=r.revision,
                created_at=r.created_at,
                images=[c.get("image", "") for c in r.template.get("spec", {}).get("containers", [])],
                current=r.current,
            )
            for r in revisions
        ]

    def events(self, ref: WorkloadRef, *, since: datetime) -> list[WorkloadEvent]:
        """Events of the workload, its live or recent ReplicaSets, its pods and its HPA, and
        the container terminations its pods remember, since ``since``, oldest first."""
        with self._session(ref) as s:
            obj = s.read()
            revisions = s.revisions(obj)
            pods = s.pods(obj, revisions)
            hpa = s.autoscaler()
            subjects = [(ref.kind, ref.name)]
            if ref.kind == "Deployment":
                subjects += [
                    ("ReplicaSet", r.name)
                    for r in revisions
                    if r.replicas or r.current or (r.created_at and r.created_at >= whole_second(since))
                ]
            subjects += [("Pod", p.metadata.name) for p in pods]
            if hpa is not None:
                subjects.append(("HorizontalPodAutoscaler", hpa.metadata.name))
            found = [e for kind, name in subjects for e in s.events_of(kind, name, since)]
        found += [e for p in pods for e in termination_events(p, since)]
        epoch = datetime.min.replace(tzinfo=UTC)
        return sorted(found, key=lambda e: e.at or epoch)

    def logs(self, ref: WorkloadRef, *, lines: int) -> dict[str, str]:
        """The last ``lines`` of each pod's container; of a container that restarted, also
        its previous run's (key ``<pod> (previous)``): that is where a crash is told."""
        if lines < 1:
            raise ValueError(f"lines must be 1 or more, not {lines}")
        out: dict[str, str] = {}
        with self._session(ref) as s:
            obj = s.read()
            for pod in s.pods(obj, s.revisions(obj)):
                container = pick_container(pod.spec.containers, ref.container, s.where).name
                name = pod.metadata.name
                statuses = (pod.status.container_statuses if pod.status else None) or []
                cs = next((c for c in statuses if c.name == container), None)
                out[name] = s.log(name, container, lines, previous=False)
                if cs and cs.last_state and cs.last_state.terminated:
                    out[f"{name} (previous)"] = s.log(name, container, lines, previous=True)
        return out

    # changes --------------------------------------------------------------------------------

    def restart(self, ref: WorkloadRef, *, since: datetime, dry_run: bool) -> ChangeSet:
        """``kubectl rollout restart``, unless one is done already (see restart_skip_reason).

        The controller then replaces the pods by its update strategy (a Deployment: a new
        ReplicaSet; a StatefulSet: one pod at a time from the highest ordinal). A StatefulSet
        with the OnDelete strategy replaces nothing on a template change: refused, restart its
        pods one by one instead (tasks.kubernetes.restart_pod).
        """
        result = ChangeSet(dry_run=dry_run)
        with self._session(ref) as s:
            obj = s.read()
            s.refuse_if_paused(obj, "restart")
            if ref.kind == "StatefulSet" and obj.spec.update_strategy.type == "OnDelete":
                raise Unsupported(
                    f"{s.where} has the OnDelete update strategy: a rollout restart replaces no "
                    "pod; restart its pods one at a time"
                )
            revisions = s.revisions(obj)
            pods = s.pods(obj, revisions)
            current = next((r for r in revisions if r.current), None)
            annotations = obj.spec.template.metadata.annotations or {}
            skip = restart_skip_reason(
                annotations.get(RESTARTED_AT),
                since,
                current.created_at if current else None,
                [p.metadata.creation_timestamp for p in pods if p.metadata.deletion_timestamp is None],
            )
            if skip:
                result.notes.append(f"{s.where}: {skip}; not restarting it")
                return result
            change = Change(
                action="rollout_restart",
                target=s.target,
                detail={
                    "revision": current.revision if current else None,
                    "pods": sorted(p.metadata.name for p in pods),
                    "previous_restart": annotations.get(RESTARTED_AT),
                },
            )
            result.planned.append(change)
            if dry_run:
                return result
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
            patched = s.patch(body)
            result.applied.append(change.model_copy(update={"detail": {
                **change.detail, RESTARTED_AT: stamp, "generation": patched.metadata.generation,
            }}))
        return result

    def scale(self, ref: WorkloadRef, replicas: int, *, dry_run: bool) -> ChangeSet:
        result = ChangeSet(dry_run=dry_run)
        with self._session(ref) as s:
            scale = s.read_scale()
            hpa = s.autoscaler()
            bounds = (hpa.spec.min_replicas or 1, hpa.spec.max_replicas) if hpa else None
            plan = scale_plan(scale.spec.replicas or 0, replicas, bounds)
            if plan.note:
                result.notes.append(f"{s.where}: {plan.note}")
            if not plan.change:
                return result
            change = Change(
                action="scale", target=s.target,
                detail={"from": scale.spec.replicas or 0, "to": replicas},
            )
            result.planned.append(change)
            if dry_run:
                return result
            after = s.patch_scale({"spec": {"replicas": replicas}})
            result.applied.append(change.model_copy(update={"detail": {
                **change.detail, "spec_replicas": after.spec.replicas,
            }}))
        return result

    def set_autoscaler_min(self, ref: WorkloadRef, minimum: int, *, dry_run: bool) -> ChangeSet:
        result = ChangeSet(dry_run=dry_run)
        with self._session(ref) as s:
            s.read()
            hpa = s.autoscaler()
            if hpa is None:
                raise Unsupported(f"no HorizontalPodAutoscaler targets {s.where}: scale it instead")
            current = hpa.spec.min_replicas or 1
            plan = autoscaler_min_plan(current, hpa.spec.max_replicas, minimum)
            if plan.note:
                result.notes.append(f"{s.where}: {plan.note}")
            if not plan.change:
                return result
            change = Change(
                action="set_autoscaler_min",
                target=f"HorizontalPodAutoscaler/{s.namespace}/{hpa.metadata.name}",
                detail={"from": current, "to": minimum, "max": hpa.spec.max_replicas,
                        "workload": s.target},
            )
            result.planned.append(change)
            if dry_run:
                return result
            after = s.patch_autoscaler(hpa.metadata.name, {"spec": {"minReplicas": minimum}})
            result.applied.append(change.model_copy(update={"detail": {
                **change.detail, "min_replicas": after.spec.min_replicas,
            }}))
        return result

    def set_memory_limit(self, ref: WorkloadRef, limit_bytes: int, *, dry_run: bool) -> ChangeSet:
        """The container's memory limit in the pod template: a new revision, pods replaced."""
        result = ChangeSet(dry_run=dry_run)
        with self._session(ref) as s:
            obj = s.read()
            container = pick_container(obj.spec.template.spec.containers, ref.container, s.where)
            resources = container.resources
            limit = ((resources.limits if resources else None) or {}).get("memory")
            request = ((resources.requests if resources else None) or {}).get("memory")
            plan = memory_limit_plan(limit, request, limit_bytes)
            if plan is None:
                result.notes.append(f"{s.where}: container {container.name} has limit {limit} already")
                return result
            if plan.note:
                result.notes.append(f"{s.where}: {plan.note}")
            change = Change(
                action="set_memory_limit",
                target=f"{s.target} container {container.name}",
                detail={"from": limit, "to": plan.limit, "request": request,
                        "new_request": plan.request or request},
            )
            result.planned.append(change)
            if dry_run:
                return result
            new_resources: dict[str, Any] = {"limits": {"memory": plan.limit}}
            if plan.request:
                new_resources["requests"] = {"memory": plan.request}
            # a strategic merge patch: containers merge by name, the other resources stay
            body = {"spec": {"template": {"spec": {"containers": [
                {"name": container.name, "resources": new_resources}
            ]}}}}
            patched = s.patch(body)
            result.applied.append(change.model_copy(update={"detail": {
                **change.detail, "generation": patched.metadata.generation,
            }}))
        return result

    def rollback(self, ref: WorkloadRef, *, to_revision: int, dry_run: bool) -> ChangeSet:
        """``kubectl rollout undo --to-revision``: that revision's pod template, restored.

        A no-op when the workload's template is that revision's already (a retried rollback).
        The controller then rolls the restored template out as the next revision.
        """
        result = ChangeSet(dry_run=dry_run)
        with self._session(ref) as s:
            obj = s.read()
            s.refuse_if_paused(obj, "roll back")
            revisions = s.revisions(obj)
            target = find_revision(revisions, to_revision)
            if target is None:
                kept = ", ".join(str(r.revision) for r in revisions) or "none"
                raise Escalation(f"{s.where} has no revision {to_revision} (it keeps {kept})")
            current = s.template_json(obj.spec.template)
            if target.template == current:
                result.notes.append(f"{s.where}: revision {to_revision}'s template is current already")
                return result
            images = [c.get("image") for c in target.template.get("spec", {}).get("containers", [])]
            now = next((r.revision for r in revisions if r.current), None)
            change = Change(
                action="rollback",
                target=s.target,
                detail={"from_revision": now, "to_revision": to_revision, "images": images},
            )
            result.planned.append(change)
            if dry_run:
                return result
            if ref.kind == "Deployment":
                annotations = rollback_annotations(obj.metadata.annotations or {}, target.annotations)
                body: Any = [
                    {"op": "replace", "path": "/spec/template", "value": target.template},
                    {"op": "add", "path": "/metadata/annotations", "value": annotations},
                ]
            else:
                body = target.patch
            patched = s.patch(body)
            result.applied.append(change.model_copy(update={"detail": {
                **change.detail, "generation": patched.metadata.generation,
            }}))
        return result

    @contextmanager
    def _session(self, ref: WorkloadRef) -> Iterator[Session]:
        with self.cluster.get_api_client() as client:
            yield Session(client, ref, ref.namespace or self.cluster.namespace,
                           self.cluster.request_timeout_s)


def _autoscaler(hpa: Any) -> Autoscaler:
    status = hpa.status
    return Autoscaler(
        name=hpa.metadata.name,
        min_replicas=hpa.spec.min_replicas or 1,
        max_replicas=hpa.spec.max_replicas,
        current_replicas=status.current_replicas if status else None,
        desired_replicas=status.desired_replicas if status else None,
    )


