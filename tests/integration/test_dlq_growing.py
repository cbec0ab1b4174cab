"""The dlq-growing runbook against a real broker (tansu): a DLQ filled with records the way Kafka
Connect and Spring Kafka write them; triage counts, no offset committed, secrets masked; replay
exactly once, also after a SIGKILL halfway; dry-run sends nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from prefect.settings import PREFECT_API_URL

from blocks.kafka import KafkaCluster
from flows.kafka.dlq_growing import DlqGrowingParams, dlq_growing
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kafka_dlq import FailureKind, peek_dlq, read_records
from tasks.kafka_dlq_replay import REPLAYED_FROM
from tests.conftest import create_topic, read_incident_report, unique
from tests.dlq_records import EXPECTED_PER_ROUND, SECRETS, dlq_records, produce_records
from tests.servers import KafkaBroker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
APP_GROUP = "match-events-dlq-reader"


class Dlq:
    """A DLQ topic with two source topics, on the shared broker, and a saved Kafka block."""

    def __init__(self, broker: KafkaBroker, rounds: int = 1):
        self.bootstrap = broker.bootstrap
        self.orders = create_topic(self.bootstrap, unique("orders"), partitions=2)
        self.payments = create_topic(self.bootstrap, unique("payments"), partitions=2)
        self.topic = create_topic(self.bootstrap, unique("match-events-dlq"), partitions=2)
        self.records = list(dlq_records(self.orders, self.payments, rounds))
        produce_records(self.bootstrap, self.topic, self.records)
        self.block = unique("kafka")
        self.cluster = KafkaCluster(bootstrap_servers=self.bootstrap, request_timeout_s=5)
        self.cluster.save(self.block, overwrite=True)

    def params(self, **overrides) -> DlqGrowingParams:
        values = {
            "kafka_block": self.block,
            "dlq_topic": self.topic,
            "safety": SafetyParams(escalation_block=None, budget_max_actions=1000),
        }
        return DlqGrowingParams(**{**values, **overrides})

    def replayed_markers(self) -> Counter[str]:
        """Every `runbooks-replayed-from` header in the source topics, with how often it occurs."""
        seen: Counter[str] = Counter()
        for topic in (self.orders, self.payments):
            for msg in read_records(
                self.cluster, topic, {0: (0, None), 1: (0, None)}, deadline_s=60
            ):
                for k, v in msg.headers() or []:
                    if k == REPLAYED_FROM:
                        seen[v.decode()] += 1
        return seen

    def dlq_offsets(self, kinds: set[str] | None = None, with_source: bool = False) -> set[str]:
        """`<dlq>/<partition>/<offset>` of every DLQ record (of ``kinds``; whose headers name their
        source topic), as produced round-robin."""
        return {
            f"{self.topic}/{i % 2}/{i // 2}"
            for i, r in enumerate(self.records)
            if (kinds is None or r.kind in kinds) and (r.source_topic or not with_source)
        }


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    )
    result = admin.list_consumer_group_offsets([request], request_timeout=10)[group].result(10)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def groups(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return {g.group_id for g in admin.list_consumer_groups(request_timeout=10).result(10).valid}


def test_triage_counts_each_kind_without_consuming(kafka_broker: KafkaBroker) -> None:
    dlq = Dlq(kafka_broker)
    # the application reading the DLQ has committed part of it: triage must not move that
    app = dlq.cluster.get_consumer(APP_GROUP, **{"enable.auto.commit": False})
    app.commit(
        offsets=[TopicPartition(dlq.topic, 0, 2), TopicPartition(dlq.topic, 1, 1)],
        asynchronous=False,
    )
    app.close()
    before_offsets = committed(dlq.bootstrap, APP_GROUP, dlq.topic)
    before_groups = groups(dlq.bootstrap)

    triage = peek_dlq.fn(dlq.cluster, dlq.topic)
    assert triage.read == len(dlq.records) == 12
    assert triage.by_kind == EXPECTED_PER_ROUND
    assert triage.by_source_topic == {dlq.payments: 5, dlq.orders: 5, "(not recorded)": 2}
    errors = list(triage.by_error)
    assert errors[0].startswith(
        "org.apache.kafka.connect.errors.DataException: Failed to deserialize"
    )
    assert triage.by_error[errors[0]] == 3
    assert {s.kind for s in triage.samples} == set(FailureKind)

    state = dlq_growing(dlq.params(), return_state=True)
    assert state.is_failed()  # escalated: a human fixes the cause, then replays
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**ESCALATED**" in report
    assert "12 failed record(s)" in report and "3 schema" in report and "5 serialization" in report
    assert "4 processing" in report and "| schema failures | FAILING | 3 |" in report
    assert "com.example.payments.Payment" in report and "player 0 not found" in report
    for secret in SECRETS:
        assert secret not in report, secret
    assert "**********" in report

    assert committed(dlq.bootstrap, APP_GROUP, dlq.topic) == before_offsets == {0: 2, 1: 1}
    assert groups(dlq.bootstrap) == before_groups, "triage joined or created a consumer group"


def test_replay_dry_run_sends_nothing(kafka_broker: KafkaBroker) -> None:
    dlq = Dlq(kafka_broker)
    result = dlq_growing(dlq.params(replay=True, dry_run=True))
    assert result.outcome is Outcome.PLANNED
    # the processing record without a source topic has nowhere to go without fallback_topic
    assert "Would replay 3 record(s); nothing was sent" in result.report
    assert "1 no source topic recorded and no fallback topic" in result.report
    assert dlq.replayed_markers() == Counter()


def test_replay_exactly_once_after_sigkill_halfway(kafka_broker: KafkaBroker) -> None:
    dlq = Dlq(kafka_broker, rounds=5)  # 60 records, 10 per batch
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    victim = subprocess.run(
        [sys.executable, "-m", "tests.dlq_replay_victim", dlq.bootstrap, dlq.topic, "25"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=180,
    )
    assert victim.returncode == -9, victim.stderr.decode()[-2000:]
    partial = dlq.replayed_markers()
    assert 25 <= sum(partial.values()) < 50 and max(partial.values()) == 1

    kinds = list(FailureKind)
    result = dlq_growing(dlq.params(replay=True, replay_kinds=kinds, approve_over=1000))
    assert result.outcome is Outcome.RESOLVED, result.report
    markers = dlq.replayed_markers()
    # 50 records name their source topic; the 10 that do not have nowhere to go (no fallback)
    assert set(markers) == dlq.dlq_offsets(with_source=True), "every DLQ record replayed"
    assert max(markers.values()) == 1, "a record replayed twice"
    assert "were sent by an earlier, interrupted run: not sent again" in result.report
    sent_now = sum(len(o) for o in result.replayed.values())
    assert sent_now == 50 - sum(partial.values())
    assert "10 no source topic recorded" in result.report

    again = dlq_growing(dlq.params(replay=True, replay_kinds=kinds, approve_over=1000))
    assert again.outcome is Outcome.NO_ACTION_NEEDED
    assert dlq.replayed_markers() == markers


def test_replay_only_selected_kinds_and_names_offsets(kafka_broker: KafkaBroker) -> None:
    dlq = Dlq(kafka_broker)
    result = dlq_growing(dlq.params(replay=True, fallback_topic=dlq.orders))
    assert result.outcome is Outcome.RESOLVED, result.report
    assert set(dlq.replayed_markers()) == dlq.dlq_offsets({"processing"})
    # the processing records: round-robin indexes 8, 9, 10 (payments) and 11 (fallback to orders)
    assert result.replayed == {0: [4, 5], 1: [4, 5]}
    assert "DLQ offsets [0] 4-5; [1] 4-5" in result.report
    assert "8 serialization failures (not selected)" not in result.report
    assert "5 serialization failures (not selected)" in result.report
