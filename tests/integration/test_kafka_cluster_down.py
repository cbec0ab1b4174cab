"""The kafka-cluster-down runbook end to end: a real broker (tansu) plus the fake Kubernetes API.

How the cluster is modelled: tansu is a single broker (clustering needs its postgres storage,
which this build lacks), so a real broker cannot be "one of three". The Kafka half of each
test cluster is the one real broker, and the block expects exactly that (expected_brokers=1).
The other broker pods exist only in the fake Kubernetes API, and a down broker is modelled by
its pod state (CrashLoopBackOff). What the runbook decides comes from both sides, and its
verification checks both: the recreated pod must turn Ready in the fake API and the real
broker must answer with every partition in sync. Pausing the broker (SIGSTOP) would make the
whole cluster unreachable, which is a cluster-wide outage, so it stands for exactly that here,
and for a cluster that dies during the restart. Under-replicated and offline partitions cannot
be produced by one broker: tests/unit/test_kafka_health_decisions.py covers them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import yaml
from confluent_kafka.admin import AdminClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

from blocks.kafka import KafkaCluster
from blocks.kubernetes import KubernetesCluster
from flows.kafka.kafka_cluster_down import KafkaClusterDownParams, kafka_cluster_down
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kafka import check_isr
from tests.approvals import Approver
from tests.conftest import create_topic, unique
from tests.fakes.kubernetes_api import FakeKubernetesApi
from tests.servers import KafkaBroker

pytestmark = pytest.mark.integration

NS = "kafka"
PODS = f"/api/v1/namespaces/{NS}/pods"


@pytest.fixture
def api() -> Iterator[FakeKubernetesApi]:
    with FakeKubernetesApi.running(recreated_ready_after_s=0.3) as server:
        yield server


def broker_id(broker: KafkaBroker) -> int:
    """The real broker's id: its pod is named after it."""
    (only,) = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).brokers
    return only


def save_blocks(
    broker: KafkaBroker,
    api: FakeKubernetesApi | None,
    expected_brokers: int = 1,
    bootstrap: str | None = None,
) -> tuple[str, str | None]:
    kafka = unique("kafka")
    KafkaCluster(
        bootstrap_servers=bootstrap or broker.bootstrap,
        request_timeout_s=1,
        expected_brokers=expected_brokers,
    ).save(kafka, overwrite=True)
    if api is None:
        return kafka, None
    k8s = unique("k8s")
    KubernetesCluster(
        kubeconfig=yaml.safe_dump(api.kubeconfig(NS)), namespace=NS, request_timeout_s=2
    ).save(k8s, overwrite=True)
    return kafka, k8s


def params(blocks: tuple[str, str | None], **overrides) -> KafkaClusterDownParams:
    kafka, k8s = blocks
    short = {
        "isr_catchup_deadline_s": 10,
        "poll_interval_s": 0.2,
        # the tests share one broker, so one cluster target: the budget has its own test
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return KafkaClusterDownParams(kafka_block=kafka, kubernetes_block=k8s, **{**short, **overrides})


def report_of(state) -> str:
    """The incident report artifact the run published, however it ended."""
    # prefect 3.8.8's read_artifacts sends nulls its server rejects, and empty run filters
    # that drop flow-level artifacts, so ask the REST endpoint directly
    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {
                    "flow_run_id": {"any_": [str(state.state_details.flow_run_id)]},
                    "key": {"any_": ["incident-kafka-cluster-down"]},
                },
                # a run that paused for approval published it before pausing, too
                "sort": "CREATED_DESC",
            },
        )
    artifact, *_earlier = response.json()
    return artifact["data"]


def add_broker_pods(
    api: FakeKubernetesApi, first_id: int, *crashing: int, count: int = 3, ns: str = NS
) -> None:
    """Broker pods kafka-<id>; the given ids crash-loop."""
    for broker in range(first_id, first_id + count):
        down = broker in crashing
        api.add_pod(
            ns,
            f"kafka-{broker}",
            ready=not down,
            waiting_reason="CrashLoopBackOff" if down else None,
            restarts=9 if down else 0,
        )


