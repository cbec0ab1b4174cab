"""The Kubernetes workload backend through the Prefect tasks of tasks/workloads.py, against the
fake API server and its controllers (tests/fakes/kubernetes_apps.py).

Each test asserts the exact requests the API server received (method, path, content type,
body) and what the cluster holds afterwards: ReplicaSets and revisions, pods replaced or added,
templates restored, not only what a task returned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from prefect import flow

from blocks.kubernetes import KubernetesCluster
from runbooks.errors import Escalation
from tasks.kubernetes_apps import KubernetesBackend
from tasks.kubernetes_apps_decisions import RESTARTED_AT, parse_time
from tasks.workloads import (
    Capability,
    Unsupported,
    WorkloadRef,
    load_backend,
    restart_workload,
    rollback_workload,
    scale_workload,
    set_autoscaler_min,
    set_memory_limit,
    workload_events,
    workload_history,
    workload_logs,
    workload_status,
)
from tests.conftest import unique
from tests.fakes.kubernetes_api import FakeKubernetesApi

pytestmark = pytest.mark.integration

NS = "shop"
APPS = f"/apis/apps/v1/namespaces/{NS}"
HPAS = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers"
STRATEGIC = "application/strategic-merge-patch+json"
WEB = WorkloadRef(name="web")
DB = WorkloadRef(name="db", kind="StatefulSet")
MUTATING = ("PATCH", "POST", "PUT", "DELETE")


@pytest.fixture
def api() -> Iterator[FakeKubernetesApi]:
    with FakeKubernetesApi.running(recreated_ready_after_s=0.1) as server:
        yield server


def cluster_for(api: FakeKubernetesApi) -> KubernetesCluster:
    # the block's namespace is another one: the ref's must win
    kubeconfig = yaml.safe_dump(api.kubeconfig("default"))
    return KubernetesCluster(kubeconfig=kubeconfig, namespace=NS, request_timeout_s=2)


class Steps:
    """The workload tasks for one flow run, the backend built as a runbook builds it.

    A test runs its steps in one flow (a flow run costs more than all the API calls of a
    step); each task keeps its own retry policy, minus the backoff waits.
    """

    def __init__(self, api: FakeKubernetesApi) -> None:
        self.backend = KubernetesBackend(cluster_for(api))

    def __getattr__(self, action: str) -> Any:
        task = {
            "status": workload_status, "restart": restart_workload, "scale": scale_workload,
            "autoscaler_min": set_autoscaler_min, "memory_limit": set_memory_limit,
            "history": workload_history, "rollback": rollback_workload,
            "events": workload_events, "logs": workload_logs,
        }[action].with_options(retry_delay_seconds=0)
        return lambda *args, ref=WEB, **kwargs: task(self.backend, ref, *args, **kwargs)

    def error(self, action: str, *args: Any, **kwargs: Any) -> BaseException:
        """The exception a task failed with (it must fail)."""
        state = getattr(self, action)(*args, return_state=True, **kwargs)
        assert state.is_failed()
        return state.result(raise_on_failure=False)


def mutations(api: FakeKubernetesApi) -> list[tuple[str, str, str | None, Any]]:
    return [(c.method, c.path, c.content_type, c.body) for c in api.calls if c.method in MUTATING]


def snapshot(api: FakeKubernetesApi) -> Any:
    """Everything the fake cluster holds, but for statuses' condition times."""
    objects = copy.deepcopy(api.apps.objects)
    pods = sorted((p.name, p.uid, p.deleted_at) for p in api.pods(NS))
    return objects, pods


def pod_names(api: FakeKubernetesApi, app: str = "web") -> set[str]:
    return {p.name for p in api.pods(NS, f"app={app}")}


