"""The service runbooks end to end on Kubernetes: the HTTP fake of the API server and its
controllers (tests/fakes: no API server runs here), through the official client, with the exact
requests asserted and what the cluster holds afterwards (issue #12)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from blocks.kafka import KafkaCluster
from blocks.kubernetes import KubernetesCluster
from flows.services.consumers_too_slow import (
    ConsumersTooSlowParams,
    ScaleAction,
    consumers_too_slow,
)
from flows.services.rollback_bad_deploy import (
    RollbackAction,
    RollbackBadDeployParams,
    rollback_bad_deploy,
)
from flows.services.service_high_memory import (
    Relief,
    ServiceHighMemoryParams,
    service_high_memory,
)
from flows.services.service_not_responding import (
    ServiceNotRespondingParams,
    Verdict,
    service_not_responding,
)
from flows.services.service_oom import OomAction, ServiceOomParams, service_oom
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kubernetes_apps_decisions import RESTARTED_AT
from tests.approvals import Approver
from tests.conftest import read_incident_report, slow_consumer_group, unique
from tests.fakes.kubernetes_api import FakeKubernetesApi
from tests.servers import KafkaBroker, free_port

pytestmark = pytest.mark.integration

NS = "shop"
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NS}/deployments/web"
MUTATING = ("PATCH", "POST", "PUT", "DELETE")
QUIET = SafetyParams(escalation_block=None)
MIB = 2**20


@pytest.fixture
def api() -> Iterator[FakeKubernetesApi]:
    with FakeKubernetesApi.running(recreated_ready_after_s=0.1) as server:
        yield server


@pytest.fixture
def platform(api: FakeKubernetesApi) -> str:
    name = unique("k8s")
    KubernetesCluster(
        kubeconfig=yaml.safe_dump(api.kubeconfig("default")), namespace=NS, request_timeout_s=3
    ).save(name, overwrite=True)
    return f"kubernetes/{name}"


def mutations(api: FakeKubernetesApi) -> list[tuple[str, str, str | None, Any]]:
    return [(c.method, c.path, c.content_type, c.body) for c in api.calls if c.method in MUTATING]


def web_pods(api: FakeKubernetesApi) -> dict[str, Any]:
    return {p.name: p for p in api.pods(NS, "app=web") if p.deleted_at is None}


def template(api: FakeKubernetesApi) -> dict[str, Any]:
    deployment = api.apps.get("Deployment", NS, "web")
    assert deployment is not None
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_crash_looping_deployment_is_rolled_and_ready(
    api: FakeKubernetesApi, platform: str
) -> None:
    api.apps.add_deployment(NS, "web", replicas=2)
    before = web_pods(api)
    api.crash_loop(NS, sorted(before)[0])
    params = ServiceNotRespondingParams(
        platform=platform,
        service="web",
        namespace=NS,
        ready_timeout_s=20,
        poll_interval_s=0.3,
        log_lines=5,
        safety=QUIET,
    )

    dry = service_not_responding(params.model_copy(update={"dry_run": True}))
    assert dry.outcome is Outcome.PLANNED, dry.report
    assert mutations(api) == [], "a dry run sends no change"

    result = service_not_responding(params)
    assert result.outcome is Outcome.RESOLVED, result.report
    assert result.diagnosis is not None and result.diagnosis.verdict is Verdict.RESTART
    (patch,) = mutations(api)
    method, path, content_type, body = patch
    assert (method, path, content_type) == (
        "PATCH",
        DEPLOYMENT,
        "application/strategic-merge-patch+json",
    )
    assert RESTARTED_AT in body["spec"]["template"]["metadata"]["annotations"]
    after = web_pods(api)
    assert len(after) == 2 and not set(after) & set(before), "every pod replaced"
    assert all(p.ready for p in after.values())


def test_oom_killed_deployment_gets_a_bigger_limit_after_approval(
    api: FakeKubernetesApi, platform: str
) -> None:
    api.apps.add_deployment(NS, "web", replicas=2, memory_limit="256Mi", memory_request="128Mi")
    api.oom_kill(NS, sorted(web_pods(api))[0], crash_loop=True)
    approver = Approver(
        "service-oom", {"approve": True, "approver": "alice", "reason": "leak known"}
    )
    approver.start()
    result = service_oom(
        ServiceOomParams(
            platform=platform,
            service="web",
            namespace=NS,
            memory_factor=2,
            memory_cap="1Gi",
            verify_window_s=2,
            poll_interval_s=0.5,
            safety=QUIET,
        )
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert result.outcome is Outcome.RESOLVED, result.report
    assert result.plan is not None and result.plan.action is OomAction.RAISE_LIMIT
    assert result.plan.new_limit_bytes == 512 * MIB
    assert template(api)["resources"]["limits"]["memory"] in ("512Mi", str(512 * MIB))
    assert [
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
        for rs in api.apps.replica_sets(NS, "web")
    ] == ["1", "2"]
    assert "256Mi" in (approver.description or "") and "512Mi" in (approver.description or "")
    assert "Write the new limit 512Mi into the service's definition" in result.report


def test_oom_path_of_not_responding_rejected_changes_nothing(
    api: FakeKubernetesApi, platform: str
) -> None:
    api.apps.add_deployment(NS, "web", replicas=1, memory_limit="256Mi")
    api.oom_kill(NS, sorted(web_pods(api))[0], crash_loop=True)
    approver = Approver(
        "service-not-responding",
        {"approve": False, "approver": "bob", "reason": "deploy fix instead"},
    )
    approver.start()
    state = service_not_responding(
        ServiceNotRespondingParams(platform=platform, service="web", namespace=NS, safety=QUIET),
        return_state=True,
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "killed for memory" in report and "rejected" in report.lower()
    assert mutations(api) == [] and template(api)["resources"]["limits"]["memory"] == "256Mi"


def test_recent_bad_rollout_is_rolled_back_after_approval(
    api: FakeKubernetesApi, platform: str
) -> None:
    api.apps.add_deployment(NS, "web", replicas=2, image="registry.example/web:1.0", age_s=7200)
    api.apps.roll_out(NS, "web", image="registry.example/web:2.0", age_s=300)
    for name in web_pods(api):
        api.crash_loop(NS, name)
    approver = Approver(
        "rollback-bad-deploy", {"approve": True, "approver": "alice", "reason": "2.0 crashes"}
    )
    approver.start()
    result = rollback_bad_deploy(
        RollbackBadDeployParams(
            platform=platform,
            service="web",
            namespace=NS,
            ready_timeout_s=20,
            poll_interval_s=0.3,
            safety=QUIET,
        )
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert result.outcome is Outcome.RESOLVED, result.report
    assert result.plan is not None and (result.plan.current, result.plan.to_revision) == (2, 1)
    assert template(api)["image"] == "registry.example/web:1.0"
    (patch,) = mutations(api)
    assert (patch[0], patch[1], patch[2]) == ("PATCH", DEPLOYMENT, "application/json-patch+json")
    assert all(p.ready for p in web_pods(api).values())
    assert "web:2.0" in (approver.description or "") and "web:1.0" in (approver.description or "")


def test_old_rollout_is_not_blamed(api: FakeKubernetesApi, platform: str) -> None:
    api.apps.add_deployment(NS, "web", replicas=1, age_s=20000)
    api.apps.roll_out(NS, "web", image="registry.example/web:2.0", age_s=10000)
    api.crash_loop(NS, next(iter(web_pods(api))))
    state = rollback_bad_deploy(
        RollbackBadDeployParams(platform=platform, service="web", namespace=NS, safety=QUIET),
        return_state=True,
    )
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert RollbackAction.NOT_RECENT.value in report and "no recent change to blame" in report
    assert mutations(api) == []


@pytest.fixture
def pprof() -> Iterator[str]:
    """A Go service's pprof heap endpoint (the text form ?debug=1 returns)."""
    profile = b"heap profile: 3: 251658240 [90: 4194304] @ heap/1048576\n3: 251658240 [90: 4194304] @ 0x1\n"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/debug/pprof/heap?debug=1" else 404)
            self.end_headers()
            self.wfile.write(profile)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/debug/pprof/heap"
    server.shutdown()
    server.server_close()


