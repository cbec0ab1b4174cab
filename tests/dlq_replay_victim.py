"""Crash-test victim: replay a DLQ and die by SIGKILL inside the Nth delivery report.

Run by tests/integration/test_dlq_growing.py as
``python -m tests.dlq_replay_victim BOOTSTRAP DLQ_TOPIC KILL_AFTER_REPORTS`` with PREFECT_API_URL
set to the test server (the replay's progress is a Prefect Variable). At that moment the record
is in Kafka and the saved progress does not cover it: the worst place to die.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from confluent_kafka import Producer, TopicPartition

from blocks.kafka import KafkaCluster
from flows.kafka.dlq_growing import dlq_target
from tasks.kafka_dlq import FailureKind
from tasks.kafka_dlq_replay import replay_dlq


class _DyingProducer(Producer):
    """A real producer whose Nth delivery report is its last act."""

    def __init__(self, config: dict[str, Any], kill_after: int):
        super().__init__(config)
        self._left = kill_after

    def produce(self, *args: Any, on_delivery: Any = None, **kwargs: Any) -> None:
        def report(err: Any, msg: Any) -> None:
            on_delivery(err, msg)
            self._left -= 1
            if self._left == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        super().produce(*args, on_delivery=report, **kwargs)


class _DyingKafkaCluster(KafkaCluster):
    _block_type_slug = "runbooks-test-dying-kafka-cluster-dlq"
    kill_after: int = 0

    def get_producer(self, **overrides: Any) -> Producer:
        return _DyingProducer(self.client_config(**overrides), self.kill_after)


def main() -> None:
    bootstrap, topic, kill_after = sys.argv[1:4]
    cluster = _DyingKafkaCluster(
        bootstrap_servers=bootstrap, request_timeout_s=5, kill_after=int(kill_after)
    )
    consumer = cluster.get_consumer("runbooks-victim-unused")
    md = consumer.list_topics(topic, timeout=5).topics[topic]
    bounds = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
        for p in md.partitions
    }
    consumer.close()
    replay_dlq.fn(
        cluster,
        topic,
        bounds,
        list(FailureKind),
        dlq_target(cluster, topic).slug,
        dry_run=False,
        fallback_topic=None,
        batch_size=10,
    )


if __name__ == "__main__":
    main()