def test_status_reads_pods_revision_autoscaler_and_usage(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2, age_s=7200)
    deployed = datetime.now(UTC) - timedelta(seconds=600)
    api.apps.roll_out(NS, "web", image="registry.example/web:1.1", age_s=600)
    api.apps.add_hpa(NS, "web", "web", min_replicas=2, max_replicas=6)
    api.apps.add_deployment(NS, "cart", replicas=1)
    # matches the selector but no ReplicaSet of web controls it: not one of web's pods
    api.add_pod(NS, "web-debug", labels={"app": "web"}, owner=None)
    current = {p.name for p in api.pods(NS, "app=web") if p.owner_uid}
    api.set_memory_usage(NS, sorted(current)[0], 100 * 2**20)

    status = flow(lambda: Steps(api).status())()

    assert status.exists and status.service == f"Deployment {NS}/web"
    assert {i.name for i in status.instances} == current and len(current) == 2
    assert all(i.running and i.ready and not i.oom_killed for i in status.instances)
    assert [i.memory_usage_bytes for i in status.instances] == [100 * 2**20, None]
    assert status.memory_limit_bytes == 256 * 2**20 and status.desired_replicas == 2
    assert status.revision == 2 and abs(status.rolled_out_at - deployed) < timedelta(seconds=2)
    assert (status.autoscaler.name, status.autoscaler.min_replicas,
            status.autoscaler.max_replicas) == ("web", 2, 6)
    assert status.capabilities == [Capability.SCALE, Capability.AUTOSCALER,
                                   Capability.MEMORY_LIMIT, Capability.ROLLBACK]
    assert [(c.method, c.path, c.query) for c in api.calls] == [
        ("GET", f"{APPS}/deployments/web", {}),
        ("GET", f"{APPS}/replicasets", {"labelSelector": ["app=web"]}),
        ("GET", f"/api/v1/namespaces/{NS}/pods", {"labelSelector": ["app=web"]}),
        ("GET", HPAS, {}),
        ("GET", f"/apis/metrics.k8s.io/v1beta1/namespaces/{NS}/pods", {"labelSelector": ["app=web"]}),
    ]


def test_a_missing_workload(api: FakeKubernetesApi) -> None:
    @flow
    def look_then_restart():
        steps = Steps(api)
        return steps.status(), steps.error("restart", since=datetime.now(UTC), dry_run=False)

    status, error = look_then_restart()

    assert not status.exists and status.instances == []
    assert isinstance(error, Escalation) and f"Deployment {NS}/web does not exist" in str(error)
    assert mutations(api) == []


def test_restart_patches_restarted_at_and_replaces_every_pod_once(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=3)
    old_pods = pod_names(api)
    since = datetime.now(UTC)

    @flow
    def restart_twice():
        steps = Steps(api)
        first = steps.restart(since=since, dry_run=False)
        api.apps.wait_rolled_out(NS, "web")
        return first, steps.restart(since=since, dry_run=False), steps.status()

    first, again, status = restart_twice()

    (patch,) = mutations(api)
    stamp = patch[3]["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
    assert patch == (
        "PATCH", f"{APPS}/deployments/web", STRATEGIC,
        {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}},
    )
    assert since.replace(microsecond=0) <= parse_time(stamp) <= datetime.now(UTC)
    (planned,), (applied,) = first.planned, first.applied
    assert (planned.action, planned.target) == ("rollout_restart", f"Deployment/{NS}/web")
    assert planned.detail["pods"] == sorted(old_pods) and applied.detail[RESTARTED_AT] == stamp
    # the controller: a new ReplicaSet, the next revision, every pod replaced and Ready
    old_rs, new_rs = api.apps.replica_sets(NS, "web")
    assert [rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
            for rs in (old_rs, new_rs)] == ["1", "2"]
    assert (old_rs["spec"]["replicas"], new_rs["spec"]["replicas"]) == (0, 3)
    assert new_rs["spec"]["template"]["metadata"]["annotations"] == {RESTARTED_AT: stamp}
    new_pods = pod_names(api)
    assert len(new_pods) == 3 and not new_pods & old_pods
    assert all(p.startswith(new_rs["metadata"]["name"]) for p in new_pods)
    # the same decision again: recorded already, nothing sent
    assert not again.planned and "rollout restart was recorded" in again.notes[0]
    assert status.revision == 2 and {i.name for i in status.instances} == new_pods
    assert all(i.ready for i in status.instances)


