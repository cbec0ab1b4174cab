"""kafka-topics-validate decisions: per topic, what to do and what only to report (data tables)."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest
from pydantic import ValidationError

from flows.kafka.kafka_topics_validate import KafkaTopicsValidateParams
from runbooks.params import kafka_name_problem
from tasks import kafka_topics
from tasks.kafka_topics import (
    TopicAction,
    TopicSpec,
    TopicState,
    decide_topic,
    plan_changes,
)

C, R, S, X = (
    TopicAction.CREATE,
    TopicAction.RAISE_PARTITIONS,
    TopicAction.SET_CONFIGS,
    TopicAction.RECREATE,
)
SPEC = TopicSpec(
    name="orders", partitions=3, configs={"retention.ms": "1000", "cleanup.policy": "delete"}
)
GOOD = {"retention.ms": "1000", "cleanup.policy": "delete"}


def state(exists=True, partitions=3, rf=1, configs=None) -> TopicState:
    return TopicState(
        name="orders",
        exists=exists,
        partitions=partitions,
        replication_factor=rf,
        configs=GOOD if configs is None else configs,
    )


# (case, live state, allow_partition_increase, corrupt, actions, drifted keys, finding fragment)
CASES = [
    ("matches", state(), False, False, [], [], None),
    ("missing", state(exists=False, partitions=0, configs={}), False, False, [C], [], None),
    (
        "missing and corrupt: just created",
        state(exists=False),
        False,
        True,
        [C],
        [],
        "nothing to delete",
    ),
    ("corrupt", state(), False, True, [X], [], None),
    ("corrupt wins over drift", state(partitions=1, configs={}), True, True, [X], [], None),
    ("fewer partitions, not allowed", state(partitions=2), False, False, [], [], "not raised"),
    ("fewer partitions, allowed", state(partitions=2), True, False, [R], [], None),
    ("more partitions: never lowered", state(partitions=5), True, False, [], [], "cannot remove"),
    (
        "config drifted",
        state(configs={**GOOD, "retention.ms": "5"}),
        False,
        False,
        [S],
        ["retention.ms"],
        None,
    ),
    (
        "config unset",
        state(configs={"retention.ms": "1000", "cleanup.policy": None}),
        False,
        False,
        [S],
        ["cleanup.policy"],
        None,
    ),
    ("replication differs: report", state(rf=3), False, False, [], [], "reassignment"),
    (
        "raise and drift together",
        state(partitions=1, configs={**GOOD, "cleanup.policy": "compact"}),
        True,
        False,
        [R, S],
        ["cleanup.policy"],
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "live", "allow", "corrupt", "actions", "drifted", "finding"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_decide_topic(case, live, allow, corrupt, actions, drifted, finding) -> None:
    d = decide_topic(SPEC, live, allow, corrupt)
    assert d.actions == actions
    assert sorted(d.drifted) == drifted
    if finding:
        assert any(finding in f for f in d.findings), d.findings
    else:
        assert d.findings == []
    assert d.ok is (not actions and not finding)


def test_plan_names_from_and_to() -> None:
    live = state(partitions=1, configs={**GOOD, "retention.ms": "5"})
    d = decide_topic(SPEC, live, True, False)
    [raise_] = plan_changes([d], [SPEC], {"orders": live}, R)
    assert raise_.detail == {"from": 1, "to": 3}
    [configs] = plan_changes([d], [SPEC], {"orders": live}, S)
    assert configs.detail == {"retention.ms": {"from": "5", "to": "1000"}}
    assert plan_changes([d], [SPEC], {"orders": live}, C) == []


# (name, problem fragment or None)
NAMES = [
    ("orders", None),
    ("match-events.v2_dlq", None),
    ("a" * 249, None),
    ("a" * 250, "not a Kafka topic name"),
    (".", "reserved"),
    ("..", "reserved"),
    ("", "not a Kafka topic name"),
    ("orders/../etc", "not a Kafka topic name"),
    ("orders; rm -rf", "not a Kafka topic name"),
    ("ordérs", "not a Kafka topic name"),
]


@pytest.mark.parametrize(("name", "problem"), NAMES)
def test_topic_names(name, problem) -> None:
    found = kafka_name_problem(name)
    assert (found is None) if problem is None else (problem in found)


# (params, error fragment)
BAD_PARAMS = [
    ({"topics": [{"name": "a b", "partitions": 1}]}, "not a Kafka topic name"),
    ({"topics": [{"name": "a", "partitions": 0}]}, "greater than or equal to 1"),
    (
        {"topics": [{"name": "a", "partitions": 1, "configs": {"Retention MS": "1"}}]},
        "config names",
    ),
    (
        {"topics": [{"name": "a", "partitions": 1}, {"name": "a", "partitions": 2}]},
        "more than once",
    ),
    ({"topics": [{"name": "a", "partitions": 1}], "recreate": ["b"]}, "without a spec"),
    ({"topics": [{"name": "a", "partitions": 1}], "confirm_data_loss": [".."]}, "reserved"),
]


@pytest.mark.parametrize(("values", "error"), BAD_PARAMS)
def test_bad_params_are_refused(values, error) -> None:
    with pytest.raises(ValidationError, match=error):
        KafkaTopicsValidateParams(**values)


def test_topic_tasks_pickle_for_a_served_run() -> None:
    for task in (
        kafka_topics.read_topics,
        kafka_topics.create_missing_topics,
        kafka_topics.restore_topic_configs,
        kafka_topics.raise_topic_partitions,
        kafka_topics.recreate_topics,
    ):
        assert pickle.loads(cloudpickle.dumps(task)).name == task.name


def test_config_values_written_as_yaml_numbers_and_booleans_are_kafka_strings() -> None:
    spec = TopicSpec(
        name="a", partitions=1, configs={"min.insync.replicas": 2, "preallocate": False}
    )
    assert spec.configs == {"min.insync.replicas": "2", "preallocate": "false"}