def test_check_isr_reads_the_broker_each_time(own_kafka_broker: KafkaBroker) -> None:
    create_topic(own_kafka_broker.bootstrap, unique("orders"), partitions=3)
    the_broker = broker_id(own_kafka_broker)
    # the same block both times (what is cached is keyed on it); 5 s: a loaded machine once took
    # over 1 s to answer the first check, while the hung broker never answers
    cluster = KafkaCluster(
        bootstrap_servers=own_kafka_broker.bootstrap, request_timeout_s=5, expected_brokers=1
    )

    @flow
    def check_before_and_after_hang():
        before = check_isr(cluster)
        own_kafka_broker.pause()
        return before, check_isr(cluster)

    # with results persisted, Prefect's default cache policy would replay the first answer
    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        before, after = check_before_and_after_hang()

    assert before.reachable and before.caught_up
    assert before.broker_ids == [the_broker] == [before.controller_id]
    assert (
        before.cluster_id == own_kafka_broker.cluster_id
        and before.topics == 1
        and before.partitions == 3
    )
    assert not after.reachable and not after.caught_up and "transport failure" in after.error
    assert after.missing_brokers == 1


def test_healthy_cluster_needs_nothing(kafka_broker: KafkaBroker, api: FakeKubernetesApi) -> None:
    create_topic(kafka_broker.bootstrap, unique("orders"), partitions=3)
    add_broker_pods(api, broker_id(kafka_broker), count=1)

    state = kafka_cluster_down(params(save_blocks(kafka_broker, api)), return_state=True)

    assert state.is_completed()
    result = state.result()
    assert result.outcome == Outcome.NO_ACTION_NEEDED and result.restarted_pods == []
    assert api.calls_of("DELETE") == []
    assert [(c.method, c.path, c.query) for c in api.calls] == [
        ("GET", PODS, {"labelSelector": ["app=kafka"]})
    ]
    assert "| brokers reachable | OK |" in result.report and "NO ACTION NEEDED" in result.report


def test_one_broker_pod_down_is_restarted_and_verified(
    kafka_broker: KafkaBroker, api: FakeKubernetesApi
) -> None:
    create_topic(kafka_broker.bootstrap, unique("orders"), partitions=3)
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, count=2)
    crashing = f"kafka-{first + 1}"
    old_uid = api.pod(NS, crashing).uid
    blocks = save_blocks(kafka_broker, api)

    state = kafka_cluster_down(params(blocks), return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result.outcome == Outcome.RESOLVED and result.verified
    assert result.restarted_pods == [crashing]
    (delete,) = api.calls_of("DELETE")
    assert delete.path == f"{PODS}/{crashing}" and delete.body["preconditions"] == {"uid": old_uid}
    recreated = api.pod(NS, crashing)
    assert recreated.uid != old_uid and recreated.ready
    # the checks read the real broker: its cluster id and controller are in the report
    assert f"cluster {kafka_broker.cluster_id}, controller {first}" in result.report
    assert "| ISR caught up | OK |" in result.report and "verified" in result.report
    assert f"delete_pod | 1 | {NS}/{crashing} | applied |" in result.report
    assert f"kubectl logs -n {NS} {crashing} --previous" in result.report

    # a re-run finds the cluster healthy and deletes nothing more
    again = kafka_cluster_down(params(blocks), return_state=True)
    assert again.result().outcome == Outcome.NO_ACTION_NEEDED
    assert len(api.calls_of("DELETE")) == 1


def test_dry_run_plans_the_restart_only(kafka_broker: KafkaBroker, api: FakeKubernetesApi) -> None:
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, count=2)
    crashing = f"kafka-{first + 1}"
    old_uid = api.pod(NS, crashing).uid

    state = kafka_cluster_down(
        params(save_blocks(kafka_broker, api), dry_run=True), return_state=True
    )

    assert state.is_completed()
    result = state.result()
    assert result.outcome == Outcome.PLANNED and result.restarted_pods == [] and not result.verified
    assert api.calls_of("DELETE") == []
    assert api.pod(NS, crashing).uid == old_uid
    assert f"delete_pod | 1 | {NS}/{crashing} | planned (dry-run) |" in result.report
    assert "DRY-RUN (nothing changed)" in result.report


