"""Kafka runbook ``producer-not-sending``: seed 004 section 4.4 "producer not sending: topic
receives no new messages".

Check that the brokers answer (a producer cannot send to a cluster that does not), sample each
expected topic's end offsets twice, read the newest record of every partition without consuming,
and tell sending, quiet, slow, stalled, empty and missing topics apart. The producer runs outside
Kafka and this project has no hold on it, so no automatic fix exists: a stall is escalated with
the evidence (last record per partition, offsets, broker state). It changes nothing.
"""

import time
from datetime import UTC, datetime
from typing import Annotated, Self

from prefect import flow
from pydantic import AfterValidator, BaseModel, Field, model_validator

from blocks.kafka import KafkaCluster
from runbooks.errors import Escalation
from runbooks.params import BlockName, OptionalTopicName, RunbookParams, unique_names
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from tasks.kafka import ClusterHealth, check_isr
from tasks.kafka_activity import (
    Activity,
    ExpectedTopic,
    TopicActivity,
    classify_activity,
    read_last_records,
    read_topic_offsets,
)


class ProducerNotSendingParams(RunbookParams):
    """Parameters of the producer-not-sending runbook."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    topic: OptionalTopicName = Field(
        None,
        description="Only this topic (the alert's topic label), with its expectation from "
        "`topics` or the defaults; empty: every topic of `topics`.",
    )
    topics: Annotated[list[ExpectedTopic], AfterValidator(unique_names)] = Field(
        default_factory=list,
        description="Topics producers should keep writing to: name, fewest records per minute, "
        "and the silence (window) that makes a stall.",
    )
    watch_s: float = Field(
        30,
        gt=0,
        le=600,
        description="Time between the two end-offset samples that show whether producers write, "
        "in seconds.",
    )

    @model_validator(mode="after")
    def _something_to_check(self) -> Self:
        if not self.topic and not self.topics:
            raise ValueError("no topic to check: set `topic` or list `topics`")
        return self

    def expected(self) -> list[ExpectedTopic]:
        """The topics this run checks, each with its expectation."""
        if not self.topic:
            return self.topics
        declared = {t.name: t for t in self.topics}
        return [declared.get(self.topic) or ExpectedTopic(name=self.topic)]


class ProducerNotSendingResult(BaseModel):
    """What a producer-not-sending run found."""

    outcome: Outcome
    broker: ClusterHealth | None = Field(description="The brokers as the run found them.")
    topics: list[TopicActivity] = Field(description="Every topic checked, with its activity.")
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name="producer-not-sending",
    description="Topic receives no new messages: check the brokers answer, watch each expected "
    "topic's end offsets, read the last record per partition without consuming, and escalate "
    "stalled, slow, empty or missing topics with the evidence (no automatic fix exists).",
)
@ends_as_reported
def producer_not_sending(params: ProducerNotSendingParams) -> ProducerNotSendingResult:
    health: ClusterHealth | None = None
    found: list[TopicActivity] = []
    with incident_report(
        runbook="producer-not-sending",
        title="Producer not sending",
        severity="P2",
        params=params,
    ) as report:
        kafka = KafkaCluster.load(params.kafka_block)
        expected = params.expected()
        names = [t.name for t in expected]
        health = check_isr(kafka)
        _record_brokers(report, health, names)
        first = read_topic_offsets(kafka, names)
        report.step(
            f"end offsets of {len(names)} topic(s) read; again in {params.watch_s:.0f}s to see "
            "whether producers write"
        )
        time.sleep(params.watch_s)
        last = read_topic_offsets(kafka, names)
        for want in expected:
            newest = read_last_records(kafka, last[want.name]) if last[want.name].exists else {}
            found.append(
                classify_activity(
                    want, first[want.name], last[want.name], newest, datetime.now(UTC)
                )
            )
        _record_topics(report, found)
        _conclude(report, found, health)
    return ProducerNotSendingResult(
        outcome=report.outcome or Outcome.FAILED,
        broker=health,
        topics=found,
        report=report.to_markdown(),
    )


def _record_brokers(report: IncidentReport, health: ClusterHealth, topics: list[str]) -> None:
    report.evidence("brokers", health)
    reached = (
        f"{len(health.broker_ids)} broker(s), controller {health.controller_id}"
        if health.reachable
        else f"{health.error}"
    )
    if not report.check("brokers reachable", health.reachable, reached):
        raise Escalation(
            f"no Kafka broker answers ({health.error}): producers cannot send to any topic. "
            "This is a broker outage, not a producer fault: see the kafka-cluster-down runbook"
        )
    offline = [f"{p.topic}[{p.partition}]" for p in health.offline if p.topic in topics]
    report.check(
        "partitions of the topics have a leader",
        not offline,
        f"without a leader (writes to them fail): {', '.join(offline)}" if offline else "all",
    )


def _record_topics(report: IncidentReport, found: list[TopicActivity]) -> None:
    for a in found:
        report.check(f"topic {a.topic}", not a.problem, f"{a.activity}: {a.reason}")
        for p, newest in a.last_record_by_partition.items():
            report.step(f"{a.topic}[{p}]: last record {newest}")
    report.evidence("activity per topic", [a.model_dump(mode="json") for a in found])


def _conclude(report: IncidentReport, found: list[TopicActivity], health: ClusterHealth) -> None:
    problems = [a for a in found if a.problem]
    if not problems:
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            f"Producers are writing to all {len(found)} topic(s) as expected (or are quiet "
            "within their window).",
        )
        return
    report.follow_ups += [
        "Read the producer's logs for API failures, rate limits (e.g. HTTP 429 from the upstream "
        "API) and serialization errors: grep -i error <producer log>",
        "Check the producer's upstream data source (API outage, credentials, rate limits)",
        "Check the producer reaches Kafka from its own host (DNS, network policy, TLS/SASL "
        "credentials, broker.id it last wrote to)",
        "Restart the producer once its cause is known; then re-run this runbook to confirm the "
        "topic receives records again",
    ]
    named = "; ".join(
        f"{a.topic} {a.activity}: {a.reason}"
        + (
            f" (last record {a.last_record_at.isoformat(timespec='seconds')})"
            if a.last_record_at
            else ""
        )
        for a in problems
    )
    missing = [a.topic for a in problems if a.activity is Activity.MISSING]
    if missing:
        report.follow_ups.insert(
            0,
            f"Create the missing topic(s) {', '.join(missing)} (kafka-topics-validate creates "
            "declared topics) or fix the producer's topic name",
        )
    raise Escalation(
        f"{len(problems)} topic(s) not receiving data as expected: {named}. The brokers answer "
        f"({len(health.broker_ids)} broker(s)), so the cause is on the producer side"
        + (" or the topic is missing" if missing else "")
        + ". No automatic fix exists: the producer runs outside this runbook's reach; a human "
        "must restart or repair it"
    )
