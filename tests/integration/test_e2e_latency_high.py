"""e2e-latency-high against a real Prometheus scraping a test exporter: each stage's latency
histogram (and Flink's checkpoint-duration gauge, in ms) set to known values; the slow stage is
handed to its runbook's deployment (a real run is created on the test server)."""

from __future__ import annotations

import pytest

from blocks.prometheus import PrometheusServer
from flows.edge_gateway.stadium_network_flap import StadiumNetworkFlapParams
from flows.flink.flink_job_degraded import FlinkJobDegradedParams
from flows.kafka.kafka_consumer_lag_high import KafkaConsumerLagHighParams
from flows.notifications.push_delivery_degraded import PushDeliveryDegradedParams
from flows.pipeline.e2e_latency_high import (
    E2ELatencyHighParams,
    E2ELatencySummary,
    e2e_latency_high,
)
from runbooks.report import Outcome
from tasks.latency_decisions import LatencyVerdict, Stage
from tasks.prometheus import label_matcher
from tasks.slo_decisions import WINDOW_PLACEHOLDER
from tests.conftest import read_incident_report, runs_of, unique
from tests.servers import free_port

pytestmark = pytest.mark.integration

HISTOGRAMS = {
    "e2e": "event_e2e_latency_seconds",
    Stage.GATEWAY: "gateway_receive_latency_seconds",
    Stage.KAFKA: "kafka_publish_latency_seconds",
    Stage.NOTIFICATION: "notification_send_latency_seconds",
}
CHECKPOINT = "flink_jobmanager_job_lastCheckpointDuration"
# p99 (s) of every stage when fast; the end-to-end p99 then is 1 s, under its 3 s
FAST = {"e2e": 1.0, Stage.GATEWAY: 0.2, Stage.KAFKA: 0.1, Stage.FLINK: 0.5, Stage.NOTIFICATION: 0.2}
# a stage over its threshold (gateway 1 s, Kafka 0.5 s, Flink 2 s, notification 1 s)
SLOW = {Stage.GATEWAY: 2.5, Stage.KAFKA: 2.0, Stage.FLINK: 6.0, Stage.NOTIFICATION: 2.5}
RUNBOOK_PARAMS = {
    Stage.GATEWAY: ("stadium-network-flap", StadiumNetworkFlapParams),
    Stage.KAFKA: ("kafka-consumer-lag-high", KafkaConsumerLagHighParams),
    Stage.FLINK: ("flink-job-degraded", FlinkJobDegradedParams),
    Stage.NOTIFICATION: ("push-delivery-degraded", PushDeliveryDegradedParams),
}


@pytest.fixture(scope="module")
def prometheus_block(prometheus) -> str:
    name = unique("prometheus")
    PrometheusServer(url=prometheus.url, timeout_s=5).save(name, overwrite=True)
    return name


def queries(run: str) -> dict[str, str]:
    """The runbook's queries, for this test's series only."""
    m = label_matcher("run", run)
    p99 = "histogram_quantile(0.99, sum by (le) (rate({}_bucket{{{}}}[{{window}}])))"
    return {
        "e2e_query": p99.format(HISTOGRAMS["e2e"], m),
        "gateway_query": p99.format(HISTOGRAMS[Stage.GATEWAY], m),
        "kafka_query": p99.format(HISTOGRAMS[Stage.KAFKA], m),
        "flink_query": f"max(max_over_time({CHECKPOINT}{{{m}}}[{WINDOW_PLACEHOLDER}])) / 1000",
        "notification_query": p99.format(HISTOGRAMS[Stage.NOTIFICATION], m),
    }


def set_pipeline(prometheus, run: str, p99: dict) -> None:
    """Series of every stage in ``p99`` (seconds), then wait until Prometheus answers with them."""
    for key, seconds in p99.items():
        if key is Stage.FLINK:
            prometheus.exporter.set_gauge(CHECKPOINT, {"run": run}, seconds * 1000)
        else:
            prometheus.exporter.set_latency(HISTOGRAMS[key], {"run": run}, seconds)
    for key, seconds in p99.items():
        name = "e2e_query" if key == "e2e" else f"{key.value}_query"
        prometheus.wait_for(
            queries(run)[name].replace(WINDOW_PLACEHOLDER, "5s"),
            lambda r, s=seconds: bool(r) and abs(float(r[0]["value"][1]) - s) < 0.1 * s,
        )


def params(block: str, run: str, **overrides) -> E2ELatencyHighParams:
    fields = {"prometheus_block": block, "window": "5s", **queries(run)}
    return E2ELatencyHighParams(**(fields | overrides))


