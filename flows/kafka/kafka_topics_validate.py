"""Kafka runbook ``kafka-topics-validate``: seed 004 section 4.1 "validate topic existence" (after a
broker restart), seed 002 scenario 5 "a corrupt topic is recreated", seed 003 tuning "increase
partitions".

Compare each declared topic with the broker: create the missing ones, set drifted configs back,
raise partitions when asked (approval: keys move to other partitions), recreate topics named
corrupt (approval always; while a consumer group has not read all of a topic, the approver must
also type its name on the form, unless ``confirm_data_loss`` named it when the run started);
report what it must not fix (fewer
partitions than the broker has, another replication factor). Every change goes through the guard
and is verified by reading the topics again.
"""

from typing import Annotated, Self

from prefect import flow
from pydantic import AfterValidator, BaseModel, Field, model_validator

from blocks.kafka import KafkaCluster
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams, unique_names
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard, Target
from tasks.kafka import get_cluster_id
from tasks.kafka_lag import get_all_group_lag
from tasks.kafka_topics import (
    TopicAction,
    TopicDecision,
    TopicName,
    TopicSpec,
    TopicState,
    create_missing_topics,
    decide_all,
    raise_topic_partitions,
    read_topics,
    recreate_topics,
    restore_topic_configs,
)

# A topic recreated or repaired again and again is a deeper problem: a human should look.
REPAIR_BUDGET = Budget(max_actions=5, window_s=3600)



