"""Topic backup and restore speed: `python -m bench topic-backup [--records 100000] [--size 1024] [--repeats 3]`.

A throwaway broker (tansu) and a moto S3 server; a 4-partition topic gets ``--records`` records of
``--size`` bytes (hex text: compresses about 2:1, like JSON), each with a key and a header. Then,
alternately:

- backup: the bare loop (assign, consume to the end, frame key/value/headers into a buffer, gzip
  level 1 and put every 16 MB, one thread: what anyone would write) against ``backup_topic``
  (the same plus timestamps and offsets, digests, parallel uploads, plan and manifest);
- restore: two bare loops with the restore's own producer settings (``RESTORE_PRODUCER``:
  idempotent, gapless, acks=all, linger 5 ms, delivery reports for failures only), each into a
  new topic: one sending the records already in memory (the producer alone), and one doing what
  the backup's bare loop calls for on the way back (get its objects from S3 one by one, gunzip,
  unpack the frames, produce: one thread, what anyone would write), against ``restore_topic``
  (lists and checks the manifest, reads the target, downloads, decompresses and decodes the
  segments, sends with the same producer, writes its progress record) into a new topic.

Prints MB/s (key + value + header bytes) of each, the median of the repeats, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import time
import uuid
import zlib

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from blocks.backup_store import BackupStore
from blocks.kafka import KafkaCluster
from tasks.kafka_backup import backup_topic
from tasks.kafka_restore import RESTORE_PRODUCER, restore_topic
from tests.conftest import create_topic
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.servers import start_kafka

PARTITIONS = 4
SEGMENT = 16 * 1024 * 1024
# the bare loops' frame: timestamp, key length, value length, header count; then per header
FRAME = struct.Struct(">qiiH")
HEADER = struct.Struct(">HI")


def fill(bootstrap: str, topic: str, count: int, size: int) -> tuple[list[tuple], int]:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    records, total = [], 0
    for i in range(count):
        key = f"key-{i % 5000}".encode()
        value = os.urandom(size // 2).hex().encode()
        headers = [("trace-id", uuid.uuid4().bytes)]
        rec = (i % PARTITIONS, key, value, headers, 1_700_000_000_000 + i)
        records.append(rec)
        total += len(key) + len(value) + 8 + 16
        producer.produce(topic, key=key, value=value, headers=headers, partition=rec[0], timestamp=rec[4])
        if i % 10000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0
    return records, total


def bare_backup(bootstrap: str, topic: str, s3, bucket: str, run: str) -> int:
    """Consume everything, frame it, gzip and put every 16 MB: one thread, no bookkeeping."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-{run}", "enable.auto.commit": False,
         "enable.partition.eof": True}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    buffers = {p: bytearray() for p in range(PARTITIONS)}
    parts = {p: 0 for p in range(PARTITIONS)}
    count = 0
    pack, pack_header = FRAME.pack, HEADER.pack

    def put(p: int) -> None:
        c = zlib.compressobj(1, zlib.DEFLATED, 31)
        body = c.compress(bytes(buffers[p])) + c.flush()
        s3.put_object(Bucket=bucket, Key=f"bare/{run}/{p}/{parts[p]}", Body=body)
        parts[p] += 1
        buffers[p].clear()

    open_parts = set(range(PARTITIONS))
    while open_parts:
        for msg in consumer.consume(1000, timeout=0.5):
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(msg.partition())
                continue
            p, key, value = msg.partition(), msg.key() or b"", msg.value() or b""
            headers = msg.headers() or []
            buf = buffers[p]
            buf += pack(msg.timestamp()[1], len(key), len(value), len(headers))
            buf += key
            buf += value
            for hk, hv in headers:
                hkb, hv = hk.encode(), hv or b""
                buf += pack_header(len(hkb), len(hv))
                buf += hkb
                buf += hv
            count += 1
            if len(buf) >= SEGMENT:
                put(p)
    for p in range(PARTITIONS):
        if buffers[p]:
            put(p)
    consumer.close()
    return count


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def bare_restore(bootstrap: str, topic: str, records: list[tuple]) -> None:
    # the restore's settings: same durability (acks=all, idempotent) and the same client work
    producer = Producer({"bootstrap.servers": bootstrap, **RESTORE_PRODUCER})
    for i, (p, key, value, headers, ts) in enumerate(records):
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=headers, partition=p, timestamp=ts)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0


