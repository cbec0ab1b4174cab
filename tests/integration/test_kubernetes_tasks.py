"""Kubernetes tasks through the real `kubernetes` client against the fake API server.

Each test asserts what the API server received (method, path, query, body) and the pods it
holds afterwards, not only what a task returned.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import urllib3
import yaml
from kubernetes.client import ApiException
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

from blocks.kubernetes import KubernetesCluster
from runbooks.errors import Escalation
from tasks.kubernetes import (
    PodRestart,
    is_transient_api_error,
    list_pods,
    restart_pod,
    wait_pods_ready,
)
from tests.conftest import unique
from tests.fakes.kubernetes_api import FakeKubernetesApi

pytestmark = pytest.mark.integration

NS = "kafka"
POD_PATH = f"/api/v1/namespaces/{NS}/pods"


@pytest.fixture
def api() -> Iterator[FakeKubernetesApi]:
    with FakeKubernetesApi.running() as server:
        yield server


def cluster_for(api: FakeKubernetesApi, token: str | None = None) -> KubernetesCluster:
    kubeconfig = yaml.safe_dump(api.kubeconfig(NS, token=token))
    return KubernetesCluster(kubeconfig=kubeconfig, namespace=NS, request_timeout_s=2)


@flow
def run_restart(cluster: KubernetesCluster, name: str, uid: str, dry_run: bool = False,
                min_age_s: float = 0.0) -> PodRestart:
    return restart_pod(cluster, NS, name, uid=uid, min_age_s=min_age_s, dry_run=dry_run)


@flow
def run_list(cluster: KubernetesCluster, selector: str = "app=kafka"):
    return list_pods(cluster, NS, selector)


def test_list_pods_reads_states_of_selected_pods(api: FakeKubernetesApi) -> None:
    api.add_pod(NS, "kafka-0")
    api.add_pod(NS, "kafka-1", ready=False, waiting_reason="CrashLoopBackOff", restarts=12)
    api.add_pod(NS, "zookeeper-0", labels={"app": "zookeeper"})
    api.add_pod("other", "kafka-9")

    pods = run_list(cluster_for(api))

    assert [(p.name, p.ready, p.up, p.reason, p.restarts, p.owner) for p in pods] == [
        ("kafka-0", True, True, None, 0, "StatefulSet/kafka"),
        ("kafka-1", False, False, "CrashLoopBackOff", 12, "StatefulSet/kafka"),
    ]
    assert pods[1].uid == api.pod(NS, "kafka-1").uid
    (call,) = api.calls
    assert (call.method, call.path, call.query) == ("GET", POD_PATH, {"labelSelector": ["app=kafka"]})


def test_list_pods_is_never_answered_from_cache(api: FakeKubernetesApi) -> None:
    api.add_pod(NS, "kafka-0", ready=False, waiting_reason="CrashLoopBackOff")
    cluster = cluster_for(api)

    @flow
    def look_twice():
        before = list_pods(cluster, NS, "app=kafka")
        api.mark_ready(NS, "kafka-0")
        return before, list_pods(cluster, NS, "app=kafka")

    # with results persisted, Prefect's default cache policy would replay the first answer
    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        before, after = look_twice()

    assert (before[0].ready, after[0].ready) == (False, True)
    assert len(api.calls_of("GET")) == 2


def test_restart_deletes_exactly_that_pod_once(api: FakeKubernetesApi) -> None:
    old = api.add_pod(NS, "kafka-1", ready=False, waiting_reason="CrashLoopBackOff")
    deleted = []
    api.on_delete = deleted.append
    cluster = cluster_for(api)

    first = run_restart(cluster, "kafka-1", old.uid)
    again = run_restart(cluster, "kafka-1", old.uid)

    assert not first.dry_run
    (planned,), (applied,) = first.planned, first.applied
    assert (applied.action, applied.target) == (planned.action, planned.target)
    assert planned.detail["uid"] == old.uid and planned.detail["reason"] == "CrashLoopBackOff"
    # "after" is the pod the API shows once deleted: the StatefulSet's replacement, starting
    replacement = api.pod(NS, "kafka-1")
    assert applied.detail["uid"] == replacement.uid != old.uid
    assert applied.detail["restarts"] == 0 and applied.detail["reason"] != "CrashLoopBackOff"
    (delete,) = api.calls_of("DELETE")
    assert delete.path == f"{POD_PATH}/kafka-1"
    assert delete.body["preconditions"] == {"uid": old.uid}
    assert [p.uid for p in deleted] == [old.uid]
    # the StatefulSet recreated it: same name, new uid
    assert api.pod(NS, "kafka-1").uid != old.uid
    # re-running with the same decision does not delete the replacement
    assert not again.planned and "already replaced" in again.notes[0]


def test_dry_run_plans_without_deleting(api: FakeKubernetesApi) -> None:
    old = api.add_pod(NS, "kafka-1", ready=False, waiting_reason="CrashLoopBackOff")

    result = run_restart(cluster_for(api), "kafka-1", old.uid, dry_run=True)

    assert result.dry_run and [c.target for c in result.planned] == [f"{NS}/kafka-1"]
    assert result.applied == []
    assert api.calls_of("DELETE") == []
    assert api.pod(NS, "kafka-1").uid == old.uid


def test_young_pod_is_left_to_start(api: FakeKubernetesApi) -> None:
    young = api.add_pod(NS, "kafka-1", ready=False, age_s=20)

    result = run_restart(cluster_for(api), "kafka-1", young.uid, min_age_s=300)

    assert not result.planned and "still starting or just restarted" in result.notes[0]
    assert api.calls_of("DELETE") == []


def test_terminating_pod_is_not_deleted_again(api: FakeKubernetesApi) -> None:
    api.termination_grace_s = 30
    pod = api.add_pod(NS, "kafka-1", ready=False)
    cluster = cluster_for(api)
    first = run_restart(cluster, "kafka-1", pod.uid)
    # within its grace period the deleted pod lingers: "after" shows it terminating
    assert first.planned[0].detail["terminating"] is False
    assert first.applied[0].detail == first.planned[0].detail | {"terminating": True}

    again = run_restart(cluster, "kafka-1", pod.uid)

    assert "already terminating" in again.notes[0]
    assert len(api.calls_of("DELETE")) == 1


def test_bare_pod_is_escalated_not_deleted(api: FakeKubernetesApi) -> None:
    pod = api.add_pod(NS, "kafka-1", ready=False, owner=None)

    state = run_restart(cluster_for(api), "kafka-1", pod.uid, return_state=True)

    assert state.is_failed()
    with pytest.raises(Escalation, match="no controller"):
        state.result()
    assert api.calls_of("DELETE") == []


def test_delete_race_lost_to_someone_else_is_not_an_error(api: FakeKubernetesApi) -> None:
    pod = api.add_pod(NS, "kafka-1", ready=False)
    # what the API answers when the uid precondition no longer holds
    api.fail_next("DELETE", 409)

    result = run_restart(cluster_for(api), "kafka-1", pod.uid)

    assert result.planned and not result.applied
    assert "deleted meanwhile (HTTP 409)" in result.notes[0]
    assert len(api.calls_of("DELETE")) == 1


def test_server_error_is_retried(api: FakeKubernetesApi) -> None:
    api.add_pod(NS, "kafka-0")
    api.fail_next("GET", 503)

    pods = run_list(cluster_for(api))

    assert [p.name for p in pods] == ["kafka-0"]
    assert len(api.calls_of("GET")) == 2


@pytest.mark.parametrize("status", [403, 404])
def test_client_error_is_not_retried(api: FakeKubernetesApi, status: int) -> None:
    api.fail_next("GET", status)

    state = run_list(cluster_for(api), return_state=True)

    assert state.is_failed()
    with pytest.raises(ApiException) as err:
        state.result()
    assert err.value.status == status
    assert len(api.calls_of("GET")) == 1


def test_wrong_token_is_rejected_and_not_retried(api: FakeKubernetesApi) -> None:
    state = run_list(cluster_for(api, token="stolen"), return_state=True)

    assert state.is_failed()
    assert len(api.calls) == 1


def test_unreachable_api_server_is_retried_then_fails() -> None:
    with FakeKubernetesApi.running() as gone:
        cluster = cluster_for(gone)

    @flow
    def attempt():
        # the task's own retry policy, minus the backoff waits
        state = list_pods.with_options(retry_delay_seconds=0)(cluster, NS, "app=kafka", return_state=True)
        return state.state_details.task_run_id, state.result(raise_on_failure=False)

    task_run_id, error = attempt()

    assert isinstance(error, urllib3.exceptions.HTTPError)
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(task_run_id)
    assert task_run.state.is_failed() and task_run.run_count == 4


def test_wait_sees_through_termination_and_recreation(api: FakeKubernetesApi) -> None:
    api.termination_grace_s = 1.5
    api.recreated_ready_after_s = 0.5
    api.add_pod(NS, "kafka-0")
    pod = api.add_pod(NS, "kafka-1", ready=True)
    cluster = cluster_for(api)

    @flow
    def restart_and_wait():
        restart_pod(cluster, NS, "kafka-1", uid=pod.uid, dry_run=False)
        return wait_pods_ready(cluster, NS, ["kafka-0", "kafka-1"], timeout_s=5, interval_s=0.1)

    result = restart_and_wait()

    # the old pod kept reporting Ready while terminating: that must not end the wait
    assert result.ready and result.waited_s >= 1.5
    recreated = next(p for p in result.pods if p.name == "kafka-1")
    assert recreated.uid != pod.uid == api.calls_of("DELETE")[0].body["preconditions"]["uid"]
    assert {c.path for c in api.calls_of("GET")} >= {f"{POD_PATH}/kafka-0", f"{POD_PATH}/kafka-1"}


def test_wait_gives_up_at_its_deadline(api: FakeKubernetesApi) -> None:
    api.recreated_ready_after_s = None
    pod = api.add_pod(NS, "kafka-1")
    cluster = cluster_for(api)
    run_restart(cluster, "kafka-1", pod.uid)
    api.fail_next("GET", 500)

    @flow
    def wait():
        return wait_pods_ready(cluster, NS, ["kafka-1"], timeout_s=1.0, interval_s=0.2)

    result = wait()

    # gives up at its 1 s deadline (its last poll comes before it), measured by the task itself (the flow around it takes longer
    # on a loaded machine); at most one more poll (2 s request timeout) may overshoot it
    assert not result.ready and 0.5 <= result.waited_s < 10, result.waited_s
    assert result.pods[0].reason == "ContainerCreating" and not result.pods[0].ready
    assert result.last_error and "500" in result.last_error


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        pytest.param(ApiException(status=500), True, id="500"),
        pytest.param(ApiException(status=502), True, id="502"),
        pytest.param(ApiException(status=503), True, id="503"),
        pytest.param(ApiException(status=504), True, id="504"),
        pytest.param(ApiException(status=429), True, id="429-throttled"),
        pytest.param(ApiException(status=400), False, id="400"),
        pytest.param(ApiException(status=401), False, id="401"),
        pytest.param(ApiException(status=403), False, id="403"),
        pytest.param(ApiException(status=404), False, id="404"),
        pytest.param(ApiException(status=409), False, id="409"),
        pytest.param(ApiException(status=422), False, id="422"),
        pytest.param(ApiException(status=0, reason="SSLError"), False, id="tls-error"),
        pytest.param(urllib3.exceptions.NewConnectionError(None, "refused"), True, id="connection-refused"),
        pytest.param(urllib3.exceptions.ReadTimeoutError(None, "/", "timed out"), True, id="read-timeout"),
        pytest.param(urllib3.exceptions.ProtocolError("reset"), True, id="connection-reset"),
        pytest.param(ValueError("bad"), False, id="other-error"),
    ],
)
def test_transient_errors(exc: BaseException, transient: bool) -> None:
    assert is_transient_api_error(exc) is transient


def test_block_keeps_kubeconfig_secret(api: FakeKubernetesApi) -> None:
    name = unique("k8s")
    cluster_for(api).save(name, overwrite=True)

    loaded = KubernetesCluster.load(name)

    assert api.token not in repr(loaded) and api.token not in str(loaded.model_dump())
    assert [p.name for p in run_list(loaded)] == []
    assert api.calls[0].method == "GET"


@pytest.mark.parametrize("kwargs", [{}, {"kubeconfig": "{}", "in_cluster": True}])
def test_block_needs_exactly_one_way_to_connect(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KubernetesCluster(**kwargs)
