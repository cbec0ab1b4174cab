"""Service runbook ``consumers-too-slow``: seed 001 "High consumer lag: scale up consumers,
increase HPA min replicas", seed 003 issue 1 (lag > 10,000), seed 004 section 4.5 "lag
increasing: scale the stream processor".

Sample the group's lag on the real broker twice, and count its consumers (the group's members, or
the workload's running instances where the broker lists none). Behind and not catching up: with
fewer consumers than partitions, scale the consumer workload up (doubling, at most to the
partition count and a cap; through the autoscaler's minimum where one manages the replicas);
with a consumer per partition already, say so (more replicas cannot help: each partition is read
by one consumer) and escalate. Verify that the lag falls.
"""

import time
from enum import StrEnum

from prefect import flow
from pydantic import BaseModel, Field

from blocks.kafka import KafkaCluster
from flows.services.common import ServiceParams, record_status
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, GroupId
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.results import ChangeSet
from runbooks.safety import Budget, Guard
from tasks.kafka_activity import read_topic_offsets
from tasks.kafka_lag import GroupLag, get_all_group_lag
from tasks.workloads import (
    Capability,
    WorkloadBackend,
    WorkloadRef,
    WorkloadStatus,
    load_backend,
    scale_workload,
    set_autoscaler_min,
    workload_status,
)

# three scale-ups an hour for one consumer workload: more means the lag has another cause
SCALE_BUDGET = Budget(max_actions=3, window_s=3600)


