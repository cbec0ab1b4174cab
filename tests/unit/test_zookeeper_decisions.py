"""ZooKeeper decisions as data: the servers' four-letter-word answers -> quorum verdict; the
block's zookeeper.connect; and how kafka-cluster-down's diagnosis reads the ensemble."""

from __future__ import annotations

import pytest

from blocks.kafka import KafkaCluster, parse_zookeeper_connect
from tasks.kafka import ClusterHealth, DiagnosisKind, diagnose
from tasks.kubernetes import PodState
from tasks.zookeeper import (
    QuorumVerdict,
    ZooKeeperHealth,
    ZooKeeperServer,
    judge_ensemble,
    parse_mntr,
    parse_srvr,
)

# answers of Debian's zookeeper 3.8.0, as captured from a three-server ensemble
SRVR_LEADER = """Zookeeper version: 3.8.0-${mvngit.commit.id}, built on 2024-12-29 17:54 UTC
Latency min/avg/max: 0/0.5/3
Received: 12
Sent: 11
Connections: 1
Outstanding: 4
Zxid: 0x200000000
Mode: leader
Node count: 5
Proposal sizes last/min/max: -1/-1/-1
"""
MNTR_LEADER = (
    "zk_version\t3.8.0\nzk_server_state\tleader\nzk_outstanding_requests\t4\n"
    "zk_synced_followers\t1\nzk_quorum_size\t3\nzk_avg_latency\t0.5\n"
)


def test_srvr_and_mntr_parsed() -> None:
    stat = parse_srvr(SRVR_LEADER)
    assert stat["Mode"] == "leader" and stat["Outstanding"] == "4"
    assert stat["Latency min/avg/max"] == "0/0.5/3" and stat["Zxid"] == "0x200000000"
    assert stat["Zookeeper version"].startswith("3.8.0")
    metrics = parse_mntr(MNTR_LEADER)
    assert metrics["zk_synced_followers"] == "1" and metrics["zk_quorum_size"] == "3"


def server(
    n: int, mode: str | None = "follower", *, up: bool = True, serving: bool = True, **extra
) -> ZooKeeperServer:
    if not up:
        return ZooKeeperServer(
            address=f"zk-{n}:2181", reachable=False, error="ConnectionRefusedError: refused"
        )
    if not serving:
        return ZooKeeperServer(
            address=f"zk-{n}:2181", reachable=True, ok=True, error="not in a quorum"
        )
    return ZooKeeperServer(
        address=f"zk-{n}:2181", reachable=True, ok=True, serving=True, mode=mode, **extra
    )


def leader(n: int, synced: int | None, quorum_size: int | None = None) -> ZooKeeperServer:
    return server(n, "leader", synced_followers=synced, quorum_size=quorum_size)


REFUSED = ZooKeeperServer(
    address="zk-0:2181",
    reachable=True,
    refused=["ruok", "srvr", "mntr"],
    error="srvr is not allowed, so whether it serves is unknown: add 4lw.commands.whitelist=...",
)
# ZooKeeper's default whitelist: srvr only
SRVR_ONLY = ZooKeeperServer(
    address="zk-0:2181", reachable=True, serving=True, mode="standalone", refused=["ruok", "mntr"]
)

H, D, L, U, K = (
    QuorumVerdict.HEALTHY,
    QuorumVerdict.DEGRADED,
    QuorumVerdict.QUORUM_LOST,
    QuorumVerdict.UNREACHABLE,
    QuorumVerdict.UNKNOWN,
)

# (case, servers, verdict, has_quorum, leader, words in the reason)
ENSEMBLES = [
    ("three serving", [server(0), leader(1, 2), server(2)], H, True, "zk-1:2181",
     "leader zk-1:2181 with 3 of 3 voters in sync"),
    ("standalone", [server(0, "standalone")], H, True, "zk-0:2181", "standalone server zk-0"),
    ("one of three down", [server(0, up=False), leader(1, 1), server(2)], D, True, "zk-1:2181",
     "not answering: zk-0:2181"),
    ("a follower out of sync though it answers", [server(0), leader(1, 1), server(2)], D, True,
     "zk-1:2181", "2 of 3 voters in sync"),
    ("the leader knows five voters, two unlisted", [leader(0, 2, quorum_size=5), server(1),
     server(2)], D, True, "zk-0:2181", "3 of 5 voters in sync"),
    ("two of three down, the last running alone",
     [server(0, up=False), server(1, up=False), server(2, serving=False)], L, False, None,
     "no leader: a quorum needs 2 of 3"),
    ("an election under way: all up, none leads",
     [server(0, serving=False), server(1, serving=False), server(2, serving=False)], L, False,
     None, "running without quorum: zk-0:2181, zk-1:2181, zk-2:2181"),
    ("none answers", [server(0, up=False), server(1, up=False)], U, False, None,
     "no ZooKeeper server answers"),
    ("four-letter words not allowed", [REFUSED], K, None, None, "4lw.commands.whitelist"),
    ("one server refuses srvr, the others follow", [REFUSED, server(1), server(2)], K, None,
     None, "2 of 3 server(s) serving; four-letter words not allowed: mntr, ruok, srvr"),
    ("default whitelist: srvr only", [SRVR_ONLY], H, True, "zk-0:2181",
     "four-letter words not allowed: mntr, ruok"),
    ("a leader without mntr: its serving followers count", [
     server(0), server(1, "leader", refused=["mntr"]), server(2)], H, True, "zk-1:2181",
     "3 of 3 voters in sync"),
]


