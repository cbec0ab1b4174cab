"""Kafka topics against a declared spec: read their partitions, replication and configs; decide per
topic what to do (pure, tested with tables); create, set configs back, raise partitions, recreate.

Every mutating task re-reads the live topics and plans from them, so a retried or re-run task
applies nothing twice; with ``dry_run`` it returns the plan without changing anything.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from confluent_kafka import KafkaException
from prefect import task
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from blocks.kafka import KafkaCluster
from runbooks.params import TopicName
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.kafka import is_retriable

_CONFIG_KEY = re.compile(r"[a-z][a-z0-9.]{0,99}")


def _config_keys(configs: dict[str, str]) -> dict[str, str]:
    bad = [k for k in configs if not _CONFIG_KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"not Kafka topic config names: {', '.join(repr(k[:60]) for k in bad)}")
    return configs


def _config_text(configs: Any) -> Any:
    # Kafka configs are strings; a spec written in YAML says `min.insync.replicas: 2` or
    # `preallocate: false`: taken as Kafka spells them, "2" and "false"
    if not isinstance(configs, dict):
        return configs
    return {
        k: (str(v).lower() if isinstance(v, bool) else str(v)) if isinstance(v, int | float) else v
        for k, v in configs.items()
    }




class TopicSpec(BaseModel):
    """A topic as it should be."""

    name: TopicName = Field(description="Topic name.")
    partitions: int = Field(ge=1, le=100_000, description="Partition count.")
    replication_factor: int = Field(1, ge=1, le=32, description="Replicas of each partition.")
    configs: Annotated[
        dict[str, str], BeforeValidator(_config_text), AfterValidator(_config_keys)
    ] = Field(
        default_factory=dict,
        description="Topic configs that must hold, e.g. retention.ms, cleanup.policy, "
        "min.insync.replicas; configs not named here are left alone.",
    )


class TopicState(BaseModel):
    """A topic as the broker describes it."""

    name: str
    exists: bool
    partitions: int = 0
    replication_factor: int = 0
    configs: dict[str, str | None] = Field(
        default_factory=dict, description="Values of the spec's configs (None: not set)."
    )
    topic_id: str | None = Field(
        None, description="The broker's id of this topic: a recreated topic has a new one."
    )


class TopicAction(StrEnum):
    CREATE = "create_topic"
    RAISE_PARTITIONS = "raise_partitions"
    SET_CONFIGS = "set_topic_configs"
    RECREATE = "recreate_topic"


class TopicDecision(BaseModel):
    """What to do with one topic, and what only to report."""

    topic: str
    actions: list[TopicAction] = Field(default_factory=list)
    drifted: dict[str, tuple[str | None, str]] = Field(
        default_factory=dict, description="config -> (live value, spec value)."
    )
    findings: list[str] = Field(default_factory=list, description="Report-only differences.")

    @property
    def ok(self) -> bool:
        return not self.actions and not self.findings


def decide_topic(
    spec: TopicSpec, state: TopicState, allow_partition_increase: bool, corrupt: bool
) -> TopicDecision:
    """Compare one topic with its spec: create, recreate, raise partitions, set configs, report."""
    d = TopicDecision(topic=spec.name)
    if not state.exists:
        d.actions.append(TopicAction.CREATE)
        if corrupt:
            d.findings.append("named corrupt but missing: created, nothing to delete")
        return d
    if corrupt:
        # delete + create with the spec: partitions, replication and configs all come from it
        d.actions.append(TopicAction.RECREATE)
        return d
    if state.partitions < spec.partitions:
        if allow_partition_increase:
            d.actions.append(TopicAction.RAISE_PARTITIONS)
        else:
            d.findings.append(
                f"{state.partitions} partitions, spec {spec.partitions}: not raised "
                "(allow_partition_increase is off; raising moves keys to other partitions)"
            )
    elif state.partitions > spec.partitions:
        d.findings.append(
            f"{state.partitions} partitions, spec {spec.partitions}: Kafka cannot remove "
            "partitions; fix the spec or recreate the topic"
        )
    if state.replication_factor != spec.replication_factor:
        d.findings.append(
            f"replication factor {state.replication_factor}, spec {spec.replication_factor}: "
            "needs a partition reassignment, not done by this runbook"
        )
    d.drifted = {
        k: (state.configs.get(k), v) for k, v in spec.configs.items() if state.configs.get(k) != v
    }
    if d.drifted:
        d.actions.append(TopicAction.SET_CONFIGS)
    return d


def decide_all(
    specs: list[TopicSpec],
    states: dict[str, TopicState],
    allow_partition_increase: bool,
    recreate: list[str],
) -> list[TopicDecision]:
    return [
        decide_topic(s, states[s.name], allow_partition_increase, s.name in recreate) for s in specs
    ]


def plan_changes(
    decisions: list[TopicDecision],
    specs: list[TopicSpec],
    states: dict[str, TopicState],
    action: TopicAction,
) -> list[Change]:
    """The changes of one kind the decisions call for, with what they change from and to."""
    by_name = {s.name: s for s in specs}
    changes = []
    for d in decisions:
        if action not in d.actions:
            continue
        spec, state = by_name[d.topic], states[d.topic]
        detail: dict[str, Any]
        if action is TopicAction.CREATE:
            detail = {
                "partitions": spec.partitions,
                "replication_factor": spec.replication_factor,
                "configs": spec.configs,
            }
        elif action is TopicAction.RAISE_PARTITIONS:
            detail = {"from": state.partitions, "to": spec.partitions}
        elif action is TopicAction.SET_CONFIGS:
            detail = {k: {"from": live, "to": want} for k, (live, want) in d.drifted.items()}
        else:
            detail = {
                "partitions": {"from": state.partitions, "to": spec.partitions},
                "configs": spec.configs,
            }
        changes.append(Change(action=action.value, target=d.topic, detail=detail))
    return changes


# librdkafka's types (module `cimpl`) are named only in helpers, never in a task's body: a task's
# function is pickled by value when a served run starts, and those types cannot be.


def _read(cluster: KafkaCluster, specs: list[TopicSpec]) -> dict[str, TopicState]:
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = cluster.get_admin_client()  # held until the answers: dropping it aborts the requests
    timeout = cluster.request_timeout_s
    metadata = admin.list_topics(timeout=timeout).topics
    states: dict[str, TopicState] = {}
    present = [s for s in specs if s.name in metadata and metadata[s.name].error is None]
    resources = [ConfigResource(ResourceType.TOPIC, s.name) for s in present]
    described = admin.describe_configs(resources, request_timeout=timeout) if resources else {}
    configs = {r.name: f.result(timeout) for r, f in described.items()}
    names = [s.name for s in present]
    ids = (
        {
            n: str(f.result(timeout).topic_id)
            for n, f in admin.describe_topics(
                TopicCollection(names), request_timeout=timeout
            ).items()
        }
        if names
        else {}
    )
    for s in specs:
        if s not in present:
            states[s.name] = TopicState(name=s.name, exists=False)
            continue
        parts = metadata[s.name].partitions
        entries = configs.get(s.name, {})
        states[s.name] = TopicState(
            name=s.name,
            exists=True,
            partitions=len(parts),
            replication_factor=max((len(p.replicas) for p in parts.values()), default=0),
            configs={k: entries[k].value if k in entries else None for k in s.configs},
            topic_id=ids.get(s.name),
        )
    return states


@task(**runbook_task_options(KafkaException, when=is_retriable))
def read_topics(cluster: KafkaCluster, specs: list[TopicSpec]) -> dict[str, TopicState]:
    """Partitions, replication factor and the spec's configs of each declared topic."""
    return _read(cluster, specs)


