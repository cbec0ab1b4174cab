"""Kafka runbooks.

``kafka-cluster-down``: seed 000 "P1 Kafka Cluster Down", seed 001 "Kafka Broker Down" and
seed 004 section 4.1 "Kafka is Down". Check broker and ISR state and the broker pods, and, for a
cluster still on ZooKeeper, the ensemble (seed 000 P1 step 2, ``zkCli.sh stat``); restart a
single down broker's pod and wait for the ISR to catch up; escalate a cluster-wide outage and a
ZooKeeper ensemble without quorum (ZooKeeper nodes are never restarted automatically).
"""

import time
from collections.abc import Callable

from prefect import flow
from pydantic import BaseModel, Field, field_validator

from blocks.kafka import KafkaCluster
from blocks.kubernetes import KubernetesCluster
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, OptionalBlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.results import ChangeSet
from runbooks.safety import Budget, Guard, Target
from tasks.kafka import (
    ClusterHealth,
    Diagnosis,
    DiagnosisKind,
    check_isr,
    diagnose,
    get_cluster_id,
)
from tasks.kubernetes import PodsReady, PodState, list_pods, read_pods, restart_pod
from tasks.zookeeper import QuorumVerdict, ZooKeeperHealth, check_zookeeper

# A broker pod that needs restarting again and again has a cause a restart won't fix
# (issue #4: "3 restarts of the same broker pod per hour").
RESTART_BUDGET = Budget(max_actions=3, window_s=3600)


class KafkaClusterDownParams(RunbookParams):
    """Parameters of the kafka-cluster-down runbook."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    kubernetes_block: OptionalBlockName = Field(
        None,
        description="Name of the Runbooks Kubernetes Cluster block the brokers run on. Empty: "
        "the runbook only diagnoses and escalates, it restarts nothing.",
    )
    namespace: str | None = Field(
        None, description="Namespace of the broker pods; empty: the Kubernetes block's namespace."
    )
    broker_selector: str = Field(
        "app=kafka", description="Label selector of the broker pods (and only them)."
    )
    broker_pod_name: str = Field(
        "kafka-{broker_id}",
        description="Pod name of a broker, with {broker_id} standing for its broker.id; "
        "'kafka-{broker_id}' fits a StatefulSet 'kafka' whose broker.id is the pod ordinal.",
    )
    max_pod_restarts: int = Field(
        1,
        ge=1,
        le=5,
        description="Most broker pods restarted in one run. More brokers down at once is "
        "escalated, not restarted: it points at a shared cause (nodes, network, storage).",
    )
    restart_cooldown_s: float = Field(
        300,
        ge=0,
        le=3600,
        description="A pod younger than this is still starting (or was restarted by an earlier "
        "run): it is waited for, not restarted again.",
    )
    isr_catchup_deadline_s: float = Field(
        600,
        gt=0,
        le=3600,
        description="After a restart, how long the pods may take to be Ready and every "
        "partition to be back in sync before the run fails verification.",
    )
    poll_interval_s: float = Field(
        5, gt=0, le=60, description="Pause between checks while verifying, in seconds."
    )
    zookeeper_election_grace_s: float = Field(
        5,
        ge=0,
        le=120,
        description="ZooKeeper found without a leader is checked once more after this many "
        "seconds: an election in progress (after a leader died) looks the same for a moment.",
    )

    @field_validator("broker_pod_name")
    @classmethod
    def _names_the_broker(cls, value: str) -> str:
        try:
            value.format(broker_id=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{broker_id}} may stand in braces, not {exc}") from exc
        if "{broker_id}" not in value:
            raise ValueError("broker_pod_name must contain {broker_id}")
        return value


class KafkaClusterDownResult(BaseModel):
    """What a kafka-cluster-down run found and did."""

    outcome: Outcome
    diagnosis: Diagnosis | None = Field(
        description="The diagnosis that decided the action (none when another run held the cluster)."
    )
    restarted_pods: list[str] = Field(description="Pods this run deleted (none in dry-run).")
    verified: bool = Field(description="Pods Ready and ISR caught up after the restart.")
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name="kafka-cluster-down",
    description="Kafka brokers down: check ISR and broker pods, restart one down broker, "
    "verify ISR catch-up; escalate a cluster-wide outage.",
)
@ends_as_reported
def kafka_cluster_down(params: KafkaClusterDownParams) -> KafkaClusterDownResult:
    diagnosis: Diagnosis | None = None
    restarted: list[str] = []
    verified = False
    with incident_report(
        runbook="kafka-cluster-down", title="Kafka cluster down", severity="P1", params=params
    ) as report:
        kafka = KafkaCluster.load(params.kafka_block)
        k8s = KubernetesCluster.load(params.kubernetes_block) if params.kubernetes_block else None
        namespace = params.namespace or (k8s.namespace if k8s else "")

        def observe() -> tuple[ClusterHealth, list[PodState] | None]:
            health = check_isr(kafka)
            pods = list_pods(k8s, namespace, params.broker_selector) if k8s else None
            return health, pods

        # which pod is down is only known after the checks: lock the whole cluster, so that two
        # runs never restart two brokers of it at once (or the same one twice). Keyed on the
        # cluster's id, whichever brokers or host names the block lists. A cluster that does not
        # answer has no id to read: keyed on the bootstrap list then, as the run will almost
        # surely find it down and only escalate (restarts also wait out restart_cooldown_s).
        cluster_id = get_cluster_id(kafka)
        target = Target(
            "kafka-cluster",
            _bootstrap_list(kafka),
            f"cluster-id {cluster_id}" if cluster_id else "",
        )
        with report.guard(target) as guard:
            health, pods = observe()
            zookeeper = _check_zookeeper(report, kafka, params.zookeeper_election_grace_s)
            _record_symptoms(report, health, pods, namespace, params.broker_selector)
            diagnosis = diagnose(health, pods, params.broker_pod_name, zookeeper)
            report.evidence("diagnosis", diagnosis)
            report.step(f"diagnosis {diagnosis.kind}: {diagnosis.reason}")
            if zookeeper and zookeeper.verdict == QuorumVerdict.DEGRADED:
                report.follow_ups.append(
                    f"ZooKeeper keeps its quorum short of servers ({zookeeper.reason}): bring "
                    "them back; one more loss stops the ensemble, and Kafka with it"
                )

            if diagnosis.kind == DiagnosisKind.HEALTHY:
                report.finish(Outcome.NO_ACTION_NEEDED, f"Kafka is healthy: {diagnosis.reason}.")
            elif diagnosis.kind == DiagnosisKind.DEGRADED:
                report.follow_ups.append(
                    "Watch kafka_under_replicated_partitions until it is back to 0; re-run this "
                    "runbook if a broker goes down"
                )
                report.finish(
                    Outcome.WAITING,
                    f"{diagnosis.reason}: followers are catching up, so nothing was restarted.",
                )
            else:
                report.follow_ups += _follow_ups(namespace, diagnosis)
                _escalate_unless_one_pod_fix(diagnosis, k8s, params)
                assert k8s is not None and pods is not None
                restarted, verified = _restart_and_verify(
                    report, guard, k8s, namespace, params, diagnosis, pods, observe
                )
    return KafkaClusterDownResult(
        outcome=report.outcome or Outcome.FAILED,
        diagnosis=diagnosis,
        restarted_pods=restarted,
        verified=verified,
        report=report.to_markdown(),
    )


def _bootstrap_list(kafka: KafkaCluster) -> str:
    """The cluster's bootstrap addresses, in a stable order: blocks listing them differently agree."""
    return ",".join(sorted({s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()}))


