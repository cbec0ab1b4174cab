"""stadium-network-flap against a real broker: drain exactly once, dry-run, crash, wait, escalate."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from prefect import flow

from blocks.edge_gateway import EdgeGateway
from blocks.kafka import KafkaCluster
from flows.edge_gateway.stadium_network_flap import StadiumNetworkFlapParams, stadium_network_flap
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.wal import KafkaUnavailable
from tasks.wal_drain import drain_wal
from tasks.wal_format import (
    H_POSITION,
    H_SEQ,
    H_SOURCE,
    MARKER_FILE,
    QUARANTINE_FILE,
    WalReader,
    WalWriter,
    list_segments,
    read_marker,
    read_quarantine,
)
from tests.approvals import Approver
from tests.conftest import create_topic, read_actions_table, read_incident_report, unique
from tests.servers import KafkaBroker

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SOURCES = ("opta-feed", "var-cam", "scoreboard")
RUNBOOK = "stadium-network-flap"
# each test has its own gateway; the budget has its own test
SAFETY = SafetyParams(budget_max_actions=1000, approval_poll_s=1)


def write_events(
    directory: Path,
    n: int,
    first_seq: dict[str, int] | None = None,
    skip: dict[str, set[int]] | None = None,
    pause_s: float = 0,
    written: list[tuple[str, int, bytes]] | None = None,
) -> list[tuple[str, int, bytes]]:
    """Append n events round-robin from three sources with small segments; (source, seq, value) in order."""
    next_seq = dict(first_seq or dict.fromkeys(SOURCES, 1))
    written = [] if written is None else written
    with WalWriter(directory, segment_max_bytes=16 * 1024) as wal:
        for i in range(n):
            source = SOURCES[i % 3]
            while next_seq[source] in (skip or {}).get(source, set()):
                next_seq[source] += 1
            value = json.dumps(
                {"source": source, "seq": next_seq[source], "minute": i % 90}
            ).encode()
            wal.append(source, next_seq[source], value, sync=pause_s > 0)
            written.append((source, next_seq[source], value))
            next_seq[source] += 1
            time.sleep(pause_s)
    return written


@dataclass
class Landed:
    partition: int
    offset: int
    key: bytes
    value: bytes
    source: str
    seq: int
    position: int


def consume_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list[Landed]:
    """Every record in the topic: read until ``expected`` arrived and every partition is at its end.

    Counting (not watermarks, which tansu under-reports) decides when enough arrived; reading on
    to the end of each partition then catches any record beyond the expected count. Reads
    uncommitted records too: everything physically in the topic counts, open transactions included.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("check"),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_uncommitted",
            "log_level": 3,
        }
    )
    partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    got: list[Landed] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and (
            len(got) < expected or len(at_end) < len(partitions)
        ):
            m = consumer.poll(0.5)
            if m is None:
                continue
            if m.error():
                assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                at_end.add(m.partition())
                continue
            at_end.discard(m.partition())
            h = dict(m.headers())
            got.append(
                Landed(
                    m.partition(),
                    m.offset(),
                    m.key(),
                    m.value(),
                    h[H_SOURCE].decode(),
                    int(h[H_SEQ]),
                    int(h[H_POSITION]),
                )
            )
    finally:
        consumer.close()
    return got


def assert_exactly_once_in_order(
    landed: list[Landed], written: list[tuple[str, int, bytes]], lost: set[int] = frozenset()
) -> None:
    """Every written event but the ``lost`` positions is in the topic once, in order per source."""
    written = [w for i, w in enumerate(written) if i not in lost]
    assert len(landed) == len(written), (
        f"{len(landed)} records in the topic, {len(written)} in the WAL"
    )
    assert sorted((r.source, r.seq, r.value) for r in landed) == sorted(written)
    assert sorted(r.position for r in landed) == sorted(set(range(len(written) + len(lost))) - lost)
    by_source: dict[str, list[Landed]] = {}
    for r in sorted(landed, key=lambda r: (r.partition, r.offset)):
        assert r.key == r.source.encode()
        by_source.setdefault(r.source, []).append(r)
    for source, records in by_source.items():
        assert len({r.partition for r in records}) == 1, f"{source} spread over partitions"
        assert [r.seq for r in records] == sorted(r.seq for r in records), f"{source} out of order"


