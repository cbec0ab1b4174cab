"""Kafka tasks: cluster health (ISR, offline partitions, controller).

Consumer lag is in tasks.kafka_lag, dead letter queues in tasks.kafka_dlq."""

from __future__ import annotations

from enum import StrEnum

from confluent_kafka import KafkaError, KafkaException
from prefect import task
from pydantic import BaseModel, Field, computed_field

from blocks.kafka import KafkaCluster
from runbooks.retry import runbook_task_options
from tasks.kubernetes import PodState
from tasks.zookeeper import ZooKeeperHealth


def is_retriable(exc: BaseException) -> bool:
    """Kafka errors flagged retriable (timeouts, transport) are transient; auth/config are not."""
    err = exc.args[0] if exc.args else None
    return bool(getattr(err, "retriable", lambda: False)())


# --- cluster health ------------------------------------------------------------------------

# librdkafka's local errors when no bootstrap server answers; it flags none of them retriable
_UNREACHABLE = {
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE,
}


class PartitionState(BaseModel):
    topic: str
    partition: int
    leader: int = Field(description="Leader broker id; -1 when the partition has no leader.")
    replicas: list[int]
    isr: list[int] = Field(description="In-sync replicas.")


class ClusterHealth(BaseModel):
    """One snapshot of a Kafka cluster as its metadata describes it."""

    reachable: bool = Field(description="A bootstrap server answered within the timeout.")
    error: str | None = Field(None, description="Why the cluster was not reachable.")
    cluster_id: str | None = None
    controller_id: int | None = Field(None, description="Active controller; None when there is none.")
    broker_ids: list[int] = Field(default_factory=list, description="Brokers in the metadata.")
    expected_brokers: int | None = Field(None, description="Brokers a healthy cluster has (block).")
    topics: int = Field(0, description="Topics checked, internal ones included.")
    partitions: int = Field(0, description="Partitions checked.")
    under_replicated: list[PartitionState] = Field(
        default_factory=list, description="Partitions with a leader whose ISR is smaller than their replicas."
    )
    offline: list[PartitionState] = Field(
        default_factory=list, description="Partitions without a leader."
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def missing_brokers(self) -> int:
        """Expected brokers absent from the metadata (all of them when unreachable)."""
        if self.expected_brokers is None:
            return 0
        return max(self.expected_brokers - len(self.broker_ids), 0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def caught_up(self) -> bool:
        """Every expected broker is back and every partition has a leader and a full ISR."""
        return (
            self.reachable and not self.missing_brokers and not self.under_replicated and not self.offline
        )


@task(**runbook_task_options(KafkaException, when=is_retriable))
def get_cluster_id(cluster: KafkaCluster) -> str | None:
    """The cluster's own id (describe_cluster), the same through any broker or host name;
    None when no bootstrap server answers within the block's ``request_timeout_s``."""
    admin = cluster.get_admin_client()  # held until the answer: dropping it aborts the request
    timeout = cluster.request_timeout_s
    try:
        return admin.describe_cluster(request_timeout=timeout).result(timeout).cluster_id
    except KafkaException as exc:
        if exc.args[0].code() not in _UNREACHABLE:
            raise
        return None
    except TimeoutError:  # the future outlived its own request timeout: a hung broker
        return None


@task(**runbook_task_options(KafkaException, when=is_retriable))
def check_isr(cluster: KafkaCluster) -> ClusterHealth:
    """Brokers, controller and per-partition replication of the cluster, from its metadata.

    A partition is under-replicated when its ISR is smaller than its replica set, and offline
    when it has no leader (-1); offline partitions are not counted again as under-replicated
    (like Kafka's UnderReplicatedPartitions metric, which only leaders report). Internal topics
    (``__consumer_offsets``, ``__transaction_state``) are included: when they are short of
    replicas, consumers cannot commit and transactions stall, which matters in this runbook.

    When no bootstrap server answers within the block's ``request_timeout_s`` this returns a
    health with ``reachable=False`` instead of raising: an unreachable cluster is a finding.
    Other errors (authentication, authorization) raise.
    """
    admin = cluster.get_admin_client()
    timeout = cluster.request_timeout_s
    try:
        metadata = admin.list_topics(timeout=timeout)
        described = admin.describe_cluster(request_timeout=timeout).result(timeout)
    except KafkaException as exc:
        err = exc.args[0]
        if err.code() not in _UNREACHABLE:
            raise
        return ClusterHealth(reachable=False, error=err.str(), expected_brokers=cluster.expected_brokers)

    partitions = [
        PartitionState(topic=name, partition=p.id, leader=p.leader, replicas=p.replicas, isr=p.isrs)
        for name, topic in sorted(metadata.topics.items())
        for p in sorted(topic.partitions.values(), key=lambda p: p.id)
    ]
    return ClusterHealth(
        reachable=True,
        cluster_id=described.cluster_id,
        controller_id=described.controller.id if described.controller else None,
        broker_ids=sorted(metadata.brokers),
        expected_brokers=cluster.expected_brokers,
        topics=len(metadata.topics),
        partitions=len(partitions),
        under_replicated=[p for p in partitions if p.leader >= 0 and len(p.isr) < len(p.replicas)],
        offline=[p for p in partitions if p.leader < 0],
    )


class DiagnosisKind(StrEnum):
    HEALTHY = "HEALTHY"
    # under-replicated but every broker is up: followers are catching up; watch, do not restart
    DEGRADED = "DEGRADED"
    # leaderless partitions with every broker up: a restart will not elect a leader
    PARTITIONS_OFFLINE = "PARTITIONS_OFFLINE"
    # some brokers down while the rest serve: restarting the down broker's pod may fix it
    BROKERS_DOWN = "BROKERS_DOWN"
    # nothing serves: not a one-pod fix
    CLUSTER_DOWN = "CLUSTER_DOWN"
    # the ZooKeeper ensemble the brokers depend on has no quorum: restarting brokers cannot
    # help, and ZooKeeper nodes are never restarted automatically
    ZOOKEEPER_QUORUM_LOST = "ZOOKEEPER_QUORUM_LOST"


class Diagnosis(BaseModel):
    kind: DiagnosisKind
    reason: str = Field(description="The evidence behind the kind, in one sentence.")
    down_pods: list[str] = Field(
        default_factory=list,
        description="Broker pods that are down: not Ready, terminating, or (when brokers are "
        "missing from the metadata) serving no broker the metadata lists.",
    )
    missing_brokers: int = Field(0, description="Expected brokers absent from the metadata.")


def diagnose(
    health: ClusterHealth,
    pods: list[PodState] | None,
    broker_pod_name: str = "kafka-{broker_id}",
    zookeeper: ZooKeeperHealth | None = None,
) -> Diagnosis:
    """Classify a health snapshot plus broker pod states (None or empty: no Kubernetes evidence)
    and, for a cluster on ZooKeeper, its ensemble's state.

    An ensemble without quorum comes first: the brokers' trouble follows from it, and no broker
    restart fixes it. With a quorum, the ensemble's facts (leader, registered broker ids) are
    added to a brokers-down reason, which tells "brokers down" from "ZooKeeper lost quorum".

    ``broker_pod_name`` maps a broker id to its pod name. It matters when the metadata lacks
    expected brokers: a broker that hangs (e.g. stopped, or partitioned from the controller)
    can keep a Ready pod when its readiness probe only opens a TCP socket, so the pods whose
    broker the metadata does not list count as down too. The pod selector must select broker
    pods only.
    """
    found = _diagnose_kafka(health, pods or [], broker_pod_name)
    if zookeeper is None:
        return found
    if zookeeper.lost_quorum:
        kafka_side = (
            f"Kafka: {found.reason}"
            if found.kind != DiagnosisKind.HEALTHY
            else "Kafka still serves, but its controller cannot change anything and brokers "
            "whose ZooKeeper session expires drop out"
        )
        return Diagnosis(
            kind=DiagnosisKind.ZOOKEEPER_QUORUM_LOST,
            reason=f"ZooKeeper lost quorum ({zookeeper.reason}); {kafka_side}",
            down_pods=found.down_pods,
            missing_brokers=found.missing_brokers,
        )
    brokers_down = found.kind in (DiagnosisKind.BROKERS_DOWN, DiagnosisKind.CLUSTER_DOWN)
    if brokers_down and zookeeper.has_quorum:
        registered = (
            f"brokers registered: {zookeeper.broker_ids}"
            if zookeeper.broker_ids is not None
            else f"registered brokers unread ({zookeeper.broker_ids_error})"
        )
        ensemble = f"{zookeeper.verdict}, leader {zookeeper.leader}; {registered}"
        return found.model_copy(
            update={
                "reason": f"{found.reason}; ZooKeeper has quorum ({ensemble}): the brokers are "
                "down, not ZooKeeper"
            }
        )
    return found


def _diagnose_kafka(health: ClusterHealth, pods: list[PodState], broker_pod_name: str) -> Diagnosis:
    not_up = [p for p in pods if not p.up]
    pod_names = [p.name for p in not_up]
    missing = health.missing_brokers
    if not health.reachable:
        return Diagnosis(
            kind=DiagnosisKind.CLUSTER_DOWN, reason=f"no bootstrap server answered: {health.error}",
            down_pods=pod_names, missing_brokers=missing,
        )
    if pods and len(not_up) == len(pods):
        return Diagnosis(
            kind=DiagnosisKind.CLUSTER_DOWN, reason=f"all {len(pods)} broker pods are down",
            down_pods=pod_names, missing_brokers=missing,
        )
    hung: list[str] = []
    if missing:
        listed = {broker_pod_name.format(broker_id=b) for b in health.broker_ids}
        hung = [p.name for p in pods if p.up and p.name not in listed]
    if not_up or missing:
        facts = [f"pod {p.name} not up ({p.reason or p.phase}, {p.restarts} restarts)" for p in not_up]
        facts += [f"pod {name} is Ready but its broker is not in the metadata" for name in hung]
        if missing:
            facts.insert(0, f"{missing} of {health.expected_brokers} brokers missing from the metadata "
                            f"(seen: {health.broker_ids})")
        return Diagnosis(
            kind=DiagnosisKind.BROKERS_DOWN, reason="; ".join(facts),
            down_pods=sorted(pod_names + hung), missing_brokers=missing,
        )
    if health.offline:
        return Diagnosis(
            kind=DiagnosisKind.PARTITIONS_OFFLINE,
            reason=f"{len(health.offline)} partitions have no leader while every broker is up",
        )
    if health.under_replicated:
        return Diagnosis(
            kind=DiagnosisKind.DEGRADED,
            reason=f"{len(health.under_replicated)} partitions under-replicated while every broker is up",
        )
    return Diagnosis(
        kind=DiagnosisKind.HEALTHY,
        reason=f"{len(health.broker_ids)} broker(s) serving, {health.partitions} partitions fully in sync",
    )
