"""The kafka-topics-validate runbook against a real broker (tansu): a missing topic created, a drifted
config set back, partitions raised only with approval, a corrupt topic recreated only with approval
and not over unread records unless confirmed; dry-run changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from blocks.kafka import KafkaCluster
from flows.kafka.kafka_topics_validate import KafkaTopicsValidateParams, kafka_topics_validate
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.approvals import Approver
from tests.conftest import create_topic, produce_one_per_batch, read_incident_report, unique
from tests.servers import KafkaBroker

pytestmark = pytest.mark.integration

RUNBOOK = "kafka-topics-validate"
CONFIGS = {"retention.ms": "3600000", "cleanup.policy": "delete"}


class Topics:
    """Uniquely named topics on the shared broker, and a saved Kafka block."""

    def __init__(self, broker: KafkaBroker):
        self.bootstrap = broker.bootstrap
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})
        self.block = unique("kafka")
        KafkaCluster(bootstrap_servers=self.bootstrap, request_timeout_s=5).save(
            self.block, overwrite=True
        )

    def existing(self, partitions: int = 2, configs: dict[str, str] | None = None) -> str:
        name = create_topic(self.bootstrap, unique("orders"), partitions=partitions)
        if configs:
            self.set_configs(name, configs)
        return name

    def set_configs(self, name: str, configs: dict[str, str]) -> None:
        from confluent_kafka.admin import AlterConfigOpType, ConfigEntry

        entries = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in configs.items()
        ]
        resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries)
        self.admin.incremental_alter_configs([resource])[resource].result(10)

    def snapshot(self, names: list[str]) -> dict[str, Any]:
        """Partitions and every described config of each topic (None: the topic is missing)."""
        topics = self.admin.list_topics(timeout=10).topics
        found: dict[str, Any] = {}
        for name in names:
            if name not in topics:
                found[name] = None
                continue
            resource = ConfigResource(ResourceType.TOPIC, name)
            configs = self.admin.describe_configs([resource])[resource].result(10)
            found[name] = (len(topics[name].partitions), {k: v.value for k, v in configs.items()})
        return found

    def end_offsets(self, name: str) -> list[int]:
        consumer = KafkaCluster(bootstrap_servers=self.bootstrap).get_consumer(unique("peek"))
        try:
            parts = consumer.list_topics(name, timeout=10).topics[name].partitions
            return [
                consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                for p in parts
            ]
        finally:
            consumer.close()

    def params(self, specs: list[dict], **overrides: Any) -> KafkaTopicsValidateParams:
        values = {
            "kafka_block": self.block,
            "topics": specs,
            "safety": SafetyParams(
                escalation_block=None, approval_poll_s=1, approval_timeout_s=120
            ),
        }
        return KafkaTopicsValidateParams(**{**values, **overrides})


def spec(name: str, partitions: int = 2, **configs: str) -> dict:
    return {"name": name, "partitions": partitions, "configs": {**CONFIGS, **configs}}


@pytest.fixture
def topics(kafka_broker: KafkaBroker) -> Topics:
    return Topics(kafka_broker)


def test_dry_run_changes_nothing(topics: Topics) -> None:
    missing = unique("missing")
    drifted = topics.existing(configs={**CONFIGS, "retention.ms": "1000"})
    corrupt = topics.existing(configs=CONFIGS)
    produce_one_per_batch(topics.bootstrap, corrupt, [b"a", b"b"], partition=0)
    names = [missing, drifted, corrupt]
    before = topics.snapshot(names)

    result = kafka_topics_validate(
        topics.params(
            [spec(missing), spec(drifted), spec(corrupt, partitions=3)],
            dry_run=True,
            allow_partition_increase=True,
            recreate=[corrupt],
            confirm_data_loss=[corrupt],
        )
    )

    assert result.outcome is Outcome.PLANNED, result.report
    assert topics.snapshot(names) == before
    assert before[missing] is None and topics.end_offsets(corrupt) == [2, 0]
    for planned in ("create_topic", "set_topic_configs", "recreate_topic"):
        assert planned in result.report, planned


def test_missing_topic_created_and_drifted_config_set_back(topics: Topics) -> None:
    missing = unique("missing")
    drifted = topics.existing(configs={**CONFIGS, "retention.ms": "1000"})
    produce_one_per_batch(topics.bootstrap, drifted, [b"kept"], partition=1)

    result = kafka_topics_validate(topics.params([spec(missing, partitions=3), spec(drifted)]))

    assert result.outcome is Outcome.RESOLVED, result.report
    after = topics.snapshot([missing, drifted])
    assert after[missing][0] == 3
    assert {k: after[missing][1].get(k) for k in CONFIGS} == CONFIGS
    assert after[drifted][1]["retention.ms"] == "3600000"
    assert topics.end_offsets(drifted) == [0, 1], "setting configs back lost records"
    assert "'1000', spec '3600000'" in result.report

    again = kafka_topics_validate(topics.params([spec(missing, partitions=3), spec(drifted)]))
    assert again.outcome is Outcome.NO_ACTION_NEEDED, again.report


def test_partitions_not_raised_without_permission_or_approval(topics: Topics) -> None:
    name = topics.existing(partitions=1, configs=CONFIGS)

    state = kafka_topics_validate(topics.params([spec(name, partitions=3)]), return_state=True)
    assert state.is_failed()  # escalated: the spec wants more partitions than allowed to raise
    assert "allow_partition_increase is off" in read_incident_report(
        state.state_details.flow_run_id
    )
    assert topics.snapshot([name])[name][0] == 1

    approver = Approver(RUNBOOK, {"approve": False, "approver": "bob", "reason": "keyed topic"})
    approver.start()
    state = kafka_topics_validate(
        topics.params([spec(name, partitions=3)], allow_partition_increase=True), return_state=True
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert "per-key order breaks" in approver.description
    assert state.is_failed()
    assert "rejected by bob: keyed topic" in read_incident_report(state.state_details.flow_run_id)
    assert topics.snapshot([name])[name][0] == 1


def test_partitions_raised_after_approval(topics: Topics) -> None:
    name = topics.existing(partitions=1, configs=CONFIGS)
    approver = Approver(RUNBOOK, {"approve": True, "approver": "alice", "reason": "unkeyed"})
    approver.start()
    state = kafka_topics_validate(
        topics.params([spec(name, partitions=3)], allow_partition_increase=True), return_state=True
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    report = read_incident_report(state.state_details.flow_run_id)
    partitions = topics.snapshot([name])[name][0]
    # tansu (the test broker) does not implement CreatePartitions: the run must say so and fail;
    # a broker that does raises the count and the run verifies it
    if "CreatePartitions" in report:
        assert state.is_failed() and partitions == 1
    else:
        assert state.is_completed(), report
        assert partitions == 3


def test_recreate_refused_without_approval_done_with_it(topics: Topics) -> None:
    name = topics.existing(partitions=2, configs={**CONFIGS, "retention.ms": "1000"})
    produce_one_per_batch(topics.bootstrap, name, [b"x", b"y", b"z"], partition=0)
    params = topics.params([spec(name)], recreate=[name])

    approver = Approver(RUNBOOK, {"approve": False, "approver": "bob", "reason": "not sure"})
    approver.start()
    state = kafka_topics_validate(params, return_state=True)
    approver.join(10)
    assert approver.error is None and "loses every record" in approver.description
    assert state.is_failed()
    assert topics.end_offsets(name) == [3, 0], "rejected, yet the topic lost its records"

    approver = Approver(
        RUNBOOK,
        {"approve": True, "approver": "alice", "reason": "corrupt"},
        ignore={approver.paused_run},
    )
    approver.start()
    result = kafka_topics_validate(params)
    approver.join(10)
    assert approver.error is None
    assert result.outcome is Outcome.RESOLVED, result.report
    assert topics.end_offsets(name) == [0, 0]
    partitions, configs = topics.snapshot([name])[name]
    assert partitions == 2 and configs["retention.ms"] == "3600000"


def _read_in_part(topics: Topics, values: list[bytes]) -> tuple[str, str]:
    """A one-partition topic holding ``values`` and a consumer group that has read only the first."""
    name = topics.existing(partitions=1, configs=CONFIGS)
    produce_one_per_batch(topics.bootstrap, name, values, partition=0)
    group = unique("billing")
    consumer = KafkaCluster(bootstrap_servers=topics.bootstrap).get_consumer(group)
    consumer.commit(offsets=[TopicPartition(name, 0, 1)], asynchronous=False)
    consumer.close()
    return name, group


def test_recreate_over_unread_records_needs_the_name_typed(topics: Topics) -> None:
    name, group = _read_in_part(topics, [b"1", b"2", b"3"])
    params = topics.params([spec(name, 1)], recreate=[name])

    # a tick alone (or the wrong name typed) changes nothing
    approver = Approver(
        RUNBOOK, {"approve": True, "approver": "alice", "reason": "corrupt", "confirm": "orders"}
    )
    approver.start()
    state = kafka_topics_validate(params, return_state=True)
    approver.join(10)
    assert approver.error is None and f"have not read all of {name}" in approver.description
    assert f"also type `{name}` in the confirm field" in approver.description
    assert state.is_failed()
    assert f"approved without typing {name} in the confirm field" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert f"{group} (2 records)" in report
    assert topics.end_offsets(name) == [3]

    approver = Approver(
        RUNBOOK,
        {"approve": True, "approver": "alice", "reason": "replayed", "confirm": f" {name} "},
        ignore={approver.paused_run},
    )
    approver.start()
    result = kafka_topics_validate(params)
    approver.join(10)
    assert approver.error is None
    assert result.outcome is Outcome.RESOLVED, result.report
    assert topics.end_offsets(name) == [0]


def test_recreate_over_unread_records_confirmed_in_advance(topics: Topics) -> None:
    name, group = _read_in_part(topics, [b"1", b"2"])

    # still approved, but nothing to type: confirm_data_loss said so when the run started
    approver = Approver(RUNBOOK, {"approve": True, "approver": "alice", "reason": "replayed"})
    approver.start()
    result = kafka_topics_validate(
        topics.params([spec(name, 1)], recreate=[name], confirm_data_loss=[name])
    )
    approver.join(10)
    assert approver.error is None and f"have not read all of {name}" in approver.description
    assert "confirm field" not in approver.description
    assert result.outcome is Outcome.RESOLVED, result.report
    assert topics.end_offsets(name) == [0]


def test_recreate_task_never_recreates_twice(topics: Topics) -> None:
    from tasks.kafka_topics import TopicSpec, read_topics, recreate_topics

    cluster = KafkaCluster(bootstrap_servers=topics.bootstrap, request_timeout_s=5)
    name = topics.existing(partitions=1, configs=CONFIGS)
    produce_one_per_batch(topics.bootstrap, name, [b"1", b"2"], partition=0)
    specs = [TopicSpec(**spec(name, 1))]
    seen = {name: read_topics.fn(cluster, specs)[name].topic_id}
    assert seen[name]

    done = recreate_topics.fn(cluster, specs, seen, False)
    assert [c.action for c in done.applied] == ["recreate_topic"]
    assert done.applied[0].detail["configs"] == CONFIGS, "the audit's after is the state read back"
    assert topics.end_offsets(name) == [0]
    produce_one_per_batch(topics.bootstrap, name, [b"new"], partition=0)

    # a retry with the id the run saw: the topic was recreated already, its new record stays
    again = recreate_topics.fn(cluster, specs, seen, False)
    assert again.planned == [] and "recreated since this run read it" in again.notes[0]
    assert topics.end_offsets(name) == [1]

    # a retry after the delete went through but the create did not: only created
    for future in topics.admin.delete_topics([name]).values():
        future.result(10)
    fresh = recreate_topics.fn(cluster, specs, seen, False)
    assert [c.action for c in fresh.applied] == ["create_topic"]
    assert topics.snapshot([name])[name][0] == 1
