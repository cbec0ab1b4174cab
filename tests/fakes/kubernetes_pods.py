"""The fake API server's pods as the kubelet shows them: states, logs, events, metrics.

Part of the fake Kubernetes API server (tests/fakes/kubernetes_api.py, which serves these):
a pod's JSON, ``GET .../pods/{name}/log`` (``container``, ``tailLines``, ``previous``, and the
400 answers of a pod with several containers, an unknown container or no previous one),
``GET .../events`` with a field selector over the fields the API server indexes (400 for
others), metrics-server's ``PodMetricsList``, and what the kubelet and the kernel do to a pod
(an OOM kill, a deletion's ``Killing``).
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from tests.fakes.kubernetes_patch import field_selector, label_selector

NODE = "fake-node-1"
Response = tuple[int, Any]  # a dict is served as JSON, a str as text/plain


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    content_type: str | None = None


def _kafka_spec() -> dict[str, Any]:
    return {"containers": [{"name": "kafka", "image": "apache/kafka:3.9.0"}]}


@dataclass
class FakePod:
    namespace: str
    name: str
    labels: dict[str, str]
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # monotonic time from which the pod reports Ready; None: it never becomes Ready
    ready_at: float | None = 0.0
    # container waiting reason while not Ready, e.g. CrashLoopBackOff
    waiting_reason: str | None = None
    # restartCount of the first container (restart_counts: of the others)
    restarts: int = 0
    owner: tuple[str, str] | None = ("StatefulSet", "kafka")
    # while terminating: when deletion was requested, and the monotonic time it completes
    deleted_at: datetime | None = None
    gone_at: float | None = None
    # the pod spec (from its controller's template); containers' names and images
    spec: dict[str, Any] = field(default_factory=_kafka_spec)
    annotations: dict[str, str] = field(default_factory=dict)
    owner_uid: str | None = None
    # its controller is modelled (kubernetes_apps) and replaces it itself once it is gone
    managed: bool = False
    # when the containers' current run started (a container restarted in place starts anew)
    started_at: datetime | None = None
    restart_counts: dict[str, int] = field(default_factory=dict)
    last_terminated: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    previous_logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and time.monotonic() >= self.ready_at

    @property
    def container_names(self) -> list[str]:
        return [c["name"] for c in self.spec.get("containers", [])]

    def to_json(self) -> dict[str, Any]:
        """The pod as the API returns it (the fields a v1 Pod requires, and status)."""
        ready = self.ready
        created = _rfc3339(self.created_at)
        started = _rfc3339(self.started_at or self.created_at)
        if ready:
            state: dict[str, Any] = {"running": {"startedAt": started}}
        else:
            reason = self.waiting_reason or "ContainerCreating"
            state = {"waiting": {"reason": reason, "message": f"{reason} (fake)"}}
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "labels": self.labels,
            "creationTimestamp": created,
            "resourceVersion": "1",
        }
        if self.annotations:
            meta["annotations"] = self.annotations
        if self.deleted_at:
            meta["deletionTimestamp"] = _rfc3339(self.deleted_at)
            meta["deletionGracePeriodSeconds"] = 30
        if self.owner:
            kind, name = self.owner
            meta["ownerReferences"] = [
                {
                    "apiVersion": "apps/v1",
                    "kind": kind,
                    "name": name,
                    "uid": self.owner_uid or _owner_uid(name),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        creating = not ready and self.waiting_reason is None
        statuses = []
        for n, container in enumerate(self.spec.get("containers", [])):
            name = container["name"]
            last = self.last_terminated.get(name)
            statuses.append(
                {
                    "name": name,
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": ready,
                    "started": not creating,
                    "restartCount": self.restarts if n == 0 else self.restart_counts.get(name, 0),
                    "state": state,
                    "lastState": {"terminated": last} if last else {},
                }
            )
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {**copy.deepcopy(self.spec), "nodeName": NODE},
            "status": {
                "phase": "Pending" if creating else "Running",
                "hostIP": "10.0.0.1",
                "podIP": "10.1.0.1",
                "startTime": created,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "lastTransitionTime": started,
                    }
                ],
                "containerStatuses": statuses,
            },
        }


class PodsAndEvents:
    """Pods' logs, events and metrics, and what happens to pods (mixed into the fake server)."""

    _lock: threading.RLock
    _pods: dict[tuple[str, str], FakePod]
    _events: list[dict[str, Any]]
    _usage: dict[tuple[str, str], dict[str, int]]
    _resource_version: int
    termination_grace_s: float

    def _settle(self) -> None:
        raise NotImplementedError

    def next_resource_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def oom_kill(
        self, namespace: str, name: str, container: str | None = None, *, crash_loop: bool = False
    ) -> FakePod:
        """The kernel kills a container for exceeding its memory limit; the kubelet restarts it.

        Its ``lastState.terminated`` says ``OOMKilled`` (exit code 137), its restartCount goes
        up, its log so far becomes the previous container's; with ``crash_loop`` it keeps dying
        (CrashLoopBackOff, not Ready), else it runs again. Events as a cluster records them:
        ``OOMKilling`` on the node (node-problem-detector), ``BackOff`` on the pod.
        """
        with self._lock:
            self._settle()
            pod = self._pods[(namespace, name)]
            container = container or pod.container_names[0]
            now = datetime.now(UTC)
            pod.last_terminated[container] = {
                "exitCode": 137,
                "reason": "OOMKilled",
                "startedAt": _rfc3339(pod.started_at or pod.created_at),
                "finishedAt": _rfc3339(now),
                "containerID": f"containerd://{uuid.uuid4().hex}",
            }
            if container == pod.container_names[0]:
                pod.restarts += 1
            else:
                pod.restart_counts[container] = pod.restart_counts.get(container, 0) + 1
            pod.previous_logs[container] = pod.logs.pop(container, [])
            pod.started_at = now
            if crash_loop:
                pod.ready_at, pod.waiting_reason = None, "CrashLoopBackOff"
            node = {"kind": "Node", "name": NODE, "uid": _owner_uid(NODE), "apiVersion": "v1"}
            self.emit_event(
                node, "OOMKilling", f"Memory cgroup out of memory: Killed process 4242 "
                f"({container}) total-vm:1048576kB, anon-rss:524288kB, file-rss:0kB, "
                f"task_memcg=/kubepods/burstable/pod{pod.uid}", type_="Warning",
                component="kernel-monitor", namespace="default",
            )
            self.emit_event(
                _pod_ref(pod, container), "BackOff",
                f"Back-off restarting failed container {container} in pod "
                f"{pod.name}_{namespace}({pod.uid})", type_="Warning", component="kubelet",
            )
            return pod

    def write_log(
        self, namespace: str, name: str, lines: list[str], container: str | None = None
    ) -> None:
        """The container prints ``lines``."""
        with self._lock:
            pod = self._pods[(namespace, name)]
            pod.logs.setdefault(container or pod.container_names[0], []).extend(lines)

    def set_memory_usage(
        self, namespace: str, name: str, usage_bytes: int, container: str | None = None
    ) -> None:
        """What metrics-server reports of the container's memory (and from now on it is there)."""
        with self._lock:
            pod = self._pods[(namespace, name)]
            self._usage.setdefault((namespace, name), {})[
                container or pod.container_names[0]
            ] = usage_bytes

    def emit_event(
        self,
        involved: dict[str, Any],
        reason: str,
        message: str,
        *,
        type_: str = "Normal",
        component: str = "fake",
        at: datetime | None = None,
        namespace: str | None = None,
    ) -> dict[str, Any]:
        """Record a core/v1 Event about ``involved`` (kind, name, uid; namespace optional).

        Like client-go's event recorder, a repeat of the same object, reason and message
        within the series only bumps ``count`` and ``lastTimestamp``.
        """
        at = at or datetime.now(UTC)
        ns = namespace or involved.get("namespace") or "default"
        with self._lock:
            for event in self._events:
                if (event["involvedObject"], event["reason"], event["message"]) == (
                    {**involved, "namespace": involved.get("namespace", ns)}, reason, message
                ):
                    event["count"] += 1
                    event["lastTimestamp"] = _rfc3339(at)
                    event["metadata"]["resourceVersion"] = self.next_resource_version()
                    return event
            event = {
                "metadata": {
                    "name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
                    "namespace": ns,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": self.next_resource_version(),
                    "creationTimestamp": _rfc3339(at),
                },
                "involvedObject": {**involved, "namespace": involved.get("namespace", ns)},
                "reason": reason,
                "message": message,
                "source": {"component": component, "host": NODE},
                "firstTimestamp": _rfc3339(at),
                "lastTimestamp": _rfc3339(at),
                "count": 1,
                "type": type_,
                "reportingComponent": component,
                "reportingInstance": NODE,
            }
            self._events.append(event)
            return event

    def events(self, namespace: str) -> list[dict[str, Any]]:
        with self._lock:
            self._settle()
            return copy.deepcopy([e for e in self._events if e["metadata"]["namespace"] == namespace])


    def start_deletion(self, pod: FakePod) -> None:
        """The pod starts terminating (its grace period); the kubelet stops its containers."""
        pod.deleted_at = datetime.now(UTC)
        pod.gone_at = time.monotonic() + self.termination_grace_s
        for container in pod.container_names:
            self.emit_event(
                _pod_ref(pod, container), "Killing", f"Stopping container {container}",
                component="kubelet",
            )

    def _log(self, namespace: str, name: str, query: dict[str, list[str]]) -> Response:
        """The container's log as text, like the kubelet answers through the API server."""
        pod = self._pods.get((namespace, name))
        if pod is None:
            return status_body(HTTPStatus.NOT_FOUND, f'pods "{name}" not found', name=name)
        container = query.get("container", [None])[0]
        names = pod.container_names
        if container is None:
            if len(names) != 1:
                return status_body(
                    HTTPStatus.BAD_REQUEST,
                    f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(names)}]",
                )
            container = names[0]
        if container not in names:
            return status_body(
                HTTPStatus.BAD_REQUEST, f"container {container} is not valid for pod {name}"
            )
        previous = query.get("previous", ["false"])[0] == "true"
        if not previous and not pod.ready and pod.waiting_reason is None:
            return status_body(
                HTTPStatus.BAD_REQUEST,
                f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating',
            )
        if previous:
            if container not in pod.previous_logs:
                return status_body(
                    HTTPStatus.BAD_REQUEST,
                    f'previous terminated container "{container}" in pod "{name}" not found',
                )
            lines = pod.previous_logs[container]
        else:
            lines = pod.logs.get(container, [])
        tail = query.get("tailLines", [None])[0]
        if tail is not None:
            lines = lines[-int(tail) :] if int(tail) > 0 else []
        return HTTPStatus.OK, "".join(f"{line}\n" for line in lines)

    # the fields the API server lets a field selector filter events on
    _EVENT_FIELDS = {
        "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
        "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
        "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type",
        "metadata.name", "metadata.namespace",
    }

    def _list_events(self, namespace: str, query: dict[str, list[str]]) -> Response:
        try:
            match = field_selector(query.get("fieldSelector", [""])[0], self._EVENT_FIELDS)
        except ValueError as exc:
            return status_body(HTTPStatus.BAD_REQUEST, str(exc))
        items = []
        for event in self._events:
            if event["metadata"]["namespace"] != namespace:
                continue
            fields = {f"involvedObject.{k}": str(v) for k, v in event["involvedObject"].items()}
            fields |= {
                "reason": event["reason"],
                "type": event["type"],
                "reportingComponent": event["reportingComponent"],
                "source": event["source"]["component"],
                "metadata.name": event["metadata"]["name"],
                "metadata.namespace": namespace,
            }
            if match(fields):
                items.append(copy.deepcopy(event))
        return HTTPStatus.OK, {
            "apiVersion": "v1",
            "kind": "EventList",
            "metadata": {"resourceVersion": str(self._resource_version)},
            "items": items,
        }

    def _pod_metrics(self, segments: list[str], query: dict[str, list[str]]) -> Response:
        """metrics.k8s.io PodMetricsList, once metrics-server is "installed" (a usage is set)."""
        if not self._usage or len(segments) != 3 or segments[0] != "namespaces" or segments[2] != "pods":
            return status_body(HTTPStatus.NOT_FOUND, "the server could not find the requested resource")
        match = label_selector(query.get("labelSelector", [""])[0])
        now = _rfc3339(datetime.now(UTC))
        items = []
        for (ns, name), usage in sorted(self._usage.items()):
            pod = self._pods.get((ns, name))
            if ns != segments[1] or pod is None or not match(pod.labels):
                continue
            items.append(
                {
                    "metadata": {"name": name, "namespace": ns, "labels": pod.labels,
                                 "creationTimestamp": now},
                    "timestamp": now,
                    "window": "30s",
                    "containers": [
                        {"name": c, "usage": {"cpu": "10m", "memory": f"{b // 1024}Ki"}}
                        for c, b in usage.items()
                    ],
                }
            )
        return HTTPStatus.OK, {
            "kind": "PodMetricsList",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {},
            "items": items,
        }




def status_body(
    code: HTTPStatus, message: str, name: str | None = None, kind: str = "pods",
    reason: str | None = None,
) -> Response:
    """A v1 Status, the body Kubernetes returns with every error."""
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or code.phrase.replace(" ", ""),
        "code": int(code),
    }
    if name:
        body["details"] = {"name": name, "kind": kind}
    return int(code), body


def _pod_ref(pod: FakePod, container: str) -> dict[str, Any]:
    return {
        "kind": "Pod", "namespace": pod.namespace, "name": pod.name, "uid": pod.uid,
        "apiVersion": "v1", "fieldPath": f"spec.containers{{{container}}}",
    }


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"statefulset.{name}"))
