"""A fake Kubernetes API server: the documented JSON of the pod endpoints the runbooks call.

No Kubernetes API server can run here (kind, k3s and envtest download binaries at run time),
so tests point the real `kubernetes` client at this stdlib HTTP server. It serves exactly:

- ``GET    /api/v1/namespaces/{ns}/pods?labelSelector=...``  (PodList)
- ``GET    /api/v1/namespaces/{ns}/pods/{name}``              (Pod, or a 404 Status)
- ``DELETE /api/v1/namespaces/{ns}/pods/{name}``              (Pod; honours ``preconditions.uid``)

It checks the bearer token, records every call, and keeps a small model of pods. Deleting a
pod that has a controller behaves like a StatefulSet: the pod is recreated under the same name
with a new uid, not Ready at first, Ready after ``recreated_ready_after_s`` (``None``: never).
With ``termination_grace_s`` the deleted pod first lingers as terminating (``deletionTimestamp``
set, still reporting its old readiness), as a real pod does during its grace period.
``on_delete`` lets a test act on the world when a pod is deleted (e.g. resume a paused broker).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.servers import free_port


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


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
    restarts: int = 0
    owner: tuple[str, str] | None = ("StatefulSet", "kafka")
    # while terminating: when deletion was requested, and the monotonic time it completes
    deleted_at: datetime | None = None
    gone_at: float | None = None

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and time.monotonic() >= self.ready_at

    def to_json(self) -> dict[str, Any]:
        """The pod as the API returns it (the fields a v1 Pod requires, and status)."""
        ready = self.ready
        started = _rfc3339(self.created_at)
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
            "creationTimestamp": started,
            "resourceVersion": "1",
        }
        if self.deleted_at:
            meta["deletionTimestamp"] = _rfc3339(self.deleted_at)
        if self.owner:
            kind, name = self.owner
            meta["ownerReferences"] = [
                {
                    "apiVersion": "apps/v1",
                    "kind": kind,
                    "name": name,
                    "uid": _owner_uid(name),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        creating = not ready and self.waiting_reason is None
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"containers": [{"name": "kafka", "image": "apache/kafka:3.9.0"}]},
            "status": {
                "phase": "Pending" if creating else "Running",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "lastTransitionTime": started,
                    }
                ],
                "containerStatuses": [
                    {
                        "name": "kafka",
                        "image": "apache/kafka:3.9.0",
                        "imageID": "",
                        "ready": ready,
                        "started": not creating,
                        "restartCount": self.restarts,
                        "state": state,
                    }
                ],
            },
        }


class FakeKubernetesApi:
    """In-memory pods behind a threaded HTTP server; use ``with FakeKubernetesApi.running() as api``."""

    def __init__(
        self,
        token: str = "fake-token",
        recreated_ready_after_s: float | None = 0.3,
        termination_grace_s: float = 0.0,
    ) -> None:
        self.token = token
        self.recreated_ready_after_s = recreated_ready_after_s
        self.termination_grace_s = termination_grace_s
        self.on_delete: Callable[[FakePod], None] | None = None
        self.calls: list[Call] = []
        self._pods: dict[tuple[str, str], FakePod] = {}
        self._failures: list[tuple[str, int]] = []
        self._lock = threading.Lock()
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

    def _handle(
        self, method: str, raw_path: str, headers: Any, body: Any
    ) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        newly_deleted: FakePod | None = None
        with self._lock:
            self.calls.append(Call(method, parts.path, query, body))
            self._settle()
            segments = parts.path.strip("/").split("/")
            is_pods = segments[:3] == ["api", "v1", "namespaces"] and segments[4:5] == ["pods"]
            failure = next((f for f in self._failures if f[0] == method), None)
            if headers.get("Authorization") != f"Bearer {self.token}":
                response = _status(HTTPStatus.UNAUTHORIZED, "Unauthorized")
            elif failure:
                self._failures.remove(failure)
                response = _status(HTTPStatus(failure[1]), "injected failure")
            elif is_pods and len(segments) == 5 and method == "GET":
                response = self._list(segments[3], query.get("labelSelector", [""])[0])
            elif is_pods and len(segments) == 6 and method == "GET":
                response = self._get(segments[3], segments[5])
            elif is_pods and len(segments) == 6 and method == "DELETE":
                response, newly_deleted = self._delete(segments[3], segments[5], body or {})
            else:
                response = _status(HTTPStatus.NOT_FOUND, f"the server could not find {parts.path}")
        # outside the lock: the callback may take its time (e.g. signal a broker process)
        if newly_deleted is not None and self.on_delete:
            self.on_delete(newly_deleted)
        return response

    def _list(self, namespace: str, selector: str) -> tuple[int, dict[str, Any]]:
        try:
            match = _selector(selector)
        except ValueError as exc:
            return _status(HTTPStatus.BAD_REQUEST, str(exc))
        items = [
            p.to_json()
            for (ns, _), p in sorted(self._pods.items())
            if ns == namespace and match(p.labels)
        ]
        return HTTPStatus.OK, {
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": "1"},
            "items": items,
        }

    def _get(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        pod = self._pods.get((namespace, name))
        if pod is None:
            return _status(HTTPStatus.NOT_FOUND, f'pods "{name}" not found', name=name)
        return HTTPStatus.OK, pod.to_json()

    def _delete(
        self, namespace: str, name: str, options: dict[str, Any]
    ) -> tuple[tuple[int, dict[str, Any]], FakePod | None]:
        """Start the pod's deletion; returns the response and the pod if this call deleted it."""
        pod = self._pods.get((namespace, name))
        if pod is None:
            return _status(HTTPStatus.NOT_FOUND, f'pods "{name}" not found', name=name), None
        want_uid = (options.get("preconditions") or {}).get("uid")
        if want_uid and want_uid != pod.uid:
            message = (
                f'Operation cannot be fulfilled on Pod "{name}": Precondition failed: '
                f"UID in precondition: {want_uid}, UID in object meta: {pod.uid}"
            )
            return _status(HTTPStatus.CONFLICT, message, name=name), None
        if pod.deleted_at is not None:
            # deleting a terminating pod again changes nothing
            return (HTTPStatus.OK, pod.to_json()), None
        pod.deleted_at = datetime.now(UTC)
        pod.gone_at = time.monotonic() + self.termination_grace_s
        response = (HTTPStatus.OK, pod.to_json())
        self._settle()
        return response, pod

    def _settle(self) -> None:
        """Finish terminations whose grace period is over; controllers recreate their pods."""
        now = time.monotonic()
        for key, pod in list(self._pods.items()):
            if pod.gone_at is None or pod.gone_at > now:
                continue
            del self._pods[key]
            if pod.owner:
                # same name, new uid, starting up: what a StatefulSet controller does
                delay = self.recreated_ready_after_s
                self._pods[key] = FakePod(
                    namespace=pod.namespace,
                    name=pod.name,
                    labels=pod.labels,
                    owner=pod.owner,
                    ready_at=None if delay is None else now + delay,
                )


def _handler_for(api: FakeKubernetesApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, payload = api._handle(self.command, self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Equality-based label selector (``a=b``, ``a==b``, ``a!=b``, ``a``), comma = AND."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            tests.append(lambda labels, k=k, v=v: labels.get(k) != v)
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            tests.append(lambda labels, k=k, v=v: labels.get(k) == v)
        elif " " in term or "(" in term:
            raise ValueError(f"set-based selector {term!r} is not supported by this fake")
        else:
            tests.append(lambda labels, k=term: k in labels)
    return lambda labels: all(t(labels) for t in tests)


def _status(code: HTTPStatus, message: str, name: str | None = None) -> tuple[int, dict[str, Any]]:
    """A v1 Status, the body Kubernetes returns with every error."""
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": code.phrase.replace(" ", ""),
        "code": int(code),
    }
    if name:
        body["details"] = {"name": name, "kind": "pods"}
    return int(code), body


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"statefulset.{name}"))
