"""Runbook: high end-to-end latency (P2, E2E p99 > 3 s): per-stage breakdown from Prometheus, the
slowest stage named with evidence and handed to the runbook that checks it."""

from typing import Annotated

from prefect import flow
from pydantic import BaseModel, Field, StringConstraints

from blocks.prometheus import PrometheusServer
from runbooks.errors import Escalation
from runbooks.handoff import hand_off
from runbooks.params import BlockName, OptionalGroupId, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from tasks.latency_decisions import (
    STAGE_MEASURE,
    STAGE_RUNBOOK,
    STAGE_WHAT,
    LatencyDecision,
    LatencyVerdict,
    Stage,
    StageReading,
    decide_slow_stage,
)
from tasks.prometheus import PrometheusUnavailable, PromQLError, query_prometheus
from tasks.slo_decisions import WINDOW_PLACEHOLDER, PromDuration

RUNBOOK = "e2e-latency-high"
Query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


def _p99(metric: str) -> str:
    return f"histogram_quantile(0.99, sum by (le) (rate({metric}_bucket[{WINDOW_PLACEHOLDER}])))"


# what a person checks beside the stage's runbook (the seed's response for each stage)
STAGE_FOLLOW_UP = {
    Stage.GATEWAY: "Gateway: check the stadium's source connectivity and the WAL size "
    "(gateway_wal_pending_events).",
    Stage.KAFKA: "Kafka: check consumer lag and the brokers' CPU and request latency.",
    Stage.FLINK: "Flink: check backpressure (the job's vertices) and state size; long "
    "checkpoints hold records back while barriers align.",
    Stage.NOTIFICATION: "Notifications: check FCM/APNs response times and error rates.",
}


class E2ELatencyHighParams(RunbookParams):
    """Run form of the e2e-latency-high runbook. Queries may use `{window}`, replaced by `window`."""

    prometheus_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Prometheus Server' block."
    )
    window: PromDuration = Field("5m", description="Window of every rate and p99 (e.g. 5m).")
    e2e_query: Query = Field(
        _p99("event_e2e_latency_seconds"),
        description="End-to-end p99 in seconds (occurred_at -> notification sent).",
    )
    e2e_threshold_s: float = Field(3.0, gt=0, le=3600, description="End-to-end p99 target.")
    gateway_query: Query = Field(
        _p99("gateway_receive_latency_seconds"),
        description="Gateway stage p99 in seconds (occurred_at -> received_at).",
    )
    gateway_threshold_s: float = Field(1.0, gt=0, le=3600, description="Gateway p99 threshold.")
    kafka_query: Query = Field(
        _p99("kafka_publish_latency_seconds"),
        description="Kafka stage p99 in seconds (received_at -> published_at).",
    )
    kafka_threshold_s: float = Field(0.5, gt=0, le=3600, description="Kafka p99 threshold.")
    flink_query: Query = Field(
        "max(max_over_time(flink_jobmanager_job_lastCheckpointDuration[{window}])) / 1000",
        description="Flink checkpoint duration in seconds (Flink reports it in milliseconds).",
    )
    flink_threshold_s: float = Field(
        2.0, gt=0, le=3600, description="Longest acceptable checkpoint duration."
    )
    notification_query: Query = Field(
        _p99("notification_send_latency_seconds"),
        description="Notification send p99 in seconds (FCM/APNs request to response).",
    )
    notification_threshold_s: float = Field(
        1.0, gt=0, le=3600, description="Notification send p99 threshold."
    )
    # what the stage's own runbook gets when the stage is handed to it
    gateway_block: BlockName = Field(
        "default", description="Edge Gateway block for stadium-network-flap (gateway stage)."
    )
    kafka_block: BlockName = Field(
        "default",
        description="Kafka Cluster block for kafka-consumer-lag-high (Kafka stage).",
    )
    kafka_group: OptionalGroupId = Field(
        None, description="Consumer group kafka-consumer-lag-high checks; empty: every group."
    )
    flink_block: BlockName = Field(
        "default", description="Flink Cluster block for flink-job-degraded (Flink stage)."
    )
    flink_job_name: str = Field(
        "enrichment-job", min_length=1, max_length=200, description="Flink job to check."
    )
    push_db_block: BlockName = Field(
        "default",
        description="PostgreSQL block of the device-token table, for push-delivery-degraded "
        "(notification stage).",
    )

    def query(self, stage: Stage) -> str:
        return getattr(self, f"{stage.value}_query")

    def threshold(self, stage: Stage) -> float:
        return getattr(self, f"{stage.value}_threshold_s")

    def stage_params(self, stage: Stage) -> dict:
        """The parameters of the stage's runbook (it validates them itself)."""
        if stage is Stage.GATEWAY:
            return {"gateway_block": self.gateway_block}
        if stage is Stage.KAFKA:
            return {"kafka_block": self.kafka_block, "group": self.kafka_group}
        if stage is Stage.FLINK:
            return {
                "flink_block": self.flink_block,
                "job_name": self.flink_job_name,
            }
        return {"prometheus_block": self.prometheus_block, "db_block": self.push_db_block}