def save_blocks(
    wal_dir: Path, bootstrap: str, topic: str, request_timeout_s: float = 5, **gateway: object
) -> str:
    name = unique("gw")
    KafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=request_timeout_s).save(
        name, overwrite=True
    )
    EdgeGateway(
        gateway_name=name,
        wal_directory=str(wal_dir),
        topic=topic,
        kafka_block=name,
        delivery_timeout_s=15,
        **gateway,
    ).save(name, overwrite=True)
    return name


def run_flow(block: str, **params: object):
    defaults = {"batch_size": 200, "probe_interval_s": 0.5, "safety": SAFETY}
    p = StadiumNetworkFlapParams(gateway_block=block, **(defaults | params))
    return stadium_network_flap(params=p, return_state=True)


def kafka_state(bootstrap: str, topic: str, expected: int) -> tuple[dict[int, int], list[tuple]]:
    """The topic's end offset per partition and every record in it (partition, offset, position)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("ends"), "log_level": 3}
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
    finally:
        consumer.close()
    landed = consume_topic(bootstrap, topic, expected, timeout_s=10)
    return ends, sorted((r.partition, r.offset, r.position) for r in landed)


def wal_files(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file of the WAL directory: size, modification time and content hash."""
    return {
        f.name: (f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(directory.iterdir())
        if f.is_file()
    }


def test_flow_drains_every_record_exactly_once_in_order(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 1500)
    assert len(list_segments(tmp_path)) >= 5
    segments = len(list_segments(tmp_path))
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic, delete_delivered_segments=True)
    # deleting WAL segments throws the gateway's copy away: a human approves
    approver = Approver(RUNBOOK, {"approve": True, "approver": "alice", "reason": "in Kafka"})
    approver.start()

    state = run_flow(block)

    assert state.is_completed(), state.message
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert f"deletes {segments - 1} WAL segment file(s)" in approver.description
    summary = state.result()
    assert summary.outcome == Outcome.RESOLVED.value
    assert (summary.pending_before, summary.pending_after, summary.drained) == (1500, 0, 1500)
    assert summary.drain_rate_eps and summary.drain_rate_eps > 0
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 1500), written)
    marker = read_marker(tmp_path)
    assert marker.next_position == 1500
    assert marker.sources == {s: 500 for s in SOURCES}
    # delivered segments were deleted, the newest (the gateway writes into it) kept
    remaining = list_segments(tmp_path)
    assert len(remaining) == 1 and list(WalReader(tmp_path).records(marker.next_position)) == []
    # the actions table's "after" is the marker and the segments as found once the drain is done
    table = read_actions_table(state.state_details.flow_run_id)
    rows = {r["action"]: r for r in table}
    drained = {"marker": 1500, "pending": 0, "sent": 1500}
    assert rows["produce_wal_records"]["before"]["positions"] == "0-1499"
    assert rows["produce_wal_records"]["after"] == drained
    assert rows["advance_wal_marker"]["before"] == {"from": 0, "to": 1500}
    assert rows["advance_wal_marker"]["after"] == drained
    deleted = [r for r in table if r["action"] == "delete_wal_segment"]
    assert len(deleted) == segments - 1
    assert all(r["status"] == "applied" and r["after"] == {"present": False} for r in deleted)

    # a second run finds nothing to do
    again = run_flow(block)
    assert again.is_completed() and again.result().outcome == Outcome.NO_ACTION_NEEDED.value


