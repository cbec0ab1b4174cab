"""The pre-deployment checklist of seed 003 as verdicts: each item PASS, FAIL or NOT CONFIGURED,
with the evidence a person would write next to the tick. Pure functions of what was read."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel

from tasks.kafka import ClusterHealth
from tasks.kafka_topics import TopicDecision
from tasks.prometheus import Measurement, ScrapeTarget


class Item(StrEnum):
    """Seed 003 "Pre-Deployment Checklist", in its order and words."""

    HEALTH = "All services pass health checks"
    LOCALSTACK = "LocalStack services are running"
    KAFKA = "Kafka cluster is healthy"
    STORE = "MongoDB is accessible"  # here: the event store (PostgreSQL)
    TOPICS = "All required topics/queues exist"
    METRICS = "Metrics dashboards are configured"
    ALERTS = "Alert notifications are set up"


class ItemStatus(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    NOT_CONFIGURED = "NOT CONFIGURED"


class ItemResult(BaseModel):
    item: Item
    status: ItemStatus
    evidence: str

    def line(self) -> str:
        box = {"PASS": "[x]", "FAIL": "[ ]", "NOT CONFIGURED": "[-]"}[self.status.value]
        return f"{box} {self.item.value}: {self.status.value} ({self.evidence})"


def not_configured(item: Item, what: str) -> ItemResult:
    return ItemResult(item=item, status=ItemStatus.NOT_CONFIGURED, evidence=f"no {what} given")


def _result(item: Item, ok: bool, evidence: str) -> ItemResult:
    return ItemResult(item=item, status=ItemStatus.PASS if ok else ItemStatus.FAIL, evidence=evidence)


def kafka_item(health: ClusterHealth) -> ItemResult:
    if not health.reachable:
        return _result(Item.KAFKA, False, f"not reachable: {health.error}")
    problems = []
    if health.controller_id is None:
        problems.append("no active controller")
    if health.missing_brokers:
        problems.append(
            f"{len(health.broker_ids)} of {health.expected_brokers} brokers"
        )
    if health.offline:
        problems.append(f"{len(health.offline)} partition(s) without a leader")
    if health.under_replicated:
        problems.append(f"{len(health.under_replicated)} under-replicated partition(s)")
    brokers = f"{len(health.broker_ids)} broker(s), controller {health.controller_id}"
    return _result(
        Item.KAFKA,
        not problems,
        "; ".join(problems) if problems else f"{brokers}, {health.partitions} partitions in sync",
    )


def topics_item(decisions: list[TopicDecision], queues_missing: list[str] | None = None) -> ItemResult:
    """Declared topics (and queues, when checked) exist as specified; drift is a failure too: a
    deployment onto a topic with the wrong partitions or retention is what the check is for."""
    missing = [d.topic for d in decisions if "create_topic" in [a.value for a in d.actions]]
    drifted = [d.topic for d in decisions if not d.ok and d.topic not in missing]
    problems = []
    if missing:
        problems.append(f"topics missing: {', '.join(missing)}")
    if drifted:
        problems.append(f"topics not as declared: {', '.join(drifted)}")
    if queues_missing:
        problems.append(f"queues/topics missing in AWS: {', '.join(queues_missing)}")
    checked = f"{len(decisions)} topic(s)" + (
        " and the declared queues" if queues_missing is not None else ""
    )
    return _result(Item.TOPICS, not problems, "; ".join(problems) or f"{checked} as declared")


def metrics_item(targets: list[ScrapeTarget], measurements: list[Measurement]) -> ItemResult:
    """Prometheus scrapes every target and the series the dashboards (and SLOs) need exist."""
    down = [f"{t.job}/{t.instance}" for t in targets if t.health != "up"]
    blind = [m for m in measurements if m.value is None]
    problems = []
    if not targets:
        problems.append("Prometheus scrapes no target")
    if down:
        problems.append(f"{len(down)} target(s) down: {', '.join(down[:5])}")
    problems += [f"no data for {m.query!r}: {m.problem}" for m in blind[:5]]
    ok_text = f"{len(targets)} target(s) up, {len(measurements)} dashboard queries answer"
    return _result(Item.METRICS, not problems, "; ".join(problems) or ok_text)


def alerts_item(unrouted: list[str], expected: int, channels: bool, policy: str) -> ItemResult:
    """Every runbook alert reaches the gateway, and escalations have somewhere to go."""
    problems = []
    if unrouted:
        problems.append(f"not routed to the runbooks gateway: {', '.join(unrouted)}")
    if not channels:
        problems.append(f"escalation policy {policy!r} has no channel: a failed runbook pages nobody")
    return _result(
        Item.ALERTS,
        not problems,
        "; ".join(problems)
        or f"{expected} runbook alert(s) routed to the gateway; escalation policy {policy!r} has channels",
    )


def gate(results: list[ItemResult]) -> tuple[bool, str]:
    """Whether a deployment may go ahead: no item failed. Unconfigured items do not fail the gate,
    but are named (a check nobody configured proves nothing)."""
    failed = [r.item.value for r in results if r.status is ItemStatus.FAIL]
    skipped = [r.item.value for r in results if r.status is ItemStatus.NOT_CONFIGURED]
    passed = sum(r.status is ItemStatus.PASS for r in results)
    text = f"{passed} of {len(results)} items pass"
    if failed:
        text += f"; FAILED: {'; '.join(failed)}"
    if skipped:
        text += f"; not configured: {'; '.join(skipped)}"
    return not failed, text
