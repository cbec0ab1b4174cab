"""Kubernetes tasks: read pod states, restart a pod through its controller, wait for Ready."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes.client import ApiException, CoreV1Api, V1DeleteOptions, V1Pod, V1Preconditions
from prefect import task
from pydantic import BaseModel, Field, computed_field

from blocks.kubernetes import KubernetesCluster
from runbooks.errors import Escalation
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from runbooks.waiting import poll_until


def is_transient_api_error(exc: BaseException) -> bool:
    """Server-side (5xx), throttling (429) and connection errors pass; other 4xx never will."""
    if isinstance(exc, ApiException):
        return exc.status is not None and (exc.status >= 500 or exc.status == 429)
    return isinstance(exc, urllib3.exceptions.HTTPError)


_transient = runbook_task_options(
    ApiException, urllib3.exceptions.HTTPError, when=is_transient_api_error
)


class PodState(BaseModel):
    """What ``kubectl get pods`` shows of one pod, plus what a restart decision needs."""

    name: str
    uid: str
    phase: str = Field(description="Pending, Running, Succeeded, Failed or Unknown.")
    ready: bool = Field(description="The pod's Ready condition is True.")
    restarts: int = Field(description="Container restarts, summed over containers.")
    reason: str | None = Field(
        None, description="Why it is not running well, e.g. CrashLoopBackOff, OOMKilled, Evicted."
    )
    owner: str | None = Field(
        None,
        description="Controller that recreates it, e.g. 'StatefulSet/kafka'; None for a bare pod.",
    )
    created_at: datetime | None = None
    terminating: bool = Field(False, description="Deletion requested; the pod is shutting down.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def up(self) -> bool:
        """Serving: Ready and not on its way out (a terminating pod may still report Ready)."""
        return self.ready and not self.terminating


class PodRestart(ChangeSet):
    """A pod restart: the pod is deleted so that its controller recreates it."""

    namespace: str
    pod: str


class PodsReady(BaseModel):
    """How a wait for pods to become Ready ended."""

    ready: bool
    pods: list[PodState] = Field(description="Last state seen of each named pod that exists.")
    missing: list[str] = Field(description="Named pods absent at the last look (being recreated).")
    waited_s: float
    last_error: str | None = Field(None, description="Last transient API error seen while waiting.")


@task(**_transient)
def list_pods(cluster: KubernetesCluster, namespace: str, label_selector: str) -> list[PodState]:
    """States of the pods matching ``label_selector`` (``kubectl get pods -l ...``), by name."""
    with cluster.get_client("core") as core:
        pods = core.list_namespaced_pod(
            namespace, label_selector=label_selector, _request_timeout=cluster.request_timeout_s
        )
    return sorted((pod_state(p) for p in pods.items), key=lambda p: p.name)


@task(**_transient)
def restart_pod(
    cluster: KubernetesCluster,
    namespace: str,
    name: str,
    *,
    uid: str,
    min_age_s: float = 0.0,
    dry_run: bool,
) -> PodRestart:
    """Delete pod ``name`` so that its StatefulSet/ReplicaSet recreates it (``kubectl delete pod``).

    Idempotent: only the pod instance ``uid`` is deleted (the DELETE carries a uid
    precondition), so a retry or a re-run never deletes its replacement. A pod that is already
    terminating, already replaced, gone, or younger than ``min_age_s`` (still starting, or
    restarted by an earlier run) is left alone with a note. A pod without a controller would
    not come back, so that is escalated instead.
    """
    target = f"{namespace}/{name}"
    result = PodRestart(dry_run=dry_run, namespace=namespace, pod=name)
    timeout = cluster.request_timeout_s
    with cluster.get_client("core") as core:
        state = _read_pod(core, namespace, name, timeout)
        skip = _reason_to_leave(state, uid, min_age_s, datetime.now(UTC))
        if skip:
            result.notes.append(f"{target}: {skip}; not restarting it")
            return result
        assert state is not None
        if state.owner is None:
            raise Escalation(
                f"pod {target} has no controller: deleting it would not bring it back; restart it by hand"
            )
        change = Change(action="delete_pod", target=target, detail=_pod_detail(state))
        result.planned.append(change)
        if dry_run:
            return result
        try:
            core.delete_namespaced_pod(
                name,
                namespace,
                body=V1DeleteOptions(preconditions=V1Preconditions(uid=uid)),
                _request_timeout=timeout,
            )
        except ApiException as exc:
            # 404: gone; 409: uid precondition failed, i.e. already replaced. Both mean someone
            # (or our own earlier attempt whose answer was lost) deleted it already.
            if exc.status not in (404, 409):
                raise
            result.notes.append(f"{target} uid {uid} was deleted meanwhile (HTTP {exc.status})")
            return result
        # the "after": the pod as the API shows it now (terminating, replaced or absent)
        try:
            after = _pod_detail(_read_pod(core, namespace, name, timeout))
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            # the pod is deleted either way: a failed re-read must not turn into a retry
            after = {"unread": f"{type(exc).__name__}: {exc}"[:200]}
        result.applied.append(change.model_copy(update={"detail": after}))
    return result


def _pod_detail(state: PodState | None) -> dict[str, Any]:
    """A pod as the actions table shows it, before and after a restart."""
    if state is None:
        return {"present": False}
    return state.model_dump(
        include={"uid", "phase", "ready", "terminating", "reason", "restarts", "owner"}
    )


@task(**runbook_task_options())
def read_pods(cluster: KubernetesCluster, namespace: str, names: list[str]) -> PodsReady:
    """One look at the named pods: are they all there, not terminating and Ready?

    The probe of a verification loop: a transient API error counts as "not yet" (``ready`` is
    False and ``last_error`` says why) so that one blip does not end the wait; other errors raise.
    """
    started = time.monotonic()
    seen, error = _look(cluster, namespace, names)
    return _pods_ready(names, seen, time.monotonic() - started, error)


@task(**runbook_task_options())
def wait_pods_ready(
    cluster: KubernetesCluster,
    namespace: str,
    names: list[str],
    *,
    timeout_s: float,
    interval_s: float = 1.0,
) -> PodsReady:
    """Poll the named pods until every one exists, is not terminating and is Ready.

    Bounded by ``timeout_s``. Reads each pod by name: a pod being recreated is briefly absent
    or still terminating, and neither counts as Ready. A transient API error counts as "not
    yet" so that one blip does not end the wait; other errors raise.
    """
    last_error: list[str] = []

    def look() -> dict[str, PodState | None]:
        seen, error = _look(cluster, namespace, names)
        if error:
            last_error.append(error)
        return seen

    outcome = poll_until(
        look,
        lambda seen: _all_up(names, seen),
        timeout_s=timeout_s,
        interval_s=interval_s,
    )
    return _pods_ready(
        names, outcome.last or {}, outcome.elapsed_s, last_error[-1] if last_error else None
    )


def _look(
    cluster: KubernetesCluster, namespace: str, names: list[str]
) -> tuple[dict[str, PodState | None], str | None]:
    """Each named pod's state (None: absent); empty with the error on a transient API error."""
    with cluster.get_client("core") as core:
        try:
            return {
                n: _read_pod(core, namespace, n, cluster.request_timeout_s) for n in names
            }, None
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            if not is_transient_api_error(exc):
                raise
            return {}, f"{type(exc).__name__}: {exc}"