def test_gateway_keeps_writing_while_the_drain_runs(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """Half-written records at the tail are left for the next drain; nothing is lost or repeated."""
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 1200)
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)
    gateway = threading.Thread(
        target=write_events,
        args=(tmp_path, 600),
        kwargs={"first_seq": dict.fromkeys(SOURCES, 401), "pause_s": 0.003, "written": written},
    )
    gateway.start()
    try:
        first = run_flow(block)
    finally:
        gateway.join(60)
    assert first.is_completed(), first.message
    assert first.result().outcome == Outcome.RESOLVED.value
    assert 1200 <= read_marker(tmp_path).next_position <= 1800

    second = run_flow(block)
    assert second.is_completed(), second.message
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 1800), written)
    assert read_marker(tmp_path).next_position == 1800


def test_dry_run_changes_nothing(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    write_events(tmp_path, 1500)
    # the plan includes deleting delivered segments: dry-run neither asks nor deletes
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic, delete_delivered_segments=True)
    kafka_before, wal_before = kafka_state(kafka_broker.bootstrap, topic, 0), wal_files(tmp_path)
    assert kafka_before[1] == [] and MARKER_FILE not in wal_before

    state = run_flow(block, dry_run=True)

    assert state.is_completed(), state.message
    assert state.result().outcome == Outcome.PLANNED.value
    assert kafka_state(kafka_broker.bootstrap, topic, 0) == kafka_before
    assert wal_files(tmp_path) == wal_before

    # with a marker from an earlier drain (by a block that keeps segments) and new events after it
    assert run_flow(save_blocks(tmp_path, kafka_broker.bootstrap, topic)).is_completed()
    write_events(tmp_path, 90, first_seq=dict.fromkeys(SOURCES, 501))
    kafka_before, wal_before = kafka_state(kafka_broker.bootstrap, topic, 1500), wal_files(tmp_path)
    assert len(kafka_before[1]) == 1500 and sum(kafka_before[0].values()) >= 1500
    assert MARKER_FILE in wal_before

    state = run_flow(block, dry_run=True)

    assert state.is_completed() and state.result().outcome == Outcome.PLANNED.value
    assert kafka_state(kafka_broker.bootstrap, topic, 1500) == kafka_before
    assert wal_files(tmp_path) == wal_before


def victim_cmd(tmp_path: Path, bootstrap: str, topic: str, *args: str) -> list[str]:
    """The drain in a subprocess (tests/wal_drain_victim.py), batches of 100."""
    return [
        sys.executable, "-m", "tests.wal_drain_victim", str(tmp_path), bootstrap, topic, "100",
        *args,
    ]


def drain_until_killed(cmd: list[str]) -> None:
    """Run the victim until it SIGKILLs itself at the point its arguments name."""
    victim = subprocess.run(cmd, cwd=REPO, timeout=120, capture_output=True)
    assert victim.returncode == -signal.SIGKILL, victim.stderr.decode()[-2000:]


@pytest.mark.parametrize("kill", ["inside-delivery-report", "from-outside"])
def test_drain_killed_halfway_then_rerun_loses_and_duplicates_nothing(
    kafka_broker: KafkaBroker, tmp_path: Path, kill: str
) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 1200)
    cmd = victim_cmd(tmp_path, kafka_broker.bootstrap, topic)
    if kill == "inside-delivery-report":
        # dies at the 650th delivery report: its transaction is open, the marker stands at 600
        drain_until_killed([*cmd, "650"])
        assert read_marker(tmp_path).next_position == 600
    else:
        proc = subprocess.Popen([*cmd, "0"], cwd=REPO, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                marker = read_marker(tmp_path) if (tmp_path / MARKER_FILE).exists() else None
                if marker and marker.next_position >= 500:
                    break
                time.sleep(0.002)
            time.sleep(0.005)  # often lands inside the next batch's transaction
            proc.kill()
        finally:
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        assert 500 <= read_marker(tmp_path).next_position < 1200
    acked_at_crash = read_marker(tmp_path).next_position
    at_crash = consume_topic(kafka_broker.bootstrap, topic, 0)
    unacked_in_kafka = len(at_crash) - acked_at_crash
    assert len({r.position for r in at_crash}) == len(at_crash)
    if kill == "inside-delivery-report":
        assert unacked_in_kafka >= 50  # delivered, not yet covered by the marker

    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)
    state = run_flow(block)

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.outcome == Outcome.RESOLVED.value
    assert summary.pending_before == 1200 - acked_at_crash
    assert summary.already_in_kafka == unacked_in_kafka  # found in the topic and skipped
    assert summary.drained == summary.pending_before - unacked_in_kafka
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 1200), written)
    assert read_marker(tmp_path).next_position == 1200