@pytest.mark.parametrize("stage", list(Stage))
def test_the_slow_stage_is_named_and_handed_to_its_runbook(
    prometheus, prometheus_block: str, deployment_ids: dict[str, str], stage: Stage
) -> None:
    run = unique("pipeline")
    set_pipeline(prometheus, run, FAST | {"e2e": 3.5, stage: SLOW[stage]})
    runbook, model = RUNBOOK_PARAMS[stage]
    before = {r["id"] for r in runs_of(deployment_ids[runbook])}
    p = params(
        prometheus_block,
        run,
        gateway_block="wembley-gw",
        kafka_block="prod-kafka",
        kafka_group="notifier",
        flink_block="flink-eu",
        flink_job_name="enrichment-job",
        push_db_block="push-db",
    )

    summary: E2ELatencySummary = e2e_latency_high(p)

    decision = summary.decision
    assert (decision.verdict, decision.stage) == (LatencyVerdict.SLOW_STAGE, stage), decision.reason
    rows = {r.stage: r for r in decision.rows}
    assert rows[stage].over and rows[stage].p99_s == pytest.approx(SLOW[stage], rel=0.1)
    assert [s for s, r in rows.items() if r.over] == [stage]
    assert rows[stage].share_of_e2e == pytest.approx(SLOW[stage] / 3.5, rel=0.15)
    assert summary.outcome is Outcome.HANDED_OFF and summary.handed_to == runbook

    new = [r for r in runs_of(deployment_ids[runbook]) if r["id"] not in before]
    assert len(new) == 1
    handed = new[0]["parameters"]["params"]
    expected = {
        Stage.GATEWAY: {"gateway_block": "wembley-gw"},
        Stage.KAFKA: {"kafka_block": "prod-kafka", "group": "notifier"},
        Stage.FLINK: {"flink_block": "flink-eu", "job_name": "enrichment-job"},
        Stage.NOTIFICATION: {"prometheus_block": prometheus_block, "db_block": "push-db"},
    }[stage]  # fmt: skip
    assert {k: handed[k] for k in expected} == expected
    assert handed["dry_run"] is False
    model.model_validate(handed)  # the run it starts accepts them
    assert "handed-off" in new[0]["tags"]
    assert (
        new[0]["id"] in summary.report
        and f"handed the {stage.value} stage to {runbook}" in summary.report
    )
    measure = "longest checkpoint" if stage is Stage.FLINK else "p99"
    assert f"| {stage.value} {measure} | FAILING | {stage.value}: {measure} " in summary.report


def test_a_dry_run_hands_off_a_dry_run(
    prometheus, prometheus_block: str, deployment_ids: dict[str, str]
) -> None:
    run = unique("pipeline")
    set_pipeline(prometheus, run, FAST | {"e2e": 3.5, Stage.KAFKA: SLOW[Stage.KAFKA]})
    before = {r["id"] for r in runs_of(deployment_ids["kafka-consumer-lag-high"])}
    summary = e2e_latency_high(params(prometheus_block, run, dry_run=True))
    assert summary.decision.stage is Stage.KAFKA
    (new,) = [
        r for r in runs_of(deployment_ids["kafka-consumer-lag-high"]) if r["id"] not in before
    ]
    assert new["parameters"]["params"]["dry_run"] is True


def test_all_stages_fast_is_no_action_needed(prometheus, prometheus_block: str) -> None:
    run = unique("pipeline")
    set_pipeline(prometheus, run, FAST)
    summary = e2e_latency_high(params(prometheus_block, run))
    assert summary.outcome is Outcome.NO_ACTION_NEEDED, summary.report
    assert summary.decision.verdict is LatencyVerdict.ALL_FAST and summary.handed_off is None
    assert all(r.p99_s is not None and not r.over for r in summary.decision.rows)


def test_no_data_is_said_and_escalated(prometheus, prometheus_block: str) -> None:
    state = e2e_latency_high(params(prometheus_block, unique("nothing")), return_state=True)
    assert state.is_failed()
    assert "no stage's query returned data" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "gateway: no data" in report and "check that their exporters are scraped" in report


def test_prometheus_down_escalates() -> None:
    block = unique("prometheus-down")
    PrometheusServer(url=f"http://127.0.0.1:{free_port()}", timeout_s=2).save(block, overwrite=True)
    state = e2e_latency_high(params(block, unique("pipeline")), return_state=True)
    assert state.is_failed()
    assert (
        "does not answer" in state.message and "per-stage breakdown cannot be read" in state.message
    )
    report = read_incident_report(state.state_details.flow_run_id)
    assert "ESCALATED" in report and "Check Prometheus at" in report