def _check_zookeeper(
    report: IncidentReport, kafka: KafkaCluster, grace_s: float
) -> ZooKeeperHealth | None:
    """The ensemble of a cluster on ZooKeeper (None for KRaft), recorded as checks."""
    if not kafka.zookeeper_connect:
        return None
    zookeeper = check_zookeeper(kafka)
    if zookeeper.lost_quorum and grace_s:
        report.step(
            f"ZooKeeper without a leader ({zookeeper.reason}); checking again in {grace_s:.0f}s "
            "in case an election is under way"
        )
        time.sleep(grace_s)
        zookeeper = check_zookeeper(kafka)
    assert zookeeper is not None  # the block names an ensemble
    report.evidence("ZooKeeper ensemble", zookeeper)
    report.check(
        "ZooKeeper quorum", zookeeper.has_quorum is True, f"{zookeeper.verdict}: {zookeeper.reason}"
    )
    for server in zookeeper.servers:
        observed = (
            f"{server.mode}, outstanding {server.outstanding}, latency min/avg/max "
            f"{server.latency_ms} ms, zxid {server.zxid}"
            if server.serving
            else server.error or "not serving"
        )
        report.check(f"ZooKeeper {server.address}", server.serving, observed)
    registered = (
        ", ".join(map(str, zookeeper.broker_ids)) or "none"
        if zookeeper.broker_ids is not None
        else zookeeper.broker_ids_error or "unread"
    )
    expected = kafka.expected_brokers
    report.check(
        "brokers registered in ZooKeeper",
        zookeeper.broker_ids is not None
        and (expected is None or len(zookeeper.broker_ids) >= expected),
        f"{registered} (expected {expected or 'unspecified'})",
    )
    return zookeeper


