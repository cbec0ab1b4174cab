"""Kafka tasks: cluster health (ISR, offline partitions, controller) and consumer lag."""

from __future__ import annotations

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec
from prefect import task
from pydantic import BaseModel, Field

from blocks.kafka import KafkaCluster
from runbooks.retry import transient_retries


def is_retriable(exc: BaseException) -> bool:
    """Kafka errors flagged retriable (timeouts, transport) are transient; auth/config are not."""
    err = exc.args[0] if exc.args else None
    return bool(getattr(err, "retriable", lambda: False)())


class PartitionLag(BaseModel):
    topic: str
    partition: int
    committed: int | None = Field(description="Group's committed offset; None if it never committed.")
    end_offset: int
    lag: int


class ConsumerLag(BaseModel):
    group: str
    topic: str
    total_lag: int
    partitions: list[PartitionLag]


@task(**transient_retries(KafkaException, when=is_retriable))
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
    tps = [TopicPartition(topic, p) for p in sorted(topic_md.partitions)]

    committed_fut = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, tps)], request_timeout=timeout
    )[group]
    committed = {tp.partition: tp.offset for tp in committed_fut.result(timeout).topic_partitions}

    ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout)
    rows = []
    for tp, fut in ends.items():
        end = fut.result(timeout).offset
        done = committed.get(tp.partition)
        done = done if done is not None and done >= 0 else None
        rows.append(
            PartitionLag(
                topic=topic, partition=tp.partition, committed=done, end_offset=end,
                lag=max(end - (done or 0), 0),
            )
        )
    rows.sort(key=lambda r: r.partition)
    return ConsumerLag(group=group, topic=topic, total_lag=sum(r.lag for r in rows), partitions=rows)
