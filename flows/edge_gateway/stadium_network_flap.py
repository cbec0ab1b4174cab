"""Edge-gateway runbooks: seed 000 "P4 Stadium Network Flap"."""

from prefect import flow
from pydantic import BaseModel, Field

from blocks.edge_gateway import EdgeGateway
from blocks.kafka import KafkaCluster
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, OptionalBlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from runbooks.waiting import poll_until
from tasks.wal import (
    WalAction,
    WalStatus,
    check_kafka_reachable,
    decide,
    describe_damage,
    get_wal_identity,
    mark_quarantine_reported,
    measure_wal,
)
from tasks.wal_drain import DrainResult, drain_wal
from tasks.wal_format import QUARANTINE_FILE, WalDamage
from tasks.wal_topic import DeliveryCheckpoint, checkpoint_delivery, verify_delivery

RUNBOOK = "stadium-network-flap"

# Draining is idempotent (exactly once, resumes from the marker), so re-running it is safe; but
# a WAL that needs draining this often means the stadium link keeps flapping: a human looks.
DRAIN_BUDGET = Budget(max_actions=10, window_s=3600)


class StadiumNetworkFlapParams(RunbookParams):
    """Run form of the stadium-network-flap runbook."""

    gateway_block: BlockName = Field(
        "default", description="Name of the Runbooks Edge Gateway block."
    )
    kafka_block: OptionalBlockName = Field(
        None, description="Runbooks Kafka Cluster block; leave empty for the one the gateway names."
    )
    pending_threshold: int = Field(
        5_000,
        ge=0,
        description="Backlog the WAL absorbs on its own: at most this many pending events and Kafka "
        "unreachable means wait; more means a human investigates the network (seed: 5,000).",
    )
    network_wait_s: float = Field(
        600.0,
        ge=0,
        le=3600,
        description="Below the threshold, how long to wait for Kafka to become reachable.",
    )
    probe_interval_s: float = Field(
        10.0, gt=0, le=300, description="Seconds between reachability probes while waiting."
    )
    batch_size: int = Field(
        5000,
        ge=1,
        le=50_000,
        description="Records per Kafka transaction. The marker moves after each commit, "
        "written while the next batch is sent; a drain killed in between finds the batch in "
        "the topic.",
    )


class StadiumNetworkFlapSummary(BaseModel):
    outcome: str
    gateway: str
    pending_before: int
    pending_after: int | None = None
    waited_s: float = 0.0
    drained: int = 0
    already_in_kafka: int = 0
    drain_rate_eps: float | None = None


