"""Crash-test victim: back up a topic, or restore one, and die by SIGKILL part way.

Run by tests/integration/test_kafka_topic_backup.py as
``python -m tests.kafka_backup_victim backup BOOTSTRAP S3_ENDPOINT BUCKET TOPIC KILL_AFTER_PUTS SEGMENT_BYTES``
or ``python -m tests.kafka_backup_victim restore BOOTSTRAP S3_ENDPOINT BUCKET TOPIC KILL_AFTER_RECORDS TARGET``.
A backup dies as its Nth segment upload returns (uploads run on two threads: others may be half
done); a restore dies 500 records after its first N are in Kafka (some of those 500 in flight).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from confluent_kafka import Producer

from blocks.backup_store import BackupStore
from blocks.kafka import KafkaCluster
from tasks.kafka_backup import backup_topic
from tasks.kafka_restore import restore_topic
from tests.moto_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY


class _DyingStore(BackupStore):
    _block_type_slug = "runbooks-test-dying-backup-store"
    kill_after_puts: int = 0
    victim_suffix: str = ".seg.gz"  # the objects counted (tests/event_archive_victim.py: archives)

    def get_s3_client(self) -> Any:
        client = super().get_s3_client()
        left = [self.kill_after_puts]

        def before_put(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
            context["victim_segment"] = params["Key"].endswith(self.victim_suffix)

        def after_put(context: dict[str, Any], **_: Any) -> None:
            if not context.get("victim_segment"):
                return
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        if self.kill_after_puts:
            client.meta.events.register("provide-client-params.s3.PutObject", before_put)
            client.meta.events.register("after-call.s3.PutObject", after_put)
        return client


class _DyingProducer(Producer):
    """A real producer that makes sure its first N records are in Kafka, then sends 500 more
    without waiting and dies by SIGKILL: some of those are in Kafka, some in flight, some not
    sent. (A restore asks for few delivery reports and sends faster than they arrive, so dying
    inside a report would come too late.)"""

    def __init__(self, config: dict[str, Any], kill_after: int):
        super().__init__(config)
        self._calls = 0
        self._kill_after = kill_after

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self._calls += 1
        if self._calls == self._kill_after:
            assert self.flush(30) == 0
        if self._calls == self._kill_after + 500:
            os.kill(os.getpid(), signal.SIGKILL)
        super().produce(*args, **kwargs)


class _DyingKafkaCluster(KafkaCluster):
    _block_type_slug = "runbooks-test-dying-kafka-cluster-restore"
    kill_after: int = 0

    def get_producer(self, **overrides: Any) -> Producer:
        return _DyingProducer(self.client_config(**overrides), self.kill_after)


def main() -> None:
    mode, bootstrap, endpoint, bucket, topic, kill_after, extra = sys.argv[1:8]
    store = dict(
        bucket=bucket,
        endpoint_url=endpoint,
        region=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    if mode == "backup":
        cluster = KafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=5)
        backup_topic.fn(
            cluster,
            _DyingStore(**store, kill_after_puts=int(kill_after)),
            topic,
            dry_run=False,
            segment_bytes=int(extra),
        )
    else:
        dying = _DyingKafkaCluster(
            bootstrap_servers=bootstrap, request_timeout_s=5, kill_after=int(kill_after)
        )
        restore_topic.fn(
            dying, BackupStore(**store), topic, dry_run=False, target_topic=extra, replication_factor=1
        )


if __name__ == "__main__":
    main()