def _all_up(names: list[str], seen: dict[str, PodState | None]) -> bool:
    return len(seen) == len(names) and all(p is not None and p.up for p in seen.values())


def _pods_ready(
    names: list[str], seen: dict[str, PodState | None], waited_s: float, error: str | None
) -> PodsReady:
    return PodsReady(
        ready=_all_up(names, seen),
        pods=[p for p in seen.values() if p is not None],
        missing=[n for n, p in seen.items() if p is None],
        waited_s=round(waited_s, 3),
        last_error=error,
    )


def _read_pod(core: CoreV1Api, namespace: str, name: str, timeout: float) -> PodState | None:
    """The pod's state, or None when it does not exist (404)."""
    try:
        return pod_state(core.read_namespaced_pod(name, namespace, _request_timeout=timeout))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _reason_to_leave(
    state: PodState | None, uid: str, min_age_s: float, now: datetime
) -> str | None:
    """Why this pod must not be deleted now, or None when deleting it is the restart asked for."""
    if state is None:
        return "pod is gone already (its controller recreates it)"
    if state.uid != uid:
        return f"pod was already replaced (uid {state.uid}, not {uid})"
    if state.terminating:
        return "pod is already terminating"
    if state.created_at is not None:
        age = (now - state.created_at).total_seconds()
        if age < min_age_s:
            return f"pod is only {age:.0f}s old (under {min_age_s:.0f}s): still starting or just restarted"
    return None


def pod_state(pod: V1Pod) -> PodState:
    meta, status = pod.metadata, pod.status
    containers = (status.container_statuses if status else None) or []
    conditions = (status.conditions if status else None) or []
    reasons = [
        cs.state.waiting.reason if cs.state.waiting else cs.state.terminated.reason
        for cs in containers
        if cs.state and (cs.state.waiting or cs.state.terminated)
    ]
    owner = next((f"{o.kind}/{o.name}" for o in meta.owner_references or [] if o.controller), None)
    return PodState(
        name=meta.name,
        uid=meta.uid,
        phase=(status.phase if status else None) or "Unknown",
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        restarts=sum(cs.restart_count for cs in containers),
        reason=next((r for r in reasons if r), None) or (status.reason if status else None),
        owner=owner,
        created_at=meta.creation_timestamp,
        terminating=meta.deletion_timestamp is not None,
    )