@flow(name=RUNBOOK, description="Seed 000 P4: gateway WAL growing while the stadium network flaps.")
@ends_as_reported
def stadium_network_flap(params: StadiumNetworkFlapParams) -> StadiumNetworkFlapSummary:
    """Measure the WAL backlog; wait for the network or escalate; drain it to Kafka; verify nothing was lost."""
    with incident_report(
        runbook=RUNBOOK,
        title=f"Stadium network flap: gateway {params.gateway_block}",
        severity="P4",
        params=params,
    ) as report:
        gateway = EdgeGateway.load(params.gateway_block)
        cluster = KafkaCluster.load(params.kafka_block or gateway.kafka_block)
        # the WAL directory is what a drain acts on: one lock and budget per WAL directory
        target = Target("edge-gateway", _gateway_label(gateway), get_wal_identity(gateway))
        with report.guard(target) as guard:
            before = measure_wal(gateway)
            report.evidence("WAL before (gateway_wal_pending_events)", before)
            summary = StadiumNetworkFlapSummary(
                outcome="", gateway=gateway.gateway_name, pending_before=before.pending_events
            )
            report.check(
                "gateway_wal_pending_events within threshold",
                before.pending_events <= params.pending_threshold,
                f"{before.describe()}; threshold {params.pending_threshold}",
            )
            if before.damaged:
                report.check("WAL records intact", False, describe_damage(before.damaged))
            reach = check_kafka_reachable(cluster, gateway.topic)
            report.check(f"Kafka topic {gateway.topic} reachable", reach.reachable, reach.detail)
            action = decide(
                before.pending_events,
                params.pending_threshold,
                reach.reachable,
                damaged=len(before.damaged),
            )
            report.step(f"decision: {action.value}")

            if action is WalAction.NOTHING_PENDING:
                # a drain killed after quarantining, before its run could escalate
                _escalate_damage(report, gateway, before.unreported_quarantine, [])
                return _finish(
                    report, summary, Outcome.NO_ACTION_NEEDED, "The WAL holds no pending events."
                )
            if action is WalAction.INVESTIGATE:
                raise Escalation(_network_advice(before, params.pending_threshold))
            if action is WalAction.WAIT_FOR_NETWORK:
                if params.dry_run:
                    return _finish(
                        report,
                        summary,
                        Outcome.PLANNED,
                        f"Would wait up to {params.network_wait_s:.0f}s for Kafka, then drain "
                        f"{before.pending_events} events.",
                    )
                report.step(
                    f"below threshold: waiting up to {params.network_wait_s:.0f}s for the "
                    "network (self-healing)"
                )
                # waiting for the network to heal itself, not verifying a fix: plain polling
                waited = poll_until(
                    lambda: check_kafka_reachable(cluster, gateway.topic),
                    lambda r: r.reachable,
                    timeout_s=params.network_wait_s,
                    interval_s=params.probe_interval_s,
                )
                summary.waited_s = waited.elapsed_s
                if not waited.ok or waited.last is None:
                    return _still_down(report, summary, gateway, params)
                reach = waited.last
                report.check(
                    f"Kafka topic {gateway.topic} reachable", True, f"after {waited.elapsed_s:.0f}s"
                )
            if before.pending_events > params.pending_threshold:
                report.follow_ups.append(
                    f"Backlog reached {before.pending_events} events (threshold "
                    f"{params.pending_threshold}): review the stadium uplink and the 4G failover."
                )
            if not reach.topic_exists:
                raise Escalation(
                    f"Kafka answers but {reach.detail}: create the topic or fix the gateway block"
                )

            # where the drain's records can land, read before it: what verification reads back
            checkpoint = None if params.dry_run else checkpoint_delivery(gateway, cluster)
            drain = guard.act(
                "drain WAL",
                lambda dry_run: drain_wal(
                    gateway, cluster, dry_run=dry_run, batch_size=params.batch_size
                ),
                budget=DRAIN_BUDGET,
                approval=_needs_approval,
            )
            if params.dry_run or checkpoint is None:
                return _finish(
                    report,
                    summary,
                    Outcome.PLANNED,
                    f"Kafka is reachable: would drain {before.pending_events} events to "
                    f"{gateway.topic}.",
                )
            summary.drained, summary.already_in_kafka = drain.sent, drain.already_in_kafka
            summary.drain_rate_eps = drain.rate_eps
            report.evidence(
                "drain",
                {
                    "sent": drain.sent,
                    "already_in_kafka": drain.already_in_kafka,
                    "elapsed_s": round(drain.elapsed_s, 3),
                    "drain_rate_events_per_s": drain.rate_eps,
                    "marker": f"{drain.acked_before} -> {drain.acked_after}",
                    "torn_tail_bytes_ignored": drain.torn_tail_bytes,
                },
            )
            _verify(report, summary, gateway, cluster, checkpoint, drain)
            return _finish(
                report,
                summary,
                Outcome.RESOLVED,
                f"Drained {drain.acked_after - checkpoint.acked} events to {gateway.topic} "
                f"({drain.already_in_kafka} already there from an interrupted drain) at "
                f"{drain.rate_eps or 0:.0f} events/s; every one is in the topic exactly once, "
                "sequence numbers are continuous.",
            )


def _gateway_label(gateway: EdgeGateway) -> str:
    """The gateway and the WAL directory it buffers in, as its block names them."""
    return f"{gateway.gateway_name}:{gateway.wal_path()}"


def _needs_approval(plan: DrainResult) -> str | None:
    """Sending to Kafka is idempotent; deleting WAL segment files throws the gateway's copy away."""
    deletes = [c.target for c in plan.planned if c.action == "delete_wal_segment"]
    if deletes:
        return (
            f"the drain deletes {len(deletes)} WAL segment file(s) once their records are in "
            f"Kafka ({', '.join(deletes[:3])}{', ...' if len(deletes) > 3 else ''}); the gateway "
            "keeps no copy of those events afterwards"
        )
    return None


