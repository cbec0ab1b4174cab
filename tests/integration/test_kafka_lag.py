"""Consumer lag against a real broker: produce, commit part of it, measure."""

from __future__ import annotations

from confluent_kafka import Producer, TopicPartition
from prefect import flow

from blocks.kafka import KafkaCluster
from tasks.kafka_lag import get_consumer_lag
from tests.conftest import create_topic, unique


def test_lag_counts_uncommitted_messages(kafka_cluster: KafkaCluster) -> None:
    topic = create_topic(kafka_cluster.bootstrap_servers, unique("lag"), partitions=2)
    producer = Producer({"bootstrap.servers": kafka_cluster.bootstrap_servers})
    for i in range(10):
        producer.produce(topic, value=b"x", partition=i % 2)
        # one record per batch: tansu 0.6 reports the high watermark as the last batch's
        # base offset + 1, so multi-record batches would under-count the log end
        assert producer.flush(10) == 0
    group = unique("grp")
    consumer = kafka_cluster.get_consumer(group, **{"enable.auto.commit": False})
    # the group has consumed 3 of partition 0's 5 messages
    consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    consumer.close()

    @flow
    def measure():
        return get_consumer_lag(kafka_cluster, group, topic)

    lag = measure()
    by_part = {p.partition: p for p in lag.partitions}
    assert by_part[0].committed == 3 and by_part[0].end_offset == 5 and by_part[0].lag == 2
    assert by_part[1].committed is None and by_part[1].lag == 5
    assert lag.total_lag == 7