def _wait_all(futures: dict[Any, Any], timeout: float) -> None:
    for future in futures.values():
        future.result(timeout)


def _create(cluster: KafkaCluster, specs: list[TopicSpec]) -> None:
    from confluent_kafka.admin import NewTopic

    admin = cluster.get_admin_client()
    new = [
        NewTopic(s.name, s.partitions, s.replication_factor, config=dict(s.configs)) for s in specs
    ]
    _wait_all(
        admin.create_topics(new, request_timeout=cluster.request_timeout_s),
        cluster.request_timeout_s * 2,
    )


def _delete(cluster: KafkaCluster, names: list[str]) -> None:
    admin = cluster.get_admin_client()
    _wait_all(
        admin.delete_topics(names, request_timeout=cluster.request_timeout_s),
        cluster.request_timeout_s * 2,
    )


def _set_configs(cluster: KafkaCluster, values: dict[str, dict[str, str]]) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    admin = cluster.get_admin_client()
    # incremental: only the named configs change; a plain alter_configs would reset every other one
    resources = [
        ConfigResource(
            ResourceType.TOPIC,
            topic,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in configs.items()
            ],
        )
        for topic, configs in values.items()
    ]
    _wait_all(
        admin.incremental_alter_configs(resources, request_timeout=cluster.request_timeout_s),
        cluster.request_timeout_s * 2,
    )


def _raise(cluster: KafkaCluster, counts: dict[str, int]) -> None:
    from confluent_kafka.admin import NewPartitions

    admin = cluster.get_admin_client()
    new = [NewPartitions(topic, n) for topic, n in counts.items()]
    _wait_all(
        admin.create_partitions(new, request_timeout=cluster.request_timeout_s),
        cluster.request_timeout_s * 2,
    )


