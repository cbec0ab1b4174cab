"""kafka-topic-backup and kafka-topic-restore against a real broker (tansu) and a real moto S3:
round trip of 100k records, a backup and a restore each killed by SIGKILL halfway and run again,
dry-runs that write nothing, and the runbooks' approval and refusal."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from blocks.backup_store import BackupStore
from blocks.kafka import KafkaCluster
from deployments.catalog import PROJECT_ROOT
from flows.kafka.kafka_topic_backup import KafkaTopicBackupParams, kafka_topic_backup
from flows.kafka.kafka_topic_restore import KafkaTopicRestoreParams, kafka_topic_restore
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kafka_backup import backup_topic, check_backup, describe_topic_configs
from tasks.kafka_backup_format import MANIFEST, backup_root, parse_segment_key
from tasks.kafka_backup_s3 import list_objects, load_manifest
from tasks.kafka_restore import check_restore, restore_topic
from tests.approvals import Approver
from tests.conftest import create_topic, unique
from tests.moto_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tests.servers import KafkaBroker

pytestmark = pytest.mark.integration

Rows = dict[int, list[tuple[Any, ...]]]


@pytest.fixture
def store(moto: MotoServer) -> BackupStore:
    bucket = f"backups-{uuid.uuid4().hex[:10]}"
    moto.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
    )
    return BackupStore(
        bucket=bucket,
        endpoint_url=moto.endpoint_url,
        region=moto.region,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        timeout_s=10,
    )


@pytest.fixture
def cluster(kafka_broker: KafkaBroker) -> KafkaCluster:
    return KafkaCluster(bootstrap_servers=kafka_broker.bootstrap, request_timeout_s=5)


def fill(bootstrap: str, topic: str, count: int, partitions: int, value_size: int = 120) -> None:
    """Records of every shape: null keys and values, no headers, repeated and null headers."""
    rnd = random.Random(topic)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True}
    )
    for i in range(count):
        headers = (
            None
            if i % 5 == 0
            else [("trace-id", uuid.UUID(int=rnd.getrandbits(128)).bytes), ("n", str(i).encode())]
            + ([("n", None), ("émoji-ü", b"")] if i % 7 == 0 else [])
        )
        producer.produce(
            topic,
            key=None if i % 11 == 0 else f"key-{i % 997}".encode(),
            value=None if i % 13 == 0 else rnd.randbytes(rnd.randint(value_size // 2, value_size)),
            headers=headers,
            partition=i % partitions,
            timestamp=1_700_000_000_000 + i,
        )
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0


def read_topic(bootstrap: str, topic: str, partitions: int) -> Rows:
    """Every record per partition in order: (key, value, headers, timestamp)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    rows: Rows = {p: [] for p in range(partitions)}
    open_parts = set(rows)
    while open_parts:
        for msg in consumer.consume(1000, timeout=1):
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                open_parts.discard(msg.partition())
                continue
            rows[msg.partition()].append(
                (msg.key(), msg.value(), msg.headers(), msg.timestamp()[1])
            )
    consumer.close()
    return rows


def topic_exists(cluster: KafkaCluster, topic: str) -> bool:
    return topic in cluster.get_admin_client().list_topics(timeout=5).topics


def run_victim(*argv: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kafka_backup_victim", *argv],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert proc.returncode == -9, (
        f"victim did not die by SIGKILL: {proc.returncode} {proc.stderr[-2000:]!r}"
    )


def test_round_trip_of_100k_records(
    kafka_broker: KafkaBroker, cluster: KafkaCluster, store: BackupStore
) -> None:
    source = create_topic(kafka_broker.bootstrap, unique("backup-src"), partitions=4)
    fill(kafka_broker.bootstrap, source, 100_000, 4)
    before = read_topic(kafka_broker.bootstrap, source, 4)

    backup = backup_topic.fn(cluster, store, source, dry_run=False, segment_bytes=1024 * 1024)
    assert backup.manifest is not None and backup.manifest.records == 100_000
    assert {p: s.records for p, s in backup.manifest.partitions.items()} == {
        p: 25_000 for p in range(4)
    }
    check = check_backup.fn(store, source, backup.backup_id, deep=True)
    assert check.ok, check.problems
    assert check.segments_read == len(backup.manifest.segments) > 4

    target = unique("restored")
    restored = restore_topic.fn(
        cluster, store, source, dry_run=False, target_topic=target, replication_factor=1
    )
    assert restored.created_topic and sum(restored.sent.values()) == 100_000
    after = read_topic(kafka_broker.bootstrap, target, 4)
    for p in range(4):  # keys, values, headers, timestamps, in each partition's order
        assert after[p] == before[p], f"partition {p} differs"
    verified = check_restore.fn(
        cluster, store, source, backup.backup_id, target, restored.start_offsets
    )
    assert verified.ok, verified.problems