def _record_symptoms(
    report: IncidentReport,
    health: ClusterHealth,
    pods: list[PodState] | None,
    namespace: str,
    selector: str,
) -> None:
    report.evidence("cluster health", health)
    reached = (
        f"cluster {health.cluster_id}, controller {health.controller_id}"
        if health.reachable
        else f"{health.error}"
    )
    if report.check("brokers reachable", health.reachable, reached):
        report.check(
            "brokers present",
            not health.missing_brokers,
            f"{len(health.broker_ids)} of {health.expected_brokers or 'unspecified'} expected: "
            f"{health.broker_ids}",
        )
        report.check(
            "under-replicated partitions",
            not health.under_replicated,
            f"{len(health.under_replicated)} of {health.partitions}",
        )
        report.check(
            "offline partitions",
            not health.offline,
            f"{len(health.offline)} of {health.partitions}",
        )
    if pods is None:
        report.step("no Kubernetes block: broker pods not checked, nothing will be restarted")
        return
    report.evidence("broker pods", [p.model_dump(mode="json") for p in pods])
    down = [f"{p.name} ({p.reason or p.phase}, {p.restarts} restarts)" for p in pods if not p.up]
    observed = (
        f"{len(pods) - len(down)}/{len(pods)} up" + (f"; down: {', '.join(down)}" if down else "")
        if pods
        else f"no pod matches {selector!r} in namespace {namespace!r}"
    )
    report.check("broker pods ready", bool(pods) and not down, observed)


def _escalate_unless_one_pod_fix(
    diagnosis: Diagnosis, k8s: KubernetesCluster | None, params: KafkaClusterDownParams
) -> None:
    """Raise Escalation unless restarting a few identified broker pods is the fix."""
    if diagnosis.kind == DiagnosisKind.ZOOKEEPER_QUORUM_LOST:
        raise Escalation(
            f"{diagnosis.reason}. Escalate to the team that runs ZooKeeper: bring its servers "
            "back (a majority is needed) before anything else. ZooKeeper nodes are never "
            "restarted automatically, and no broker was restarted: brokers cannot recover "
            "without ZooKeeper"
        )
    if diagnosis.kind == DiagnosisKind.CLUSTER_DOWN:
        raise Escalation(
            f"cluster-wide outage ({diagnosis.reason}): escalate to the infrastructure team; "
            "nothing was restarted"
        )
    if diagnosis.kind == DiagnosisKind.PARTITIONS_OFFLINE:
        raise Escalation(
            f"{diagnosis.reason}: a broker restart will not elect leaders; a human must decide "
            "(e.g. on unclean leader election)"
        )
    if k8s is None:
        raise Escalation(
            f"brokers down ({diagnosis.reason}) and no Kubernetes block configured: restart the "
            "broker by hand"
        )
    if not diagnosis.down_pods:
        raise Escalation(
            f"brokers down ({diagnosis.reason}) but no broker pod is identified as down: check "
            f"broker_selector {params.broker_selector!r} and broker_pod_name"
        )
    if len(diagnosis.down_pods) > params.max_pod_restarts:
        raise Escalation(
            f"{len(diagnosis.down_pods)} broker pods down at once ({', '.join(diagnosis.down_pods)}), "
            f"more than max_pod_restarts={params.max_pod_restarts}: likely a shared cause; "
            "escalate to the infrastructure team; nothing was restarted"
        )


