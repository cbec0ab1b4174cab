"""Kafka runbook ``kafka-consumer-lag-high``: seed 001 "High Consumer Lag", seed 002 scenario 5,
seed 003 issue 1 (lag > 10,000; alert > 5,000) and its daily "check consumer lag across all topics",
seed 004 section 4.5 "lag increasing".

Sample the lag of every consumer group (or the alert's group) twice, name the groups and
partitions behind and why (no consumers, stuck, slow), and the action that would fix each. A slow
group whose consumer workload is listed in ``consumer_workloads`` is handed to the
consumers-too-slow runbook (its own run, lock, budget and report, linked from this one), which
scales the consumers; for the rest the run recommends the fix and escalates with the evidence when
a group is over the escalation threshold and its lag is not falling. It changes nothing in Kafka.
"""

import time
from typing import Literal, Self

from prefect import flow
from pydantic import BaseModel, Field, model_validator

from blocks.kafka import KafkaCluster
from runbooks.errors import Escalation
from runbooks.handoff import hand_off
from runbooks.params import (
    BlockName,
    GroupId,
    OptionalGroupId,
    OptionalNamespace,
    PlatformRef,
    RunbookParams,
    ServiceName,
)
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from tasks.kafka_lag import (
    GroupFinding,
    GroupLag,
    LagVerdict,
    classify_group,
    get_all_group_lag,
    needs_escalation,
)


class ConsumerWorkload(BaseModel):
    """The workload whose instances consume in a group (consumers-too-slow scales it)."""

    group: GroupId = Field(description="The consumer group.")
    platform: PlatformRef = Field(
        description="Where the consumers run: kubernetes/<block>, docker/<block> or supervisord/<block>."
    )
    service: ServiceName = Field(
        description="The consumer workload (Deployment, Compose service, group)."
    )
    namespace: OptionalNamespace = Field(
        None, description="Kubernetes namespace; empty: the block's."
    )
    kind: Literal["Deployment", "StatefulSet"] = Field("Deployment", description="Kubernetes kind.")


class KafkaConsumerLagHighParams(RunbookParams):
    """Parameters of the kafka-consumer-lag-high runbook."""

    kafka_block: BlockName = Field(
        "default", description="Name of the Runbooks Kafka Cluster block."
    )
    group: OptionalGroupId = Field(
        None,
        description="Only this consumer group (the alert's consumergroup label); empty: every group.",
    )
    warn_lag: int = Field(
        5000,
        ge=0,
        description="A group with more lag than this is behind: named, classified, its fix recommended.",
    )
    escalate_lag: int = Field(
        10000,
        ge=0,
        description="A group with more lag than this whose lag is not falling is escalated.",
    )
    sample_interval_s: float = Field(
        30,
        gt=0,
        le=600,
        description="Time between the two lag samples that show the trend, in seconds.",
    )
    consumer_workloads: list[ConsumerWorkload] = Field(
        default_factory=list,
        description="Which workload consumes in which group: a slow group listed here is handed "
        "to the consumers-too-slow runbook, which scales it.",
    )

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> Self:
        if self.escalate_lag < self.warn_lag:
            raise ValueError(
                f"escalate_lag ({self.escalate_lag}) must be at least warn_lag ({self.warn_lag})"
            )
        return self


class KafkaConsumerLagHighResult(BaseModel):
    """What a kafka-consumer-lag-high run found."""

    outcome: Outcome
    findings: list[GroupFinding] = Field(description="Every group checked, with its verdict.")
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name="kafka-consumer-lag-high",
    description="Consumer lag high: sample the lag of every consumer group twice, name the groups and "
    "partitions behind and why (no consumers, stuck, slow), recommend the fix, escalate lag that is "
    "over the threshold and not falling.",
)
@ends_as_reported
def kafka_consumer_lag_high(params: KafkaConsumerLagHighParams) -> KafkaConsumerLagHighResult:
    findings: list[GroupFinding] = []
    with incident_report(
        runbook="kafka-consumer-lag-high",
        title="Kafka consumer lag high",
        severity="P2",
        params=params,
    ) as report:
        kafka = KafkaCluster.load(params.kafka_block)
        groups = [params.group] if params.group else None
        first = get_all_group_lag(kafka, groups)
        report.step(
            f"first lag sample of {len(first)} group(s); next in {params.sample_interval_s:.0f}s to see the trend"
        )
        started = time.monotonic()
        time.sleep(params.sample_interval_s)
        last = get_all_group_lag(kafka, groups)
        interval = time.monotonic() - started
        findings = _classify(first, last, params, interval)
        _record(report, last, findings, params)
        _conclude(report, findings, params)
    return KafkaConsumerLagHighResult(
        outcome=report.outcome or Outcome.FAILED, findings=findings, report=report.to_markdown()
    )


