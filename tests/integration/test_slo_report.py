"""slo-report against a real Prometheus: the seed 003 table measured from series with known
values; a breached SLO escalates with the table; an unmeasurable one is said so."""

from __future__ import annotations

import pytest

from blocks.prometheus import PrometheusServer
from flows.observability.slo_report import SloReportParams, slo_report
from runbooks.report import Outcome
from tasks.slo_decisions import SEED_OBJECTIVES, Objective
from tests.conftest import read_incident_report, unique


def objectives(tag: str) -> list[Objective]:
    """The seed's objectives, their queries narrowed to this test's series."""
    mine = f'slo="{tag}"'
    queries = {
        "Availability": f"avg(avg_over_time(svc_up{{{mine}}}[{{window}}]))",
        "Throughput": f"sum(rate(events_processed_total{{{mine}}}[{{window}}]))",
        "Latency (P99)": "histogram_quantile(0.99, sum by (le) "
        f"(rate(event_e2e_latency_seconds_bucket{{{mine}}}[{{window}}])))",
        "Error Rate": f'sum(rate(http_requests_total{{{mine},status=~"5.."}}[{{window}}])) '
        f"/ sum(rate(http_requests_total{{{mine}}}[{{window}}]))",
        "Delivery Success": f'sum(rate(notifications_sent_total{{{mine},result="success"}}[{{window}}])) '
        f"/ sum(rate(notifications_sent_total{{{mine}}}[{{window}}]))",
    }
    return [o.model_copy(update={"query": queries[o.name]}) for o in SEED_OBJECTIVES]


def serve(prometheus, tag: str, *, errors_per_s: float, events_per_s: float) -> None:
    e, mine = prometheus.exporter, {"slo": tag}
    e.set_gauge("svc_up", mine | {"service": "gateway"}, 1)
    e.set_rate("events_processed_total", mine, events_per_s)
    e.set_latency("event_e2e_latency_seconds", mine, 0.5)
    e.set_rate("http_requests_total", mine | {"status": "200"}, 100.0 - errors_per_s)
    e.set_rate("http_requests_total", mine | {"status": "500"}, errors_per_s)
    e.set_rate("notifications_sent_total", mine | {"result": "success"}, 1000.0)
    for o in objectives(tag):
        prometheus.wait_for(o.for_window("10s"), timeout_s=40)
    # rates are right once the window is full of samples (a new counter is underestimated)
    throughput = objectives(tag)[1].for_window("5s")
    prometheus.wait_for(
        throughput, lambda r: bool(r) and abs(float(r[0]["value"][1]) / events_per_s - 1) < 0.05
    )


@pytest.fixture
def prom_block(prometheus) -> str:
    name = unique("prom")
    PrometheusServer(url=prometheus.url, timeout_s=5).save(name)
    return name


def test_a_healthy_day_meets_every_slo_but_throughput(prometheus, prom_block: str) -> None:
    tag = unique("slo")
    serve(prometheus, tag, errors_per_s=0.0, events_per_s=60_000)
    params = SloReportParams(
        prometheus_block=prom_block, objectives=objectives(tag), window="5s", budget_period="10s"
    )

    summary = slo_report(params)

    assert summary.outcome is Outcome.NO_ACTION_NEEDED
    status = {r.name: r.status.value for r in summary.results}
    assert status == {
        "Availability": "MET",
        "Throughput": "AT RISK",  # 60K/s: under the 100K objective, over the 50K threshold
        "Latency (P99)": "MET",
        "Error Rate": "MET",
        "Delivery Success": "MET",
    }
    budgets = {r.name: r.budget_left for r in summary.results}
    assert budgets["Availability"] == pytest.approx(1.0)
    assert budgets["Error Rate"] == pytest.approx(1.0)
    assert budgets["Latency (P99)"] is None
    assert "4 of 5 SLOs met over 5s; 1 at risk" in summary.report
    assert "Throughput misses its objective" in summary.report


def test_a_breached_error_rate_escalates_with_the_table(prometheus, prom_block: str) -> None:
    tag = unique("slo")
    serve(prometheus, tag, errors_per_s=10.0, events_per_s=120_000)
    params = SloReportParams(
        prometheus_block=prom_block, objectives=objectives(tag), window="5s", budget_period="10s"
    )

    state = slo_report(params, return_state=True)

    assert state.is_failed()
    assert "1 SLO(s) breached over 5s: Error Rate 10% (alert threshold > 5%)" in state.message
    md = read_incident_report(state.state_details.flow_run_id)
    assert "| Error Rate | FAILING | Error Rate: 10% (objective <= 0.1%) BREACHED" in md
    assert "| Availability | OK |" in md
    assert "| Severity | P3 (minor degradation) |" in md
    assert "ticket for the team, respond within 1 h" in md


def test_an_slo_that_cannot_be_measured_is_said_so(prometheus, prom_block: str) -> None:
    tag = unique("slo")
    serve(prometheus, tag, errors_per_s=0.0, events_per_s=120_000)
    objs = objectives(tag)
    objs[4] = objs[4].model_copy(
        update={"query": 'sum(rate(nothing_here_total{slo="x"}[{window}]))'}
    )
    objs[1] = objs[1].model_copy(update={"query": "rate(events_processed_total[{window}]"})
    params = SloReportParams(
        prometheus_block=prom_block, objectives=objs, window="5s", budget_period="10s"
    )

    summary = slo_report(params)

    assert summary.outcome is Outcome.NO_ACTION_NEEDED
    assert {r.name for r in summary.results if r.status.value == "NO DATA"} == {
        "Throughput",
        "Delivery Success",
    }
    assert "query refused: bad_data" in summary.report
    assert "no data (no series matched)" in summary.report
    assert "Delivery Success could not be measured" in summary.report


def test_prometheus_down_escalates() -> None:
    from tests.servers import free_port

    name = unique("prom")
    PrometheusServer(url=f"http://127.0.0.1:{free_port()}", timeout_s=1).save(name)
    state = slo_report(SloReportParams(prometheus_block=name), return_state=True)
    assert state.is_failed()
    assert "Prometheus does not answer" in state.message