@pytest.mark.parametrize(
    ("outage", "pods_ready"),
    [
        pytest.param("stop", False, id="broker-stopped-all-pods-crashlooping"),
        # a hung broker (SIGSTOP) keeps a Ready pod when the readiness probe only opens a socket
        pytest.param("pause", True, id="broker-hung-pods-look-ready"),
    ],
)
def test_cluster_wide_outage_is_escalated_untouched(
    own_kafka_broker: KafkaBroker, api: FakeKubernetesApi, outage: str, pods_ready: bool
) -> None:
    first = broker_id(own_kafka_broker)
    crashing = () if pods_ready else (first, first + 1, first + 2)
    add_broker_pods(api, first, *crashing)
    blocks = save_blocks(own_kafka_broker, api)
    getattr(own_kafka_broker, outage)()

    state = kafka_cluster_down(params(blocks), return_state=True)

    assert state.is_failed()
    assert "cluster-wide outage" in state.message
    assert "escalate to the infrastructure team" in state.message
    assert api.calls_of("DELETE") == []
    report = report_of(state)
    assert "**ESCALATED**" in report and "| brokers reachable | FAILING |" in report


def test_restarted_pod_never_ready_fails_verification(
    kafka_broker: KafkaBroker, api: FakeKubernetesApi
) -> None:
    api.recreated_ready_after_s = None
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, count=2)
    crashing = f"kafka-{first + 1}"

    state = kafka_cluster_down(
        params(save_blocks(kafka_broker, api), isr_catchup_deadline_s=1.5), return_state=True
    )

    assert state.is_failed()
    assert f"{crashing} not Ready" in state.message and "ContainerCreating" in state.message
    assert len(api.calls_of("DELETE")) == 1
    report = report_of(state)
    assert "Verification failed" in report and "| restarted pods ready | FAILING |" in report


def test_ready_pods_are_not_enough_kafka_must_answer(
    own_kafka_broker: KafkaBroker, api: FakeKubernetesApi
) -> None:
    first = broker_id(own_kafka_broker)
    add_broker_pods(api, first, first + 1, count=2)
    # the restart goes wrong: the serving broker hangs just as the other pod is deleted
    api.on_delete = lambda pod: own_kafka_broker.pause()

    state = kafka_cluster_down(
        params(save_blocks(own_kafka_broker, api), isr_catchup_deadline_s=2.5), return_state=True
    )

    assert state.is_failed()
    assert "Kafka not healthy" in state.message and "no bootstrap server answered" in state.message
    assert len(api.calls_of("DELETE")) == 1
    report = report_of(state)
    assert "| restarted pods ready | OK |" in report and "| ISR caught up | FAILING |" in report


def test_more_pods_down_than_allowed_is_escalated(
    kafka_broker: KafkaBroker, api: FakeKubernetesApi
) -> None:
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, first + 2)

    state = kafka_cluster_down(params(save_blocks(kafka_broker, api)), return_state=True)

    assert state.is_failed()
    assert f"2 broker pods down at once (kafka-{first + 1}, kafka-{first + 2})" in state.message
    assert api.calls_of("DELETE") == []


@pytest.mark.parametrize("approve", [False, True], ids=["rejected", "approved"])
def test_restarting_several_pods_needs_approval(
    kafka_broker: KafkaBroker, api: FakeKubernetesApi, approve: bool
) -> None:
    create_topic(kafka_broker.bootstrap, unique("orders"), partitions=3)
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, first + 2)
    down = [f"kafka-{first + 1}", f"kafka-{first + 2}"]
    uids = {name: api.pod(NS, name).uid for name in down}
    answer = {"approve": approve, "approver": "alice", "reason": "both nodes were drained"}
    approver = Approver("kafka-cluster-down", answer)
    approver.start()

    state = kafka_cluster_down(
        params(save_blocks(kafka_broker, api), max_pod_restarts=2), return_state=True
    )

    approver.join(5)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert "restarts 2 broker pods at once" in approver.description
    assert all(f"{NS}/{name}" in approver.description for name in down)
    report = report_of(state)
    if not approve:
        assert state.is_failed()
        assert "rejected by alice: both nodes were drained" in state.message
        # nothing was touched: no DELETE reached the API, the same pods are still there
        assert api.calls_of("DELETE") == []
        assert {name: api.pod(NS, name).uid for name in down} == uids
        assert "**ESCALATED**" in report and "| rejected | alice |" in report
        return
    assert state.is_completed(), state.message
    result = state.result()
    assert result.outcome == Outcome.RESOLVED and sorted(result.restarted_pods) == down
    assert sorted(c.path for c in api.calls_of("DELETE")) == [f"{PODS}/{name}" for name in down]
    assert all(api.pod(NS, name).uid != uids[name] and api.pod(NS, name).ready for name in down)
    assert "| approved | alice |" in report


