"""Kubernetes workload decisions as data: is a restart needed, how to scale around an HPA, the
memory limit plan, what a rollback writes back, and what a pod's JSON says as an Instance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes.client import V1LabelSelectorRequirement, V1Pod

from runbooks.errors import Escalation
from tasks.kubernetes_apps_decisions import (
    MemoryPlan,
    RevisionRecord,
    ScalePlan,
    autoscaler_min_plan,
    find_revision,
    format_bytes,
    memory_limit_plan,
    pod_instance,
    quantity_bytes,
    restart_skip_reason,
    rollback_annotations,
    scale_plan,
    selector_text,
    template_without_hash,
    termination_events,
)
from tasks.workloads import Unsupported

SINCE = datetime(2025, 3, 1, 12, 0, 0, 400000, tzinfo=UTC)
BEFORE = SINCE - timedelta(minutes=5)
AFTER = SINCE + timedelta(seconds=30)


@pytest.mark.parametrize(
    ("restarted_at", "since", "rolled_out_at", "pods", "skip"),
    [
        pytest.param(None, SINCE, BEFORE, [BEFORE, BEFORE], None, id="never-restarted"),
        pytest.param("2025-03-01T11:00:00Z", SINCE, BEFORE, [BEFORE], None, id="restarted-before"),
        pytest.param("2025-03-01T12:00:30Z", SINCE, BEFORE, [BEFORE], "recorded", id="restarted-after"),
        # the annotation has whole seconds: the same second as `since` is after it
        pytest.param("2025-03-01T12:00:00Z", SINCE, BEFORE, [BEFORE], "recorded", id="same-second"),
        pytest.param("2025-03-01T11:59:59Z", SINCE, BEFORE, [BEFORE], None, id="second-before"),
        # kubectl writes local time with its offset
        pytest.param("2025-03-01T13:00:10+01:00", SINCE, BEFORE, [BEFORE], "recorded", id="offset-after"),
        pytest.param("2025-03-01T12:59:00+01:00", SINCE, BEFORE, [BEFORE], None, id="offset-before"),
        pytest.param("yesterday", SINCE, BEFORE, [BEFORE], None, id="unreadable-annotation"),
        pytest.param(None, SINCE, AFTER, [BEFORE], "rolled out", id="new-revision-after"),
        pytest.param(None, SINCE, None, [AFTER, AFTER], "every pod", id="all-pods-new"),
        pytest.param(None, SINCE, None, [AFTER, BEFORE], None, id="one-old-pod"),
        pytest.param(None, SINCE, None, [], None, id="no-pods"),
        # a naive `since` is UTC
        pytest.param("2025-03-01T12:00:30Z", SINCE.replace(tzinfo=None), None, [], "recorded",
                     id="naive-since"),
    ],
)
def test_restart_skip_reason(restarted_at, since, rolled_out_at, pods, skip) -> None:
    reason = restart_skip_reason(restarted_at, since, rolled_out_at, pods)
    if skip is None:
        assert reason is None
    else:
        assert reason is not None and skip in reason


@pytest.mark.parametrize(
    ("current", "wanted", "hpa", "plan"),
    [
        pytest.param(2, 4, None, ScalePlan(True), id="up"),
        pytest.param(4, 1, None, ScalePlan(True), id="down"),
        pytest.param(3, 3, None, ScalePlan(False, "already 3 replicas"), id="same"),
        pytest.param(0, 2, None, ScalePlan(True), id="from-zero"),
        pytest.param(2, 4, (2, 6), "moves them by its metrics", id="within-hpa-bounds"),
        pytest.param(3, 3, (2, 6), ScalePlan(False, "already 3 replicas"), id="same-with-hpa"),
        pytest.param(3, 1, (2, 6), Unsupported, id="below-hpa-min"),
        pytest.param(3, 7, (2, 6), Unsupported, id="above-hpa-max"),
        pytest.param(3, -1, None, ValueError, id="negative"),
    ],
)
def test_scale_plan(current: int, wanted: int, hpa, plan) -> None:
    if isinstance(plan, type):
        with pytest.raises(plan):
            scale_plan(current, wanted, hpa)
    elif isinstance(plan, str):
        got = scale_plan(current, wanted, hpa)
        assert got.change and plan in (got.note or "")
    else:
        assert scale_plan(current, wanted, hpa) == plan


@pytest.mark.parametrize(
    ("current_min", "maximum", "wanted", "change", "note"),
    [
        pytest.param(2, 10, 5, True, None, id="raise"),
        pytest.param(5, 10, 10, True, None, id="raise-to-max"),
        pytest.param(5, 10, 5, False, "is 5 already", id="same"),
        pytest.param(5, 10, 3, True, "lowers", id="lower"),
        pytest.param(2, 6, 7, Unsupported, "above the autoscaler's maximum 6", id="above-max"),
        pytest.param(2, 6, 0, Unsupported, "at least 1", id="zero"),
    ],
)
def test_autoscaler_min_plan(current_min, maximum, wanted, change, note) -> None:
    if change is Unsupported:
        with pytest.raises(Unsupported, match=note):
            autoscaler_min_plan(current_min, maximum, wanted)
        return
    plan = autoscaler_min_plan(current_min, maximum, wanted)
    assert plan.change is change
    assert (plan.note is None) if note is None else (note in (plan.note or ""))


@pytest.mark.parametrize(
    ("text", "size"),
    [("512Mi", 512 * 2**20), ("1Gi", 2**30), ("1G", 10**9), ("129e6", 129 * 10**6),
     ("0.5Gi", 2**29), ("1000", 1000), ("64Ki", 65536), (None, None)],
)
def test_quantity_bytes(text: str | None, size: int | None) -> None:
    assert quantity_bytes(text) == size


@pytest.mark.parametrize(
    ("size", "text"),
    [(2**30, "1Gi"), (3 * 2**29, "1536Mi"), (768 * 2**20, "768Mi"), (2**40, "1Ti"),
     (65536, "64Ki"), (10**9, "1000000000"), (1000, "1000")],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text
    assert quantity_bytes(text) == size


@pytest.mark.parametrize(
    ("limit", "requested", "wanted", "plan"),
    [
        pytest.param("256Mi", "128Mi", 2**30, MemoryPlan("1Gi"), id="raise"),
        pytest.param(None, None, 2**29, MemoryPlan("512Mi"), id="no-limit-yet"),
        pytest.param("1Gi", "1Gi", 2**31, MemoryPlan("2Gi"), id="request-equal-stays"),
        pytest.param("1Gi", "512Mi", 2**30, None, id="same-limit"),
        pytest.param("1073741824", None, 2**30, None, id="same-limit-in-bytes"),
        pytest.param(
            "1Gi", "768Mi", 2**29,
            MemoryPlan("512Mi", "512Mi", "memory request 768Mi lowered to the new limit 512Mi"),
            id="lower-below-request",
        ),
    ],
)
def test_memory_limit_plan(limit, requested, wanted: int, plan: MemoryPlan | None) -> None:
    assert memory_limit_plan(limit, requested, wanted) == plan


def test_memory_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        memory_limit_plan("1Gi", None, 0)


@pytest.mark.parametrize(
    ("template", "restored"),
    [
        pytest.param(
            {"metadata": {"labels": {"app": "web", "pod-template-hash": "5d4f8c7b9"}},
             "spec": {"containers": [{"name": "web", "image": "web:1.0"}]}},
            {"metadata": {"labels": {"app": "web"}},
             "spec": {"containers": [{"name": "web", "image": "web:1.0"}]}},
            id="hash-label-dropped",
        ),
        pytest.param(
            {"metadata": {"labels": {"pod-template-hash": "x"}, "annotations": {"a": "b"}},
             "spec": {}},
            {"metadata": {"annotations": {"a": "b"}}, "spec": {}},
            id="only-label",
        ),
        pytest.param({"spec": {}}, {"metadata": {}, "spec": {}}, id="no-metadata"),
    ],
)
def test_template_without_hash(template: dict, restored: dict) -> None:
    before = repr(template)
    assert template_without_hash(template) == restored
    assert repr(template) == before  # the ReplicaSet's own is left alone


@pytest.mark.parametrize(
    ("deployment", "replica_set", "after"),
    [
        pytest.param(
            {"deployment.kubernetes.io/revision": "4", "kubernetes.io/change-cause": "v2",
             "team": "shop"},
            {"deployment.kubernetes.io/revision": "2", "kubernetes.io/change-cause": "v1",
             "deployment.kubernetes.io/desired-replicas": "3"},
            {"deployment.kubernetes.io/revision": "4", "kubernetes.io/change-cause": "v1"},
            id="kubectl-undo",
        ),
        pytest.param({}, {"team": "shop"}, {"team": "shop"}, id="nothing-kept"),
    ],
)
def test_rollback_annotations(deployment: dict, replica_set: dict, after: dict) -> None:
    assert rollback_annotations(deployment, replica_set) == after


def record(revision: int, earlier: tuple[int, ...] = ()) -> RevisionRecord:
    return RevisionRecord(revision, f"web-{revision}", f"uid-{revision}", None, {}, {}, 0,
                          False, earlier=earlier)


@pytest.mark.parametrize(
    ("revisions", "wanted", "found"),
    [
        pytest.param([record(1), record(2)], 1, 1, id="present"),
        # rolled back to 1 already: that ReplicaSet is revision 3 now
        pytest.param([record(2), record(3, (1,))], 1, 3, id="renumbered-by-rollback"),
        pytest.param([record(2), record(5, (1, 3))], 3, 5, id="renumbered-twice"),
        pytest.param([record(2), record(3)], 1, None, id="pruned"),
    ],
)
def test_find_revision(revisions, wanted: int, found: int | None) -> None:
    hit = find_revision(revisions, wanted)
    assert (hit.revision if hit else None) == found


@pytest.mark.parametrize(
    ("labels", "expressions", "text"),
    [
        ({"app": "web"}, None, "app=web"),
        ({"tier": "front", "app": "web"}, None, "app=web,tier=front"),
        ({"app": "web"}, [V1LabelSelectorRequirement(key="env", operator="In", values=["b", "a"])],
         "app=web,env in (a,b)"),
        (None, [V1LabelSelectorRequirement(key="env", operator="NotIn", values=["dev"]),
                V1LabelSelectorRequirement(key="canary", operator="DoesNotExist"),
                V1LabelSelectorRequirement(key="app", operator="Exists")],
         "env notin (dev),!canary,app"),
    ],
)
def test_selector_text(labels, expressions, text: str) -> None:
    assert selector_text(labels, expressions) == text


# pods as the API serves them ----------------------------------------------------------------


def pod(*statuses: dict[str, Any], containers: list[str] = ("web",), phase: str = "Running",
        ready: bool = True, deleting: bool = False, limits: str | None = "256Mi") -> V1Pod:
    meta: dict[str, Any] = {"name": "web-abc-x1", "uid": "u1", "creationTimestamp": "2025-03-01T10:00:00Z",
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                 "name": "web-abc", "uid": "rs", "controller": True}]}
    if deleting:
        meta["deletionTimestamp"] = "2025-03-01T12:00:00Z"
    return V1Pod.from_dict({
        "metadata": meta,
        "spec": {"containers": [
            {"name": c, "image": f"{c}:1", "resources": {"limits": {"memory": limits}} if limits else {}}
            for c in containers
        ]},
        "status": {
            "phase": phase, "startTime": "2025-03-01T10:00:01Z",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": list(statuses),
        },
    })


def cs(name: str = "web", *, state: dict | None = None, last: dict | None = None,
       restarts: int = 0) -> dict[str, Any]:
    return {"name": name, "image": f"{name}:1", "imageID": "", "ready": True,
            "restartCount": restarts,
            "state": state or {"running": {"startedAt": "2025-03-01T11:00:00Z"}},
            "lastState": {"terminated": last} if last else {}}


OOM = {"exitCode": 137, "reason": "OOMKilled", "startedAt": "2025-03-01T10:30:00Z",
       "finishedAt": "2025-03-01T11:59:00Z"}
ERROR = {"exitCode": 1, "reason": "Error", "finishedAt": "2025-03-01T11:59:00Z"}
CRASHLOOP = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}}
T = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731

# (case, pod, container, usage, expected fields)
INSTANCES = [
    pytest.param(pod(cs()), None, None,
                 dict(state="Running", running=True, ready=True, restarts=0, oom_killed=False,
                      exit_code=None, started_at=T("2025-03-01T11:00:00Z"),
                      memory_limit_bytes=256 * 2**20, memory_usage_bytes=None), id="running"),
    pytest.param(pod(cs(last=OOM, restarts=3)), None, {"web": 200 * 2**20},
                 dict(state="Running", running=True, oom_killed=True, exit_code=137, restarts=3,
                      finished_at=T(OOM["finishedAt"]), memory_usage_bytes=200 * 2**20),
                 id="oom-killed-then-running"),
    pytest.param(pod(cs(state=CRASHLOOP, last=OOM, restarts=7), ready=False), None, None,
                 dict(state="CrashLoopBackOff", running=False, ready=False, oom_killed=True,
                      restarts=7, started_at=T(OOM["startedAt"])), id="oom-crash-loop"),
    pytest.param(pod(cs(state={"terminated": OOM}), ready=False), None, None,
                 dict(state="OOMKilled", running=False, oom_killed=True, exit_code=137),
                 id="oom-killed-now"),
    pytest.param(pod(cs(state=CRASHLOOP, last=ERROR, restarts=2), ready=False), None, None,
                 dict(state="CrashLoopBackOff", oom_killed=False, exit_code=1), id="crash-not-oom"),
    pytest.param(pod(cs(), deleting=True), None, None,
                 dict(state="Terminating", running=False, ready=True), id="terminating"),
    pytest.param(pod(phase="Pending", ready=False), None, None,
                 dict(state="Pending", running=False, ready=False, restarts=0,
                      started_at=T("2025-03-01T10:00:01Z")), id="pending-no-status"),
    pytest.param(pod(cs(), limits=None), None, None, dict(memory_limit_bytes=None), id="no-limit"),
    # a sidecar's OOM is the sidecar's: the container asked about is the one reported
    pytest.param(pod(cs(), cs("proxy", last=OOM, restarts=1), containers=["web", "proxy"]), None,
                 {"web": 1, "proxy": 2}, dict(oom_killed=False, restarts=0, memory_usage_bytes=1),
                 id="sidecar-oom-first-container"),
    pytest.param(pod(cs(), cs("proxy", last=OOM, restarts=1), containers=["web", "proxy"]), "proxy",
                 {"web": 1, "proxy": 2}, dict(oom_killed=True, restarts=1, memory_usage_bytes=2),
                 id="sidecar-oom-named"),
]


@pytest.mark.parametrize(("pod_", "container", "usage", "expected"), INSTANCES)
def test_pod_instance(pod_: V1Pod, container, usage, expected: dict) -> None:
    instance = pod_instance(pod_, container, usage)
    assert (instance.id, instance.name) == ("web-abc-x1", "web-abc-x1")
    assert {k: getattr(instance, k) for k in expected} == expected


def test_pod_instance_unknown_container_escalates() -> None:
    with pytest.raises(Escalation, match="no container 'db' .*it has web"):
        pod_instance(pod(cs()), "db", None)


@pytest.mark.parametrize(
    ("pod_", "since", "reasons"),
    [
        pytest.param(pod(cs(last=OOM)), T("2025-03-01T11:00:00Z"), ["OOMKilled"], id="oom-since"),
        pytest.param(pod(cs(last=OOM)), T("2025-03-01T12:00:00Z"), [], id="oom-before-since"),
        pytest.param(pod(cs(state={"terminated": ERROR})), T("2025-03-01T11:00:00Z"), ["Error"],
                     id="terminated-now"),
        pytest.param(pod(cs()), T("2025-03-01T00:00:00Z"), [], id="never-terminated"),
    ],
)
def test_termination_events(pod_: V1Pod, since: datetime, reasons: list[str]) -> None:
    events = termination_events(pod_, since)
    assert [e.reason for e in events] == reasons
    assert all(e.instance == "web-abc-x1" and "exit code" in e.message for e in events)