def _restart_and_verify(
    report: IncidentReport,
    guard: Guard,
    k8s: KubernetesCluster,
    namespace: str,
    params: KafkaClusterDownParams,
    diagnosis: Diagnosis,
    pods: list[PodState],
    observe: Callable[[], tuple[ClusterHealth, list[PodState] | None]],
) -> tuple[list[str], bool]:
    """Restart the down broker pods, then wait for them to be Ready and the ISR to catch up."""
    uids = {p.name: p.uid for p in pods}
    names = diagnosis.down_pods

    def restart(dry_run: bool) -> ChangeSet:
        # every pod re-read and re-checked (uid, age, terminating) at the moment of deleting it
        results = [
            restart_pod(
                k8s,
                namespace,
                name,
                uid=uids[name],
                min_age_s=params.restart_cooldown_s,
                dry_run=dry_run,
            )
            for name in names
        ]
        return ChangeSet(
            dry_run=dry_run,
            planned=[c for r in results for c in r.planned],
            applied=[c for r in results for c in r.applied],
            notes=[n for r in results for n in r.notes],
        )

    # one budget per pod (the usual single-pod restart); several pods at once need a human anyway
    label = "restart broker pod " + ", ".join(f"{namespace}/{n}" for n in names)
    changes = guard.act(label, restart, budget=RESTART_BUDGET, approval=_needs_approval)
    if params.dry_run:
        planned = [c.target for c in changes.planned]
        if planned:
            report.finish(
                Outcome.PLANNED,
                f"Would restart {', '.join(planned)} and wait up to "
                f"{params.isr_catchup_deadline_s:.0f}s for the ISR to catch up. Nothing was changed.",
            )
        else:
            report.finish(Outcome.NO_ACTION_NEEDED, "No pod to restart now (see notes).")
        return [], False
    applied = {c.target for c in changes.applied}
    restarted = [name for name in names if f"{namespace}/{name}" in applied]

    started = time.monotonic()
    ready = guard.verify(
        "restarted pods ready",
        lambda: read_pods(k8s, namespace, names),
        lambda seen: seen.ready,
        timeout_s=params.isr_catchup_deadline_s,
        interval_s=params.poll_interval_s,
        describe=_describe_pods,
    )
    assert ready.last is not None
    report.evidence("pods after restart", ready.last)
    if not ready.ok:
        raise VerificationFailed(
            f"{', '.join(names)} not Ready {ready.elapsed_s:.0f}s after the restart "
            f"({_describe_pods(ready.last)})"
        )
    remaining = params.isr_catchup_deadline_s - (time.monotonic() - started)
    caught_up = guard.verify(
        "ISR caught up",
        lambda: diagnose(*observe(), params.broker_pod_name),
        lambda d: d.kind == DiagnosisKind.HEALTHY,
        timeout_s=max(remaining, 0.0),
        interval_s=params.poll_interval_s,
        describe=lambda d: d.reason,
    )
    last = caught_up.last
    assert last is not None
    report.evidence("diagnosis after restart", last)
    if not caught_up.ok:
        raise VerificationFailed(
            f"Kafka not healthy {params.isr_catchup_deadline_s:.0f}s after restarting "
            f"{', '.join(names)}: {last.reason}"
        )
    did = f"Restarted {', '.join(restarted)}" if restarted else "Restarted nothing (see notes)"
    how = (
        "the alert resolved"
        if "alert.resolved" in (ready.by, caught_up.by)
        else "broker pods Ready, every expected broker back and every partition in sync"
    )
    report.finish(
        Outcome.RESOLVED, f"{did}; verified {time.monotonic() - started:.1f}s later: {how}."
    )
    return restarted, True


def _needs_approval(plan: ChangeSet) -> str | None:
    """Restarting more than one broker at once takes their replicas offline together."""
    if len(plan.planned) > 1:
        pods = ", ".join(c.target for c in plan.planned)
        return (
            f"restarts {len(plan.planned)} broker pods at once ({pods}): partitions whose "
            "replicas all sit on them go offline until they are back"
        )
    return None


def _describe_pods(seen: PodsReady) -> str:
    states = ", ".join(f"{p.name} {'Ready' if p.up else p.reason or p.phase}" for p in seen.pods)
    missing = f"; missing: {', '.join(seen.missing)}" if seen.missing else ""
    error = f"; last API error: {seen.last_error}" if seen.last_error else ""
    return f"{states}{missing}{error}" or "no reading"


def _follow_ups(namespace: str, diagnosis: Diagnosis) -> list[str]:
    if diagnosis.kind == DiagnosisKind.ZOOKEEPER_QUORUM_LOST:
        return [
            "Check the ZooKeeper servers that do not answer or do not serve: their pods/hosts, "
            "logs (disk full, out of memory, a corrupt snapshot or transaction log) and the "
            "network between them (ports 2888/3888)",
            "Check ZooKeeper from inside: zkCli.sh stat, or echo srvr | nc <server> 2181",
            "Once a majority serves again, re-run this runbook: brokers whose sessions expired "
            "re-register, and under-replicated partitions catch up",
        ]
    pods = " ".join(diagnosis.down_pods) or "<broker-pod>"
    return [
        f"Read the down brokers' logs: kubectl logs -n {namespace or '<namespace>'} {pods} --previous",
        "Check disk space on the broker nodes (a full or corrupted log dir crashes brokers)",
        "Verify network connectivity between brokers",
        "Check the controller quorum: ZooKeeper (zkCli.sh stat) or the KRaft controllers",
        "Confirm recovery downstream: consumer lag back to normal, producer buffers drained",
    ]