def test_one_cluster_by_two_host_names_has_one_lock(
    kafka_broker: KafkaBroker, api: FakeKubernetesApi
) -> None:
    """Issue #9 defect 4: the lock is the cluster's (its id), not its bootstrap text's."""
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, first + 2)
    by_address = save_blocks(kafka_broker, api, bootstrap=f"127.0.0.1:{kafka_broker.port}")
    by_name = save_blocks(kafka_broker, api, bootstrap=f"localhost:{kafka_broker.port}")
    approver = Approver("kafka-cluster-down", None)
    approver.start()
    holding: list = []
    holder = threading.Thread(
        target=lambda: holding.append(
            kafka_cluster_down(params(by_address, max_pod_restarts=2), return_state=True)
        ),
        daemon=True,
    )
    holder.start()
    assert approver.seen_paused.wait(60), approver.error

    # short approval timeout: without a shared lock this run would also pause for approval
    skip = SafetyParams(on_busy_target="skip", approval_timeout_s=3, budget_max_actions=1000)
    state = kafka_cluster_down(params(by_name, max_pod_restarts=2, safety=skip), return_state=True)

    assert state.is_completed(), state.message
    assert state.result().outcome == Outcome.TARGET_BUSY
    report = report_of(state)
    assert "NOT ACTED: TARGET BUSY" in report
    assert f"kafka-cluster localhost:{kafka_broker.port} busy: held by run" in report
    resume_flow_run(approver.paused_run, run_input={"approve": False, "reason": "test over"})
    holder.join(60)
    assert holding[0].is_failed() and "rejected" in holding[0].message
    assert api.calls_of("DELETE") == []


def test_budget_stops_restarting_the_same_pod(
    kafka_broker: KafkaBroker, api: FakeKubernetesApi
) -> None:
    create_topic(kafka_broker.bootstrap, unique("orders"), partitions=3)
    # a namespace of its own: a broker pod no other test restarted, so a fresh budget
    ns = unique("kafka-budget")
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, count=2, ns=ns)
    crashing = f"kafka-{first + 1}"
    p = params(
        save_blocks(kafka_broker, api),
        namespace=ns,
        restart_cooldown_s=0,
        safety=SafetyParams(budget_max_actions=1, approval_poll_s=1),
    )

    state = kafka_cluster_down(p, return_state=True)

    assert state.is_completed(), state.message
    assert state.result().restarted_pods == [crashing]
    restarted_uid = api.pod(ns, crashing).uid
    # the recreated pod crash-loops too: restarting it again is over the budget
    api.crash_loop(ns, crashing)

    again = kafka_cluster_down(p, return_state=True)

    assert again.is_failed()
    assert "budget of 1 per 1h spent" in again.message
    assert len(api.calls_of("DELETE")) == 1
    assert api.pod(ns, crashing).uid == restarted_uid
    report = report_of(again)
    assert "**ESCALATED**" in report
    assert f"delete_pod | 1 | {ns}/{crashing} | remediation budget spent" in report


def test_without_kubernetes_brokers_down_are_escalated(kafka_broker: KafkaBroker) -> None:
    # the block expects three brokers; the metadata lists one
    blocks = save_blocks(kafka_broker, None, expected_brokers=3)

    state = kafka_cluster_down(params(blocks), return_state=True)

    assert state.is_failed()
    assert "2 of 3 brokers missing from the metadata" in state.message
    assert "no Kubernetes block configured" in state.message
    assert "| brokers present | FAILING |" in report_of(state)


@pytest.mark.parametrize(
    ("template", "ok"),
    [
        ("kafka-{broker_id}", True),
        ("{broker_id}-broker", True),
        ("kafka", False),
        ("kafka-{id}", False),
        ("kafka-{0}", False),
        ("kafka-{broker_id", False),
    ],
)
def test_broker_pod_name_must_name_the_broker(template: str, ok: bool) -> None:
    if ok:
        assert KafkaClusterDownParams(broker_pod_name=template).broker_pod_name == template
    else:
        with pytest.raises(ValueError):
            KafkaClusterDownParams(broker_pod_name=template)