def bare_restore_from_s3(bootstrap: str, topic: str, s3, bucket: str, run: str) -> int:
    """Get the bare backup's objects one by one, gunzip, unpack the frames, produce each record to
    its partition with its timestamp: the bare loop's way back, one thread, no bookkeeping."""
    producer = Producer({"bootstrap.servers": bootstrap, **RESTORE_PRODUCER})
    unpack, unpack_header = FRAME.unpack_from, HEADER.unpack_from
    fsize, hsize = FRAME.size, HEADER.size
    count = 0
    for p in range(PARTITIONS):
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"bare/{run}/{p}/").get("Contents", [])
        for key in sorted((o["Key"] for o in listed), key=lambda k: int(k.rsplit("/", 1)[1])):
            data = zlib.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), 31)
            pos, end = 0, len(data)
            while pos < end:
                ts, klen, vlen, nheaders = unpack(data, pos)
                pos += fsize
                rkey = data[pos:pos + klen]
                pos += klen
                value = data[pos:pos + vlen]
                pos += vlen
                headers = []
                for _ in range(nheaders):
                    hklen, hvlen = unpack_header(data, pos)
                    pos += hsize
                    hk = data[pos:pos + hklen].decode()
                    pos += hklen
                    headers.append((hk, data[pos:pos + hvlen]))
                    pos += hvlen
                while True:
                    try:
                        producer.produce(
                            topic, key=rkey, value=value, headers=headers, partition=p, timestamp=ts
                        )
                        break
                    except BufferError:
                        producer.poll(0.05)
                count += 1
                if count % 1000 == 0:
                    producer.poll(0)
    assert producer.flush(120) == 0
    return count


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench topic-backup")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    broker = start_kafka()
    moto = MotoServer().start()
    try:
        s3 = moto.client("s3")
        bucket = "bench-backups"
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region})
        store = BackupStore(
            bucket=bucket, endpoint_url=moto.endpoint_url, region=moto.region,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
        )
        cluster = KafkaCluster(bootstrap_servers=broker.bootstrap, request_timeout_s=10)
        topic = create_topic(broker.bootstrap, "bench-backup-src", partitions=PARTITIONS)
        started = time.monotonic()
        records, total = fill(broker.bootstrap, topic, args.records, args.size)
        mb = total / 1e6
        print(f"filled {topic} with {len(records):,} records ({mb:.1f} MB) in {time.monotonic() - started:.1f} s")

        rates: dict[str, list[float]] = {
            k: [] for k in ("bare_b", "task_b", "bare_r", "bare_s3_r", "task_r")
        }
        # CPU seconds of this process, the broker and moto: on a shared 2-core machine the
        # restore is CPU-bound, and this says how much work each side did whatever the load
        pids = [os.getpid(), broker.proc.pid, moto._proc.pid]
        cpu: dict[str, list[float]] = {"bare_r": [], "bare_s3_r": [], "task_r": []}
        for i in range(args.repeats):
            t0 = time.perf_counter()
            n = bare_backup(broker.bootstrap, topic, s3, bucket, f"r{i}")
            rates["bare_b"].append(mb / (time.perf_counter() - t0))
            assert n == len(records), f"bare backup read {n}"
            t0 = time.perf_counter()
            result = backup_topic.fn(
                cluster, store, topic, dry_run=False, backup_id=f"20990101T00000{i}Z-bench"
            )
            rates["task_b"].append(mb / (time.perf_counter() - t0))
            assert result.manifest is not None and result.manifest.records == len(records)

            target = create_topic(broker.bootstrap, f"bench-bare-restore-{i}", partitions=PARTITIONS)
            c0 = cpu_s(pids)
            t0 = time.perf_counter()
            bare_restore(broker.bootstrap, target, records)
            rates["bare_r"].append(mb / (time.perf_counter() - t0))
            cpu["bare_r"].append(cpu_s(pids) - c0)
            target = create_topic(broker.bootstrap, f"bench-bare-s3-restore-{i}", partitions=PARTITIONS)
            c0 = cpu_s(pids)
            t0 = time.perf_counter()
            n = bare_restore_from_s3(broker.bootstrap, target, s3, bucket, f"r{i}")
            rates["bare_s3_r"].append(mb / (time.perf_counter() - t0))
            cpu["bare_s3_r"].append(cpu_s(pids) - c0)
            assert n == len(records), f"bare restore from S3 sent {n}"
            c0 = cpu_s(pids)
            t0 = time.perf_counter()
            restored = restore_topic.fn(
                cluster, store, topic, dry_run=False, backup_id=result.backup_id,
                target_topic=f"bench-restore-{i}", replication_factor=1,
            )
            rates["task_r"].append(mb / (time.perf_counter() - t0))
            cpu["task_r"].append(cpu_s(pids) - c0)
            assert sum(restored.sent.values()) == len(records)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print()
        mcpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"| {len(records):,} records x {args.size} B, {PARTITIONS} partitions | MB/s (median of {args.repeats}) | ratio | restore CPU s (median) |")
        print("|---|---|---|---|")
        print(f"| bare consume + gzip + put loop | {med['bare_b']:.1f} | 1.00x | |")
        print(f"| `backup_topic` (plan, segments, digests, manifest) | {med['task_b']:.1f} | **{med['task_b'] / med['bare_b']:.2f}x** | |")
        print(f"| bare get + gunzip + unpack + produce loop (S3 to topic, one thread) | {med['bare_s3_r']:.1f} | 1.00x | {mcpu['bare_s3_r']:.2f} |")
        print(f"| `restore_topic` (manifest, get, gunzip, decode, produce, progress) | {med['task_r']:.1f} | **{med['task_r'] / med['bare_s3_r']:.2f}x** | {mcpu['task_r']:.2f} |")
        print(f"| bare produce loop, records already in memory (the producer alone) | {med['bare_r']:.1f} | 1.00x | {mcpu['bare_r']:.2f} |")
        print(f"| `restore_topic` against it | {med['task_r']:.1f} | **{med['task_r'] / med['bare_r']:.2f}x** | |")
        print(f"\nbackup: {result.manifest.bytes / 1e6:.1f} MB in {len(result.manifest.segments)} segments")
        print("all runs (MB/s):", {k: [round(x, 1) for x in v] for k, v in rates.items()})
        print(
            "restore CPU s (this process + broker + moto), median:",
            {k: round(statistics.median(v), 2) for k, v in cpu.items()},
            "all:", {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        )
        print("load average:", os.getloadavg())
    finally:
        moto.stop()
        broker.stop()
    return 0
