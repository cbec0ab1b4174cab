"""Kafka runbook ``dlq-growing``: seed 000 "P3 DLQ events growing" and seed 003's daily "review
dead letter queue".

Read the newest records of a dead letter queue without consuming them, tell schema,
serialization and processing failures apart, and count them per kind, source topic and error,
with a few scrubbed samples. Once the cause is fixed, a run with ``replay`` sends the selected
records back to their source topic: exactly once (also across crashes), through the guard
(lock, budget, approval above ``approve_over`` records), the DLQ offsets sent in the report.
"""

from datetime import datetime

from prefect import flow
from pydantic import BaseModel, Field

from blocks.kafka import KafkaCluster
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, OptionalTopicName, RunbookParams, TopicName
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Guard, Target
from tasks.kafka import get_cluster_id
from tasks.kafka_dlq import DlqTriage, FailureKind, offset_ranges, peek_dlq
from tasks.kafka_dlq_replay import ReplayResult, find_replayed, replay_dlq

# Replaying the same DLQ again and again means the fix did not hold: a human should look.
REPLAY_BUDGET = Budget(max_actions=5, window_s=3600)


class DlqGrowingParams(RunbookParams):
    """Parameters of the dlq-growing runbook."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    dlq_topic: TopicName = Field(
        "match-events-dlq", description="The dead letter queue topic (the alert's topic label)."
    )
    newest: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Read at most this many of the newest records per DLQ partition.",
    )
    since: datetime | None = Field(
        None,
        description="Read records from this time on instead of the newest (still at most `newest`).",
    )
    samples_per_kind: int = Field(
        3, ge=0, le=20, description="Sample records shown per failure kind."
    )
    max_chars: int = Field(
        200, ge=20, le=2000, description="Sample values and errors are cut to this length."
    )
    replay: bool = Field(
        False,
        description="Send the records read back to their source topic (after the cause is fixed). "
        "Exactly once: records replayed before, by any run, are not sent again.",
    )
    replay_kinds: list[FailureKind] = Field(
        default_factory=lambda: [FailureKind.PROCESSING],
        description="Which failures to replay; schema and serialization failures fail again unless "
        "their producer or schema was fixed.",
    )
    fallback_topic: OptionalTopicName = Field(
        None,
        description="Where records whose headers name no source topic are replayed; empty: skipped.",
    )
    approve_over: int = Field(
        100,
        ge=0,
        le=10_000_000,
        description="Replaying more than this many records in one run needs a human's approval.",
    )
    verify_timeout_s: float = Field(
        60,
        gt=0,
        le=3600,
        description="How long to look for the replayed records in the source topics.",
    )


class DlqGrowingResult(BaseModel):
    """What a dlq-growing run found and replayed."""

    outcome: Outcome
    triage: DlqTriage | None = Field(
        description="Counts and samples (the per-record list left out)."
    )
    replayed: dict[int, list[int]] = Field(description="DLQ offsets replayed, per partition.")
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name="dlq-growing",
    description="Dead letter queue growing: read the newest DLQ records without consuming them, tell "
    "schema, serialization and processing failures apart, count them per source topic and error; "
    "replay them to their source topic exactly once after approval.",
)
@ends_as_reported
def dlq_growing(params: DlqGrowingParams) -> DlqGrowingResult:
    triage: DlqTriage | None = None
    replayed: dict[int, list[int]] = {}
    with incident_report(
        runbook="dlq-growing", title="Dead letter queue growing", severity="P3", params=params
    ) as report:
        kafka = KafkaCluster.load(params.kafka_block)
        triage = peek_dlq(
            kafka,
            params.dlq_topic,
            params.newest,
            params.since,
            params.samples_per_kind,
            params.max_chars,
        )
        _record_triage(report, triage)
        if triage.read == 0:
            report.finish(
                Outcome.NO_ACTION_NEEDED, f"{params.dlq_topic} holds no record in the range read."
            )
        elif not params.replay:
            raise Escalation(
                f"{triage.read} failed record(s) in {params.dlq_topic}: {_kinds(triage)}; most frequent "
                f"error: {next(iter(triage.by_error))}. Fix the cause, then run again with replay=true"
            )
        else:
            target = dlq_target(kafka, params.dlq_topic)
            with report.guard(target) as guard:
                replayed = _replay_and_verify(report, guard, kafka, target, triage, params)
    return DlqGrowingResult(
        outcome=report.outcome or Outcome.FAILED,
        triage=triage,
        replayed=replayed,
        report=report.to_markdown(),
    )


def dlq_target(kafka: KafkaCluster, topic: str) -> Target:
    """The DLQ as a guarded target: its lock, budget and replay progress are keyed on the cluster's
    id (any bootstrap list reaching it agrees) and the topic."""
    cluster_id = get_cluster_id.fn(kafka)
    return Target(
        "kafka-dlq",
        f"{kafka.bootstrap_servers}/{topic}",
        f"{cluster_id}/{topic}" if cluster_id else "",
    )


def _kinds(triage: DlqTriage) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in triage.by_kind.items())


def _record_triage(report: IncidentReport, triage: DlqTriage) -> None:
    ranges = ", ".join(f"[{p}] {a}-{b}" for p, (a, b) in triage.ranges.items()) or "none"
    report.step(
        f"read {triage.read} record(s) of {triage.topic} without committing (offsets {ranges})"
    )
    report.check(
        "DLQ records in range", triage.read == 0, f"{triage.read}: {_kinds(triage) or 'none'}"
    )
    for kind in FailureKind:
        if triage.by_kind.get(kind.value):
            report.check(f"{kind} failures", False, str(triage.by_kind[kind.value]))
    report.evidence("failures per kind", triage.by_kind)
    report.evidence("failures per source topic", triage.by_source_topic)
    report.evidence("most frequent errors", triage.by_error)
    report.evidence(
        "samples (cut, secrets masked)", [s.model_dump(mode="json") for s in triage.samples]
    )
    report.follow_ups += _follow_ups(triage)


def _follow_ups(triage: DlqTriage) -> list[str]:
    todo = []
    if triage.by_kind.get(FailureKind.SCHEMA.value):
        todo.append(
            "Schema failures: register the missing schema (or fix the producer's subject) in the schema registry"
        )
    if triage.by_kind.get(FailureKind.SERIALIZATION.value):
        todo.append(
            "Serialization failures: find the producer writing the wrong format (see samples and source topics)"
        )
    if triage.by_kind.get(FailureKind.PROCESSING.value):
        todo.append(
            "Processing failures: fix the consumer (see the most frequent errors), then replay them"
        )
    return todo


def _replay_and_verify(
    report: IncidentReport,
    guard: Guard,
    kafka: KafkaCluster,
    target: Target,
    triage: DlqTriage,
    params: DlqGrowingParams,
) -> dict[int, list[int]]:
    bounds = {p: (first, last + 1) for p, (first, last) in triage.ranges.items()}

    def replay(dry_run: bool) -> ReplayResult:
        return replay_dlq(
            kafka,
            params.dlq_topic,
            bounds,
            params.replay_kinds,
            target.slug,
            dry_run,
            params.fallback_topic,
        )

    result = guard.act(
        f"replay {params.dlq_topic}",
        replay,
        budget=REPLAY_BUDGET,
        approval=lambda plan: _needs_approval(plan, params.approve_over),
    )
    assert isinstance(result, ReplayResult)
    if result.skipped:
        report.step("not replayed: " + ", ".join(f"{n} {why}" for why, n in result.skipped.items()))
    if params.dry_run:
        count = sum(c.detail["count"] for c in result.planned)
        report.finish(Outcome.PLANNED, f"Would replay {count} record(s); nothing was sent.")
        return {}
    if not result.planned:
        report.finish(
            Outcome.NO_ACTION_NEEDED, "Every record selected was replayed before: nothing to send."
        )
        return {}
    sent = {(p, o) for p, offsets in result.replayed.items() for o in offsets}
    found = guard.verify(
        "replayed records in their source topics",
        lambda: find_replayed(kafka, params.dlq_topic, result.scan_from, kafka.request_timeout_s),
        lambda seen: sent <= seen,
        timeout_s=params.verify_timeout_s,
        describe=lambda seen: f"{len(sent & seen)} of {len(sent)} found",
    )
    if not found.ok:
        raise VerificationFailed(
            f"{len(sent - (found.last or set()))} replayed record(s) not found in their source topics"
        )
    offsets = "; ".join(f"[{p}] {offset_ranges(o)}" for p, o in sorted(result.replayed.items()))
    again = sum(len(o) for o in result.already_sent.values())
    report.finish(
        Outcome.RESOLVED,
        f"Replayed {len(sent)} record(s) of {params.dlq_topic} (DLQ offsets {offsets or 'none'}) to their "
        f"source topics and found each there"
        + (f"; {again} sent by an interrupted earlier run were not sent again" if again else "")
        + ".",
    )
    return result.replayed


def _needs_approval(plan: ReplayResult, approve_over: int) -> str | None:
    """Many records at once land on the consumers that failed on them before."""
    count = sum(c.detail["count"] for c in plan.planned)
    if count > approve_over:
        return (
            f"{count} records would be sent back to their source topics (more than approve_over="
            f"{approve_over}): if the cause is not fixed they fail again and return to the DLQ"
        )
    return None
