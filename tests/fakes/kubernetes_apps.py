"""The fake API server's workloads: apps/v1 and autoscaling/v2, and the controllers behind them.

Served (all under ``/apis/<group>/<version>/namespaces/{ns}/``):

- ``deployments``, ``statefulsets``: list (``labelSelector``), get, patch (strategic merge,
  merge and JSON patch: tests/fakes/kubernetes_patch.py), and the ``/scale`` subresource
  (get, patch; an autoscaling/v1 Scale);
- ``replicasets``, ``controllerrevisions``: list, get (the controllers own them);
- ``horizontalpodautoscalers`` (autoscaling/v2): list, get, patch.

A patch is answered like the API server does: the object's immutable metadata and its status
are kept, defaults are filled in (imagePullPolicy, restartPolicy, strategy, ...), the result is
validated (422 Invalid: a memory request above the limit, a selector change, template labels
that miss the selector, maxReplicas below minReplicas), ``generation`` goes up when the spec
changed and ``resourceVersion`` when anything did; a ``metadata.resourceVersion`` in a merge
patch that is not the stored one is a 409 Conflict.

The controllers, run whenever the server settles (see kubernetes_api.py), act as the real ones
documented in the Kubernetes concepts pages do, with two simplifications said here: a
Deployment's rollout replaces all pods at once (as a surge of 100% would), and nothing is
ever scheduled short of resources.

- Deployment: a pod template no ReplicaSet has yet gets a new ReplicaSet named
  ``<deployment>-<hash>`` with the next ``deployment.kubernetes.io/revision``; a template an
  older ReplicaSet has (a rollback) moves that ReplicaSet to the next revision (its old numbers
  go to ``deployment.kubernetes.io/revision-history``). The current ReplicaSet is scaled to
  ``spec.replicas``, the others to 0 (``ScalingReplicaSet`` events); old ReplicaSets beyond
  ``revisionHistoryLimit`` are deleted; ``spec.paused`` stops it.
- ReplicaSet: creates pods ``<replicaset>-<5 chars>`` from its template until it has
  ``spec.replicas`` live ones, and deletes surplus ones (not-Ready first, then the youngest);
  ``SuccessfulCreate``/``SuccessfulDelete`` events. A new pod is Ready after the server's
  ``recreated_ready_after_s``; a deleted one terminates for ``termination_grace_s``.
- StatefulSet: a ControllerRevision per distinct template (``<sts>-<hash>``, its data the
  template as a ``$patch: replace``, the next ``revision``); pods ``<sts>-<ordinal>`` created
  in order, each once the lower ones are Ready, removed from the highest ordinal; with the
  RollingUpdate strategy, pods of an older revision are replaced one at a time from the
  highest ordinal, each once every pod is Ready (OnDelete: only when someone deletes them).
- HorizontalPodAutoscaler: keeps the target's ``spec.replicas`` within
  ``[minReplicas, maxReplicas]`` (``SuccessfulRescale`` events); it has no metrics, so within
  the bounds it leaves the count alone, and a target scaled to 0 disables it, as the real one.
"""

from __future__ import annotations

import copy
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from tests.fakes.kubernetes_admission import default, validate
from tests.fakes.kubernetes_controllers import Controllers, _plural, _selector_text
from tests.fakes.kubernetes_patch import (
    JSON_PATCH,
    MERGE,
    STRATEGIC,
    PatchError,
    apply_patch,
    label_selector,
)
from tests.fakes.kubernetes_pods import Response, _rfc3339, status_body

if TYPE_CHECKING:
    from tests.fakes.kubernetes_api import FakeKubernetesApi

# (group, version, plural) -> kind; which ones a client may patch or scale
RESOURCES = {
    ("apps", "v1", "deployments"): "Deployment",
    ("apps", "v1", "statefulsets"): "StatefulSet",
    ("apps", "v1", "replicasets"): "ReplicaSet",
    ("apps", "v1", "controllerrevisions"): "ControllerRevision",
    ("autoscaling", "v2", "horizontalpodautoscalers"): "HorizontalPodAutoscaler",
}
PATCHABLE = {"deployments", "statefulsets", "horizontalpodautoscalers"}
SCALABLE = {"deployments", "statefulsets"}
API_VERSION = {kind: f"{group}/{version}" for (group, version, _), kind in RESOURCES.items()}


