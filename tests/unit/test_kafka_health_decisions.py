"""Kafka cluster-down decisions as data: a health snapshot plus broker pod states -> diagnosis.

tansu, the broker the integration tests run, is a single broker (its postgres storage, the
only way to cluster it, is not compiled in), so a real broker cannot produce under-replicated
or offline partitions, nor a three-broker cluster with one missing: those cases live here.
"""

from __future__ import annotations

import pytest

from tasks.kafka import ClusterHealth, DiagnosisKind, PartitionState, diagnose
from tasks.kubernetes import PodState

HEALTHY = DiagnosisKind.HEALTHY
DEGRADED = DiagnosisKind.DEGRADED
OFFLINE = DiagnosisKind.PARTITIONS_OFFLINE
BROKERS_DOWN = DiagnosisKind.BROKERS_DOWN
CLUSTER_DOWN = DiagnosisKind.CLUSTER_DOWN


def health(
    brokers: tuple[int, ...] = (0, 1, 2),
    expected: int | None = 3,
    under_replicated: int = 0,
    offline: int = 0,
    reachable: bool = True,
) -> ClusterHealth:
    if not reachable:
        return ClusterHealth(
            reachable=False, error="Local: Broker transport failure", expected_brokers=expected
        )
    urp = [
        PartitionState(topic="orders", partition=i, leader=0, replicas=[0, 1, 2], isr=[0, 2])
        for i in range(under_replicated)
    ]
    off = [
        PartitionState(topic="payments", partition=i, leader=-1, replicas=[1], isr=[])
        for i in range(offline)
    ]
    return ClusterHealth(
        reachable=True,
        cluster_id="c1",
        controller_id=brokers[0] if brokers else None,
        broker_ids=list(brokers),
        expected_brokers=expected,
        topics=2,
        partitions=12,
        under_replicated=urp,
        offline=off,
    )


def pod(
    name: str,
    ready: bool = True,
    reason: str | None = None,
    terminating: bool = False,
    phase: str = "Running",
) -> PodState:
    return PodState(
        name=name,
        uid=f"uid-{name}",
        phase=phase,
        ready=ready,
        restarts=0 if ready else 7,
        reason=reason,
        owner="StatefulSet/kafka",
        terminating=terminating,
    )


def pods(*down: str, n: int = 3, prefix: str = "kafka-") -> list[PodState]:
    return [
        pod(
            f"{prefix}{i}",
            ready=f"{prefix}{i}" not in down,
            reason=None if f"{prefix}{i}" not in down else "CrashLoopBackOff",
        )
        for i in range(n)
    ]


CRASHING_1 = [
    pod("kafka-0"),
    pod("kafka-1", ready=False, reason="CrashLoopBackOff"),
    pod("kafka-2"),
]