def _classify(
    first: list[GroupLag], last: list[GroupLag], params: KafkaConsumerLagHighParams, interval: float
) -> list[GroupFinding]:
    earlier = {g.group: g for g in first}
    # a group created between the samples is compared with itself: no movement is known yet
    return [classify_group(earlier.get(g.group, g), g, params.warn_lag, interval) for g in last]


def _record(
    report: IncidentReport,
    last: list[GroupLag],
    findings: list[GroupFinding],
    params: KafkaConsumerLagHighParams,
) -> None:
    missing = [g.group for g in last if g.state == "NOT_FOUND"]
    if missing:
        raise Escalation(
            f"consumer group {', '.join(missing)} is not known to the cluster: its consumers never "
            "committed or the group was deleted; check the consumers' group.id"
        )
    report.evidence(
        "lag per group and partition (last sample)", [g.model_dump(mode="json") for g in last]
    )
    unattended = [g.group for g in last if g.unattended]
    report.check(
        "groups with lag and no consumer",
        not unattended,
        ", ".join(unattended) or "none",
    )
    for f in findings:
        members = "?" if f.members is None else f.members
        observed = f"{f.verdict}: {f.reason}; state {f.state}, members {members}"
        if f.behind:
            observed += f"; behind: {', '.join(f.behind[:10])}" + (
                " …" if len(f.behind) > 10 else ""
            )
        report.check(f"lag of group {f.group}", f.verdict is LagVerdict.CAUGHT_UP, observed)
    report.evidence("findings", [f.model_dump(mode="json") for f in findings])


def _conclude(
    report: IncidentReport, findings: list[GroupFinding], params: KafkaConsumerLagHighParams
) -> None:
    behind = [f for f in findings if f.verdict is not LagVerdict.CAUGHT_UP]
    if not findings:
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            "The cluster has no consumer group: there is no lag to measure.",
        )
        return
    if not behind:
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            f"All {len(findings)} consumer group(s) are within {params.warn_lag} messages of the log end.",
        )
        return
    handed = _hand_off_slow_groups(report, behind, params)
    report.follow_ups += [f.action for f in behind if f.group not in handed]
    escalate = [
        f for f in behind if f.group not in handed and needs_escalation(f, params.escalate_lag)
    ]
    named = "; ".join(f"group {f.group} {f.verdict}: {f.reason}" for f in (escalate or behind))
    if escalate:
        raise Escalation(
            f"{len(escalate)} consumer group(s) over {params.escalate_lag} messages behind and not falling: "
            f"{named}. Recommended: " + "; ".join(f.action for f in escalate)
        )
    passed = "".join(
        f" Group {group} is slow: handed to consumers-too-slow ({link})."
        for group, link in handed.items()
    )
    report.finish(
        Outcome.WAITING,
        f"{len(behind)} group(s) behind: {named}.{passed} "
        + (
            f"No other group is over {params.escalate_lag} with lag not falling; nothing was "
            "changed here, the recommended actions are listed below."
            if len(handed) < len(behind)
            else "Nothing was changed by this run."
        ),
    )


def _hand_off_slow_groups(
    report: IncidentReport, behind: list[GroupFinding], params: KafkaConsumerLagHighParams
) -> dict[str, str]:
    """Start consumers-too-slow for each slow group with a known workload; group -> run link."""
    workloads = {w.group: w for w in params.consumer_workloads}
    handed: dict[str, str] = {}
    for finding in behind:
        workload = workloads.get(finding.group)
        if finding.verdict is not LagVerdict.SLOW or workload is None:
            continue
        link = hand_off(
            "consumers-too-slow",
            params,
            {
                "kafka_block": params.kafka_block,
                "group": finding.group,
                "lag_threshold": params.warn_lag,
                **workload.model_dump(mode="json", exclude={"group"}),
            },
        )
        report.step(f"group {finding.group} is slow: handed to consumers-too-slow, {link}")
        handed[finding.group] = link
    return handed