def _verify(
    report: IncidentReport,
    summary: StadiumNetworkFlapSummary,
    gateway: EdgeGateway,
    cluster: KafkaCluster,
    checkpoint: DeliveryCheckpoint,
    drain: DrainResult,
) -> None:
    """Backlog gone, every intact record in Kafka exactly once and in order, no gaps, no damage."""
    backlog_end = drain.backlog_end
    after = measure_wal(gateway)
    summary.pending_after = after.pending_events
    report.evidence("WAL after", after)
    drained = report.check(
        "backlog drained",
        after.acked_up_to >= backlog_end,
        f"marker at {after.acked_up_to}, backlog ended at {backlog_end}; {after.pending_events} "
        "newer event(s) pending",
    )
    delivery = verify_delivery(gateway, cluster, checkpoint, drain.acked_after, drain.damaged)
    report.evidence("delivery check", delivery)
    delivered = report.check(
        "every record in Kafka exactly once, in order per source", delivery.ok, delivery.summary()
    )
    if not (drained and delivered):
        raise VerificationFailed(
            delivery.summary() if drained else f"backlog not drained: {after.describe()}"
        )
    problems = delivery.sequences.problems()
    report.check(
        "sequence numbers continuous per source",
        not problems,
        "; ".join(problems) or "no gaps or duplicates",
    )
    _escalate_damage(report, gateway, after.unreported_quarantine, problems)
    if problems:
        report.follow_ups.append(
            "Find where the missing or repeated events went (source feed, gateway)."
        )
        raise Escalation(
            "events lost or repeated before reaching the WAL (everything in the WAL was delivered): "
            + "; ".join(problems)
        )


def _escalate_damage(
    report: IncidentReport, gateway: EdgeGateway, damage: list[WalDamage], problems: list[str]
) -> None:
    """Escalate damaged WAL bytes the drains kept aside (once each), with the sequence gaps."""
    if not damage:
        return
    quarantine = gateway.wal_path() / QUARANTINE_FILE
    report.check("WAL damage kept in quarantine", False, describe_damage(damage))
    report.evidence(
        f"damaged WAL bytes kept in {quarantine}", [d.model_dump(mode="json") for d in damage]
    )
    report.follow_ups.append(
        f"Inspect {quarantine} and recover the lost events from their sources "
        "(docs/wal-format.md, 'Damage and quarantine'); check the gateway's disk."
    )
    if not report.params.dry_run:  # a dry run changes nothing: the next real run escalates again
        mark_quarantine_reported(gateway, damage)
    raise Escalation(
        f"{describe_damage(damage)}; kept in {quarantine}, not delivered; every intact record "
        "was delivered" + (f"; sequence check: {'; '.join(problems)}" if problems else "")
    )


def _still_down(
    report: IncidentReport,
    summary: StadiumNetworkFlapSummary,
    gateway: EdgeGateway,
    params: StadiumNetworkFlapParams,
) -> StadiumNetworkFlapSummary:
    now = measure_wal(gateway)
    report.evidence("WAL after waiting", now)
    summary.pending_after = now.pending_events
    if now.pending_events > params.pending_threshold:
        raise Escalation(_network_advice(now, params.pending_threshold))
    report.follow_ups.append("Re-run this runbook if the alert keeps firing.")
    return _finish(
        report,
        summary,
        Outcome.WAITING,
        f"Kafka still unreachable after {summary.waited_s:.0f}s; {now.describe()}, below the threshold "
        f"of {params.pending_threshold}: the WAL keeps buffering and drains on recovery.",
    )


def _network_advice(status: WalStatus, threshold: int) -> str:
    return (
        f"gateway {status.gateway}: {status.describe()}, above the threshold of {threshold}, and Kafka "
        "is unreachable: investigate the stadium network link and consider failing over to the 4G "
        "uplink before the WAL fills"
    )


def _finish(
    report: IncidentReport, summary: StadiumNetworkFlapSummary, outcome: Outcome, conclusion: str
) -> StadiumNetworkFlapSummary:
    report.finish(outcome, conclusion)
    summary.outcome = outcome.value
    return summary