class KafkaTopicsValidateParams(RunbookParams):
    """Parameters of the kafka-topics-validate runbook."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    topics: Annotated[list[TopicSpec], AfterValidator(unique_names)] = Field(
        default_factory=list,
        description="The declared topics: name, partitions, replication factor, configs.",
    )
    allow_partition_increase: bool = Field(
        False,
        description="Raise partition counts below the spec (after approval: keys move to other "
        "partitions, so per-key order breaks across the change).",
    )
    recreate: list[TopicName] = Field(
        default_factory=list,
        description="Topics known to be corrupt: deleted and created again from the spec, every "
        "record lost (approval always).",
    )
    confirm_data_loss: list[TopicName] = Field(
        default_factory=list,
        description="Topics of `recreate` that may be recreated although consumer groups have not "
        "read all of them, confirmed in advance. Otherwise the approver confirms on the approval "
        "form by typing the topic's name. Approval is asked either way.",
    )
    verify_timeout_s: float = Field(
        30, gt=0, le=600, description="How long to wait for the broker to show the changes."
    )

    @model_validator(mode="after")
    def _recreate_declared(self) -> Self:
        declared = {s.name for s in self.topics}
        unknown = sorted(set(self.recreate) - declared)
        if unknown:
            raise ValueError(f"recreate names topics without a spec: {', '.join(unknown)}")
        return self


class KafkaTopicsValidateResult(BaseModel):
    """What a kafka-topics-validate run found and did."""

    outcome: Outcome
    decisions: list[TopicDecision] = Field(description="Per declared topic, as first read.")
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name="kafka-topics-validate",
    description="Validate Kafka topics against their declared spec: create missing ones, set drifted "
    "configs back, raise partitions and recreate corrupt topics after approval; report what cannot "
    "be fixed safely.",
)
@ends_as_reported
def kafka_topics_validate(params: KafkaTopicsValidateParams) -> KafkaTopicsValidateResult:
    decisions: list[TopicDecision] = []
    with incident_report(
        runbook="kafka-topics-validate",
        title="Kafka topics differ from their spec",
        severity="P2",
        params=params,
    ) as report:
        if not params.topics:
            raise ValueError("no topics declared: set params.topics (name, partitions, configs)")
        kafka = KafkaCluster.load(params.kafka_block)
        specs = params.topics
        states = read_topics(kafka, specs)
        decisions = decide_all(specs, states, params.allow_partition_increase, params.recreate)
        _record(report, decisions, states)
        if all(d.ok for d in decisions):
            report.finish(
                Outcome.NO_ACTION_NEEDED, f"All {len(specs)} declared topic(s) match their spec."
            )
        else:
            cluster_id = get_cluster_id(kafka)
            target = Target("kafka-topics", kafka.bootstrap_servers, cluster_id or "")
            with report.guard(target) as guard:
                _repair(report, guard, kafka, decisions, states, params)
    return KafkaTopicsValidateResult(
        outcome=report.outcome or Outcome.FAILED, decisions=decisions, report=report.to_markdown()
    )


def _record(report: IncidentReport, decisions: list[TopicDecision], states: dict) -> None:
    for d in decisions:
        state: TopicState = states[d.topic]
        seen = (
            f"{state.partitions} partition(s), replication {state.replication_factor}"
            if state.exists
            else "missing"
        )
        todo = ", ".join(a.value for a in d.actions)
        report.check(f"topic {d.topic}", d.ok, seen + (f"; to do: {todo}" if todo else ""))
        for k, (live, want) in d.drifted.items():
            report.step(f"{d.topic}: {k} is {live!r}, spec {want!r}")
        for finding in d.findings:
            report.step(f"{d.topic}: {finding}")


def _unconsumed(kafka: KafkaCluster, topics: list[str]) -> dict[str, dict[str, int]]:
    """Per topic, the consumer groups that have not read all of it, with their lag."""
    behind: dict[str, dict[str, int]] = {}
    for group in get_all_group_lag(kafka):
        for p in group.partitions:
            if p.topic in topics and p.lag > 0:
                lags = behind.setdefault(p.topic, {})
                lags[group.group] = lags.get(group.group, 0) + p.lag
    return behind


def _repair(
    report: IncidentReport,
    guard: Guard,
    kafka: KafkaCluster,
    decisions: list[TopicDecision],
    states: dict[str, TopicState],
    params: KafkaTopicsValidateParams,
) -> None:
    specs = params.topics
    wanted = {a for d in decisions for a in d.actions}
    if TopicAction.CREATE in wanted:
        guard.act(
            "create missing topics",
            lambda dry_run: create_missing_topics(kafka, specs, dry_run),
            budget=REPAIR_BUDGET,
        )
    if TopicAction.SET_CONFIGS in wanted:
        guard.act(
            "set drifted topic configs back",
            lambda dry_run: restore_topic_configs(kafka, specs, dry_run),
            budget=REPAIR_BUDGET,
        )
    if TopicAction.RAISE_PARTITIONS in wanted:
        guard.act(
            "raise topic partitions",
            lambda dry_run: raise_topic_partitions(kafka, specs, dry_run),
            budget=REPAIR_BUDGET,
            approval=lambda plan: (
                "records with the same key go to a different partition from now "
                "on: per-key order breaks across the change, and partitions cannot be removed again"
            ),
        )
    corrupt = [d.topic for d in decisions if TopicAction.RECREATE in d.actions]
    if corrupt:
        behind = _unconsumed(kafka, corrupt)
        for topic, groups in sorted(behind.items()):
            lag = ", ".join(f"{g} ({n} records)" for g, n in sorted(groups.items()))
            report.step(f"{topic}: consumer groups have not read all of it: {lag}")
        seen = {t: states[t].topic_id for t in corrupt}
        guard.act(
            "recreate corrupt topics",
            lambda dry_run: recreate_topics(kafka, specs, seen, dry_run),
            budget=REPAIR_BUDGET,
            approval=lambda plan: _recreate_danger(plan, behind),
            # unread records: the approver types the topic's name (unless confirmed in advance)
            confirm=lambda plan: [
                c.target
                for c in plan.planned
                if c.target in behind and c.target not in params.confirm_data_loss
            ],
        )
    if params.dry_run:
        report.finish(Outcome.PLANNED, "Planned the changes above; nothing was changed.")
        return
    _verify(report, guard, kafka, params)
    findings = [f"{d.topic}: {f}" for d in decisions for f in d.findings]
    left = [f for f in findings if "created, nothing to delete" not in f]
    if left:
        raise Escalation("topics repaired as far as safe; a human must decide: " + "; ".join(left))
    report.finish(Outcome.RESOLVED, "Every declared topic matches its spec again (read back).")


def _recreate_danger(plan, behind: dict[str, dict[str, int]]) -> str:
    topics = ", ".join(c.target for c in plan.planned)
    unread = [t for t in behind if t in topics.split(", ")]
    return f"deleting {topics} loses every record in it" + (
        f"; consumer groups have not read all of {', '.join(unread)}" if unread else ""
    )


def _verify(
    report: IncidentReport, guard: Guard, kafka: KafkaCluster, params: KafkaTopicsValidateParams
) -> None:
    """Read the topics back until nothing this run was allowed to do is still to do."""
    done_ok = {TopicAction.CREATE, TopicAction.SET_CONFIGS}
    if params.allow_partition_increase:
        done_ok.add(TopicAction.RAISE_PARTITIONS)

    def remaining(states: dict[str, TopicState]) -> list[str]:
        # recreated topics match the spec afterwards, so they are checked like any other
        decisions = decide_all(params.topics, states, params.allow_partition_increase, [])
        return [f"{d.topic}: {a.value}" for d in decisions for a in d.actions if a in done_ok]

    check = guard.verify(
        "topics read back match the spec",
        lambda: read_topics.fn(kafka, params.topics),
        lambda states: not remaining(states),
        timeout_s=params.verify_timeout_s,
        describe=lambda states: ", ".join(remaining(states)) or "all as declared",
    )
    if not check.ok:
        raise VerificationFailed(
            "topics still differ from the spec: " + ", ".join(remaining(check.last or {}))
        )
