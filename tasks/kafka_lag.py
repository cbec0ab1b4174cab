"""Kafka consumer lag: of one group on one topic, and of every consumer group of a cluster.

The classification (caught up, missing consumers, stuck, slow) is pure: it compares two
samples of the same groups, so it is tested with data tables.
"""

from __future__ import annotations

from enum import StrEnum

from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from prefect import task
from pydantic import BaseModel, Field, computed_field

from blocks.kafka import KafkaCluster
from runbooks.retry import runbook_task_options
from tasks.kafka import is_retriable


class PartitionLag(BaseModel):
    topic: str
    partition: int
    committed: int | None = Field(
        description="Group's committed offset; None if it never committed."
    )
    end_offset: int
    lag: int

    @property
    def label(self) -> str:
        return f"{self.topic}[{self.partition}]"


class ConsumerLag(BaseModel):
    group: str
    topic: str
    total_lag: int
    partitions: list[PartitionLag]


# Partitions are passed as (topic, partition) pairs and made into TopicPartitions only here: a
# task's function is pickled by value when a served run starts, and librdkafka's types (module
# `cimpl`) cannot be, so a task's own body must not name them.


def _end_offsets(
    admin: AdminClient, partitions: list[tuple[str, int]], timeout: float
) -> dict[tuple[str, int], int]:
    """Log end offset (high watermark) of each partition, in one ListOffsets round."""
    if not partitions:
        return {}
    futures = admin.list_offsets(
        {TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions}, request_timeout=timeout
    )
    return {(tp.topic, tp.partition): fut.result(timeout).offset for tp, fut in futures.items()}


def _committed(
    admin: AdminClient, group: str, partitions: list[tuple[str, int]] | None, timeout: float
) -> dict[tuple[str, int], int]:
    """A group's committed offsets (all of them when ``partitions`` is None); never-committed
    ones left out."""
    request = (
        ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in partitions])
        if partitions
        else ConsumerGroupTopicPartitions(group)
    )
    result = admin.list_consumer_group_offsets([request], request_timeout=timeout)[group].result(
        timeout
    )
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions if tp.offset >= 0}


def partition_lag(topic: str, partition: int, committed: int | None, end: int) -> PartitionLag:
    """A partition the group never committed counts its whole log as lag (from offset 0)."""
    return PartitionLag(
        topic=topic,
        partition=partition,
        committed=committed,
        end_offset=end,
        lag=max(end - (committed or 0), 0),
    )


@task(**runbook_task_options(KafkaException, when=is_retriable))
def get_consumer_lag(cluster: KafkaCluster, group: str, topic: str) -> ConsumerLag:
    """Lag of a consumer group on a topic: end offset minus committed offset, per partition.

    A partition the group never committed counts its whole log as lag (from offset 0).
    """
    admin = cluster.get_admin_client()
    timeout = cluster.request_timeout_s
    metadata = admin.list_topics(topic=topic, timeout=timeout)
    topic_md = metadata.topics.get(topic)
    if topic_md is None or topic_md.error is not None:
        raise ValueError(f"topic {topic!r} not found: {topic_md.error if topic_md else 'missing'}")
    tps = [(topic, p) for p in sorted(topic_md.partitions)]
    committed = _committed(admin, group, tps, timeout)
    ends = _end_offsets(admin, tps, timeout)
    rows = [
        partition_lag(topic, p, committed.get((topic, p)), end)
        for (_, p), end in sorted(ends.items())
    ]
    return ConsumerLag(
        group=group, topic=topic, total_lag=sum(r.lag for r in rows), partitions=rows
    )


# --- every group -----------------------------------------------------------------------------

# states in which a group has members (Kafka's group coordinator: EMPTY and DEAD have none)
_ACTIVE_STATES = {
    "STABLE",
    "PREPARING_REBALANCE",
    "COMPLETING_REBALANCE",
    "RECONCILING",
    "ASSIGNING",
}