@pytest.mark.parametrize("commits", [1, 7])
def test_drain_killed_between_commit_and_marker_write_rerun_finds_the_batch_in_the_topic(
    kafka_broker: KafkaBroker, tmp_path: Path, commits: int
) -> None:
    """The marker lags the committed transactions: the topic read from its scan_from covers them."""
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 1200)
    # dies as its Nth commit returns: that batch is committed, the marker write covering it
    # has not started (the drain waited for the one before it)
    drain_until_killed(victim_cmd(tmp_path, kafka_broker.bootstrap, topic, "0", str(commits)))
    marker = read_marker(tmp_path)
    assert marker.next_position == (commits - 1) * 100
    at_crash = consume_topic(kafka_broker.bootstrap, topic, commits * 100)
    assert sorted(r.position for r in at_crash) == list(range(commits * 100))
    # every committed record the marker does not cover lies at or after its scan_from
    uncovered = [r for r in at_crash if r.position >= marker.next_position]
    assert uncovered and all(r.offset >= marker.scan_from[r.partition] for r in uncovered)

    state = run_flow(save_blocks(tmp_path, kafka_broker.bootstrap, topic))

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.outcome == Outcome.RESOLVED.value
    assert summary.pending_before == 1200 - marker.next_position
    assert summary.already_in_kafka == 100  # found in the topic and skipped
    assert summary.drained == summary.pending_before - 100
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 1200), written)
    assert read_marker(tmp_path).next_position == 1200


def test_waits_for_the_network_then_drains(own_kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    topic = create_topic(own_kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 300)
    block = save_blocks(tmp_path, own_kafka_broker.bootstrap, topic, request_timeout_s=1)
    own_kafka_broker.pause()
    # the network comes back 2.5 s after the runbook starts waiting for it (not after a fixed
    # time from here: on a loaded machine the steps before the wait can take longer than that)
    timers: list[threading.Timer] = []

    class ResumeOnceWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting up to" in record.getMessage() and not timers:
                timers.append(threading.Timer(2.5, own_kafka_broker.resume))
                timers[0].start()

    handler = ResumeOnceWaiting()
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    try:
        state = run_flow(block, pending_threshold=5000, network_wait_s=60)
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
        for timer in timers:
            timer.cancel()
        own_kafka_broker.resume()

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.outcome == Outcome.RESOLVED.value
    assert summary.waited_s >= 2
    assert_exactly_once_in_order(consume_topic(own_kafka_broker.bootstrap, topic, 300), written)


def test_waits_at_most_the_deadline_when_the_network_stays_down(
    own_kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = create_topic(own_kafka_broker.bootstrap, unique("raw"))
    write_events(tmp_path, 30)
    block = save_blocks(tmp_path, own_kafka_broker.bootstrap, topic, request_timeout_s=1)
    own_kafka_broker.pause()
    try:
        started = time.monotonic()
        state = run_flow(block, network_wait_s=3)
        elapsed = time.monotonic() - started
    finally:
        own_kafka_broker.resume()
    assert state.is_completed(), state.message
    assert state.result().outcome == Outcome.WAITING.value
    assert elapsed < 30
    assert not (tmp_path / MARKER_FILE).exists()


def test_over_threshold_and_unreachable_escalates(
    own_kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = create_topic(own_kafka_broker.bootstrap, unique("raw"))
    write_events(tmp_path, 150)
    block = save_blocks(tmp_path, own_kafka_broker.bootstrap, topic, request_timeout_s=1)
    own_kafka_broker.pause()
    try:
        state = run_flow(block, pending_threshold=100)
    finally:
        own_kafka_broker.resume()

    assert state.is_failed()
    assert (
        "150 events" in state.message
        and "4G" in state.message
        and "threshold of 100" in state.message
    )
    assert not (tmp_path / MARKER_FILE).exists()
    assert consume_topic(own_kafka_broker.bootstrap, topic, 0, timeout_s=10) == []


def test_gap_in_a_source_sequence_is_named(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 300, skip={"var-cam": {41, 42, 43}})
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)

    state = run_flow(block)

    assert state.is_failed()
    assert "source var-cam: gap, missing seq 41-43 (3 event(s))" in state.message
    # everything the WAL holds was still delivered, exactly once
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 300), written)
    assert read_marker(tmp_path).next_position == 300