ROWS = [
    # (health, pods, template, kind, down_pods, missing, words in the reason)
    pytest.param(health(), pods(), None, HEALTHY, [], 0, "3 broker(s) serving", id="healthy"),
    pytest.param(health(), None, None, HEALTHY, [], 0, "in sync", id="healthy-without-kubernetes"),
    pytest.param(
        health(expected=None), pods(), None, HEALTHY, [], 0, "", id="healthy-no-expected-count"
    ),
    pytest.param(
        health(brokers=(0, 1, 2, 3)),
        pods(),
        None,
        HEALTHY,
        [],
        0,
        "",
        id="more-brokers-than-expected",
    ),
    pytest.param(
        health(), [], None, HEALTHY, [], 0, "", id="selector-matched-no-pod-kafka-evidence-only"
    ),
    pytest.param(
        health(brokers=(0, 2)),
        CRASHING_1,
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        1,
        "CrashLoopBackOff",
        id="one-of-three-missing-pod-crashlooping",
    ),
    pytest.param(
        health(brokers=(0, 2)),
        pods(),
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        1,
        "Ready but its broker is not in the metadata",
        id="one-missing-pod-ready-hung-broker",
    ),
    pytest.param(
        health(brokers=(0, 2)),
        None,
        None,
        BROKERS_DOWN,
        [],
        1,
        "1 of 3 brokers missing",
        id="one-missing-without-kubernetes",
    ),
    pytest.param(
        health(brokers=(0, 2)),
        [pod("kafka-0"), pod("kafka-2")],
        None,
        BROKERS_DOWN,
        [],
        1,
        "seen: [0, 2]",
        id="missing-broker-has-no-pod",
    ),
    pytest.param(
        health(brokers=(0, 2)),
        pods(prefix="broker-"),
        "broker-{broker_id}",
        BROKERS_DOWN,
        ["broker-1"],
        1,
        "",
        id="custom-pod-name-template",
    ),
    pytest.param(
        health(brokers=(10, 12), expected=3),
        [pod("kafka-10"), pod("kafka-11"), pod("kafka-12")],
        None,
        BROKERS_DOWN,
        ["kafka-11"],
        1,
        "",
        id="broker-ids-not-ordinals",
    ),
    pytest.param(
        health(expected=None),
        CRASHING_1,
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        0,
        "pod kafka-1 not up",
        id="pod-crashlooping-no-expected-count",
    ),
    pytest.param(
        health(),
        CRASHING_1,
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        0,
        "7 restarts",
        id="pod-not-ready-metadata-still-lists-broker",
    ),
    pytest.param(
        health(),
        [pod("kafka-0"), pod("kafka-1", terminating=True), pod("kafka-2")],
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        0,
        "",
        id="pod-terminating-though-ready",
    ),
    pytest.param(
        health(),
        [
            pod("kafka-0"),
            pod("kafka-1", ready=False, reason="ContainerCreating", phase="Pending"),
            pod("kafka-2"),
        ],
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        0,
        "ContainerCreating",
        id="pod-pending",
    ),
    pytest.param(
        health(),
        [pod("kafka-0"), pod("kafka-1", ready=False), pod("kafka-2")],
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        0,
        "Running",
        id="readiness-probe-failing-no-reason",
    ),
    pytest.param(
        health(brokers=(0,)),
        pods("kafka-1", "kafka-2"),
        None,
        BROKERS_DOWN,
        ["kafka-1", "kafka-2"],
        2,
        "2 of 3",
        id="two-of-three-down",
    ),
    pytest.param(
        health(brokers=(0, 2), under_replicated=4),
        CRASHING_1,
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        1,
        "",
        id="under-replicated-because-broker-down",
    ),
    pytest.param(
        health(brokers=(0, 2), offline=2),
        CRASHING_1,
        None,
        BROKERS_DOWN,
        ["kafka-1"],
        1,
        "",
        id="offline-because-broker-down",
    ),
    pytest.param(
        health(under_replicated=4),
        pods(),
        None,
        DEGRADED,
        [],
        0,
        "4 partitions under-replicated",
        id="under-replicated-all-brokers-up",
    ),
    pytest.param(
        health(under_replicated=4),
        None,
        None,
        DEGRADED,
        [],
        0,
        "",
        id="under-replicated-no-kubernetes",
    ),
    pytest.param(
        health(offline=2),
        pods(),
        None,
        OFFLINE,
        [],
        0,
        "2 partitions have no leader",
        id="offline-partitions-all-brokers-up",
    ),
    pytest.param(
        health(offline=2, under_replicated=4),
        pods(),
        None,
        OFFLINE,
        [],
        0,
        "",
        id="offline-outranks-under-replicated",
    ),
    pytest.param(
        health(reachable=False),
        pods(),
        None,
        CLUSTER_DOWN,
        [],
        3,
        "no bootstrap server answered",
        id="unreachable-pods-look-ready",
    ),
    pytest.param(
        health(reachable=False),
        None,
        None,
        CLUSTER_DOWN,
        [],
        3,
        "transport failure",
        id="unreachable-without-kubernetes",
    ),
    pytest.param(
        health(reachable=False, expected=None),
        pods("kafka-0", "kafka-1", "kafka-2"),
        None,
        CLUSTER_DOWN,
        ["kafka-0", "kafka-1", "kafka-2"],
        0,
        "",
        id="unreachable-all-pods-down",
    ),
    pytest.param(
        health(reachable=False),
        CRASHING_1,
        None,
        CLUSTER_DOWN,
        ["kafka-1"],
        3,
        "",
        id="unreachable-one-pod-down-is-still-cluster-wide",
    ),
    pytest.param(
        health(),
        pods("kafka-0", "kafka-1", "kafka-2"),
        None,
        CLUSTER_DOWN,
        ["kafka-0", "kafka-1", "kafka-2"],
        0,
        "all 3 broker pods are down",
        id="all-pods-not-ready-though-metadata-answers",
    ),
    pytest.param(
        health(brokers=(0,), expected=1),
        [pod("kafka-0", ready=False, reason="OOMKilled")],
        None,
        CLUSTER_DOWN,
        ["kafka-0"],
        0,
        "all 1 broker pods",
        id="single-broker-cluster-pod-down",
    ),
]


@pytest.mark.parametrize(
    ("snapshot", "pod_states", "template", "kind", "down", "missing", "words"), ROWS
)
def test_diagnose(snapshot, pod_states, template, kind, down, missing, words) -> None:
    args = (template,) if template else ()
    diagnosis = diagnose(snapshot, pod_states, *args)
    assert diagnosis.kind == kind
    assert diagnosis.down_pods == down
    assert diagnosis.missing_brokers == missing
    assert words in diagnosis.reason


@pytest.mark.parametrize(
    ("snapshot", "missing", "caught_up"),
    [
        pytest.param(health(), 0, True, id="all-in-sync"),
        pytest.param(health(expected=None, brokers=(0,)), 0, True, id="no-expected-count"),
        pytest.param(health(brokers=(0, 1)), 1, False, id="broker-missing"),
        pytest.param(health(under_replicated=1), 0, False, id="under-replicated"),
        pytest.param(health(offline=1), 0, False, id="offline"),
        pytest.param(
            health(reachable=False), 3, False, id="unreachable-counts-all-expected-missing"
        ),
        pytest.param(
            health(reachable=False, expected=None), 0, False, id="unreachable-no-expected"
        ),
    ],
)
def test_cluster_caught_up(snapshot: ClusterHealth, missing: int, caught_up: bool) -> None:
    assert snapshot.missing_brokers == missing
    assert snapshot.caught_up is caught_up
    assert snapshot.model_dump()["caught_up"] is caught_up
