"""ZooKeeper in kafka-cluster-down against a real three-server ensemble (Debian's zookeeper 3.8):
whole, one server killed (quorum kept), two killed (quorum lost: escalated, nothing restarted).

tansu, the Kafka broker here, runs without ZooKeeper, so the brokers' registrations under
/brokers/ids are made the way a Kafka broker makes them: an ephemeral znode per broker id with
its endpoint JSON, held by a live ZooKeeper session.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
import yaml
from kazoo.client import KazooClient

from blocks.kafka import KafkaCluster
from blocks.kubernetes import KubernetesCluster
from flows.kafka.kafka_cluster_down import KafkaClusterDownParams, kafka_cluster_down
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kafka import DiagnosisKind
from tasks.zookeeper import QuorumVerdict, ZooKeeperHealth, check_zookeeper
from tests.conftest import read_incident_report, unique
from tests.fakes.kubernetes_api import FakeKubernetesApi
from tests.servers import KafkaBroker, ZooKeeperEnsemble, start_zookeeper

pytestmark = pytest.mark.integration

NS = "kafka"


@pytest.fixture
def registered(zookeeper: ZooKeeperEnsemble) -> Iterator[tuple[str, list[int]]]:
    """Brokers 1 and 2 registered under a chroot of this test: (zookeeper.connect, ids)."""
    chroot = f"/{unique('kafka')}"
    client = KazooClient(hosts=zookeeper.connect, timeout=5)
    client.start(timeout=10)
    for broker in (1, 2):
        endpoint = {"host": f"kafka-{broker}", "port": 9092, "version": 5}
        client.create(
            f"{chroot}/brokers/ids/{broker}",
            json.dumps(endpoint).encode(),
            ephemeral=True,
            makepath=True,
        )
    yield zookeeper.connect + chroot, [1, 2]
    client.stop()
    client.close()


def ensemble_check(connect: str) -> ZooKeeperHealth:
    cluster = KafkaCluster(
        bootstrap_servers="unused:9092", zookeeper_connect=connect, request_timeout_s=5
    )
    health = check_zookeeper.fn(cluster)
    assert health is not None
    return health


def wait_for(
    connect: str,
    verdict: QuorumVerdict,
    timeout_s: float = 20,
    also: Callable[[ZooKeeperHealth], bool] = lambda health: True,
) -> ZooKeeperHealth:
    deadline = time.monotonic() + timeout_s
    while True:
        health = ensemble_check(connect)
        if health.verdict == verdict and also(health):
            return health
        assert time.monotonic() < deadline, f"still {health.verdict}: {health.reason}"
        time.sleep(0.2)


def leader_index(zookeeper: ZooKeeperEnsemble, health: ZooKeeperHealth) -> int:
    assert health.leader is not None
    return zookeeper.client_ports.index(int(health.leader.rsplit(":", 1)[1]))


def save_kafka_block(broker: KafkaBroker, connect: str) -> str:
    name = unique("kafka")
    KafkaCluster(
        bootstrap_servers=broker.bootstrap,
        request_timeout_s=5,  # a loaded machine: a slow JVM answer is not a down server
        expected_brokers=1,
        zookeeper_connect=connect,
    ).save(name, overwrite=True)
    return name


@pytest.fixture
def broker_pods(kafka_broker: KafkaBroker) -> Iterator[tuple[FakeKubernetesApi, str, str]]:
    """Broker pods of the real broker and of one more whose pod crash-loops: (api, k8s block,
    the crashing pod)."""
    from confluent_kafka.admin import AdminClient

    (first,) = (
        AdminClient({"bootstrap.servers": kafka_broker.bootstrap}).list_topics(timeout=10).brokers
    )
    with FakeKubernetesApi.running(recreated_ready_after_s=0.3) as api:
        api.add_pod(NS, f"kafka-{first}", ready=True)
        api.add_pod(
            NS, f"kafka-{first + 1}", ready=False, waiting_reason="CrashLoopBackOff", restarts=9
        )
        k8s = unique("k8s")
        KubernetesCluster(
            kubeconfig=yaml.safe_dump(api.kubeconfig(NS)), namespace=NS, request_timeout_s=2
        ).save(k8s, overwrite=True)
        yield api, k8s, f"kafka-{first + 1}"


def params(kafka: str, k8s: str | None = None, **overrides) -> KafkaClusterDownParams:
    values = {
        "kafka_block": kafka,
        "kubernetes_block": k8s,
        "isr_catchup_deadline_s": 10,
        "poll_interval_s": 0.2,
        "zookeeper_election_grace_s": 0.5,
        "safety": SafetyParams(budget_max_actions=1000, escalation_block=None),
    }
    return KafkaClusterDownParams(**{**values, **overrides})


def test_whole_ensemble_modes_latency_and_registered_brokers(
    registered: tuple[str, list[int]],
) -> None:
    connect, ids = registered
    health = ensemble_check(connect)
    assert health.verdict == QuorumVerdict.HEALTHY and health.has_quorum and not health.lost_quorum
    assert sorted(s.mode for s in health.servers) == ["follower", "follower", "leader"]
    for server in health.servers:
        assert server.ok and server.serving and server.outstanding == 0
        assert server.latency_ms and server.latency_ms.count("/") == 2
    leader = next(s for s in health.servers if s.mode == "leader")
    assert leader.synced_followers == 2 and leader.quorum_size == 3
    assert "with 3 of 3 voters in sync" in health.reason
    assert health.broker_ids == ids


def test_one_server_killed_keeps_the_quorum(
    registered: tuple[str, list[int]], zookeeper: ZooKeeperEnsemble, kafka_broker: KafkaBroker
) -> None:
    connect, ids = registered
    old_leader = leader_index(zookeeper, ensemble_check(connect))
    zookeeper.kill(old_leader)

    health = wait_for(connect, QuorumVerdict.DEGRADED)
    assert health.has_quorum and leader_index(zookeeper, health) != old_leader
    down = health.servers[old_leader]
    assert not down.reachable and "ConnectionRefused" in (down.error or "")
    assert "2 of 3 server(s) serving" in health.reason
    assert health.broker_ids == ids

    # Kafka healthy, ZooKeeper short of a server: nothing to restart, the missing server reported
    result = kafka_cluster_down(params(save_kafka_block(kafka_broker, connect)))
    assert result.outcome is Outcome.NO_ACTION_NEEDED
    assert "| ZooKeeper quorum | OK | degraded: leader" in result.report
    assert f"| ZooKeeper {down.address} | FAILING | ConnectionRefusedError" in result.report
    assert "| brokers registered in ZooKeeper | OK | 1, 2 (expected 1) |" in result.report
    assert "one more loss stops the ensemble" in result.report


def test_two_servers_killed_lose_the_quorum_escalated_nothing_restarted(
    registered: tuple[str, list[int]],
    zookeeper: ZooKeeperEnsemble,
    kafka_broker: KafkaBroker,
    broker_pods: tuple[FakeKubernetesApi, str, str],
) -> None:
    connect, _ = registered
    api, k8s, crashing = broker_pods
    survivor = 2
    zookeeper.kill(0)
    zookeeper.kill(1)
    survivor_pid = zookeeper.procs[survivor].pid

    # the survivor notices its leader is gone a few ticks after the others stop answering
    health = wait_for(
        connect, QuorumVerdict.QUORUM_LOST, also=lambda h: not h.servers[survivor].serving
    )
    assert health.has_quorum is False and health.leader is None and health.broker_ids is None
    alone = health.servers[survivor]
    assert alone.reachable and alone.ok and not alone.serving  # imok, but serves nothing
    assert "no leader: a quorum needs 2 of 3" in health.reason

    # a broker pod crash-loops too: without ZooKeeper's verdict that would be restarted
    state = kafka_cluster_down(
        params(save_kafka_block(kafka_broker, connect), k8s), return_state=True
    )
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**ESCALATED**" in report
    assert "| ZooKeeper quorum | FAILING | quorum lost:" in report
    assert f"diagnosis {DiagnosisKind.ZOOKEEPER_QUORUM_LOST}: ZooKeeper lost quorum" in report
    assert "ZooKeeper nodes are never restarted automatically" in report
    assert "ZooKeeper without a leader" in report and "checking again in" in report
    # nothing restarted: no pod deleted, the killed servers stay down, the survivor untouched
    assert api.calls_of("DELETE") == []
    assert [p.poll() is not None for p in zookeeper.procs] == [True, True, False]
    assert zookeeper.procs[survivor].pid == survivor_pid
    assert api.pod(NS, crashing) is not None


def test_brokers_down_with_zookeeper_whole_is_a_broker_problem(
    registered: tuple[str, list[int]],
    kafka_broker: KafkaBroker,
    broker_pods: tuple[FakeKubernetesApi, str, str],
) -> None:
    connect, _ = registered
    api, k8s, crashing = broker_pods
    result = kafka_cluster_down(params(save_kafka_block(kafka_broker, connect), k8s, dry_run=True))
    assert result.outcome is Outcome.PLANNED
    assert result.diagnosis is not None and result.diagnosis.kind == DiagnosisKind.BROKERS_DOWN
    assert "ZooKeeper has quorum (healthy, leader" in result.diagnosis.reason
    assert (
        "brokers registered: [1, 2]): the brokers are down, not ZooKeeper"
        in result.diagnosis.reason
    )
    assert f"{NS}/{crashing} | planned (dry-run)" in result.report
    assert api.calls_of("DELETE") == []


def test_default_whitelist_answers_srvr_only() -> None:
    """ZooKeeper's default 4lw.commands.whitelist allows srvr alone: the mode and latency still
    come from it, and the refused words are reported."""
    server = start_zookeeper(1, whitelist=None)
    try:
        health = ensemble_check(server.connect)
    finally:
        server.stop()
    assert health.verdict == QuorumVerdict.HEALTHY and health.has_quorum
    (only,) = health.servers
    assert only.mode == "standalone" and only.serving and only.outstanding == 0
    assert only.refused == ["ruok", "mntr"] and only.ok is None
    assert "four-letter words not allowed: mntr, ruok" in health.reason
    assert health.broker_ids == []  # read through kazoo: no broker ever registered