def test_unreachable_broker_fails_transiently_and_leaves_the_marker(
    own_kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = create_topic(own_kafka_broker.bootstrap, unique("raw"))
    write_events(tmp_path, 100)
    gateway = EdgeGateway(
        gateway_name="gw", wal_directory=str(tmp_path), topic=topic, delivery_timeout_s=2
    )
    cluster = KafkaCluster(bootstrap_servers=own_kafka_broker.bootstrap, request_timeout_s=1)

    @flow
    def drain_once():
        return drain_wal.with_options(retries=0)(gateway, cluster, dry_run=False, batch_size=50)

    assert drain_once().acked_after == 100
    marker_bytes = (tmp_path / MARKER_FILE).read_bytes()
    write_events(tmp_path, 60, first_seq=dict.fromkeys(SOURCES, 35))
    own_kafka_broker.pause()
    try:
        with pytest.raises(KafkaUnavailable, match="safe to retry"):
            drain_once()
    finally:
        own_kafka_broker.resume()
    assert (tmp_path / MARKER_FILE).read_bytes() == marker_bytes
    assert len(consume_topic(own_kafka_broker.bootstrap, topic, 100, timeout_s=10)) == 100


def test_rejected_segment_deletion_leaves_wal_and_kafka_untouched(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    write_events(tmp_path, 1500)
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic, delete_delivered_segments=True)
    kafka_before, wal_before = kafka_state(kafka_broker.bootstrap, topic, 0), wal_files(tmp_path)
    approver = Approver(RUNBOOK, {"approve": False, "approver": "bob", "reason": "keep a copy"})
    approver.start()

    state = run_flow(block)

    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert "WAL segment file(s)" in approver.description
    assert state.is_failed()
    assert "rejected by bob: keep a copy" in state.message
    # nothing sent, no marker, every segment still there byte for byte
    assert kafka_state(kafka_broker.bootstrap, topic, 0) == kafka_before
    assert kafka_before[1] == []
    assert wal_files(tmp_path) == wal_before


def test_drain_budget_stops_the_second_drain(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 300)
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)  # a fresh gateway
    one_per_hour = SafetyParams(budget_max_actions=1, approval_poll_s=1)

    first = run_flow(block, safety=one_per_hour)
    assert first.is_completed(), first.message
    assert first.result().outcome == Outcome.RESOLVED.value

    write_events(tmp_path, 90, first_seq=dict.fromkeys(SOURCES, 101))
    kafka_before, wal_before = kafka_state(kafka_broker.bootstrap, topic, 300), wal_files(tmp_path)

    second = run_flow(block, safety=one_per_hour)

    assert second.is_failed()
    assert "budget" in second.message and "1 per 1h" in second.message
    # exactly one drain reached Kafka and the marker
    assert kafka_state(kafka_broker.bootstrap, topic, 300) == kafka_before
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 300), written)
    assert wal_files(tmp_path) == wal_before
    assert read_marker(tmp_path).next_position == 300


# --- torn writes and damaged records (issue 9, defect 7): WAL bytes changed by hand ----------