class E2ELatencySummary(BaseModel):
    """What an e2e-latency-high run found."""

    outcome: Outcome
    decision: LatencyDecision
    handed_to: str | None = Field(None, description="The stage's runbook, when handed off.")
    handed_off: str | None = Field(None, description="Link to that runbook's run.")
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name=RUNBOOK,
    description="Break end-to-end latency down by stage (gateway, Kafka, Flink checkpoints, "
    "notification send) from Prometheus, name the slowest stage with evidence and hand it to "
    "that stage's runbook.",
)
@ends_as_reported
def e2e_latency_high(params: E2ELatencyHighParams) -> E2ELatencySummary:
    with incident_report(
        runbook=RUNBOOK, title="High End-to-End Latency", severity="P2", params=params
    ) as report:
        server = PrometheusServer.load(params.prometheus_block)
        report.evidence(
            "queries",
            {"window": params.window, "end-to-end": params.e2e_query}
            | {s.value: params.query(s) for s in Stage},
        )
        e2e = _read_p99(report, server, "end-to-end", params.e2e_query, params.window)
        readings = [
            StageReading(
                stage=stage,
                p99_s=_read_p99(report, server, stage.value, params.query(stage), params.window),
                threshold_s=params.threshold(stage),
            )
            for stage in Stage
        ]
        decision = decide_slow_stage(readings, e2e, params.e2e_threshold_s)
        _check_stages(report, decision)
        report.step(f"decision: {decision.reason}")
        if decision.verdict is LatencyVerdict.ALL_FAST:
            report.finish(Outcome.NO_ACTION_NEEDED, f"No stage is slow: {decision.reason}.")
            return _summary(report, decision)
        if decision.verdict is not LatencyVerdict.SLOW_STAGE or decision.stage is None:
            _advise_unknown(report, decision)
            raise Escalation(decision.reason)

        stage = decision.stage
        runbook = STAGE_RUNBOOK[stage]
        link = hand_off(runbook, params, params.stage_params(stage))
        report.step(f"handed the {stage.value} stage to {runbook}: {link}")
        report.follow_ups.append(
            f"Follow {runbook}'s run ({link}); it checks the {STAGE_WHAT[stage]} further."
        )
        report.follow_ups.append(STAGE_FOLLOW_UP[stage])
        report.finish(
            Outcome.HANDED_OFF,
            f"{decision.reason[0].upper()}{decision.reason[1:]}. Handed to {runbook}: {link}",
        )
        return _summary(report, decision, runbook, link)


def _read_p99(
    report: IncidentReport, server: PrometheusServer, name: str, query: str, window: str
) -> float | None:
    """The query's value (the largest when it returns several series); None: no data."""
    try:
        samples = query_prometheus(server, query.replace(WINDOW_PLACEHOLDER, window))
    except PrometheusUnavailable as exc:
        report.check("Prometheus", False, str(exc))
        report.follow_ups.append(
            f"Check Prometheus at {server.url}; until it answers, read the per-stage latency in "
            "Grafana by hand (gateway, Kafka, Flink checkpoints, notification send)."
        )
        raise Escalation(
            f"Prometheus at {server.url} does not answer ({exc}): the per-stage breakdown cannot "
            "be read"
        ) from None
    except PromQLError as exc:
        report.check(f"{name} query", False, str(exc))
        raise Escalation(
            f"Prometheus refused the {name} query ({exc}): fix the runbook's "
            f"{'e2e' if name == 'end-to-end' else name}_query parameter"
        ) from None
    values = [s.value for s in samples if s.value is not None]
    return max(values) if values else None


def _check_stages(report: IncidentReport, decision: LatencyDecision) -> None:
    report.evidence("stages", [row.model_dump(mode="json") for row in decision.rows])
    e2e = decision.e2e_p99_s
    report.check(
        "end-to-end p99",
        e2e is None or e2e <= decision.e2e_threshold_s,
        "no data" if e2e is None else f"{e2e:.3g}s against {decision.e2e_threshold_s:g}s",
    )
    for row in decision.rows:
        report.check(f"{row.stage.value} {STAGE_MEASURE[row.stage]}", not row.over, row.describe())


def _advise_unknown(report: IncidentReport, decision: LatencyDecision) -> None:
    if decision.verdict in (LatencyVerdict.NO_DATA, LatencyVerdict.PARTLY_UNKNOWN):
        names = ", ".join(s.value for s in decision.missing)
        report.follow_ups.append(
            f"No data from {names}: check that their exporters are scraped and that the "
            "runbook's queries name the right metrics (run them in Prometheus)."
        )
    else:
        report.follow_ups.append(
            "Every measured stage is fast: look at what the breakdown does not measure (Flink "
            "processing time and backpressure, the notification queue, clock skew between hosts)."
        )


def _summary(
    report: IncidentReport,
    decision: LatencyDecision,
    runbook: str | None = None,
    link: str | None = None,
) -> E2ELatencySummary:
    return E2ELatencySummary(
        outcome=report.outcome,
        decision=decision,
        handed_to=runbook,
        handed_off=link,
        report=report.to_markdown(),
    )