def test_backup_killed_halfway_resumes_without_duplicate_objects(
    kafka_broker: KafkaBroker, cluster: KafkaCluster, store: BackupStore, moto: MotoServer
) -> None:
    source = create_topic(kafka_broker.bootstrap, unique("backup-kill"), partitions=3)
    fill(kafka_broker.bootstrap, source, 20_000, 3, value_size=200)
    segment_bytes = 64 * 1024
    run_victim(
        "backup",
        kafka_broker.bootstrap,
        moto.endpoint_url,
        store.bucket,
        source,
        "20",
        str(segment_bytes),
    )
    s3 = store.get_s3_client()
    left_behind = list_objects(s3, store.bucket, f"{store.prefix}/{source}/")
    [backup_id] = {k.split("/")[0] for k in left_behind}
    segments_before = [k for k in left_behind if k.endswith(".seg.gz")]
    assert 20 <= len(segments_before) < 60
    assert f"{backup_id}/{MANIFEST}" not in left_behind, "the manifest comes last"

    resumed = backup_topic.fn(cluster, store, source, dry_run=False, segment_bytes=segment_bytes)
    assert resumed.resumed and resumed.backup_id == backup_id
    assert resumed.manifest is not None and resumed.manifest.records == 20_000
    assert resumed.records < 20_000, "the segments already there were not read again"
    root = backup_root(store.prefix, source, backup_id)
    objects = list_objects(s3, store.bucket, root)
    keys = [parse_segment_key(k) for k in objects if k.endswith(".seg.gz")]
    assert len(keys) == len(resumed.manifest.segments)
    assert len({(k.partition, k.seq) for k in keys}) == len(keys), "two objects for one segment"
    assert check_backup.fn(store, source, backup_id, deep=True).ok

    # the same topic backed up in one go gives the very same segments
    clean = backup_topic.fn(
        cluster,
        store,
        source,
        dry_run=False,
        segment_bytes=segment_bytes,
        backup_id="20990101T000000Z-clean",
    )
    assert clean.manifest is not None
    assert [(s.key, s.records_sha256) for s in clean.manifest.segments] == [
        (s.key, s.records_sha256) for s in resumed.manifest.segments
    ]


def test_restore_killed_halfway_then_run_again_is_exactly_once(
    kafka_broker: KafkaBroker, cluster: KafkaCluster, store: BackupStore, moto: MotoServer
) -> None:
    source = create_topic(kafka_broker.bootstrap, unique("restore-kill"), partitions=3)
    fill(kafka_broker.bootstrap, source, 20_000, 3)
    backup = backup_topic.fn(cluster, store, source, dry_run=False, segment_bytes=256 * 1024)
    target = unique("restore-kill-target")
    run_victim(
        "restore", kafka_broker.bootstrap, moto.endpoint_url, store.bucket, source, "7000", target
    )
    partial = read_topic(kafka_broker.bootstrap, target, 3)
    landed = sum(len(rows) for rows in partial.values())
    assert 6999 <= landed < 7500

    again = restore_topic.fn(cluster, store, source, dry_run=False, target_topic=target)
    assert again.resumed and sum(again.already_there.values()) == landed
    assert sum(again.sent.values()) == 20_000 - landed
    assert read_topic(kafka_broker.bootstrap, target, 3) == read_topic(
        kafka_broker.bootstrap, source, 3
    )
    assert check_restore.fn(
        cluster, store, source, backup.backup_id, target, again.start_offsets
    ).ok
    # a third run finds the restore done and sends nothing
    third = restore_topic.fn(cluster, store, source, dry_run=False, target_topic=target)
    assert not third.planned and not third.applied and third.refused


def test_dry_runs_write_nothing(
    kafka_broker: KafkaBroker, cluster: KafkaCluster, store: BackupStore
) -> None:
    source = create_topic(kafka_broker.bootstrap, unique("backup-dry"), partitions=2)
    fill(kafka_broker.bootstrap, source, 500, 2)
    s3 = store.get_s3_client()
    planned = backup_topic.fn(cluster, store, source, dry_run=True)
    assert [c.detail["records_at_most"] for c in planned.planned[:2]] == [250, 250]
    assert list_objects(s3, store.bucket, "") == {}, "a dry-run backup wrote to S3"

    backup_topic.fn(cluster, store, source, dry_run=False)
    listed = list_objects(s3, store.bucket, "")
    target = unique("restore-dry")
    plan = restore_topic.fn(cluster, store, source, dry_run=True, target_topic=target)
    assert plan.planned[0].action == "create_topic" and not plan.applied
    assert not topic_exists(cluster, target), "a dry-run restore created the topic"
    before = read_topic(kafka_broker.bootstrap, source, 2)
    plan = restore_topic.fn(cluster, store, source, dry_run=True, into_non_empty=True)
    assert sum(c.detail["records"] for c in plan.planned) == 500
    assert read_topic(kafka_broker.bootstrap, source, 2) == before
    assert list_objects(s3, store.bucket, "") == listed, "a dry-run restore wrote to S3"


