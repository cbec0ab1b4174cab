"""A fake Kubernetes API server: the documented JSON of the endpoints the runbooks call.

No Kubernetes API server can run here (kind, k3s and envtest download binaries at run time),
so tests point the real `kubernetes` client at this stdlib HTTP server. It serves exactly:

- ``GET    /api/v1/namespaces/{ns}/pods?labelSelector=...``  (PodList)
- ``GET    /api/v1/namespaces/{ns}/pods/{name}``              (Pod, or a 404 Status)
- ``DELETE /api/v1/namespaces/{ns}/pods/{name}``              (Pod; honours ``preconditions.uid``)
- ``GET    /api/v1/namespaces/{ns}/pods/{name}/log?container=&tailLines=&previous=`` (text)
- ``GET    /api/v1/namespaces/{ns}/events?fieldSelector=...`` (EventList)
- ``GET    /apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods`` (PodMetricsList; 404 until a
  test gives a pod a memory usage, as when no metrics-server is installed)
- apps/v1 Deployments, StatefulSets (get, list, patch, ``/scale``), ReplicaSets and
  ControllerRevisions (get, list), autoscaling/v2 HorizontalPodAutoscalers (get, list,
  patch), with the controllers that act on them: see tests/fakes/kubernetes_apps.py.

It checks the bearer token, records every call (method, path, query, content type, body), and
keeps a small model of pods. Deleting a pod whose controller is not modelled (a pod added with
``add_pod``) behaves like a StatefulSet: the pod is recreated under the same name with a new
uid, not Ready at first, Ready after ``recreated_ready_after_s`` (``None``: never); pods of a
modelled Deployment or StatefulSet are replaced by its controller. With
``termination_grace_s`` a deleted pod first lingers as terminating (``deletionTimestamp`` set,
still reporting its old readiness), as a real pod does during its grace period.
``on_delete`` lets a test act on the world when a pod is deleted (e.g. resume a paused broker).

Controllers act when the server *settles*, at the start of every request and of every test
accessor: as with a real cluster, the answer to a PATCH is the object as stored, and what the
controllers made of it shows from the next request on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.kubernetes_patch import label_selector
from tests.fakes.kubernetes_pods import (
    Call,
    FakePod,
    PodsAndEvents,
    Response,
    status_body,
)
from tests.servers import free_port

__all__ = ["Call", "FakeKubernetesApi", "FakePod"]


class FakeKubernetesApi(PodsAndEvents):
    """In-memory cluster behind a threaded HTTP server; ``with FakeKubernetesApi.running() as api``."""

    def __init__(
        self,
        token: str = "fake-token",
        recreated_ready_after_s: float | None = 0.3,
        termination_grace_s: float = 0.0,
    ) -> None:
        # imported here: kubernetes_apps builds on this module's pods
        from tests.fakes.kubernetes_apps import FakeApps

        self.token = token
        self.recreated_ready_after_s = recreated_ready_after_s
        self.termination_grace_s = termination_grace_s
        self.on_delete: Callable[[FakePod], None] | None = None
        self.calls: list[Call] = []
        self._pods: dict[tuple[str, str], FakePod] = {}
        self._events: list[dict[str, Any]] = []
        # pod -> container -> memory working set in bytes (metrics-server); empty: no metrics API
        self._usage: dict[tuple[str, str], dict[str, int]] = {}
        self._failures: list[tuple[str, int]] = []
        self._resource_version = 1000
        self._lock = threading.RLock()
        self.apps = FakeApps(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler_for(self))
        self._server.daemon_threads = True

    @classmethod
    @contextmanager
    def running(cls, **kwargs: Any) -> Iterator[FakeKubernetesApi]:
        api = cls(**kwargs)
        thread = threading.Thread(target=api._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield api
        finally:
            api._server.shutdown()
            api._server.server_close()
            thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, namespace: str = "default", token: str | None = None) -> dict[str, Any]:
        """A kubeconfig that points at this server with bearer-token auth."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "runbooks", "user": {"token": token or self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "runbooks", "namespace": namespace},
                }
            ],
        }

    # the model -------------------------------------------------------------------------

    def add_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str] | None = None,
        *,
        ready: bool = True,
        waiting_reason: str | None = None,
        restarts: int = 0,
        owner: tuple[str, str] | None = ("StatefulSet", "kafka"),
        age_s: float = 3600,
    ) -> FakePod:
        """Add a pod that has existed for ``age_s`` seconds (a crash loop rarely starts just now)."""
        pod = FakePod(
            namespace=namespace,
            name=name,
            labels=labels or {"app": "kafka"},
            created_at=datetime.now(UTC) - timedelta(seconds=age_s),
            ready_at=0.0 if ready else None,
            waiting_reason=waiting_reason,
            restarts=restarts,
            owner=owner,
        )
        with self._lock:
            self._pods[(namespace, name)] = pod
        return pod

    def pod(self, namespace: str, name: str) -> FakePod | None:
        with self._lock:
            self._settle()
            return self._pods.get((namespace, name))

    def pods(self, namespace: str, selector: str = "") -> list[FakePod]:
        """The pods of ``namespace`` matching a label selector, terminating ones included."""
        match = label_selector(selector)
        with self._lock:
            self._settle()
            return [p for (ns, _), p in sorted(self._pods.items()) if ns == namespace and match(p.labels)]

    def mark_ready(self, namespace: str, name: str) -> None:
        """The pod's readiness probe starts passing."""
        with self._lock:
            pod = self._pods[(namespace, name)]
            pod.ready_at, pod.waiting_reason = 0.0, None

    def crash_loop(self, namespace: str, name: str) -> None:
        """The pod's container starts crashing again: not Ready, CrashLoopBackOff."""
        with self._lock:
            self._settle()
            pod = self._pods[(namespace, name)]
            pod.ready_at, pod.waiting_reason = None, "CrashLoopBackOff"
            pod.restarts += 1

    def fail_next(self, method: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests with this method with an error Status."""
        with self._lock:
            self._failures += [(method, status)] * times

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    # request handling (called from server threads) ----------------------------------------

    def _handle(self, method: str, raw_path: str, headers: Any, body: Any) -> Response:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        newly_deleted: FakePod | None = None
        with self._lock:
            self.calls.append(Call(method, parts.path, query, body, headers.get("Content-Type")))
            self._settle()
            segments = parts.path.strip("/").split("/")
            is_core = segments[:3] == ["api", "v1", "namespaces"] and len(segments) >= 5
            is_pods = is_core and segments[4] == "pods"
            failure = next((f for f in self._failures if f[0] == method), None)
            if headers.get("Authorization") != f"Bearer {self.token}":
                response = status_body(HTTPStatus.UNAUTHORIZED, "Unauthorized")
            elif failure:
                self._failures.remove(failure)
                response = status_body(HTTPStatus(failure[1]), "injected failure")
            elif is_pods and len(segments) == 5 and method == "GET":
                response = self._list(segments[3], query.get("labelSelector", [""])[0])
            elif is_pods and len(segments) == 6 and method == "GET":
                response = self._get(segments[3], segments[5])
            elif is_pods and len(segments) == 6 and method == "DELETE":
                response, newly_deleted = self._delete(segments[3], segments[5], body or {})
            elif is_pods and segments[6:] == ["log"] and method == "GET":
                response = self._log(segments[3], segments[5], query)
            elif is_core and segments[4:] == ["events"] and method == "GET":
                response = self._list_events(segments[3], query)
            elif segments[:3] == ["apis", "metrics.k8s.io", "v1beta1"] and method == "GET":
                response = self._pod_metrics(segments[3:], query)
            else:
                response = self.apps.handle(
                    method, segments, query, body, headers.get("Content-Type")
                ) or status_body(HTTPStatus.NOT_FOUND, f"the server could not find {parts.path}")
        # outside the lock: the callback may take its time (e.g. signal a broker process)
        if newly_deleted is not None and self.on_delete:
            self.on_delete(newly_deleted)
        return response

    def _list(self, namespace: str, selector: str) -> Response:
        try:
            match = label_selector(selector)
        except ValueError as exc:
            return status_body(HTTPStatus.BAD_REQUEST, str(exc))
        items = [
            p.to_json()
            for (ns, _), p in sorted(self._pods.items())
            if ns == namespace and match(p.labels)
        ]
        return HTTPStatus.OK, {
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": str(self._resource_version)},
            "items": items,
        }

    def _get(self, namespace: str, name: str) -> Response:
        pod = self._pods.get((namespace, name))
        if pod is None:
            return status_body(HTTPStatus.NOT_FOUND, f'pods "{name}" not found', name=name)
        return HTTPStatus.OK, pod.to_json()

    def _delete(
        self, namespace: str, name: str, options: dict[str, Any]
    ) -> tuple[Response, FakePod | None]:
        """Start the pod's deletion; returns the response and the pod if this call deleted it."""
        pod = self._pods.get((namespace, name))
        if pod is None:
            return status_body(HTTPStatus.NOT_FOUND, f'pods "{name}" not found', name=name), None
        want_uid = (options.get("preconditions") or {}).get("uid")
        if want_uid and want_uid != pod.uid:
            message = (
                f'Operation cannot be fulfilled on Pod "{name}": Precondition failed: '
                f"UID in precondition: {want_uid}, UID in object meta: {pod.uid}"
            )
            return status_body(HTTPStatus.CONFLICT, message, name=name), None
        if pod.deleted_at is not None:
            # deleting a terminating pod again changes nothing
            return (HTTPStatus.OK, pod.to_json()), None
        self.start_deletion(pod)
        response = (HTTPStatus.OK, pod.to_json())
        self._settle()
        return response, pod

    def _settle(self) -> None:
        """Finish terminations whose grace period is over; controllers do their work."""
        now = time.monotonic()
        for key, pod in list(self._pods.items()):
            if pod.gone_at is None or pod.gone_at > now:
                continue
            del self._pods[key]
            self._usage.pop(key, None)
            if pod.owner and not pod.managed:
                # same name, new uid, starting up: what a StatefulSet controller does
                delay = self.recreated_ready_after_s
                self._pods[key] = FakePod(
                    namespace=pod.namespace,
                    name=pod.name,
                    labels=pod.labels,
                    owner=pod.owner,
                    ready_at=None if delay is None else now + delay,
                )
        self.apps.reconcile()


def _handler_for(api: FakeKubernetesApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, payload = api._handle(self.command, self.path, self.headers, body)
            if isinstance(payload, str):
                data, content_type = payload.encode(), "text/plain"
            else:
                data, content_type = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_DELETE = do_PATCH = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
