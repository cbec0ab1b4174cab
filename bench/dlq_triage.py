"""DLQ triage speed: `python -m bench dlq-triage [--records 100000] [--repeats 3]`.

A throwaway broker (tansu) gets a DLQ of ``--records`` records written the way Kafka Connect and
Spring Kafka write them (tests/dlq_records.py: headers, wire-format Avro, broken JSON, protobuf,
JSON) over 4 partitions. Then, alternately, the bare baseline (a plain confluent-kafka consumer
loop: assign, consume in batches to the end of every partition, touch each value) and the
runbook's ``peek_dlq`` (the same read plus classification, counts and samples) read all of them.
Prints records/s of each (median of the repeats) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from confluent_kafka import Consumer, KafkaError, TopicPartition

from blocks.kafka import KafkaCluster
from tasks.kafka_dlq import peek_dlq
from tests.conftest import create_topic
from tests.dlq_records import dlq_records, produce_records
from tests.servers import start_kafka

PARTITIONS = 4


def bare_loop(bootstrap: str, topic: str) -> int:
    """What anyone would write: assign from the start, consume to the end, count."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    open_parts, count, size = set(range(PARTITIONS)), 0, 0
    while open_parts:
        for msg in consumer.consume(1000, timeout=0.5):
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(msg.partition())
                continue
            count += 1
            size += len(msg.value() or b"")
    consumer.close()
    return count


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench dlq-triage")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    broker = start_kafka()
    try:
        topic = create_topic(broker.bootstrap, "match-events-dlq", partitions=PARTITIONS)
        rounds = -(-args.records // 12)
        records = list(dlq_records("orders", "payments", rounds))[: args.records]
        started = time.monotonic()
        produce_records(broker.bootstrap, topic, records, partitions=PARTITIONS)
        print(f"filled {topic} with {len(records):,} records in {time.monotonic() - started:.1f} s")
        cluster = KafkaCluster(bootstrap_servers=broker.bootstrap, request_timeout_s=10)

        bare: list[float] = []
        triage: list[float] = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = bare_loop(broker.bootstrap, topic)
            bare.append(n / (time.perf_counter() - t0))
            assert n == len(records), f"bare loop read {n} of {len(records)}"
            t0 = time.perf_counter()
            result = peek_dlq.fn(cluster, topic, newest=len(records))
            triage.append(result.read / (time.perf_counter() - t0))
            assert result.read == len(records), f"triage read {result.read} of {len(records)}"
        b, t = statistics.median(bare), statistics.median(triage)
        print()
        print(
            f"| {len(records):,} DLQ records, {PARTITIONS} partitions | records/s (median of {args.repeats}) |"
        )
        print("|---|---|")
        print(f"| bare confluent-kafka consumer loop | {b:,.0f} |")
        print(f"| `peek_dlq` (read + classify + count + samples) | {t:,.0f} |")
        print(f"| ratio | **{t / b:.2f}x** |")
        print(f"\ncounts: {result.by_kind}")
    finally:
        broker.stop()
    return 0
