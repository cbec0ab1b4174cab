"""A small Kafka producer for the supervisord tests: COUNT records, spread over the partitions.

``python kafka_producer.py --bootstrap HOST:PORT --topic T --count N [--rate R]``

Each record is its own batch: tansu reports a partition's high watermark as its last batch's
base offset + 1, so multi-record batches would hide records from a lag measurement. With
``--rate`` it produces R records a second (a live producer); without, as fast as it can.
``--count 0`` produces until stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from confluent_kafka import Producer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args()

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "linger.ms": 0,
        "batch.num.messages": 1,
    })
    sent = 0
    while not stopping and (args.count == 0 or sent < args.count):
        producer.produce(args.topic, value=f"record-{sent}".encode(),
                         partition=sent % args.partitions)
        producer.poll(0)
        sent += 1
        if args.rate:
            time.sleep(1 / args.rate)
    left = producer.flush(30)
    print(f"produced {sent - left} records to {args.topic}", flush=True)
    sys.exit(1 if left else 0)


if __name__ == "__main__":
    main()
