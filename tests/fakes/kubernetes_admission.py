"""What the fake API server does to a written object before storing it: defaults, validation.

As the API server's defaulting and validation do (k8s.io/kubernetes pkg/apis/*/v1 defaults.go
and validation.go), for the fields the workloads here use: a container's imagePullPolicy and
termination message, a pod's restartPolicy, DNS policy, scheduler and grace period, a
Deployment's strategy, a StatefulSet's update strategy and pod management, an HPA's minimum;
and 422 Invalid for a negative replica count, a changed selector, template labels the selector
misses, a container without name or image, a request above its limit, an HPA whose maximum is
below its minimum.
"""

from __future__ import annotations

import re
from typing import Any


def default(plural: str, obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    if plural == "horizontalpodautoscalers":
        spec.setdefault("minReplicas", 1)
        return
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    if plural == "deployments":
        spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {
            "maxUnavailable": "25%", "maxSurge": "25%"}})
        spec.setdefault("progressDeadlineSeconds", 600)
    else:
        spec.setdefault("podManagementPolicy", "OrderedReady")
        strategy = spec.setdefault("updateStrategy", {"type": "RollingUpdate"})
        if strategy.get("type") == "RollingUpdate":
            strategy.setdefault("rollingUpdate", {"partition": 0})
    template = spec.setdefault("template", {})
    template.setdefault("metadata", {})
    pod = template.setdefault("spec", {})
    for container in pod.get("containers") or []:
        image = str(container.get("image", ""))
        tag = image.rsplit("/", 1)[-1]
        container.setdefault(
            "imagePullPolicy", "Always" if ":" not in tag or tag.endswith(":latest") else "IfNotPresent"
        )
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})
    pod.setdefault("restartPolicy", "Always")
    pod.setdefault("terminationGracePeriodSeconds", 30)
    pod.setdefault("dnsPolicy", "ClusterFirst")
    pod.setdefault("securityContext", {})
    pod.setdefault("schedulerName", "default-scheduler")


_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_FACTOR = {None: 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "P": 1e15, "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "Pi": 2**50, "Ei": 2**60}


def _quantity(value: Any) -> float | None:
    found = _QUANTITY.match(str(value))
    return float(found[1]) * _FACTOR[found[2]] if found else None


def validate(plural: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    spec = new["spec"]
    problems: list[str] = []
    if plural == "horizontalpodautoscalers":
        low, high = spec.get("minReplicas"), spec.get("maxReplicas")
        if not isinstance(low, int) or low < 1:
            problems.append(f"spec.minReplicas: Invalid value: {low}: must be greater than or equal to 1")
        elif not isinstance(high, int) or high < low:
            problems.append(f"spec.maxReplicas: Invalid value: {high}: must be greater than or "
                            "equal to `minReplicas`")
        return problems
    replicas = spec.get("replicas")
    if not isinstance(replicas, int) or replicas < 0:
        problems.append(f"spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0")
    if spec.get("selector") != old["spec"]["selector"]:
        problems.append(f"spec.selector: Invalid value: {spec.get('selector')}: field is immutable")
    wanted = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = spec["template"]["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in wanted.items()):
        problems.append(f"spec.template.metadata.labels: Invalid value: {labels}: `selector` does "
                        "not match template `labels`")
    containers = spec["template"]["spec"].get("containers") or []
    if not containers:
        problems.append("spec.template.spec.containers: Required value")
    for n, container in enumerate(containers):
        where = f"spec.template.spec.containers[{n}]"
        for key in ("name", "image"):
            if not container.get(key):
                problems.append(f"{where}.{key}: Required value")
        limits = container.get("resources", {}).get("limits") or {}
        requests = container.get("resources", {}).get("requests") or {}
        for resource, request in requests.items():
            limit = limits.get(resource)
            if limit is None:
                continue
            if _quantity(request) is None or _quantity(limit) is None:
                problems.append(f"{where}.resources: Invalid value: {request!r}: quantities must "
                                "match the regular expression")
            elif _quantity(request) > _quantity(limit):
                problems.append(f"{where}.resources.requests: Invalid value: \"{request}\": must "
                                f"be less than or equal to {resource} limit of {limit}")
    return problems