@pytest.mark.parametrize(
    ("case", "servers", "verdict", "quorum", "leader_at", "words"),
    ENSEMBLES,
    ids=[e[0] for e in ENSEMBLES],
)
def test_judge_ensemble(case, servers, verdict, quorum, leader_at, words) -> None:
    found = judge_ensemble(servers)
    assert found.verdict == verdict, found.reason
    assert found.has_quorum is quorum
    assert found.leader == leader_at
    assert words in found.reason


@pytest.mark.parametrize(
    ("connect", "servers", "chroot"),
    [
        ("zk-0:2181", [("zk-0", 2181)], ""),
        ("zk-0:2181,zk-1:2182/kafka", [("zk-0", 2181), ("zk-1", 2182)], "/kafka"),
        ("10.0.0.1:2181/kafka/prod", [("10.0.0.1", 2181)], "/kafka/prod"),
        ("[::1]:2181", [("::1", 2181)], ""),
    ],
)
def test_zookeeper_connect_parsed(connect: str, servers: list, chroot: str) -> None:
    assert parse_zookeeper_connect(connect) == (servers, chroot)
    assert KafkaCluster(bootstrap_servers="k:9092", zookeeper_connect=connect).zookeeper_connect


@pytest.mark.parametrize(
    "connect", ["zk-0", "zk-0:0", "zk-0:70000", "zk-0:2181,zk-0:2181", "zk-0:2181/", "zk;rm:1"]
)
def test_zookeeper_connect_refused(connect: str) -> None:
    with pytest.raises(ValueError):
        parse_zookeeper_connect(connect)
    with pytest.raises(ValueError):
        KafkaCluster(bootstrap_servers="k:9092", zookeeper_connect=connect)


def test_empty_zookeeper_connect_means_kraft() -> None:
    assert KafkaCluster(bootstrap_servers="k:9092", zookeeper_connect=" ").zookeeper_connect is None


# --- how kafka-cluster-down's diagnosis reads the ensemble ------------------------------------


def kafka(reachable: bool = True) -> ClusterHealth:
    if not reachable:
        return ClusterHealth(reachable=False, error="Local: Broker transport failure", expected_brokers=3)
    return ClusterHealth(
        reachable=True, cluster_id="c1", controller_id=0, broker_ids=[0, 1, 2], expected_brokers=3,
        topics=1, partitions=3,
    )


def pods(*down: int) -> list[PodState]:
    return [
        PodState(
            name=f"kafka-{i}", uid=f"u{i}", phase="Running", ready=i not in down,
            restarts=7 if i in down else 0, reason="CrashLoopBackOff" if i in down else None,
            owner="StatefulSet/kafka", terminating=False,
        )
        for i in range(3)
    ]


def ensemble(verdict: QuorumVerdict, ids: list[int] | None = None) -> ZooKeeperHealth:
    quorum = verdict in (QuorumVerdict.HEALTHY, QuorumVerdict.DEGRADED)
    return ZooKeeperHealth(
        servers=[], verdict=verdict, has_quorum=None if verdict == K else quorum,
        leader="zk-1:2181" if quorum else None, reason=f"ensemble {verdict}",
        broker_ids=ids if quorum else None,
        broker_ids_error=None if quorum else "not read: no quorum serves requests",
    )


ZK_LOST = DiagnosisKind.ZOOKEEPER_QUORUM_LOST

# (case, kafka, pods, ensemble, kind, words in the reason)
DIAGNOSES = [
    ("no ZooKeeper (KRaft): Kafka alone decides", kafka(), pods(1), None,
     DiagnosisKind.BROKERS_DOWN, "pod kafka-1 not up"),
    ("brokers down, ZooKeeper whole: the brokers", kafka(), pods(1), ensemble(H, [0, 2]),
     DiagnosisKind.BROKERS_DOWN, "ZooKeeper has quorum (healthy, leader zk-1:2181; brokers "
     "registered: [0, 2]): the brokers are down, not ZooKeeper"),
    ("cluster down, ZooKeeper degraded but in quorum", kafka(False), pods(), ensemble(D, []),
     DiagnosisKind.CLUSTER_DOWN, "the brokers are down, not ZooKeeper"),
    ("brokers down, ZooKeeper lost quorum: ZooKeeper first", kafka(), pods(1), ensemble(L),
     ZK_LOST, "ZooKeeper lost quorum (ensemble quorum lost); Kafka: pod kafka-1 not up"),
    ("Kafka still serving, ZooKeeper lost quorum", kafka(), pods(), ensemble(L), ZK_LOST,
     "Kafka still serves, but its controller cannot change anything"),
    ("nothing answers at all", kafka(False), pods(), ensemble(U), ZK_LOST,
     "Kafka: no bootstrap server answered"),
    ("Kafka healthy, ZooKeeper degraded: healthy", kafka(), pods(), ensemble(D, [0, 1, 2]),
     DiagnosisKind.HEALTHY, "in sync"),
    ("four-letter words refused: Kafka alone decides", kafka(), pods(1), ensemble(K),
     DiagnosisKind.BROKERS_DOWN, "pod kafka-1 not up"),
]


@pytest.mark.parametrize(
    ("case", "snapshot", "pod_states", "zookeeper", "kind", "words"),
    DIAGNOSES,
    ids=[d[0] for d in DIAGNOSES],
)
def test_diagnose_with_zookeeper(case, snapshot, pod_states, zookeeper, kind, words) -> None:
    found = diagnose(snapshot, pod_states, "kafka-{broker_id}", zookeeper)
    assert found.kind == kind, found.reason
    assert words in found.reason