def test_topic_configs_are_backed_up_and_given_to_a_created_target(
    kafka_broker: KafkaBroker, cluster: KafkaCluster, store: BackupStore
) -> None:
    configs = {"retention.ms": "123456789", "retention.bytes": "987654321"}
    source = unique("backup-cfg")
    admin = cluster.get_admin_client()
    for fut in admin.create_topics([NewTopic(source, 2, 1, config=configs)]).values():
        fut.result(15)
    fill(kafka_broker.bootstrap, source, 200, 2)

    backup = backup_topic.fn(cluster, store, source, dry_run=False)
    # tansu reports only what was set on the topic, marked as defaults: all of it is kept
    manifest = load_manifest(store, source, backup.backup_id)
    assert manifest.topic_configs is not None
    assert (manifest.topic_configs.configs, manifest.topic_configs.which) == (configs, "reported")

    target = unique("restored-cfg")
    restored = restore_topic.fn(
        cluster, store, source, dry_run=False, target_topic=target, replication_factor=1
    )
    assert restored.created_topic and restored.planned[0].detail["configs"] == configs
    described = {name: value for name, value, *_ in describe_topic_configs(cluster, target)}
    assert {k: described.get(k) for k in configs} == configs
    assert read_topic(kafka_broker.bootstrap, target, 2) == read_topic(
        kafka_broker.bootstrap, source, 2
    )

    # an existing target with other configs: reported, not changed
    other = unique("restore-cfg-drift")
    for fut in admin.create_topics(
        [NewTopic(other, 2, 1, config={"retention.ms": "1000"})]
    ).values():
        fut.result(15)
    plan = restore_topic.fn(cluster, store, source, dry_run=True, target_topic=other)
    assert plan.config_drift == [
        "retention.bytes: not set (broker default) in the target, 987654321 in the backup",
        "retention.ms: 1000 in the target, 123456789 in the backup",
    ]
    assert {n: v for n, v, *_ in describe_topic_configs(cluster, other)} == {"retention.ms": "1000"}


def _save_blocks(cluster: KafkaCluster, store: BackupStore) -> str:
    name = unique("backup")
    cluster.save(name, overwrite=True)
    store.save(name, overwrite=True)
    return name


def test_runbooks_back_up_then_restore_after_approval_a_non_empty_topic_only_when_its_name_is_typed(
    kafka_broker: KafkaBroker, cluster: KafkaCluster, store: BackupStore
) -> None:
    block = _save_blocks(cluster, store)
    safety = SafetyParams(escalation_block=None, approval_poll_s=1, approval_timeout_s=120)
    source = create_topic(kafka_broker.bootstrap, unique("runbook-src"), partitions=2)
    fill(kafka_broker.bootstrap, source, 300, 2)
    common = {"kafka_block": block, "backup_store_block": block, "topic": source, "safety": safety}

    done = kafka_topic_backup(KafkaTopicBackupParams(**common, deep_check=True))
    assert done.outcome == Outcome.RESOLVED and done.records == 300, done.report
    assert load_manifest(store, source, done.backup_id).records == 300

    # into a new topic: approval, nothing to type
    target = unique("runbook-restored")
    approver = Approver(
        "kafka-topic-restore", {"approve": True, "approver": "alice", "reason": "DR drill"}
    )
    approver.start()
    result = kafka_topic_restore(
        KafkaTopicRestoreParams(**common, target_topic=target, replication_factor=1)
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert "300 records would be written into" in (approver.description or "")
    assert "confirm field" not in (approver.description or "")
    assert result.outcome == Outcome.RESOLVED, result.report
    before = read_topic(kafka_broker.bootstrap, source, 2)
    assert read_topic(kafka_broker.bootstrap, target, 2) == before

    # into the source topic, which still holds its records: the approver must type its name;
    # a tick with another name (the old flag set too) writes nothing
    seen = {approver.paused_run}
    approver = Approver(
        "kafka-topic-restore",
        {"approve": True, "approver": "bob", "reason": "dup", "confirm": target},
        ignore=seen,
    )
    approver.start()
    state = kafka_topic_restore(
        KafkaTopicRestoreParams(**common, confirm_non_empty=True), return_state=True
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert f"also type `{source}` in the confirm field" in (approver.description or "")
    assert "already holds 300 records" in (approver.description or "")
    assert state.is_failed()
    assert f"approved without typing {source} in the confirm field" in (state.message or "")
    assert read_topic(kafka_broker.bootstrap, source, 2) == before

    # typed: the backup's records follow the ones there, each partition in order
    seen.add(approver.paused_run)
    approver = Approver(
        "kafka-topic-restore",
        {"approve": True, "approver": "bob", "reason": "replay", "confirm": source},
        ignore=seen,
    )
    approver.start()
    again = kafka_topic_restore(KafkaTopicRestoreParams(**common))
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert again.outcome == Outcome.RESOLVED, again.report
    assert sum(again.sent.values()) == 300
    assert read_topic(kafka_broker.bootstrap, source, 2) == {
        p: rows + rows for p, rows in before.items()
    }