class GroupLag(BaseModel):
    """One consumer group at one moment: its state, members and lag per committed partition."""

    group: str
    state: str = Field(
        description="Group state as the coordinator reports it (STABLE, EMPTY, ...)."
    )
    members: int | None = Field(
        description="Members the broker listed; None when the group is active but the broker "
        "listed none (some Kafka-compatible brokers do not describe classic groups' members)."
    )
    partitions: list[PartitionLag] = Field(
        description="Partitions the group committed or is assigned."
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def has_consumers(self) -> bool:
        """A member is in the group (its state says so even when the broker lists none)."""
        return bool(self.members) or self.state in _ACTIVE_STATES

    @computed_field  # type: ignore[prop-decorator]
    @property
    def unattended(self) -> bool:
        """Lag with nobody consuming: it only grows until a consumer joins."""
        return self.total_lag > 0 and not self.has_consumers


def _state_name(state: ConsumerGroupState | None) -> str:
    return state.name if state is not None else "UNKNOWN"


@task(**runbook_task_options(KafkaException, when=is_retriable))
def get_all_group_lag(cluster: KafkaCluster, groups: list[str] | None = None) -> list[GroupLag]:
    """Lag of every consumer group (or only ``groups``): per partition committed offset, end
    offset and lag, with the group's state and member count.

    The partitions are those the group committed plus those assigned to its members; an
    assigned partition never committed counts its whole log as lag. A group named in ``groups``
    that the broker does not know is reported with state ``NOT_FOUND`` and no partitions.
    """
    admin = cluster.get_admin_client()  # held until the answers: dropping it aborts the requests
    timeout = cluster.request_timeout_s
    listed = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
    known = sorted({g.group_id for g in listed.valid})
    wanted = sorted(set(groups)) if groups else known
    present = [g for g in wanted if g in set(known)]
    described = (
        {
            g: f.result(timeout)
            for g, f in admin.describe_consumer_groups(present, request_timeout=timeout).items()
        }
        if present
        else {}
    )
    committed = {g: _committed(admin, g, None, timeout) for g in present}
    assigned: dict[str, set[tuple[str, int]]] = {
        g: {
            (tp.topic, tp.partition)
            for m in d.members
            if m.assignment
            for tp in m.assignment.topic_partitions
        }
        for g, d in described.items()
    }
    every = sorted({tp for g in present for tp in (*committed[g], *assigned.get(g, ()))})
    ends = _end_offsets(admin, every, timeout)
    found: list[GroupLag] = []
    for g in wanted:
        if g not in described:
            found.append(GroupLag(group=g, state="NOT_FOUND", members=0, partitions=[]))
            continue
        d = described[g]
        state = _state_name(d.state)
        members = len(d.members) if d.members or state not in _ACTIVE_STATES else None
        tps = sorted({*committed[g], *assigned.get(g, ())})
        rows = [
            partition_lag(t, p, committed[g].get((t, p)), ends[(t, p)])
            for t, p in tps
            if (t, p) in ends
        ]
        found.append(GroupLag(group=g, state=state, members=members, partitions=rows))
    return found


# --- classification ----------------------------------------------------------------------------


class LagVerdict(StrEnum):
    CAUGHT_UP = "caught up"
    # lag and nobody in the group: the consumers are down (or were renamed)
    MISSING_CONSUMERS = "missing consumers"
    # members present but a partition behind has not committed between the samples
    STUCK = "stuck"
    # committing, but the log grows as fast or faster (or the backlog is still being worked off)
    SLOW = "slow"


class GroupFinding(BaseModel):
    """What two samples of one group say about it."""

    group: str
    verdict: LagVerdict
    total_lag: int = Field(description="Lag at the last sample.")
    lag_change: int = Field(description="Lag at the last sample minus lag at the first.")
    state: str
    members: int | None
    behind: list[str] = Field(
        description="Partitions with lag at the last sample, as topic[partition]=lag."
    )
    not_moving: list[str] = Field(
        description="Partitions behind whose committed offset did not move."
    )
    reason: str = Field(description="The evidence behind the verdict, in one sentence.")
    action: str = Field("", description="What a person (or, later, the runbook) should do.")

    @property
    def falling(self) -> bool:
        return self.lag_change < 0


def classify_group(
    first: GroupLag, last: GroupLag, threshold: int, interval_s: float
) -> GroupFinding:
    """Classify a group from two samples ``interval_s`` apart; lag at or under ``threshold``
    counts as caught up."""
    before = {(p.topic, p.partition): p.committed for p in first.partitions}
    behind = [p for p in last.partitions if p.lag > 0]
    not_moving = [
        p
        for p in behind
        if (p.topic, p.partition) in before and before[(p.topic, p.partition)] == p.committed
    ]
    change = last.total_lag - first.total_lag
    trend = f"{change:+d} in {interval_s:.0f}s"
    members = (
        "its members (which the broker does not list)"
        if last.members is None
        else f"{last.members} member(s)"
    )
    common = {
        "group": last.group,
        "total_lag": last.total_lag,
        "lag_change": change,
        "state": last.state,
        "members": last.members,
        "behind": [f"{p.label}={p.lag}" for p in behind],
        "not_moving": [p.label for p in not_moving],
    }
    if last.total_lag <= threshold:
        return GroupFinding(
            verdict=LagVerdict.CAUGHT_UP,
            reason=f"lag {last.total_lag} is within {threshold} ({trend})",
            **common,
        )
    if not last.has_consumers:
        return GroupFinding(
            verdict=LagVerdict.MISSING_CONSUMERS,
            reason=f"lag {last.total_lag} ({trend}) and no member in the group (state {last.state})",
            action=f"start the consumers of group {last.group}: nobody consumes, so the lag only grows",
            **common,
        )
    if not_moving:
        labels = ", ".join(p.label for p in not_moving)
        return GroupFinding(
            verdict=LagVerdict.STUCK,
            reason=f"lag {last.total_lag} ({trend}); the group has {members}, but the committed offset of "
            f"{labels} did not move in {interval_s:.0f}s",
            action=f"restart the consumer of group {last.group} that owns {labels} (a hung poll loop or a "
            "poison record); if it keeps stopping at the same offset, read the record there",
            **common,
        )
    partitions = len(last.partitions)
    if last.members is not None and last.members >= partitions:
        scale = (
            f"it already has a consumer per partition ({last.members} for {partitions}): "
            "add partitions or make processing faster"
        )
    else:
        scale = f"scale its consumers up (at most one per partition: {partitions})"
    return GroupFinding(
        verdict=LagVerdict.SLOW,
        reason=f"lag {last.total_lag} ({trend}) while every partition behind is committing",
        action=f"group {last.group} consumes slower than its topics grow: {scale}"
        if change >= 0
        else f"group {last.group} is working off its backlog; if it does not fall fast enough, {scale}",
        **common,
    )


def needs_escalation(finding: GroupFinding, escalate_over: int) -> bool:
    """Lag over the escalation threshold and not falling: waiting will not fix it."""
    return (
        finding.verdict is not LagVerdict.CAUGHT_UP
        and finding.total_lag > escalate_over
        and not finding.falling
    )
