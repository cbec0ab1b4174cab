"""The kafka-consumer-lag-high runbook against a real broker (tansu) of its own, so that "every
group" is exactly the groups made here: one caught up, one behind with a live member that does
not commit (stuck), one behind with no member (missing consumers)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition

from blocks.kafka import KafkaCluster
from flows.kafka.kafka_consumer_lag_high import KafkaConsumerLagHighParams, kafka_consumer_lag_high
from flows.services.consumers_too_slow import ConsumersTooSlowParams
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.kafka_lag import LagVerdict, get_all_group_lag
from tests.conftest import (
    create_topic,
    produce_one_per_batch,
    read_incident_report,
    slow_consumer_group,
    unique,
)
from tests.servers import KafkaBroker

pytestmark = pytest.mark.integration

TOPIC = "orders"


def commit(bootstrap: str, group: str, offsets: dict[int, int]) -> None:
    """Commit offsets for a group without joining it (a simple-consumer commit)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    consumer.commit(
        offsets=[TopicPartition(TOPIC, p, o) for p, o in offsets.items()], asynchronous=False
    )
    consumer.close()


@pytest.fixture
def three_groups(own_kafka_broker: KafkaBroker) -> Iterator[str]:
    """Topic `orders` (2 partitions, 6 records each) and groups caught-up, stuck and abandoned."""
    bootstrap = own_kafka_broker.bootstrap
    create_topic(bootstrap, TOPIC, partitions=2)
    for p in (0, 1):
        produce_one_per_batch(bootstrap, TOPIC, [b"r%d" % i for i in range(6)], partition=p)
    commit(bootstrap, "caught-up", {0: 6, 1: 6})
    commit(bootstrap, "abandoned", {0: 2, 1: 3})
    commit(bootstrap, "stuck", {0: 1, 1: 1})
    # a live member of `stuck` that never commits: the group is STABLE, its offsets do not move
    member = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "stuck",
            "enable.auto.commit": False,
            # tansu holds a JoinGroup for the rebalance timeout (max.poll.interval.ms)
            "max.poll.interval.ms": 6000,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    assigned: list[object] = []
    member.subscribe([TOPIC], on_assign=lambda _c, parts: assigned.append(parts))
    deadline = time.monotonic() + 30
    while not assigned and time.monotonic() < deadline:
        member.poll(0.2)
    assert assigned, "the stuck group's member never got its partitions"
    kafka = unique("kafka")
    KafkaCluster(bootstrap_servers=bootstrap, request_timeout_s=5).save(kafka, overwrite=True)
    yield kafka
    member.close()


def params(kafka: str, **overrides) -> KafkaConsumerLagHighParams:
    values = {
        "kafka_block": kafka,
        "warn_lag": 0,
        "escalate_lag": 4,
        "sample_interval_s": 1.5,
        "safety": SafetyParams(escalation_block=None),
    }
    return KafkaConsumerLagHighParams(**{**values, **overrides})


def test_every_group_lag_and_state_read_from_the_broker(three_groups: str) -> None:
    lags = {g.group: g for g in get_all_group_lag.fn(KafkaCluster.load(three_groups))}
    assert set(lags) == {"caught-up", "abandoned", "stuck"}
    by_part = {
        p.partition: (p.committed, p.end_offset, p.lag) for p in lags["abandoned"].partitions
    }
    assert by_part == {0: (2, 6, 4), 1: (3, 6, 3)}
    assert lags["abandoned"].state == "EMPTY" and lags["abandoned"].unattended
    assert lags["caught-up"].total_lag == 0 and not lags["caught-up"].unattended
    assert lags["stuck"].state == "STABLE" and lags["stuck"].has_consumers
    assert lags["stuck"].total_lag == 10