def _read_back(
    cluster: KafkaCluster, specs: list[TopicSpec], planned: list[Change]
) -> list[Change]:
    """The applied changes with what the broker shows afterwards (the audit's "after")."""
    states = _read(cluster, [s for s in specs if s.name in {c.target for c in planned}])
    return [
        c.model_copy(
            update={
                "detail": {
                    "partitions": states[c.target].partitions,
                    "replication_factor": states[c.target].replication_factor,
                    "configs": states[c.target].configs,
                }
            }
        )
        for c in planned
    ]


def _plan(
    cluster: KafkaCluster,
    specs: list[TopicSpec],
    action: TopicAction,
    allow_partition_increase: bool,
    recreate: list[str],
) -> tuple[list[Change], dict[str, TopicState]]:
    states = _read(cluster, specs)
    decisions = decide_all(specs, states, allow_partition_increase, recreate)
    return plan_changes(decisions, specs, states, action), states


@task(**runbook_task_options(KafkaException, when=is_retriable))
def create_missing_topics(
    cluster: KafkaCluster, specs: list[TopicSpec], dry_run: bool
) -> ChangeSet:
    """Create the declared topics the broker does not have, with the spec's partitions,
    replication factor and configs."""
    planned, _ = _plan(cluster, specs, TopicAction.CREATE, False, [])
    if dry_run or not planned:
        return ChangeSet(dry_run=dry_run, planned=planned)
    _create(cluster, [s for s in specs if s.name in {c.target for c in planned}])
    return ChangeSet(dry_run=False, planned=planned, applied=_read_back(cluster, specs, planned))


@task(**runbook_task_options(KafkaException, when=is_retriable))
def restore_topic_configs(
    cluster: KafkaCluster, specs: list[TopicSpec], dry_run: bool
) -> ChangeSet:
    """Set configs that drifted from the spec back (incremental_alter_configs: others untouched)."""
    planned, _ = _plan(cluster, specs, TopicAction.SET_CONFIGS, False, [])
    if dry_run or not planned:
        return ChangeSet(dry_run=dry_run, planned=planned)
    _set_configs(cluster, {c.target: {k: v["to"] for k, v in c.detail.items()} for c in planned})
    return ChangeSet(dry_run=False, planned=planned, applied=_read_back(cluster, specs, planned))


@task(**runbook_task_options(KafkaException, when=is_retriable))
def raise_topic_partitions(
    cluster: KafkaCluster, specs: list[TopicSpec], dry_run: bool
) -> ChangeSet:
    """Raise the partition count of topics with fewer partitions than the spec (never lowers)."""
    planned, _ = _plan(cluster, specs, TopicAction.RAISE_PARTITIONS, True, [])
    if dry_run or not planned:
        return ChangeSet(dry_run=dry_run, planned=planned)
    _raise(cluster, {c.target: c.detail["to"] for c in planned})
    return ChangeSet(dry_run=False, planned=planned, applied=_read_back(cluster, specs, planned))


@task(**runbook_task_options(KafkaException, when=is_retriable))
def recreate_topics(
    cluster: KafkaCluster, specs: list[TopicSpec], seen: dict[str, str | None], dry_run: bool
) -> ChangeSet:
    """Delete and create again (from the spec) the topics in ``seen``: every record is lost.

    ``seen`` maps each topic to its id when the run read it: a topic whose id changed since was
    recreated already (by this task before a retry, or by someone else) and is left alone, and a
    topic missing now (a retry after the delete) is only created, so nothing is recreated twice.
    """
    states = _read(cluster, specs)
    by_name = {s.name: s for s in specs}
    planned, notes = [], []
    for name, topic_id in sorted(seen.items()):
        state = states[name]
        if state.exists and state.topic_id != topic_id:
            notes.append(f"{name} was recreated since this run read it (new topic id): left alone")
            continue
        d = decide_topic(by_name[name], state, False, corrupt=True)
        planned += plan_changes([d], specs, states, TopicAction.RECREATE)
        planned += plan_changes([d], specs, states, TopicAction.CREATE)
    if dry_run or not planned:
        return ChangeSet(dry_run=dry_run, planned=planned, notes=notes)
    doomed = [c.target for c in planned if c.action == TopicAction.RECREATE.value]
    if doomed:
        _delete(cluster, doomed)
    _create_when_deleted(cluster, [by_name[c.target] for c in planned])
    return ChangeSet(
        dry_run=False, planned=planned, applied=_read_back(cluster, specs, planned), notes=notes
    )


def _create_when_deleted(cluster: KafkaCluster, specs: list[TopicSpec]) -> None:
    """Create right after a delete: a broker may still be removing the topic (TOPIC_ALREADY_EXISTS
    for a moment), so that error is retried until the request timeout runs out."""
    import time

    from confluent_kafka import KafkaError

    deadline = time.monotonic() + cluster.request_timeout_s * 3
    while True:
        try:
            _create(cluster, specs)
            return
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
