"""The API calls of the Kubernetes workload backend (tasks/kubernetes_apps.py).

One ``Session`` per backend method: one connection pool, the official client's typed methods,
each with the block's timeout.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import urllib3
from kubernetes.client import (
    ApiClient,
    ApiException,
    AppsV1Api,
    AutoscalingV2Api,
    CoreV1Api,
    CustomObjectsApi,
    V1Pod,
    V1PodTemplateSpec,
)

from runbooks.errors import Escalation
from tasks.kubernetes_apps_decisions import (
    REVISION,
    REVISION_HISTORY,
    RevisionRecord,
    quantity_bytes,
    selector_text,
    template_without_hash,
    whole_second,
)
from tasks.workloads import Unsupported, WorkloadEvent, WorkloadRef


class Session:
    """The API calls of one backend method: one connection pool, the block's timeout."""

    def __init__(self, client: ApiClient, ref: WorkloadRef, namespace: str, timeout: float):
        self.client = client
        self.core = CoreV1Api(client)
        self.apps = AppsV1Api(client)
        self.autoscaling = AutoscalingV2Api(client)
        self.custom = CustomObjectsApi(client)
        self.ref = ref
        self.namespace = namespace
        self.timeout = timeout
        self.where = f"{ref.kind} {namespace}/{ref.name}"
        self.target = f"{ref.kind}/{namespace}/{ref.name}"
        self._suffix = "deployment" if ref.kind == "Deployment" else "stateful_set"

    def _call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.apps, f"{verb}_namespaced_{self._suffix}")
        return method(*args, _request_timeout=self.timeout, **kwargs)

    def read(self, *, missing_ok: bool = False) -> Any:
        try:
            return self._call("read", self.ref.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            if missing_ok:
                return None
            raise Escalation(f"{self.where} does not exist") from None

    def refuse_if_paused(self, obj: Any, what: str) -> None:
        # as kubectl does: a paused Deployment rolls nothing out until someone resumes it
        if getattr(obj.spec, "paused", None):
            raise Unsupported(f"{self.where} is paused: resume it (kubectl rollout resume) to {what} it")

    def patch(self, body: Any) -> Any:
        return self._call("patch", self.ref.name, self.namespace, body)

    def read_scale(self) -> Any:
        method = getattr(self.apps, f"read_namespaced_{self._suffix}_scale")
        try:
            return method(self.ref.name, self.namespace, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                raise Escalation(f"{self.where} does not exist") from None
            raise

    def patch_scale(self, body: dict[str, Any]) -> Any:
        method = getattr(self.apps, f"patch_namespaced_{self._suffix}_scale")
        return method(self.ref.name, self.namespace, body, _request_timeout=self.timeout)

    def template_json(self, template: V1PodTemplateSpec) -> dict[str, Any]:
        """A pod template as API JSON (camelCase keys, no nulls), comparable across sources."""
        return self.client.sanitize_for_serialization(template)

    def revisions(self, obj: Any) -> list[RevisionRecord]:
        """The workload's ReplicaSets / ControllerRevisions (those it controls), oldest first."""
        selector = obj.spec.selector
        labels = selector_text(selector.match_labels, selector.match_expressions)
        uid = obj.metadata.uid
        current = self.template_json(obj.spec.template)
        found = []
        if self.ref.kind == "Deployment":
            items = self.apps.list_namespaced_replica_set(
                self.namespace, label_selector=labels, _request_timeout=self.timeout
            ).items
            for rs in items:
                if not _controlled_by(rs, uid):
                    continue
                annotations = rs.metadata.annotations or {}
                if not (annotations.get(REVISION) or "").isdigit():
                    continue
                template = template_without_hash(self.template_json(rs.spec.template))
                earlier = annotations.get(REVISION_HISTORY, "").split(",")
                found.append(RevisionRecord(
                    int(annotations[REVISION]), rs.metadata.name, rs.metadata.uid,
                    rs.metadata.creation_timestamp, template, annotations,
                    rs.spec.replicas or (rs.status.replicas if rs.status else 0) or 0,
                    template == current, earlier=tuple(int(e) for e in earlier if e.isdigit()),
                ))
        else:
            items = self.apps.list_namespaced_controller_revision(
                self.namespace, label_selector=labels, _request_timeout=self.timeout
            ).items
            update = obj.status.update_revision if obj.status else None
            for cr in items:
                if not _controlled_by(cr, uid):
                    continue
                raw = ((cr.data or {}).get("spec") or {}).get("template") or {}
                template = self.template_json(V1PodTemplateSpec.from_dict(raw))
                found.append(RevisionRecord(
                    cr.revision, cr.metadata.name, cr.metadata.uid, cr.metadata.creation_timestamp,
                    template, cr.metadata.annotations or {}, 0, cr.metadata.name == update, cr.data,
                ))
        return sorted(found, key=lambda r: r.revision)

    def pods(self, obj: Any, revisions: list[RevisionRecord]) -> list[V1Pod]:
        """The pods the selector picks and the workload (or its ReplicaSets) controls, by name."""
        selector = obj.spec.selector
        owners = {obj.metadata.uid} if self.ref.kind == "StatefulSet" else {r.uid for r in revisions}
        pods = self.core.list_namespaced_pod(
            self.namespace,
            label_selector=selector_text(selector.match_labels, selector.match_expressions),
            _request_timeout=self.timeout,
        ).items
        owned = [p for p in pods if any(_controlled_by(p, uid) for uid in owners)]
        return sorted(owned, key=lambda p: p.metadata.name)

    def autoscaler(self) -> Any:
        """The HorizontalPodAutoscaler whose scaleTargetRef names the workload (first by name)."""
        hpas = self.autoscaling.list_namespaced_horizontal_pod_autoscaler(
            self.namespace, _request_timeout=self.timeout
        ).items
        mine = [
            h for h in hpas
            if h.spec.scale_target_ref.kind == self.ref.kind
            and h.spec.scale_target_ref.name == self.ref.name
        ]
        return min(mine, key=lambda h: h.metadata.name) if mine else None

    def memory_usage(self, obj: Any) -> dict[str, dict[str, int]]:
        """pod -> container -> bytes from metrics-server; empty when it does not answer.

        Metrics are optional (many clusters have no metrics-server, and it may be down): no
        answer is no usage, never a failed status.
        """
        selector = obj.spec.selector
        try:
            listing = self.custom.list_namespaced_custom_object(
                "metrics.k8s.io", "v1beta1", self.namespace, "pods",
                label_selector=selector_text(selector.match_labels, selector.match_expressions),
                _request_timeout=self.timeout,
            )
        except (ApiException, urllib3.exceptions.HTTPError):
            return {}
        usage: dict[str, dict[str, int]] = {}
        for item in listing.get("items", []):
            for c in item.get("containers", []):
                memory = (c.get("usage") or {}).get("memory")
                if memory is not None:
                    usage.setdefault(item["metadata"]["name"], {})[c["name"]] = quantity_bytes(memory)
        return usage

    def patch_autoscaler(self, name: str, body: dict[str, Any]) -> Any:
        return self.autoscaling.patch_namespaced_horizontal_pod_autoscaler(
            name, self.namespace, body, _request_timeout=self.timeout
        )

    def events_of(self, kind: str, name: str, since: datetime) -> list[WorkloadEvent]:
        listing = self.core.list_namespaced_event(
            self.namespace,
            field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
            _request_timeout=self.timeout,
        )
        found = []
        for e in listing.items:
            at = (
                (e.series.last_observed_time if e.series else None)
                or e.last_timestamp or e.event_time or e.first_timestamp
                or e.metadata.creation_timestamp
            )
            if at is not None and whole_second(at) < whole_second(since):
                continue
            count = f" (x{e.count})" if e.count and e.count > 1 else ""
            found.append(WorkloadEvent(
                at=at, reason=e.reason or "", message=f"{e.message or ''}{count}",
                instance=name if kind == "Pod" else f"{kind}/{name}",
            ))
        return found

    def log(self, pod: str, container: str, lines: int, *, previous: bool) -> str:
        try:
            return self.core.read_namespaced_pod_log(
                pod, self.namespace, container=container, tail_lines=lines,
                previous=previous or None, _request_timeout=self.timeout,
            )
        except ApiException as exc:
            # 400: no log to show (a container still waiting to start, no previous run)
            if exc.status != 400:
                raise
            return f"(no log: {_status_message(exc)})"


def _controlled_by(obj: Any, uid: str) -> bool:
    return any(o.controller and o.uid == uid for o in obj.metadata.owner_references or [])


def _status_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)[:300]
    except ValueError:
        return str(exc.reason)[:300]