def test_restart_dry_run_changes_nothing(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    before = snapshot(api)
    since = datetime.now(UTC)

    @flow
    def dry_then_real():
        steps = Steps(api)
        dry = steps.restart(since=since, dry_run=True)
        return dry, snapshot(api), mutations(api), steps.restart(since=since, dry_run=False)

    dry, after_dry, sent_by_dry, real = dry_then_real()

    assert after_dry == before and sent_by_dry == []
    assert dry.dry_run and dry.applied == [] and len(dry.planned) == 1
    assert real.planned == dry.planned and len(mutations(api)) == 1


def test_restart_retried_after_a_server_error_restarts_once(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    api.fail_next("PATCH", 503)

    result = flow(lambda: Steps(api).restart(since=datetime.now(UTC), dry_run=False))()

    assert len(result.applied) == 1
    assert [c[0] for c in mutations(api)] == ["PATCH", "PATCH"]  # the 503, then the retry
    api.apps.wait_rolled_out(NS, "web")
    assert len(api.apps.replica_sets(NS, "web")) == 2


def test_restart_left_alone_when_a_rollout_followed_since(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    since = datetime.now(UTC) - timedelta(seconds=60)
    api.apps.roll_out(NS, "web", image="registry.example/web:1.1", age_s=10)

    result = flow(lambda: Steps(api).restart(since=since, dry_run=False))()

    assert not result.planned and "rolled out at" in result.notes[0]
    assert mutations(api) == []


def test_statefulset_restart_replaces_pods_under_their_names(api: FakeKubernetesApi) -> None:
    api.apps.add_statefulset(NS, "db", replicas=3)
    uids = {p.name: p.uid for p in api.pods(NS, "app=db")}

    @flow
    def restart():
        steps = Steps(api)
        result = steps.restart(ref=DB, since=datetime.now(UTC), dry_run=False)
        api.apps.wait_rolled_out(NS, "db", kind="StatefulSet")
        return result, steps.status(ref=DB)

    result, status = restart()

    ((method, path, content_type, body),) = mutations(api)
    assert (method, path, content_type) == ("PATCH", f"{APPS}/statefulsets/db", STRATEGIC)
    assert list(body["spec"]["template"]["metadata"]["annotations"]) == [RESTARTED_AT]
    assert result.applied[0].target == f"StatefulSet/{NS}/db"
    after = {p.name: p.uid for p in api.pods(NS, "app=db")}
    assert sorted(after) == ["db-0", "db-1", "db-2"]
    assert all(after[name] != uid for name, uid in uids.items())
    assert [cr["revision"] for cr in api.apps.controller_revisions(NS, "db")] == [1, 2]
    # replaced from the highest ordinal down (the kubelet stopping each old pod, in order)
    stopped = [(e["involvedObject"]["name"], e["involvedObject"]["uid"])
               for e in api.events(NS) if e["reason"] == "Killing"]
    assert stopped == [(f"db-{n}", uids[f"db-{n}"]) for n in (2, 1, 0)]
    assert status.revision == 2 and len(status.running) == 3


def test_statefulset_on_delete_restart_is_refused(api: FakeKubernetesApi) -> None:
    api.apps.add_statefulset(NS, "db", replicas=2, update_strategy="OnDelete")

    error = flow(lambda: Steps(api).error("restart", ref=DB, since=datetime.now(UTC),
                                          dry_run=False))()

    assert isinstance(error, Unsupported) and "OnDelete" in str(error)
    assert mutations(api) == []


def test_scale_uses_the_scale_subresource_and_adds_or_removes_pods(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    old_pods = pod_names(api)

    @flow
    def scale_up_and_down():
        steps = Steps(api)
        up = steps.scale(4, dry_run=False)
        api.apps.wait_rolled_out(NS, "web")
        grown = pod_names(api)
        same = steps.scale(4, dry_run=False)
        down = steps.scale(1, dry_run=False)
        api.apps.wait_rolled_out(NS, "web")
        return up, grown, same, down

    up, grown, same, down = scale_up_and_down()

    assert mutations(api) == [
        ("PATCH", f"{APPS}/deployments/web/scale", STRATEGIC, {"spec": {"replicas": 4}}),
        ("PATCH", f"{APPS}/deployments/web/scale", STRATEGIC, {"spec": {"replicas": 1}}),
    ]
    assert up.applied[0].detail == {"from": 2, "to": 4, "spec_replicas": 4}
    assert not same.planned and same.notes == [f"Deployment {NS}/web: already 4 replicas"]
    assert down.planned[0].detail == {"from": 4, "to": 1}
    # scaling adds pods beside the old ones (same ReplicaSet) and removes surplus ones
    assert len(grown) == 4 and old_pods < grown
    assert len(pod_names(api)) == 1 and pod_names(api) < grown
    assert len(api.apps.replica_sets(NS, "web")) == 1


def test_scale_dry_run_and_statefulset_scale(api: FakeKubernetesApi) -> None:
    api.apps.add_statefulset(NS, "db", replicas=2)
    before = snapshot(api)

    @flow
    def dry_then_real():
        steps = Steps(api)
        dry = steps.scale(3, ref=DB, dry_run=True)
        seen = snapshot(api), mutations(api)
        steps.scale(3, ref=DB, dry_run=False)
        api.apps.wait_rolled_out(NS, "db", kind="StatefulSet")
        return dry, seen

    dry, (after_dry, sent_by_dry) = dry_then_real()

    assert after_dry == before and sent_by_dry == [] and dry.planned
    assert mutations(api) == [
        ("PATCH", f"{APPS}/statefulsets/db/scale", STRATEGIC, {"spec": {"replicas": 3}})
    ]
    assert pod_names(api, "db") == {"db-0", "db-1", "db-2"}


def test_scale_outside_the_autoscaler_bounds_is_refused(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=3)
    api.apps.add_hpa(NS, "web", "web", min_replicas=3, max_replicas=6)

    error = flow(lambda: Steps(api).error("scale", 1, dry_run=False))()

    assert isinstance(error, Unsupported) and "set_autoscaler_min" in str(error)
    assert mutations(api) == [] and len(pod_names(api)) == 3


def test_autoscaler_min_raises_the_replicas(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    api.apps.add_hpa(NS, "web", "web", min_replicas=2, max_replicas=6)
    old_pods = pod_names(api)

    @flow
    def raise_min_twice():
        steps = Steps(api)
        result = steps.autoscaler_min(minimum=5, dry_run=False)
        deployment = api.apps.wait_rolled_out(NS, "web")
        return result, deployment, steps.autoscaler_min(minimum=5, dry_run=False), steps.status()

    result, deployment, again, status = raise_min_twice()

    assert mutations(api) == [("PATCH", f"{HPAS}/web", STRATEGIC, {"spec": {"minReplicas": 5}})]
    assert result.applied[0].target == f"HorizontalPodAutoscaler/{NS}/web"
    assert result.applied[0].detail["min_replicas"] == 5 and not again.planned
    # the HPA controller raised the Deployment's replicas; the ReplicaSet added pods
    assert deployment["spec"]["replicas"] == 5
    assert len(pod_names(api)) == 5 and old_pods < pod_names(api)
    assert (status.autoscaler.min_replicas, status.autoscaler.desired_replicas) == (5, 5)
    assert len(status.running) == 5
    rescales = [e for e in api.events(NS) if e["reason"] == "SuccessfulRescale"]
    assert [e["message"] for e in rescales] == [
        "New size: 5; reason: Current number of replicas below Spec.MinReplicas"
    ]


def test_autoscaler_min_above_its_max_or_without_one_is_refused(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    api.apps.add_deployment(NS, "cart", replicas=1)
    api.apps.add_hpa(NS, "web", "web", min_replicas=2, max_replicas=6)

    @flow
    def refused():
        steps = Steps(api)
        return (steps.error("autoscaler_min", minimum=7, dry_run=False),
                steps.error("autoscaler_min", ref=WorkloadRef(name="cart"), minimum=2,
                            dry_run=False))

    above, none = refused()

    assert isinstance(above, Unsupported) and "for a human to decide" in str(above)
    assert isinstance(none, Unsupported) and "no HorizontalPodAutoscaler" in str(none)
    assert mutations(api) == []
    assert api.apps.get("HorizontalPodAutoscaler", NS, "web")["spec"]["maxReplicas"] == 6


def test_memory_limit_rolls_out_a_new_revision(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2, memory_limit="256Mi", memory_request="128Mi")
    old_pods = pod_names(api)

    @flow
    def set_limit_twice():
        steps = Steps(api)
        result = steps.memory_limit(limit_bytes=2**30, dry_run=False)
        api.apps.wait_rolled_out(NS, "web")
        return result, steps.memory_limit(limit_bytes=2**30, dry_run=False), steps.status()

    result, again, status = set_limit_twice()

    assert mutations(api) == [(
        "PATCH", f"{APPS}/deployments/web", STRATEGIC,
        {"spec": {"template": {"spec": {"containers": [
            {"name": "web", "resources": {"limits": {"memory": "1Gi"}}}
        ]}}}},
    )]
    assert result.planned[0].detail == {"from": "256Mi", "to": "1Gi", "request": "128Mi",
                                        "new_request": "128Mi"}
    assert not again.planned and "has limit 1Gi already" in again.notes[0]
    # merged by container name: the cpu limit and the requests are kept
    container = api.apps.get("Deployment", NS, "web")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"limits": {"memory": "1Gi", "cpu": "500m"},
                                      "requests": {"memory": "128Mi", "cpu": "100m"}}
    assert [rs["spec"]["replicas"] for rs in api.apps.replica_sets(NS, "web")] == [0, 2]
    new_pods = api.pods(NS, "app=web")
    assert not {p.name for p in new_pods} & old_pods
    assert all(p.spec["containers"][0]["resources"]["limits"]["memory"] == "1Gi" for p in new_pods)
    assert status.revision == 2 and status.memory_limit_bytes == 2**30
    assert [i.memory_limit_bytes for i in status.instances] == [2**30, 2**30]


def test_memory_limit_below_the_request_lowers_the_request(api: FakeKubernetesApi) -> None:
    api.apps.add_statefulset(NS, "db", replicas=1, memory_limit="1Gi", memory_request="768Mi")

    result = flow(lambda: Steps(api).memory_limit(ref=DB, limit_bytes=512 * 2**20,
                                                  dry_run=False))()

    (patch,) = mutations(api)
    assert patch[3] == {"spec": {"template": {"spec": {"containers": [{"name": "db", "resources": {
        "limits": {"memory": "512Mi"}, "requests": {"memory": "512Mi"}}}]}}}}
    assert "lowered to the new limit" in result.notes[0]
    template = api.apps.get("StatefulSet", NS, "db")["spec"]["template"]
    assert template["spec"]["containers"][0]["resources"]["requests"]["memory"] == "512Mi"


def test_rollback_restores_the_revision_template(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2, image="registry.example/web:1.0",
                            annotations={"kubernetes.io/change-cause": "first"})
    first_rs = api.apps.replica_sets(NS, "web")[0]
    api.apps.roll_out(NS, "web", image="registry.example/web:2.0", change_cause="bad", age_s=60)
    bad_pods = pod_names(api)

    @flow
    def roll_back():
        steps = Steps(api)
        history = steps.history()
        dry = steps.rollback(to_revision=1, dry_run=True)
        sent_by_dry = mutations(api)
        result = steps.rollback(to_revision=1, dry_run=False)
        api.apps.wait_rolled_out(NS, "web")
        again = steps.rollback(to_revision=1, dry_run=False)
        return history, dry, sent_by_dry, result, again, steps.history()

    history, dry, sent_by_dry, result, again, history_after = roll_back()

    assert [(r.revision, r.images, r.current) for r in history] == [
        (1, ["registry.example/web:1.0"], False), (2, ["registry.example/web:2.0"], True)]
    assert sent_by_dry == [] and dry.planned == result.planned
    assert result.planned[0].detail == {"from_revision": 2, "to_revision": 1,
                                        "images": ["registry.example/web:1.0"]}
    # what `kubectl rollout undo` sends: the ReplicaSet's template minus its hash label
    ((method, path, content_type, body),) = mutations(api)
    assert (method, path, content_type) == ("PATCH", f"{APPS}/deployments/web",
                                            "application/json-patch+json")
    template = copy.deepcopy(first_rs["spec"]["template"])
    del template["metadata"]["labels"]["pod-template-hash"]
    assert body[0] == {"op": "replace", "path": "/spec/template", "value": template}
    assert body[1] == {"op": "add", "path": "/metadata/annotations", "value": {
        "deployment.kubernetes.io/revision": "2", "kubernetes.io/change-cause": "first"}}
    # the controller: the first ReplicaSet is the newest revision again, its pods are back
    deployment = api.apps.get("Deployment", NS, "web")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/web:1.0"
    assert deployment["metadata"]["annotations"]["kubernetes.io/change-cause"] == "first"
    replica_sets = {rs["metadata"]["name"]: rs for rs in api.apps.replica_sets(NS, "web")}
    restored = replica_sets[first_rs["metadata"]["name"]]
    assert restored["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    assert restored["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] == "1"
    assert restored["spec"]["replicas"] == 2 and len(replica_sets) == 2
    assert not pod_names(api) & bad_pods
    assert all(p.owner_uid == restored["metadata"]["uid"] for p in api.pods(NS, "app=web"))
    # retried: revision 1 is current (as revision 3), nothing sent again
    assert not again.planned and "current already" in again.notes[0]
    assert [(r.revision, r.current) for r in history_after] == [(2, False), (3, True)]


def test_rollback_to_a_pruned_revision_escalates(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=1)

    error = flow(lambda: Steps(api).error("rollback", to_revision=7, dry_run=False))()

    assert isinstance(error, Escalation) and "no revision 7 (it keeps 1)" in str(error)
    assert mutations(api) == []


def test_statefulset_rollback_applies_its_controller_revision(api: FakeKubernetesApi) -> None:
    api.apps.add_statefulset(NS, "db", replicas=2, image="registry.example/db:1.0")
    api.apps.roll_out(NS, "db", kind="StatefulSet", image="registry.example/db:2.0", age_s=60)
    first, _ = api.apps.controller_revisions(NS, "db")
    assert [p.spec["containers"][0]["image"] for p in api.pods(NS, "app=db")] == [
        "registry.example/db:2.0"] * 2

    @flow
    def roll_back():
        steps = Steps(api)
        result = steps.rollback(ref=DB, to_revision=1, dry_run=False)
        api.apps.wait_rolled_out(NS, "db", kind="StatefulSet")
        return result, steps.history(ref=DB)

    result, history = roll_back()

    # what kubectl sends: the revision's data, a strategic merge patch replacing the template
    assert mutations(api) == [("PATCH", f"{APPS}/statefulsets/db", STRATEGIC, first["data"])]
    assert first["data"]["spec"]["template"]["$patch"] == "replace"
    assert result.applied[0].detail["images"] == ["registry.example/db:1.0"]
    pods = api.pods(NS, "app=db")
    assert [p.spec["containers"][0]["image"] for p in pods] == ["registry.example/db:1.0"] * 2
    assert [(r.revision, r.images, r.current) for r in history] == [
        (2, ["registry.example/db:2.0"], False), (3, ["registry.example/db:1.0"], True)]


def test_oom_killed_pods_are_detected(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=3, memory_limit="256Mi")
    victim, *others = sorted(pod_names(api))
    api.oom_kill(NS, victim, crash_loop=True)

    status = flow(lambda: Steps(api).status())()

    (oom,) = status.oom_killed
    assert (oom.name, oom.exit_code, oom.restarts, oom.state, oom.running) == (
        victim, 137, 1, "CrashLoopBackOff", False)
    assert oom.memory_limit_bytes == 256 * 2**20 and oom.finished_at is not None
    assert sorted(i.name for i in status.running) == others


def test_events_and_logs_of_the_workload(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    api.apps.add_deployment(NS, "cart", replicas=1)
    since = datetime.now(UTC) - timedelta(seconds=5)
    victim, healthy = sorted(pod_names(api))
    old = {"kind": "Pod", "namespace": NS, "name": victim, "uid": "x", "apiVersion": "v1"}
    api.emit_event(old, "Unhealthy", "long ago", at=since - timedelta(hours=1))
    api.write_log(NS, victim, [f"line {n}" for n in range(10)])
    api.oom_kill(NS, victim)
    api.write_log(NS, victim, ["restarted"])
    api.write_log(NS, healthy, ["a", "b", "c"])
    api.oom_kill(NS, next(iter(pod_names(api, "cart"))))
    replica_set = api.apps.replica_sets(NS, "web")[0]["metadata"]["name"]

    @flow
    def look():
        steps = Steps(api)
        return steps.events(since=since), steps.logs(lines=3)

    events, logs = look()

    assert [(e.reason, e.instance) for e in events] == [("BackOff", victim), ("OOMKilled", victim)]
    assert "Back-off restarting failed container web" in events[0].message
    assert events[1].message == "container web terminated with exit code 137"
    assert [c.query["fieldSelector"][0] for c in api.calls if c.path.endswith("/events")] == [
        "involvedObject.kind=Deployment,involvedObject.name=web",
        f"involvedObject.kind=ReplicaSet,involvedObject.name={replica_set}",
        f"involvedObject.kind=Pod,involvedObject.name={victim}",
        f"involvedObject.kind=Pod,involvedObject.name={healthy}",
    ]
    assert logs == {
        victim: "restarted\n",
        f"{victim} (previous)": "line 7\nline 8\nline 9\n",
        healthy: "a\nb\nc\n",
    }
    log_calls = [(c.path, c.query) for c in api.calls if c.path.endswith("/log")]
    assert log_calls[:2] == [
        (f"/api/v1/namespaces/{NS}/pods/{victim}/log", {"container": ["web"], "tailLines": ["3"]}),
        (f"/api/v1/namespaces/{NS}/pods/{victim}/log",
         {"container": ["web"], "previous": ["true"], "tailLines": ["3"]}),
    ]


def test_backend_from_a_saved_block(api: FakeKubernetesApi) -> None:
    api.apps.add_deployment(NS, "web", replicas=1)
    name = unique("k8s")
    cluster_for(api).save(name, overwrite=True)

    status = flow(lambda: workload_status(load_backend(f"kubernetes/{name}"), WEB))()

    assert status.platform == "kubernetes" and len(status.instances) == 1
    assert api.token not in status.model_dump_json()