def damage_record(directory: Path, position: int, index: int = -1) -> tuple[str, int, bytes]:
    """Flip one bit of the record at ``position`` (default: its last value byte).

    Returns the segment's name, the record's offset in it and its damaged bytes.
    """
    segments = list_segments(directory)
    offset = 0
    for r in WalReader(directory).records():
        base, path = [s for s in segments if s[0] <= r.position][-1]
        offset = 0 if r.position == base else offset
        if r.position == position:
            data = bytearray(path.read_bytes())
            data[offset + (index % r.size)] ^= 0x01
            path.write_bytes(bytes(data))
            return path.name, offset, bytes(data[offset : offset + r.size])
        offset += r.size
    raise AssertionError(f"no record at position {position}")


def quarantined(directory: Path) -> list[tuple[str, int, bytes, str, bool]]:
    """(segment, offset, raw bytes, reason, escalated) of every quarantine entry."""
    q = read_quarantine(directory)
    return [
        (e.segment, e.offset, base64.b64decode(e.raw_base64), e.reason, e.reported_at is not None)
        for e in (q.entries if q else [])
    ]


def test_corrupt_record_in_an_older_segment_is_quarantined_and_the_rest_delivered(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 600)
    segment, offset, raw = damage_record(tmp_path, 100)
    assert segment != list_segments(tmp_path)[-1][1].name  # an older segment
    source, seq, _ = written[100]
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)

    state = run_flow(block)

    assert state.is_failed()
    assert (
        f"1 damaged region(s) holding 1 event(s): {segment} byte {offset} ({len(raw)} bytes, "
        "position 100): crc mismatch" in state.message
    )
    assert f"kept in {tmp_path / QUARANTINE_FILE}, not delivered" in state.message
    # the sequence check names exactly the event that is missing
    assert f"source {source}: gap, missing seq {seq} (1 event(s))" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**ESCALATED**" in report and "damaged WAL bytes kept in" in report
    assert f'"segment": "{segment}"' in report and f'"offset": {offset}' in report
    assert f'"claimed": "position 100, source \'{source}\', seq {seq}"' in report
    # every intact record before and after it was delivered, exactly once
    landed = consume_topic(kafka_broker.bootstrap, topic, 599)
    assert_exactly_once_in_order(landed, written, lost={100})
    assert read_marker(tmp_path).next_position == 600
    assert quarantined(tmp_path) == [(segment, offset, raw, "crc mismatch", True)]

    # the marker passed the damage: a re-run neither re-sends, nor re-quarantines, nor escalates
    again = run_flow(block)
    assert again.is_completed(), again.message
    assert again.result().outcome == Outcome.NO_ACTION_NEEDED.value
    assert len(consume_topic(kafka_broker.bootstrap, topic, 599)) == 599
    assert quarantined(tmp_path) == [(segment, offset, raw, "crc mismatch", True)]


def test_drain_killed_after_quarantining_quarantines_once_and_escalates_on_rerun(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 1200)
    segment, offset, raw = damage_record(tmp_path, 1000, index=20)
    # dies at the 650th delivery report: the damage is quarantined, the marker at 600 before it
    drain_until_killed(victim_cmd(tmp_path, kafka_broker.bootstrap, topic, "650"))
    assert read_marker(tmp_path).next_position == 600
    assert quarantined(tmp_path) == [(segment, offset, raw, "crc mismatch", False)]

    state = run_flow(save_blocks(tmp_path, kafka_broker.bootstrap, topic))

    assert state.is_failed()
    assert (
        f"{segment} byte {offset} ({len(raw)} bytes, position 1000): crc mismatch" in state.message
    )
    source, seq, _ = written[1000]
    assert f"source {source}: gap, missing seq {seq} (1 event(s))" in state.message
    assert_exactly_once_in_order(
        consume_topic(kafka_broker.bootstrap, topic, 1199), written, lost={1000}
    )
    assert read_marker(tmp_path).next_position == 1200
    assert quarantined(tmp_path) == [(segment, offset, raw, "crc mismatch", True)]


