"""Crash-test victim: drain a WAL to a real broker and die by SIGKILL part way.

Run by tests/integration/test_wal_drain.py as
``python -m tests.wal_drain_victim WAL_DIR BOOTSTRAP TOPIC BATCH_SIZE KILL_AFTER_REPORTS``.
With KILL_AFTER_REPORTS > 0 the process kills itself inside the Nth delivery report: that
record is in Kafka, its transaction is open and the marker does not cover it yet. With 0 it
drains normally and the test kills it from outside.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from confluent_kafka import Producer

from blocks.edge_gateway import EdgeGateway
from blocks.kafka import KafkaCluster
from tasks.wal import drain_wal


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
    _block_type_slug = "runbooks-test-dying-kafka-cluster"
    kill_after: int = 0

    def get_producer(self, **overrides: Any) -> Producer:
        return _DyingProducer(self.client_config(**overrides), self.kill_after)


def main() -> None:
    wal_dir, bootstrap, topic, batch_size, kill_after = sys.argv[1:6]
    gateway = EdgeGateway(gateway_name="victim", wal_directory=wal_dir, topic=topic, delivery_timeout_s=15)
    cluster: KafkaCluster
    if int(kill_after) > 0:
        cluster = _DyingKafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=5, kill_after=int(kill_after))
    else:
        cluster = KafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=5)
    drain_wal.fn(gateway, cluster, dry_run=False, batch_size=int(batch_size))


if __name__ == "__main__":
    main()
