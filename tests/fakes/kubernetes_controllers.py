"""The controllers of the fake API server's workloads (tests/fakes/kubernetes_apps.py).

They act as the real ones documented in the Kubernetes concepts pages do, with two
simplifications: a Deployment's rollout replaces all pods at once (as a surge of 100% would),
and nothing is ever short of resources to schedule. See kubernetes_apps.py for what each does.
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tests.fakes.kubernetes_pods import FakePod, _rfc3339

if TYPE_CHECKING:
    from tests.fakes.kubernetes_api import FakeKubernetesApi

API_VERSION = {
    "Deployment": "apps/v1", "StatefulSet": "apps/v1", "ReplicaSet": "apps/v1",
    "ControllerRevision": "apps/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
}
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
HASH_LABEL = "pod-template-hash"
STS_HASH_LABEL = "controller-revision-hash"
# annotations the Deployment controller keeps off the ReplicaSets it copies annotations to
SKIPPED_ANNOTATIONS = {
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
}
_SAFE = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery rand.SafeEncodeString's alphabet



class Controllers:
    """The controllers' passes over the objects (mixed into ``FakeApps``)."""

    api: FakeKubernetesApi
    objects: dict[str, dict[tuple[str, str], dict[str, Any]]]
    _setup_at: datetime | None
    _random: random.Random

    def reconcile(self) -> None:
        """One pass of every controller (the caller holds the server's lock)."""
        for hpa in list(self.objects["horizontalpodautoscalers"].values()):
            self._autoscale(hpa)
        for dep in list(self.objects["deployments"].values()):
            self._deploy(dep)
        for rs in list(self.objects["replicasets"].values()):
            self._replicate(rs)
        for dep in list(self.objects["deployments"].values()):
            self._deployment_status(dep)
        for sts in list(self.objects["statefulsets"].values()):
            self._stateful(sts)

    def _now(self) -> datetime:
        return self._setup_at or datetime.now(UTC)

    def _event(self, obj: dict[str, Any], kind: str, reason: str, message: str,
               component: str, type_: str = "Normal") -> None:
        meta = obj["metadata"]
        involved = {
            "kind": kind, "namespace": meta["namespace"], "name": meta["name"],
            "uid": meta["uid"], "apiVersion": API_VERSION[kind],
        }
        self.api.emit_event(involved, reason, message, type_=type_, component=component,
                            at=self._setup_at)

    def _owned(self, plural: str, owner: dict[str, Any]) -> list[dict[str, Any]]:
        uid = owner["metadata"]["uid"]
        owned = [
            o for o in self.objects[plural].values()
            if any(r["uid"] == uid and r.get("controller") for r in o["metadata"]["ownerReferences"])
        ]
        return sorted(owned, key=_revision_of)

    def _new_owned(self, plural: str, owner: dict[str, Any], kind: str, name: str,
                   labels: dict[str, str]) -> dict[str, Any]:
        meta = owner["metadata"]
        return {
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "uid": str(uuid.uuid4()),
                "resourceVersion": self.api.next_resource_version(),
                "generation": 1,
                "creationTimestamp": _rfc3339(self._now()),
                "labels": labels,
                "annotations": {},
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": kind, "name": meta["name"],
                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
                ],
            },
        }

    def _touch(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = self.api.next_resource_version()

    # Deployment -------------------------------------------------------------------------

    def _deploy(self, dep: dict[str, Any]) -> None:
        spec, meta = dep["spec"], dep["metadata"]
        owned = self._owned("replicasets", dep)
        latest = max((_revision_of(rs) for rs in owned), default=0)
        current = next(
            (rs for rs in owned if _without_hash(rs["spec"]["template"]) == spec["template"]), None
        )
        if current is None and spec.get("paused"):
            current = owned[-1] if owned else None
        if current is None:
            pod_hash = _hash(spec["template"])
            template = copy.deepcopy(spec["template"])
            template["metadata"].setdefault("labels", {})[HASH_LABEL] = pod_hash
            current = self._new_owned(
                "replicasets", dep, "Deployment", f"{meta['name']}-{pod_hash}",
                dict(template["metadata"]["labels"]),
            )
            current["spec"] = {
                "replicas": 0,
                "selector": {"matchLabels": {**spec["selector"]["matchLabels"], HASH_LABEL: pod_hash}},
                "template": template,
            }
            current["status"] = {"replicas": 0}
            current["metadata"]["annotations"][REVISION] = str(latest + 1)
            self.objects["replicasets"][(meta["namespace"], current["metadata"]["name"])] = current
            owned.append(current)
        elif _revision_of(current) < latest:
            # a rollback: the old ReplicaSet becomes the newest revision again
            annotations = current["metadata"]["annotations"]
            history = [h for h in annotations.get(REVISION_HISTORY, "").split(",") if h]
            annotations[REVISION_HISTORY] = ",".join([*history, annotations[REVISION]])
            annotations[REVISION] = str(latest + 1)
            self._touch(current)
        annotations = current["metadata"]["annotations"]
        for key, value in (meta.get("annotations") or {}).items():
            if key not in SKIPPED_ANNOTATIONS and annotations.get(key) != value:
                annotations[key] = value
        annotations["deployment.kubernetes.io/desired-replicas"] = str(spec["replicas"])
        if meta.setdefault("annotations", {}).get(REVISION) != annotations[REVISION]:
            meta["annotations"][REVISION] = annotations[REVISION]
            self._touch(dep)
        for rs in owned:
            want = spec["replicas"] if rs is current else 0
            have = rs["spec"]["replicas"]
            if have != want:
                rs["spec"]["replicas"] = want
                rs["metadata"]["generation"] += 1
                self._touch(rs)
                self._event(
                    dep, "Deployment", "ScalingReplicaSet",
                    f"Scaled {'up' if want > have else 'down'} replica set "
                    f"{rs['metadata']['name']} from {have} to {want}", "deployment-controller",
                )
        old = [rs for rs in owned if rs is not current and rs["spec"]["replicas"] == 0
               and not self._pods_of(rs, live_only=False)]
        for rs in old[: max(0, len(old) - spec.get("revisionHistoryLimit", 10))]:
            del self.objects["replicasets"][(meta["namespace"], rs["metadata"]["name"])]

    def _deployment_status(self, dep: dict[str, Any]) -> None:
        owned = self._owned("replicasets", dep)
        revision = dep["metadata"]["annotations"].get(REVISION)
        pods = [p for rs in owned for p in self._pods_of(rs)]
        updated = [p for rs in owned if rs["metadata"]["annotations"].get(REVISION) == revision
                   for p in self._pods_of(rs)]
        want = dep["spec"]["replicas"]
        ready = sum(p.ready for p in pods)
        complete = len(updated) == want == ready and len(pods) == want
        status = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": len(pods),
            "updatedReplicas": len(updated),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, want - ready),
            "conditions": [
                _condition("Available", ready >= want, "MinimumReplicasAvailable" if ready >= want
                           else "MinimumReplicasUnavailable"),
                _condition("Progressing", True, "NewReplicaSetAvailable" if complete
                           else "ReplicaSetUpdated"),
            ],
        }
        if not status["unavailableReplicas"]:
            del status["unavailableReplicas"]
        _set_status(dep, status, self._touch)

    # ReplicaSet ---------------------------------------------------------------------------

    def _pods_of(self, owner: dict[str, Any], *, live_only: bool = True) -> list[FakePod]:
        uid = owner["metadata"]["uid"]
        return [
            p for p in self.api._pods.values()
            if p.owner_uid == uid and (p.deleted_at is None or not live_only)
        ]

    def _replicate(self, rs: dict[str, Any]) -> None:
        pods = self._pods_of(rs)
        want = rs["spec"]["replicas"]
        name = rs["metadata"]["name"]
        for _ in range(want - len(pods)):
            pod_name = f"{name}-{''.join(self._random.choices(_SAFE, k=5))}"
            self._new_pod(rs, "ReplicaSet", pod_name, rs["spec"]["template"], {})
            self._event(rs, "ReplicaSet", "SuccessfulCreate", f"Created pod: {pod_name}",
                        "replicaset-controller")
        if len(pods) > want:
            # the ReplicaSet controller's ranking: not Ready before Ready, younger before older
            doomed = sorted(pods, key=lambda p: (p.ready, -p.created_at.timestamp()))
            for pod in doomed[: len(pods) - want]:
                self._remove_pod(pod)
                self._event(rs, "ReplicaSet", "SuccessfulDelete", f"Deleted pod: {pod.name}",
                            "replicaset-controller")
        pods = self._pods_of(rs)
        ready = sum(p.ready for p in pods)
        _set_status(rs, {
            "replicas": len(pods), "fullyLabeledReplicas": len(pods), "readyReplicas": ready,
            "availableReplicas": ready, "observedGeneration": rs["metadata"]["generation"],
        }, self._touch)

    def _remove_pod(self, pod: FakePod) -> None:
        if self._setup_at:
            del self.api._pods[(pod.namespace, pod.name)]
        else:
            self.api.start_deletion(pod)

    def _new_pod(self, owner: dict[str, Any], kind: str, name: str, template: dict[str, Any],
                 labels: dict[str, str]) -> FakePod:
        meta = owner["metadata"]
        delay = self.api.recreated_ready_after_s
        if self._setup_at:
            ready_at: float | None = 0.0
        else:
            ready_at = None if delay is None else time.monotonic() + delay
        pod = FakePod(
            namespace=meta["namespace"],
            name=name,
            labels={**(template["metadata"].get("labels") or {}), **labels},
            created_at=self._now(),
            ready_at=ready_at,
            owner=(kind, meta["name"]),
            owner_uid=meta["uid"],
            managed=True,
            spec=copy.deepcopy(template["spec"]),
            annotations=dict(template["metadata"].get("annotations") or {}),
        )
        self.api._pods[(pod.namespace, pod.name)] = pod
        return pod

    # StatefulSet --------------------------------------------------------------------------

    def _stateful(self, sts: dict[str, Any]) -> None:
        spec, meta = sts["spec"], sts["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        revisions = self._owned("controllerrevisions", sts)
        latest = max((_revision_of(cr) for cr in revisions), default=0)
        update = next((cr for cr in revisions if _revision_template(cr) == spec["template"]), None)
        if update is None:
            update = self._new_owned(
                "controllerrevisions", sts, "StatefulSet", f"{name}-{_hash(spec['template'])}",
                dict(spec["template"]["metadata"].get("labels") or {}),
            )
            update["data"] = {"spec": {"template": {**copy.deepcopy(spec["template"]),
                                                     "$patch": "replace"}}}
            update["revision"] = latest + 1
            self.objects["controllerrevisions"][(namespace, update["metadata"]["name"])] = update
            revisions.append(update)
        elif update["revision"] < latest:
            update["revision"] = latest + 1
            self._touch(update)
        update_name = update["metadata"]["name"]
        template = _revision_template(update)
        pods = {p.name: p for p in self._pods_of(sts, live_only=False)}
        if self._setup_at:
            # set-up: what a rollout would have replaced long ago is gone already
            for pod in list(pods.values()):
                if pod.labels.get(STS_HASH_LABEL) != update_name:
                    self._remove_pod(pod)
                    del pods[pod.name]
        ordinals = range(spec["replicas"])
        settled = all(p.ready and p.deleted_at is None for p in pods.values())
        for ordinal in ordinals:
            pod_name = f"{name}-{ordinal}"
            if pod_name in pods:
                continue
            if not (self._setup_at or settled):
                break  # OrderedReady: the next pod once the ones before it are Ready
            pods[pod_name] = self._new_pod(sts, "StatefulSet", pod_name, template, {
                STS_HASH_LABEL: update_name,
                "statefulset.kubernetes.io/pod-name": pod_name,
                "apps.kubernetes.io/pod-index": str(ordinal),
            })
            self._event(sts, "StatefulSet", "SuccessfulCreate",
                        f"create Pod {pod_name} in StatefulSet {name} successful",
                        "statefulset-controller")
            settled = bool(self._setup_at)
        by_ordinal = sorted(pods.values(), key=lambda p: -int(p.name.rsplit("-", 1)[1]))
        surplus = [p for p in by_ordinal if int(p.name.rsplit("-", 1)[1]) >= spec["replicas"]]
        if surplus and settled:
            self._remove_pod(surplus[0])
            self._event(sts, "StatefulSet", "SuccessfulDelete",
                        f"delete Pod {surplus[0].name} in StatefulSet {name} successful",
                        "statefulset-controller")
            settled = False
        outdated = [p for p in by_ordinal if p.labels.get(STS_HASH_LABEL) != update_name
                    and p not in surplus]
        if (outdated and settled and len(pods) == spec["replicas"]
                and spec["updateStrategy"]["type"] == "RollingUpdate"):
            self._remove_pod(outdated[0])
        live = [p for p in self._pods_of(sts) if int(p.name.rsplit("-", 1)[1]) < spec["replicas"]]
        updated = [p for p in live if p.labels.get(STS_HASH_LABEL) == update_name]
        current_name = sts["status"].get("currentRevision") or update_name
        if len(updated) == spec["replicas"]:
            current_name = update_name
        ready = sum(p.ready for p in live)
        _set_status(sts, {
            "observedGeneration": meta["generation"],
            "replicas": len(live),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentReplicas": sum(p.labels.get(STS_HASH_LABEL) == current_name for p in live),
            "updatedReplicas": len(updated),
            "currentRevision": current_name,
            "updateRevision": update_name,
            "collisionCount": 0,
        }, self._touch)
        keep = {current_name, update_name}
        old = [cr for cr in self._owned("controllerrevisions", sts)
               if cr["metadata"]["name"] not in keep]
        for cr in old[: max(0, len(old) - spec.get("revisionHistoryLimit", 10))]:
            del self.objects["controllerrevisions"][(namespace, cr["metadata"]["name"])]

    # HorizontalPodAutoscaler ----------------------------------------------------------------

    def _autoscale(self, hpa: dict[str, Any]) -> None:
        spec, meta = hpa["spec"], hpa["metadata"]
        ref = spec["scaleTargetRef"]
        target = self.objects.get(_plural(ref["kind"]), {}).get((meta["namespace"], ref["name"]))
        if target is None:
            _set_status(hpa, {"currentReplicas": 0, "desiredReplicas": 0, "conditions": [
                _condition("AbleToScale", False, "FailedGetScale")]}, self._touch)
            return
        current = target["spec"]["replicas"]
        low, high = spec.get("minReplicas", 1), spec["maxReplicas"]
        desired, why = current, "ScaleDownStabilized"
        if current == 0 and low != 0:
            why = "ScalingDisabled"  # scaled to zero by hand: the HPA stands aside
        elif current < low:
            desired, why = low, "TooFewReplicas"
        elif current > high:
            desired, why = high, "TooManyReplicas"
        status = copy.deepcopy(hpa["status"])
        if desired != current:
            target["spec"]["replicas"] = desired
            target["metadata"]["generation"] += 1
            self._touch(target)
            limit = "below Spec.MinReplicas" if desired == low else "above Spec.MaxReplicas"
            self._event(hpa, "HorizontalPodAutoscaler", "SuccessfulRescale",
                        f"New size: {desired}; reason: Current number of replicas {limit}",
                        "horizontal-pod-autoscaler")
            status["lastScaleTime"] = _rfc3339(self._now())
        status.update({
            "observedGeneration": meta["generation"],
            "currentReplicas": target["status"].get("replicas", current),
            "desiredReplicas": desired,
            "currentMetrics": [],
            "conditions": [
                _condition("AbleToScale", True, "SucceededRescale" if desired != current
                           else "ReadyForNewScale"),
                # no metrics here: scaling on them is never active, only the bounds hold
                _condition("ScalingActive", False, "ScalingDisabled" if why == "ScalingDisabled"
                           else "FailedGetResourceMetric"),
                _condition("ScalingLimited", why in ("TooFewReplicas", "TooManyReplicas"),
                           why if why.startswith("Too") else "DesiredWithinRange"),
            ],
        })
        _set_status(hpa, status, self._touch)



def _plural(kind: str) -> str:
    return {
        "Deployment": "deployments", "StatefulSet": "statefulsets", "ReplicaSet": "replicasets",
        "ControllerRevision": "controllerrevisions",
        "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    }.get(kind, kind.lower() + "s")



def _hash(template: dict[str, Any]) -> str:
    digest = hashlib.sha256(repr(_canonical(template)).encode()).digest()
    return "".join(_SAFE[b % len(_SAFE)] for b in digest[:10])


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted((k, _canonical(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _without_hash(template: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(template)
    labels = template["metadata"].get("labels") or {}
    labels.pop(HASH_LABEL, None)
    return template


def _revision_template(cr: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(cr["data"]["spec"]["template"])
    template.pop("$patch", None)
    return template


def _revision_of(obj: dict[str, Any]) -> int:
    if "revision" in obj:
        return obj["revision"]
    return int(obj["metadata"].get("annotations", {}).get(REVISION, "0"))


def _selector_text(selector: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items()))


def _condition(type_: str, ok: bool, reason: str) -> dict[str, Any]:
    now = _rfc3339(datetime.now(UTC))
    return {"type": type_, "status": "True" if ok else "False", "reason": reason,
            "lastTransitionTime": now, **({"lastUpdateTime": now} if type_ in (
                "Available", "Progressing") else {})}


def _set_status(obj: dict[str, Any], status: dict[str, Any], touch: Any) -> None:
    """Write a controller's status; conditions keep their times unless their status changed."""
    old = {c["type"]: c for c in obj["status"].get("conditions", [])}
    for n, cond in enumerate(status.get("conditions", [])):
        before = old.get(cond["type"])
        if before and (before["status"], before["reason"]) == (cond["status"], cond["reason"]):
            status["conditions"][n] = before
    if status != obj["status"]:
        obj["status"] = status
        touch(obj)