class FakeApps(Controllers):
    """Workloads and autoscalers of a ``FakeKubernetesApi`` (reached as ``api.apps``)."""

    def __init__(self, api: FakeKubernetesApi) -> None:
        self.api = api
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            plural: {} for (_, _, plural) in RESOURCES
        }
        # while a test sets the cluster up: what is created has existed since then, Ready
        self._setup_at: datetime | None = None
        self._random = random.Random(1234)

    # test set-up ------------------------------------------------------------------------

    def add_deployment(
        self,
        namespace: str,
        name: str,
        *,
        replicas: int = 2,
        image: str = "registry.example/web:1.0",
        containers: list[dict[str, Any]] | None = None,
        memory_limit: str | None = "256Mi",
        memory_request: str | None = "128Mi",
        annotations: dict[str, str] | None = None,
        age_s: float = 3600,
    ) -> dict[str, Any]:
        """A Deployment that rolled out ``age_s`` ago: revision 1, its pods Ready since then."""
        spec = {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": _template(name, image, containers, memory_limit, memory_request),
        }
        return self._create("deployments", namespace, name, spec, annotations, age_s)

    def add_statefulset(
        self,
        namespace: str,
        name: str,
        *,
        replicas: int = 3,
        image: str = "registry.example/db:1.0",
        containers: list[dict[str, Any]] | None = None,
        memory_limit: str | None = "512Mi",
        memory_request: str | None = "256Mi",
        update_strategy: str = "RollingUpdate",
        age_s: float = 3600,
    ) -> dict[str, Any]:
        """A StatefulSet whose pods ``<name>-0..`` have been Ready for ``age_s``."""
        spec = {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": _template(name, image, containers, memory_limit, memory_request),
            "updateStrategy": {"type": update_strategy},
        }
        return self._create("statefulsets", namespace, name, spec, None, age_s)

    def add_hpa(
        self,
        namespace: str,
        name: str,
        target: str,
        *,
        kind: str = "Deployment",
        min_replicas: int = 1,
        max_replicas: int = 10,
        age_s: float = 3600,
    ) -> dict[str, Any]:
        spec = {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 80},
                    },
                }
            ],
        }
        return self._create("horizontalpodautoscalers", namespace, name, spec, None, age_s)

    def roll_out(
        self,
        namespace: str,
        name: str,
        *,
        kind: str = "Deployment",
        image: str | None = None,
        change_cause: str | None = None,
        age_s: float = 600,
    ) -> dict[str, Any]:
        """Someone deployed ``age_s`` ago (``kubectl set image``): a new revision, its pods Ready."""
        plural = _plural(kind)
        with self.api._lock:
            obj = self.objects[plural][(namespace, name)]
            if image:
                obj["spec"]["template"]["spec"]["containers"][0]["image"] = image
            if change_cause:
                obj["metadata"].setdefault("annotations", {})["kubernetes.io/change-cause"] = (
                    change_cause
                )
            obj["metadata"]["generation"] += 1
            obj["metadata"]["resourceVersion"] = self.api.next_resource_version()
            self._settle_at(datetime.now(UTC) - timedelta(seconds=age_s))
            return copy.deepcopy(obj)

    def _create(
        self,
        plural: str,
        namespace: str,
        name: str,
        spec: dict[str, Any],
        annotations: dict[str, str] | None,
        age_s: float,
    ) -> dict[str, Any]:
        at = datetime.now(UTC) - timedelta(seconds=age_s)
        obj = {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": self.api.next_resource_version(),
                "generation": 1,
                "creationTimestamp": _rfc3339(at),
                "labels": {"app": name},
                "annotations": dict(annotations or {}),
            },
            "spec": spec,
            "status": {},
        }
        default(plural, obj)
        with self.api._lock:
            self.objects[plural][(namespace, name)] = obj
            self._settle_at(at)
            return copy.deepcopy(obj)

    def _settle_at(self, at: datetime) -> None:
        """Let the controllers finish their work as if it happened at ``at`` (set-up only)."""
        self._setup_at = at
        try:
            self.api._settle()
        finally:
            self._setup_at = None

    # test accessors -----------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as stored now (after the controllers had their turn), or None."""
        with self.api._lock:
            self.api._settle()
            obj = self.objects[_plural(kind)].get((namespace, name))
            return copy.deepcopy(obj)

    def replica_sets(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        """The Deployment's ReplicaSets, oldest revision first."""
        with self.api._lock:
            self.api._settle()
            dep = self.objects["deployments"][(namespace, deployment)]
            return copy.deepcopy(self._owned("replicasets", dep))

    def controller_revisions(self, namespace: str, statefulset: str) -> list[dict[str, Any]]:
        with self.api._lock:
            self.api._settle()
            sts = self.objects["statefulsets"][(namespace, statefulset)]
            return copy.deepcopy(self._owned("controllerrevisions", sts))

    def wait_rolled_out(
        self, namespace: str, name: str, *, kind: str = "Deployment", timeout_s: float = 10
    ) -> dict[str, Any]:
        """Poll until every pod is of the current template and Ready, none terminating."""
        deadline = time.monotonic() + timeout_s
        while True:
            obj = self.get(kind, namespace, name)
            assert obj is not None
            status, want = obj["status"], obj["spec"]["replicas"]
            pods = self.api.pods(namespace, _selector_text(obj["spec"]["selector"]))
            done = (
                status.get("observedGeneration") == obj["metadata"]["generation"]
                and status.get("updatedReplicas", 0) == want
                and status.get("readyReplicas", 0) == want
                and len(pods) == want
                and all(p.ready and p.deleted_at is None for p in pods)
            )
            if done:
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(f"{kind} {namespace}/{name} did not roll out: {status}")
            time.sleep(0.05)

    # HTTP -----------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        segments: list[str],
        query: dict[str, list[str]],
        body: Any,
        content_type: str | None,
    ) -> Response | None:
        """The answer to a request for one of these resources; None: not one of them."""
        if segments[0] != "apis" or len(segments) < 6 or segments[3] != "namespaces":
            return None
        kind = RESOURCES.get((segments[1], segments[2], segments[5]))
        if kind is None:
            return None
        namespace, plural, rest = segments[4], segments[5], segments[6:]
        if not rest:
            if method != "GET":
                return _not_allowed(method)
            return self._list(plural, kind, namespace, query.get("labelSelector", [""])[0])
        name, sub = rest[0], rest[1:]
        obj = self.objects[plural].get((namespace, name))
        if sub not in ([], ["scale"]) or (sub and plural not in SCALABLE):
            return None
        if obj is None:
            return status_body(
                HTTPStatus.NOT_FOUND, f'{_resource(plural)} "{name}" not found', name, plural
            )
        if method == "GET":
            return HTTPStatus.OK, (self._scale(obj, kind) if sub else _served(obj, kind))
        if method != "PATCH" or plural not in PATCHABLE:
            return _not_allowed(method)
        if sub:
            return self._patch_scale(plural, kind, obj, body, content_type)
        return self._patch(plural, kind, obj, body, content_type)

    def _list(self, plural: str, kind: str, namespace: str, selector: str) -> Response:
        try:
            match = label_selector(selector)
        except ValueError as exc:
            return status_body(HTTPStatus.BAD_REQUEST, str(exc))
        items = [
            copy.deepcopy(o)
            for (ns, _), o in sorted(self.objects[plural].items())
            if ns == namespace and match(o["metadata"].get("labels") or {})
        ]
        return HTTPStatus.OK, {
            "apiVersion": API_VERSION[kind],
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self.api._resource_version)},
            "items": items,
        }

    def _patch(
        self, plural: str, kind: str, obj: dict[str, Any], patch: Any, content_type: str | None
    ) -> Response:
        name = obj["metadata"]["name"]
        kind_name = f'{kind}.{API_VERSION[kind].split("/")[0]} "{name}"'
        if (content_type or "").split(";")[0] not in (STRATEGIC, MERGE, JSON_PATCH):
            return status_body(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the body of the request was in an unknown "
                f"format - accepted media types include: {JSON_PATCH}, {MERGE}, {STRATEGIC}",
            )
        wanted_version = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(
            patch, dict
        ) else None
        if wanted_version and wanted_version != obj["metadata"]["resourceVersion"]:
            return _conflict(plural, name)
        try:
            patched = apply_patch(content_type, _served(obj, kind), patch)
        except PatchError as exc:
            return status_body(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc), name, plural, "Invalid")
        if not isinstance(patched.get("spec"), dict) or not isinstance(patched.get("metadata"), dict):
            return status_body(HTTPStatus.UNPROCESSABLE_ENTITY, f"{kind_name} is invalid: spec: "
                               "Required value", name, plural, "Invalid")
        new = {"metadata": patched["metadata"], "spec": patched["spec"], "status": obj["status"]}
        for key in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion"):
            new["metadata"][key] = obj["metadata"][key]
        default(plural, new)
        problems = validate(plural, obj, new)
        if problems:
            message = f"{kind_name} is invalid: {'; '.join(problems)}"
            return status_body(HTTPStatus.UNPROCESSABLE_ENTITY, message, name, plural, "Invalid")
        if new != obj:
            if new["spec"] != obj["spec"]:
                new["metadata"]["generation"] += 1
            new["metadata"]["resourceVersion"] = self.api.next_resource_version()
            obj.clear()
            obj.update(new)
        return HTTPStatus.OK, _served(obj, kind)

    def _scale(self, obj: dict[str, Any], kind: str) -> dict[str, Any]:
        meta = obj["metadata"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            },
            "spec": {"replicas": obj["spec"]["replicas"]},
            "status": {
                "replicas": obj["status"].get("replicas", 0),
                "selector": _selector_text(obj["spec"]["selector"]),
            },
        }

    def _patch_scale(
        self, plural: str, kind: str, obj: dict[str, Any], patch: Any, content_type: str | None
    ) -> Response:
        name = obj["metadata"]["name"]
        try:
            scale = apply_patch(content_type, self._scale(obj, kind), patch)
        except PatchError as exc:
            return status_body(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc), name, plural, "Invalid")
        wanted_version = scale["metadata"].get("resourceVersion")
        if wanted_version != obj["metadata"]["resourceVersion"]:
            return _conflict(plural, name)
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            return status_body(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                f"{replicas}: must be greater than or equal to 0", name, plural, "Invalid",
            )
        if replicas != obj["spec"]["replicas"]:
            obj["spec"]["replicas"] = replicas
            obj["metadata"]["generation"] += 1
            obj["metadata"]["resourceVersion"] = self.api.next_resource_version()
        return HTTPStatus.OK, self._scale(obj, kind)

    # controllers ----------------------------------------------------------------------


# helpers ------------------------------------------------------------------------------------


def _template(
    app: str, image: str, containers: list[dict[str, Any]] | None,
    memory_limit: str | None, memory_request: str | None,
) -> dict[str, Any]:
    if containers is None:
        resources: dict[str, Any] = {}
        if memory_limit:
            resources["limits"] = {"memory": memory_limit, "cpu": "500m"}
        if memory_request:
            resources["requests"] = {"memory": memory_request, "cpu": "100m"}
        containers = [{"name": app, "image": image, "resources": resources}]
    return {"metadata": {"labels": {"app": app}}, "spec": {"containers": copy.deepcopy(containers)}}



def _resource(plural: str) -> str:
    """How the API server names a resource in messages: ``deployments.apps``."""
    group = next(g for (g, _, p) in RESOURCES if p == plural)
    return f"{plural}.{group}"


def _served(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION[kind], "kind": kind, **copy.deepcopy(obj)}


def _not_allowed(method: str) -> Response:
    return status_body(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported by this fake")


def _conflict(plural: str, name: str) -> Response:
    return status_body(
        HTTPStatus.CONFLICT,
        f'Operation cannot be fulfilled on {_resource(plural)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        name, plural, "Conflict",
    )