def test_damage_left_unescalated_by_an_unfinished_run_is_escalated_by_the_next(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """A drain that quarantined and passed the damage, but whose run never escalated it."""
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    write_events(tmp_path, 90)
    segment, offset, raw = damage_record(tmp_path, 40)
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)
    gateway, cluster = EdgeGateway.load(block), KafkaCluster.load(block)

    @flow
    def drain_only():
        return drain_wal(gateway, cluster, dry_run=False, batch_size=50)

    drained = drain_only()
    assert (drained.sent, drained.acked_after) == (89, 90)
    assert [d.first_position for d in drained.damaged] == [40]

    state = run_flow(block)  # nothing pending any more
    assert state.is_failed()
    assert f"{segment} byte {offset} ({len(raw)} bytes, position 40): crc mismatch" in state.message
    assert "**ESCALATED**" in read_incident_report(state.state_details.flow_run_id)

    again = run_flow(block)  # escalated once
    assert again.is_completed() and again.result().outcome == Outcome.NO_ACTION_NEEDED.value


def test_flipped_last_record_is_reported_and_kept_not_cut(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """Its length says it is complete: an event already acknowledged, not a torn write."""
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 300)
    newest = list_segments(tmp_path)[-1][1]
    segment, offset, raw = damage_record(tmp_path, 299)
    assert segment == newest.name and offset + len(raw) == newest.stat().st_size
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)

    state = run_flow(block)

    assert state.is_failed()
    assert (
        f"{segment} byte {offset} ({len(raw)} bytes, position 299): crc mismatch" in state.message
    )
    report = read_incident_report(state.state_details.flow_run_id)
    assert '"pending_events": 300' in report  # counted as pending, not silently dropped
    assert_exactly_once_in_order(
        consume_topic(kafka_broker.bootstrap, topic, 299), written, lost={299}
    )
    assert quarantined(tmp_path) == [(segment, offset, raw, "crc mismatch", True)]

    # the gateway restarts: the damaged record stays, new events go to a new segment after it
    size = newest.stat().st_size
    more = write_events(tmp_path, 30, first_seq=dict.fromkeys(SOURCES, 101))
    assert newest.stat().st_size == size and newest.read_bytes()[offset:] == raw
    assert list_segments(tmp_path)[-1][0] == 300
    gateway, cluster = EdgeGateway.load(block), KafkaCluster.load(block)

    @flow
    def drain_only():
        return drain_wal(gateway, cluster, dry_run=False, batch_size=50)

    drained = drain_only()
    assert (drained.sent, drained.damaged, drained.acked_after) == (30, [], 330)
    assert_exactly_once_in_order(
        consume_topic(kafka_broker.bootstrap, topic, 329), written + more, lost={299}
    )
    assert len(quarantined(tmp_path)) == 1


def test_power_cut_inside_a_record_header_is_a_torn_tail(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """Only `WR` of the next record reached disk, then zero-filled blocks: drained, then repaired."""
    topic = create_topic(kafka_broker.bootstrap, unique("raw"))
    written = write_events(tmp_path, 300)
    newest = list_segments(tmp_path)[-1][1]
    size = newest.stat().st_size
    with open(newest, "ab") as f:
        f.write(b"WR" + bytes(4094))
    block = save_blocks(tmp_path, kafka_broker.bootstrap, topic)

    state = run_flow(block)

    assert state.is_completed(), state.message
    assert state.result().outcome == Outcome.RESOLVED.value
    assert '"torn_tail_bytes_ignored": 4096' in read_incident_report(
        state.state_details.flow_run_id
    )
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 300), written)
    assert not (tmp_path / QUARANTINE_FILE).exists()

    # the gateway's writer opens the WAL again: it cuts the torn bytes, says so, and appends
    with WalWriter(tmp_path, segment_max_bytes=16 * 1024) as wal:
        assert wal.torn_bytes == 4096 and newest.stat().st_size == size
    more = write_events(tmp_path, 30, first_seq=dict.fromkeys(SOURCES, 101))
    again = run_flow(block)
    assert again.is_completed(), again.message
    assert again.result().outcome == Outcome.RESOLVED.value
    assert_exactly_once_in_order(consume_topic(kafka_broker.bootstrap, topic, 330), written + more)