def test_high_memory_keeps_the_heap_profile_then_restarts(
    api: FakeKubernetesApi, platform: str, pprof: str
) -> None:
    api.apps.add_deployment(NS, "web", replicas=2, memory_limit="256Mi")
    full, calm = sorted(web_pods(api))
    api.set_memory_usage(NS, full, 250 * MIB)
    api.set_memory_usage(NS, calm, 60 * MIB)
    result = service_high_memory(
        ServiceHighMemoryParams(
            platform=platform,
            service="web",
            namespace=NS,
            pprof_url=pprof,
            settle_timeout_s=20,
            poll_interval_s=0.3,
            safety=QUIET,
        )
    )
    assert result.outcome is Outcome.RESOLVED, result.report
    assert (
        result.plan is not None
        and result.plan.action is Relief.RESTART
        and result.plan.over == [full]
    )
    (profile,) = result.profiles
    assert (
        profile.in_use_bytes == 251658240
        and profile.text
        and profile.text.startswith("heap profile")
    )
    (patch,) = mutations(api)
    assert RESTARTED_AT in patch[3]["spec"]["template"]["metadata"]["annotations"]
    assert "250Mi of 256Mi (98%)" in result.report


@pytest.fixture
def slow_group(kafka_broker: KafkaBroker) -> Iterator[tuple[str, str]]:
    group = unique("slow")
    # a member that never commits: the lag only grows, whatever the timing of the samples
    with slow_consumer_group(kafka_broker.bootstrap, group, commits=False):
        kafka = unique("kafka")
        KafkaCluster(bootstrap_servers=kafka_broker.bootstrap, request_timeout_s=5).save(
            kafka, overwrite=True
        )
        yield kafka, group


def test_slow_consumers_raise_the_autoscaler_minimum(
    api: FakeKubernetesApi, platform: str, slow_group: tuple[str, str]
) -> None:
    kafka, group = slow_group
    api.apps.add_deployment(NS, "web", replicas=1)
    api.apps.add_hpa(NS, "web", "web", min_replicas=1, max_replicas=8)
    state = consumers_too_slow(
        ConsumersTooSlowParams(
            platform=platform,
            service="web",
            namespace=NS,
            kafka_block=kafka,
            group=group,
            lag_threshold=0,
            sample_interval_s=2,
            verify_window_s=3,
            safety=QUIET,
        ),
        return_state=True,
    )
    (patch,) = mutations(api)
    assert (patch[0], patch[1]) == (
        "PATCH",
        f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/web",
    )
    assert patch[3] == {"spec": {"minReplicas": 2}}
    deployment = api.apps.get("Deployment", NS, "web")
    assert deployment is not None and deployment["spec"]["replicas"] == 2, (
        "the HPA raised the replicas"
    )
    # the fake's pods consume nothing and the group's member commits nothing while the producer
    # writes: the lag cannot fall, so the run must say so (that it falls after scaling is shown
    # on supervisord)
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert ScaleAction.RAISE_AUTOSCALER_MIN.value in report
    assert f"group {group}'s lag did not fall" in report
