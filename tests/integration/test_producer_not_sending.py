"""The producer-not-sending runbook against the real broker (tansu): a topic with a live producer,
one whose producer stopped (records expected, none new: escalated with the last record's time),
and one that never received a record."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from blocks.kafka import KafkaCluster
from flows.kafka.producer_not_sending import ProducerNotSendingParams, producer_not_sending
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kafka_activity import Activity, ExpectedTopic
from tests.conftest import create_topic, read_incident_report, unique
from tests.servers import KafkaBroker, free_port

pytestmark = pytest.mark.integration


class LiveProducer:
    """Produces one record per batch every ``every_s`` until stopped."""

    def __init__(self, bootstrap: str, topic: str, every_s: float = 0.1) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        self.topic, self.every_s = topic, every_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.producer.produce(self.topic, value=b"tick %d" % self.sent)
            self.producer.flush(10)
            self.sent += 1

    def __enter__(self) -> LiveProducer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def produce_and_stop(bootstrap: str, topic: str, count: int) -> dict[int, datetime]:
    """Produce ``count`` records one per batch, round robin over partitions 0 and 1; per
    partition, the timestamp of the last one the broker acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    last: dict[int, datetime] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        last[msg.partition()] = datetime.fromtimestamp(msg.timestamp()[1] / 1000, UTC)

    for i in range(count):
        producer.produce(topic, value=b"price %d" % i, partition=i % 2, on_delivery=delivered)
        assert producer.flush(10) == 0
    return last


@pytest.fixture
def topics(kafka_broker: KafkaBroker) -> Iterator[tuple[str, str, str, str, dict[int, datetime]]]:
    """(Kafka block, live topic, stalled topic, empty topic, stalled topic's last timestamps)."""
    bootstrap = kafka_broker.bootstrap
    live, stalled, empty = (
        create_topic(bootstrap, unique(n), partitions=2) for n in ("ticks", "prices", "orders")
    )
    last = produce_and_stop(bootstrap, stalled, 6)
    kafka = unique("kafka")
    KafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=5).save(kafka, overwrite=True)
    with LiveProducer(bootstrap, live):
        yield kafka, live, stalled, empty, last


def params(kafka: str, names: list[str], **overrides) -> ProducerNotSendingParams:
    # 60/min expected; a silence over 1 s is a stall; the live producer sends 10/s
    values = {
        "kafka_block": kafka,
        "topics": [ExpectedTopic(name=n, min_per_minute=60, window_s=1) for n in names],
        "watch_s": 2,
        "safety": SafetyParams(escalation_block=None),
    }
    return ProducerNotSendingParams(**{**values, **overrides})


def groups(bootstrap: str) -> set[str]:
    listed = AdminClient({"bootstrap.servers": bootstrap}).list_consumer_groups().result(10)
    return {g.group_id for g in listed.valid}


def test_live_stalled_and_empty_topics_told_apart(
    topics: tuple[str, str, str, str, dict[int, datetime]], kafka_broker: KafkaBroker
) -> None:
    kafka, live, stalled, empty, last = topics
    gone = unique("gone")  # never created: producers writing to it fail
    groups_before = groups(kafka_broker.bootstrap)
    state = producer_not_sending(params(kafka, [live, stalled, empty, gone]), return_state=True)

    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**ESCALATED**" in report
    assert "| brokers reachable | OK | 1 broker(s)" in report
    assert f"| topic {live} | OK | sending:" in report
    assert f"| topic {stalled} | FAILING | stalled: no new record in 2s; last record" in report
    assert (
        f"| topic {empty} | FAILING | empty: no new record in 2s, and it has never received"
        in report
    )
    # the stalled topic's last record per partition, as the broker acknowledged it
    for p, at in last.items():
        assert (
            f"{stalled}[{p}]: last record offset 2 at {at.isoformat(timespec='milliseconds')}"
            in report
        )
    newest = max(last.values()).isoformat(timespec="seconds")
    assert f"{stalled} stalled:" in report and f"(last record {newest})" in report
    assert f"| topic {gone} | FAILING | missing: the topic does not exist" in report
    assert f"Create the missing topic(s) {gone}" in report
    assert "3 topic(s) not receiving data as expected" in report
    assert "No automatic fix exists" in report
    assert "Read the producer's logs" in report
    # read without joining or creating a group: the broker knows the same groups as before
    assert groups(kafka_broker.bootstrap) == groups_before


def test_a_live_topic_needs_nothing_and_dry_run_would_escalate(
    topics: tuple[str, str, str, str, dict[int, datetime]],
) -> None:
    kafka, live, stalled, empty, last = topics
    result = producer_not_sending(params(kafka, [live, stalled], topic=live))
    assert result.outcome is Outcome.NO_ACTION_NEEDED
    (found,) = result.topics
    assert found.activity is Activity.SENDING and found.new_records >= 5
    assert found.per_minute >= 60 and found.silent_s is not None and found.silent_s < 2

    # the alert's topic, not in `topics`: checked with the defaults (1/min, 5 min window)
    quiet = producer_not_sending(params(kafka, [live], topic=stalled, watch_s=1))
    assert quiet.outcome is Outcome.NO_ACTION_NEEDED
    (found,) = quiet.topics
    assert found.activity is Activity.QUIET and found.last_record_at == max(last.values())

    dry = producer_not_sending(
        params(kafka, [live], topic=empty, dry_run=True, watch_s=1), return_state=True
    )
    assert dry.is_completed()
    report = read_incident_report(dry.state_details.flow_run_id)
    assert "**DRY-RUN: WOULD ESCALATE**" in report and f"{empty} empty" in report


def test_unreachable_brokers_escalate_as_a_broker_outage() -> None:
    kafka = unique("kafka")
    KafkaCluster(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_s=1).save(kafka)
    state = producer_not_sending(params(kafka, ["prices"]), return_state=True)
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| brokers reachable | FAILING |" in report
    assert "producers cannot send to any topic" in report and "kafka-cluster-down" in report