def test_three_groups_classified_and_escalated(three_groups: str) -> None:
    state = kafka_consumer_lag_high(params(three_groups), return_state=True)
    assert state.is_failed()
    report = read_incident_report(state.state_details.flow_run_id)
    assert "**ESCALATED**" in report
    # each group named with its verdict and the partitions behind
    assert "| lag of group caught-up | OK | caught up: lag 0 is within 0" in report
    assert "| lag of group abandoned | FAILING | missing consumers: lag 7" in report
    assert "behind: orders[0]=4, orders[1]=3" in report
    assert "| lag of group stuck | FAILING | stuck: lag 10" in report
    assert "committed offset of orders[0], orders[1] did not move" in report
    assert "| groups with lag and no consumer | FAILING | abandoned |" in report
    # the recommendations are action items, and the escalation names them
    assert "start the consumers of group abandoned" in report
    assert "restart the consumer of group stuck" in report
    assert "2 consumer group(s) over 4 messages behind and not falling" in report


def test_dry_run_would_escalate_and_a_caught_up_group_needs_nothing(three_groups: str) -> None:
    dry = kafka_consumer_lag_high(params(three_groups, dry_run=True), return_state=True)
    assert dry.is_completed()
    report = read_incident_report(dry.state_details.flow_run_id)
    assert "**DRY-RUN: WOULD ESCALATE**" in report

    one = kafka_consumer_lag_high(params(three_groups, group="caught-up"), return_state=True)
    result = one.result()
    assert result.outcome is Outcome.NO_ACTION_NEEDED
    assert [(f.group, f.verdict) for f in result.findings] == [("caught-up", LagVerdict.CAUGHT_UP)]


def test_lag_under_the_escalation_threshold_waits(three_groups: str) -> None:
    result = kafka_consumer_lag_high(params(three_groups, escalate_lag=100))
    assert result.outcome is Outcome.WAITING
    verdicts = {f.group: f.verdict for f in result.findings}
    assert verdicts == {
        "caught-up": LagVerdict.CAUGHT_UP,
        "abandoned": LagVerdict.MISSING_CONSUMERS,
        "stuck": LagVerdict.STUCK,
    }


def test_unknown_group_escalates(three_groups: str) -> None:
    state = kafka_consumer_lag_high(params(three_groups, group="no-such-group"), return_state=True)
    assert state.is_failed()
    assert "consumer group no-such-group is not known" in read_incident_report(
        state.state_details.flow_run_id
    )


@pytest.fixture
def slow_group(own_kafka_broker: KafkaBroker) -> Iterator[tuple[str, str]]:
    """Group `slow`, behind and committing (tests.conftest.slow_consumer_group)."""
    with slow_consumer_group(own_kafka_broker.bootstrap, "slow") as topic:
        kafka = unique("kafka")
        KafkaCluster(bootstrap_servers=own_kafka_broker.bootstrap, request_timeout_s=5).save(
            kafka, overwrite=True
        )
        yield kafka, topic


def test_slow_group_is_handed_to_consumers_too_slow(
    slow_group: tuple[str, str], deployment_ids: dict[str, str]
) -> None:
    from tests.conftest import runs_of

    kafka, _topic = slow_group
    workload = {
        "group": "slow",
        "platform": "kubernetes/prod",
        "service": "clicks-consumer",
        "namespace": "web",
    }
    before = {r["id"] for r in runs_of(deployment_ids["consumers-too-slow"])}
    result = kafka_consumer_lag_high(
        params(
            kafka, group="slow", escalate_lag=0, sample_interval_s=2, consumer_workloads=[workload]
        )
    )
    assert [f.verdict for f in result.findings] == [LagVerdict.SLOW], result.findings
    # not escalated although over escalate_lag and growing: the fixing runbook has it now
    assert result.outcome is Outcome.WAITING, result.report
    new = [r for r in runs_of(deployment_ids["consumers-too-slow"]) if r["id"] not in before]
    assert len(new) == 1
    handed = new[0]["parameters"]["params"]
    assert {k: handed[k] for k in ("group", "platform", "service", "namespace", "kafka_block")} == {
        **{k: v for k, v in workload.items()},
        "kafka_block": kafka,
    }
    assert handed["lag_threshold"] == 0 and handed["dry_run"] is False
    ConsumersTooSlowParams.model_validate(handed)  # the run it starts accepts them
    assert "handed-off" in new[0]["tags"]
    assert "handed to consumers-too-slow" in result.report and new[0]["id"] in result.report
