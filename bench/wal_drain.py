"""Draining the edge-gateway WAL against the bare Kafka producer, on one tansu broker, in one run.

Builds a WAL (default 200,000 records with 200-byte values from 4 sources, one segment of about
49 MB), then measures on the same broker, each into a fresh 4-partition topic:

    bare idempotent producer  acks=all, linger 5 ms, on records already read, and incl. the read
    bare transactional        the same read path (WalReader.scan), init_transactions, commit every N
    drain_wal (task)          the project's drain as a Prefect task in a flow, end to end
    stadium-network-flap      the whole runbook (measure, plan, drain, read back and verify)

Every producer sends what the drain sends: key = source, the record's value and timestamp, the
five wal-* headers. Records/s and MB/s count value bytes; ratios are against the bare producers.

    python -m bench wal-drain [--records 200000 --value-bytes 200 --sources 4 --commit-every N
                               --repeat 3 --skip-flow]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from confluent_kafka import Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from tasks.wal_format import (  # noqa: E402
    H_GATEWAY,
    H_POSITION,
    H_SEQ,
    H_SOURCE,
    H_WAL_ID,
    MARKER_FILE,
    WalReader,
    WalRecord,
    WalWriter,
    read_marker,
)
from tests.servers import start_kafka  # noqa: E402


def build_wal(directory: Path, records: int, value_bytes: int, sources: int) -> None:
    names = [f"source-{i}" for i in range(sources)]
    seq = dict.fromkeys(names, 1)
    filler = os.urandom(value_bytes)
    now = int(time.time() * 1000)
    with WalWriter(directory) as wal:
        for i in range(records):
            source = names[i % sources]
            value = i.to_bytes(8, "big") + filler[8:]
            wal.append(source, seq[source], value, now + i, sync=False)
            seq[source] += 1


def create_topic(bootstrap: str, name: str, partitions: int) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result(15)
    return name


def produce_all(producer: Producer, topic: str, wal_id: str, records: list[WalRecord]) -> None:
    for r in records:
        while True:
            try:
                producer.produce(
                    topic,
                    key=r.source.encode(),
                    value=r.value,
                    timestamp=r.timestamp_ms,
                    headers=[
                        (H_WAL_ID, wal_id),
                        (H_GATEWAY, "bench"),
                        (H_SOURCE, r.source),
                        (H_SEQ, str(r.seq)),
                        (H_POSITION, str(r.position)),
                    ],
                )
                break
            except BufferError:
                producer.poll(0.01)


def bare_idempotent(bootstrap: str, topic: str, wal: Path, read: bool) -> float:
    """Seconds for a plain idempotent producer to send every record (optionally reading them first)."""
    reader = WalReader(wal)
    records = [] if read else reader.scan(0).records
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "log_level": 2,
        }
    )
    started = time.perf_counter()
    if read:
        records = reader.scan(0).records
    produce_all(producer, topic, reader.wal_id or "", records)
    left = producer.flush(120)
    elapsed = time.perf_counter() - started
    assert left == 0, f"{left} records not delivered"
    return elapsed


def bare_transactional(bootstrap: str, topic: str, wal: Path, commit_every: int) -> float:
    """Seconds to read the WAL and send it in transactions of ``commit_every`` records."""
    started = time.perf_counter()
    reader = WalReader(wal)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"bench-{topic}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "log_level": 2,
        }
    )
    producer.init_transactions(30)
    records = reader.scan(0).records
    for i in range(0, len(records), commit_every):
        producer.begin_transaction()
        produce_all(producer, topic, reader.wal_id or "", records[i : i + commit_every])
        producer.commit_transaction(60)
    return time.perf_counter() - started


def fresh_copy(wal: Path, into: Path) -> Path:
    shutil.copytree(wal, into)
    (into / MARKER_FILE).unlink(missing_ok=True)
    return into


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench wal-drain")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--value-bytes", type=int, default=200)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument(
        "--commit-every",
        type=int,
        default=None,
        help="records per transaction, drain and bare transactional producer alike "
        "(default: the runbook's batch_size)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row (median shown)")
    parser.add_argument("--skip-flow", action="store_true", help="leave out the whole runbook")
    args = parser.parse_args(argv)

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from blocks.edge_gateway import EdgeGateway
    from blocks.kafka import KafkaCluster
    from flows.edge_gateway.stadium_network_flap import (
        StadiumNetworkFlapParams,
        stadium_network_flap,
    )
    from runbooks.params import SafetyParams
    from tasks.wal_drain import DrainResult, drain_wal

    commit_every = args.commit_every or StadiumNetworkFlapParams.model_fields["batch_size"].default
    work = Path(tempfile.mkdtemp(prefix="bench-wal-"))
    wal = work / "wal"
    t0 = time.perf_counter()
    build_wal(wal, args.records, args.value_bytes, args.sources)
    wal_mb = sum(p.stat().st_size for p in wal.iterdir()) / 1e6
    print(
        f"WAL: {args.records} records, {args.value_bytes} B values, {args.sources} sources, "
        f"{wal_mb:.1f} MB on disk, built in {time.perf_counter() - t0:.1f}s ({work})"
    )
    broker = start_kafka()
    samples: dict[str, list[float]] = {}
    txn_label = f"bare transactional, commit every {commit_every}"
    task_label = f"drain_wal task run, {commit_every} per transaction"
    try:
        bootstrap = broker.bootstrap
        n = 0

        def topic() -> str:
            nonlocal n
            n += 1
            return create_topic(bootstrap, f"bench-{n}", args.sources)

        def sample(label: str, seconds: float) -> None:
            samples.setdefault(label, []).append(seconds)

        # the first transactional producer on a tansu broker pays for the coordinator's start
        bare_transactional(bootstrap, topic(), wal, 1000)
        with prefect_test_harness(server_startup_timeout=120):
            cluster = KafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=10)

            @flow
            def drain_only(wal_directory: str, topic: str) -> tuple[DrainResult, float]:
                gateway = EdgeGateway(
                    gateway_name="bench", wal_directory=wal_directory, topic=topic
                )
                # the task run, timed inside its flow run (starting a flow run is not the drain)
                started = time.perf_counter()
                result = drain_wal(gateway, cluster, dry_run=False, batch_size=commit_every)
                return result, time.perf_counter() - started

            # interleaved, so load from elsewhere on the machine hits every row alike
            for i in range(args.repeat):
                started = time.perf_counter()
                WalReader(wal).scan(0)
                sample("read path alone (WalReader.scan)", time.perf_counter() - started)
                sample(
                    "bare idempotent, records already read",
                    bare_idempotent(bootstrap, topic(), wal, False),
                )
                sample(
                    "bare idempotent, incl. the read",
                    bare_idempotent(bootstrap, topic(), wal, True),
                )
                sample(txn_label, bare_transactional(bootstrap, topic(), wal, commit_every))
                copy, drain_topic = str(fresh_copy(wal, work / f"task-{i}")), topic()
                result, seconds = drain_only(copy, drain_topic)
                sample(task_label, seconds)
                sample("  of which inside drain_wal (its elapsed_s)", result.elapsed_s)
                assert result.sent == args.records, result
                assert read_marker(work / f"task-{i}").next_position == args.records

            if not args.skip_flow:
                name = "bench-gw"
                cluster.save(name, overwrite=True)
                EdgeGateway(
                    gateway_name=name,
                    wal_directory=str(fresh_copy(wal, work / "flow")),
                    topic=topic(),
                    kafka_block=name,
                    capacity_events=10 * args.records,
                    capacity_bytes=10**12,
                ).save(name, overwrite=True)
                params = StadiumNetworkFlapParams(
                    gateway_block=name,
                    batch_size=commit_every,
                    safety=SafetyParams(budget_max_actions=1000),
                )
                started = time.perf_counter()
                state = stadium_network_flap(params=params, return_state=True)
                elapsed = time.perf_counter() - started
                summary = state.result()
                assert summary.outcome == "RESOLVED" and summary.drained == args.records, summary
                sample("stadium-network-flap runbook, whole run (once)", elapsed)
                sample(
                    "  of which its drain (drain_rate_eps)", args.records / summary.drain_rate_eps
                )
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    mb = args.records * args.value_bytes / 1e6
    seconds = {label: statistics.median(values) for label, values in samples.items()}
    txn = seconds[txn_label]
    idem = seconds["bare idempotent, records already read"]
    idem_read = seconds["bare idempotent, incl. the read"]
    print(
        f"\n{args.records} records x {args.value_bytes} B over {args.sources} sources, tansu; "
        f"median of {args.repeat} interleaved runs (the runbook once)"
    )
    head = (
        f"{'':50} {'seconds':>8} {'records/s':>10} {'MB/s':>6} {'vs txn':>7} {'vs idem':>8} "
        f"{'vs idem+read':>12}"
    )
    print(head)
    print("-" * len(head))
    for label, s in seconds.items():
        print(
            f"{label:50} {s:8.2f} {args.records / s:10,.0f} {mb / s:6.1f} "
            f"{txn / s:6.2f}x {idem / s:7.2f}x {idem_read / s:11.2f}x"
        )
    spread = {label: f"{min(v):.2f}-{max(v):.2f}" for label, v in samples.items() if len(v) > 1}
    print(
        "\nrange of seconds over the runs: "
        + "; ".join(f"{k.strip()} {v}" for k, v in spread.items())
    )
    return 0
