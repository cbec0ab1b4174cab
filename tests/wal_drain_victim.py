"""Crash-test victim: drain a WAL to a real broker and die by SIGKILL part way.

Run by tests/integration/test_wal_drain.py as
``python -m tests.wal_drain_victim WAL_DIR BOOTSTRAP TOPIC BATCH_SIZE KILL_AFTER_REPORTS
[KILL_AFTER_COMMITS]``.
With KILL_AFTER_REPORTS > 0 the process kills itself inside the Nth delivery report: that
record is in Kafka, its transaction is open and the marker does not cover it yet. With
KILL_AFTER_COMMITS > 0 it kills itself as the Nth ``commit_transaction`` returns: that
transaction is committed, the marker write that covers it has not started. With both 0 it
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
from tasks.wal_drain import drain_wal


class _DyingProducer(Producer):
    """A real producer whose Nth delivery report, or Nth commit, is its last act."""

    def __init__(self, config: dict[str, Any], kill_after: int, kill_after_commits: int):
        super().__init__(config)
        self._left = kill_after
        self._commits_left = kill_after_commits

    def produce(self, *args: Any, on_delivery: Any = None, **kwargs: Any) -> None:
        # every record gets a report here, also those the drain asks none for
        def report(err: Any, msg: Any) -> None:
            if on_delivery is not None:
                on_delivery(err, msg)
            self._left -= 1
            if self._left == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        super().produce(*args, on_delivery=report, **kwargs)

    def commit_transaction(self, *args: Any) -> None:
        super().commit_transaction(*args)
        self._commits_left -= 1
        if self._commits_left == 0:
            os.kill(os.getpid(), signal.SIGKILL)


class _DyingKafkaCluster(KafkaCluster):
    _block_type_slug = "runbooks-test-dying-kafka-cluster"
    kill_after: int = 0
    kill_after_commits: int = 0

    def get_producer(self, **overrides: Any) -> Producer:
        return _DyingProducer(
            self.client_config(**overrides), self.kill_after, self.kill_after_commits
        )


def main() -> None:
    wal_dir, bootstrap, topic, batch_size, kill_after = sys.argv[1:6]
    kill_after_commits = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    gateway = EdgeGateway(
        gateway_name="victim", wal_directory=wal_dir, topic=topic, delivery_timeout_s=15
    )
    cluster: KafkaCluster
    if int(kill_after) > 0 or kill_after_commits > 0:
        cluster = _DyingKafkaCluster(
            bootstrap_servers=bootstrap,
            request_timeout_s=5,
            kill_after=int(kill_after),
            kill_after_commits=kill_after_commits,
        )
    else:
        cluster = KafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=5)
    drain_wal.fn(gateway, cluster, dry_run=False, batch_size=int(batch_size))


if __name__ == "__main__":
    main()
