"""A deliberately slow Kafka consumer for the supervisord tests: one group member.

``python kafka_consumer.py --bootstrap HOST:PORT --topic T --group G --sleep-ms MS
[--rebalance-ms MS]``

It subscribes (so several copies share the partitions), sleeps MS milliseconds per record (a
consumer too slow for its topic) and commits what it consumed every 200 ms. It prints each
assignment and revocation of partitions. On SIGTERM (what
supervisord sends to stop it) it leaves the group at once, so the others take its partitions
over without waiting for its session to time out.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from confluent_kafka import Consumer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--sleep-ms", type=float, default=0.0)
    parser.add_argument("--rebalance-ms", type=int, default=3000)
    args = parser.parse_args()

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
        "auto.commit.interval.ms": 200,
        # tansu holds a JoinGroup for the whole rebalance timeout (max.poll.interval.ms), so
        # every join takes that long; librdkafka wants the session timeout no longer
        "max.poll.interval.ms": args.rebalance_ms,
        "session.timeout.ms": args.rebalance_ms,
        "heartbeat.interval.ms": max(args.rebalance_ms // 3, 100),
    })
    def assigned(_consumer: Consumer, partitions: list) -> None:
        # tests read these lines (its log file) to know the group has settled
        print(f"assigned {len(partitions)} partitions: "
              f"{sorted(p.partition for p in partitions)}", flush=True)

    def revoked(_consumer: Consumer, partitions: list) -> None:
        print(f"revoked {len(partitions)} partitions", flush=True)

    consumer.subscribe([args.topic], on_assign=assigned, on_revoke=revoked)
    print(f"consumer pid={os.getpid()} joined {args.group} on {args.topic}", flush=True)
    consumed = 0
    while not stopping:
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        time.sleep(args.sleep_ms / 1000)
        consumed += 1
    consumer.close()
    print(f"consumer pid={os.getpid()} consumed {consumed} records, left the group", flush=True)


if __name__ == "__main__":
    main()