class ConsumersTooSlowParams(ServiceParams):
    """Parameters of the consumers-too-slow runbook (``service`` is the consumer workload)."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    group: GroupId = Field(description="The consumer group the workload's instances consume in.")
    lag_threshold: int = Field(
        5000, ge=0, description="Lag at or under this is caught up: nothing to scale."
    )
    max_drain_s: float = Field(
        600,
        gt=0,
        le=86400,
        description="A falling lag that would take longer than this to reach the threshold "
        "still gets more consumers.",
    )
    max_replicas: int = Field(
        10, ge=1, le=1000, description="Never scale the consumers beyond this many instances."
    )
    sample_interval_s: float = Field(
        30, gt=0, le=600, description="Time between the two lag samples that show the trend."
    )
    verify_window_s: float = Field(
        300, gt=0, le=3600, description="After scaling, how long the lag has to start falling."
    )


class ScaleAction(StrEnum):
    NONE = "nothing to do"
    SCALE = "scale the workload"
    RAISE_AUTOSCALER_MIN = "raise the autoscaler's minimum"
    NO_CONSUMERS = "no consumer runs"
    AT_PARTITIONS = "a consumer per partition already"
    AT_CAP = "at the replica cap"
    CANNOT_SCALE = "the platform cannot scale it"


class ScalePlan(BaseModel):
    action: ScaleAction
    reason: str
    consumers: int = Field(description="Consumers counted (group members, else running instances).")
    partitions: int
    replicas: int = Field(description="Instances now.")
    target: int | None = Field(None, description="Instances (or autoscaler minimum) to set.")

    @property
    def acts(self) -> bool:
        return self.action in (ScaleAction.SCALE, ScaleAction.RAISE_AUTOSCALER_MIN)


def drain_seconds(lag: int, change: int, interval_s: float, threshold: int) -> float | None:
    """Seconds until the lag reaches ``threshold`` at the trend seen; None when it does not fall."""
    if change >= 0:
        return None
    return (lag - threshold) / (-change / interval_s)


def plan_consumer_scale(
    first: GroupLag,
    last: GroupLag,
    status: WorkloadStatus,
    params: ConsumersTooSlowParams,
    partitions: int | None = None,
) -> ScalePlan:
    """Scale, raise the autoscaler's minimum, or say why not (pure; tests/unit tables).

    ``partitions``: of the topics the group consumes, as the broker has them; the group's own
    view (partitions it committed or was assigned) can be short while its consumers start.
    """
    seen_partitions = len({(p.topic, p.partition) for p in last.partitions})
    partitions = max(partitions or 0, seen_partitions)
    replicas = max(status.desired_replicas or 0, len(status.running))
    consumers = last.members if last.members is not None else len(status.running)
    lag, change = last.total_lag, last.total_lag - first.total_lag
    seen = dict(consumers=consumers, partitions=partitions, replicas=replicas)
    trend = f"lag {lag} ({change:+d} in {params.sample_interval_s:.0f}s)"
    if lag <= params.lag_threshold:
        return ScalePlan(
            action=ScaleAction.NONE, reason=f"{trend}, within {params.lag_threshold}", **seen
        )
    drain = drain_seconds(lag, change, params.sample_interval_s, params.lag_threshold)
    if drain is not None and drain <= params.max_drain_s:
        return ScalePlan(
            action=ScaleAction.NONE,
            reason=f"{trend}: falling, under the threshold in about {drain:.0f}s",
            **seen,
        )
    if consumers == 0 or not status.running:
        return ScalePlan(
            action=ScaleAction.NO_CONSUMERS,
            reason=f"{trend} and no consumer running: the consumers are down, not slow",
            **seen,
        )
    if consumers >= partitions:
        return ScalePlan(
            action=ScaleAction.AT_PARTITIONS,
            reason=f"{trend} with {consumers} consumers for {partitions} partitions: each "
            "partition is read by one consumer of the group, so more replicas would sit idle",
            **seen,
        )
    target = min(partitions, params.max_replicas, max(replicas * 2, replicas + 1))
    if target <= replicas:
        return ScalePlan(
            action=ScaleAction.AT_CAP,
            reason=f"{trend} with {replicas} instances, already at max_replicas {params.max_replicas}",
            **seen,
        )
    why = f"{trend} with {consumers} consumers for {partitions} partitions"
    if status.autoscaler is not None and status.can(Capability.AUTOSCALER):
        return ScalePlan(
            action=ScaleAction.RAISE_AUTOSCALER_MIN,
            reason=f"{why}: the autoscaler {status.autoscaler.name} manages the replicas, its "
            f"minimum goes from {status.autoscaler.min_replicas} to {target}",
            target=target,
            **seen,
        )
    if not status.can(Capability.SCALE):
        return ScalePlan(
            action=ScaleAction.CANNOT_SCALE,
            reason=f"{why}, but {status.platform} cannot scale {status.service}",
            **seen,
        )
    return ScalePlan(
        action=ScaleAction.SCALE,
        reason=f"{why}: from {replicas} to {target} instances",
        target=target,
        **seen,
    )


class ConsumersTooSlowResult(BaseModel):
    outcome: Outcome
    plan: ScalePlan | None
    lag_before: int | None = None
    lag_after: int | None = None
    report: str


@flow(
    name="consumers-too-slow",
    description="Consumer lag grows: count consumers against partitions; scale the consumer "
    "workload (or its autoscaler's minimum) up to the partition count and a cap, verify the lag "
    "falls; escalate when a consumer per partition is already there.",
)
@ends_as_reported
def consumers_too_slow(params: ConsumersTooSlowParams) -> ConsumersTooSlowResult:
    plan: ScalePlan | None = None
    before: int | None = None
    after: int | None = None
    with incident_report(
        runbook="consumers-too-slow", title="Consumers too slow", severity="P2", params=params
    ) as report:
        kafka = KafkaCluster.load(params.kafka_block)
        backend = load_backend(params.platform)
        ref = params.ref()
        with report.guard(params.target()) as guard:
            first = _lag(kafka, params.group)
            report.step(
                f"group {params.group}: lag {first.total_lag}; sampling again in "
                f"{params.sample_interval_s:.0f}s for the trend"
            )
            time.sleep(params.sample_interval_s)
            last = _lag(kafka, params.group)
            before = last.total_lag
            status = workload_status(backend, ref)
            record_status(report, status)
            report.evidence(f"group {params.group}", last)
            partitions = _partitions(kafka, last)
            plan = plan_consumer_scale(first, last, status, params, partitions)
            report.evidence("scale plan", plan)
            report.check("consumer lag", plan.action is ScaleAction.NONE, plan.reason)
            if plan.action is ScaleAction.NONE:
                report.finish(Outcome.NO_ACTION_NEEDED, f"Group {params.group}: {plan.reason}.")
            elif not plan.acts:
                _escalate(report, params, plan)
            else:
                after = _scale_and_verify(report, guard, backend, ref, kafka, params, plan)
    return ConsumersTooSlowResult(
        outcome=report.outcome or Outcome.FAILED,
        plan=plan,
        lag_before=before,
        lag_after=after,
        report=report.to_markdown(),
    )


def _partitions(kafka: KafkaCluster, lag: GroupLag) -> int:
    """Partitions of the topics the group consumes (each can have one consumer of the group)."""
    topics = sorted({p.topic for p in lag.partitions})
    found = read_topic_offsets(kafka, topics) if topics else {}
    return sum(len(t.end) for t in found.values())


def _lag(kafka: KafkaCluster, group: str) -> GroupLag:
    found = get_all_group_lag(kafka, [group])
    if not found or found[0].state == "NOT_FOUND":
        raise Escalation(
            f"the broker does not know consumer group {group!r}: check the alert's label"
        )
    return found[0]


def _escalate(report: IncidentReport, params: ConsumersTooSlowParams, plan: ScalePlan) -> None:
    if plan.action is ScaleAction.AT_PARTITIONS:
        report.follow_ups += [
            "Make each consumer faster (batch processing, fewer per-record round trips, a slow "
            "downstream such as a database) or add partitions to the topic (keys move between "
            "partitions: check ordering needs first)",
        ]
    elif plan.action is ScaleAction.NO_CONSUMERS:
        report.follow_ups.append(
            f"Start the consumers of {params.service}: service-not-responding restarts a service "
            "that does not run"
        )
    raise Escalation(f"Group {params.group} is behind and automation cannot help: {plan.reason}")


def _scale_and_verify(
    report: IncidentReport,
    guard: Guard,
    backend: WorkloadBackend,
    ref: WorkloadRef,
    kafka: KafkaCluster,
    params: ConsumersTooSlowParams,
    plan: ScalePlan,
) -> int | None:
    assert plan.target is not None
    target = plan.target

    def change(dry_run: bool) -> ChangeSet:
        if plan.action is ScaleAction.RAISE_AUTOSCALER_MIN:
            return set_autoscaler_min(backend, ref, target, dry_run=dry_run)
        return scale_workload(backend, ref, target, dry_run=dry_run)

    label = (
        f"raise the autoscaler minimum of {ref.describe()} to {target}"
        if plan.action is ScaleAction.RAISE_AUTOSCALER_MIN
        else f"scale {ref.describe()} to {target} instances"
    )
    guard.act(label, change, budget=SCALE_BUDGET)
    if params.dry_run:
        report.finish(
            Outcome.PLANNED,
            f"Would {plan.action} to {target} ({plan.reason}) and watch the lag fall for up to "
            f"{params.verify_window_s:.0f}s. Nothing was changed.",
        )
        return None
    start = _lag(kafka, params.group).total_lag
    falling = guard.verify(
        "lag falling after scaling",
        lambda: _lag(kafka, params.group),
        lambda seen: seen.total_lag < start or seen.total_lag <= params.lag_threshold,
        timeout_s=params.verify_window_s,
        interval_s=min(params.sample_interval_s, 10),
        describe=lambda seen: f"lag {seen.total_lag} (was {start} when scaled)",
    )
    last = falling.last
    assert last is not None
    if not falling.ok:
        raise VerificationFailed(
            f"group {params.group}'s lag did not fall in {params.verify_window_s:.0f}s after "
            f"scaling {ref.describe()} to {target} (lag {last.total_lag}): the consumers are "
            "slow for another reason (a slow downstream, a poison record)"
        )
    report.follow_ups.append(
        f"Scale {ref.describe()} back down once the backlog is gone, or keep {target} if the "
        "traffic stays (the definition in git should say so)"
    )
    report.finish(
        Outcome.RESOLVED,
        f"Group {params.group} was behind ({plan.reason}); {label}; the lag went from "
        f"{start} to {last.total_lag} in {falling.elapsed_s:.0f}s.",
    )
    return last.total_lag
