"""The PromQL and Alertmanager tasks against a real Prometheus and a real Alertmanager."""

from __future__ import annotations

import httpx
import pytest

from blocks.prometheus import AlertmanagerServer, PrometheusServer
from tasks.alertmanager import firing_alerts
from tasks.prometheus import (
    PrometheusUnavailable,
    PromQLError,
    instant_query,
    label_matcher,
    range_query,
)
from tests.alertmanager import firing, running_alertmanager
from tests.conftest import unique
from tests.servers import free_port


def test_instant_query_reads_the_exporters_rate(prometheus) -> None:
    svc = unique("svc")
    prometheus.exporter.set_rate("http_requests_total", {"service": svc, "status": "500"}, 4.0)
    expr = f"sum(rate(http_requests_total{{{label_matcher('service', svc)}}}[5s]))"
    prometheus.wait_for(expr, lambda r: bool(r) and abs(float(r[0]["value"][1]) - 4.0) < 0.5)
    (sample,) = instant_query(PrometheusServer(url=prometheus.url), expr)
    assert sample.value == pytest.approx(4.0, abs=0.5)


def test_a_label_value_cannot_change_the_query(prometheus) -> None:
    svc = unique("svc")
    prometheus.exporter.set_gauge("probe_up", {"service": svc}, 1)
    prometheus.wait_for(f'probe_up{{service="{svc}"}}')
    server = PrometheusServer(url=prometheus.url)
    hostile = f'{svc}"}} or vector(42) or probe_up{{service="x'
    assert instant_query(server, f"probe_up{{{label_matcher('service', hostile)}}}") == []


def test_nan_is_no_data_and_range_queries_return_points(prometheus) -> None:
    svc = unique("svc")
    prometheus.exporter.set_rate("http_requests_total", {"service": svc, "status": "200"}, 0.0)
    expr = f"sum(rate(http_requests_total{{{label_matcher('service', svc)}}}[5s]))"
    selector = f"http_requests_total{{{label_matcher('service', svc)}}}"
    prometheus.wait_for(f"count_over_time({selector}[30s]) >= 10", timeout_s=40)
    server = PrometheusServer(url=prometheus.url)
    (ratio,) = instant_query(server, f"{expr} / {expr}")
    assert ratio.value is None  # 0/0: no requests, no ratio
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    (series,) = range_query(server, expr, now - timedelta(seconds=4), now, 1)
    assert len(series.points) == 5


def test_bad_promql_is_a_query_error_not_a_retry(prometheus) -> None:
    with pytest.raises(PromQLError, match="bad_data"):
        instant_query(PrometheusServer(url=prometheus.url), "rate(up[5s]")


def test_an_unreachable_server_is_transient() -> None:
    server = PrometheusServer(url=f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(PrometheusUnavailable):
        instant_query(server, "up")


def test_firing_alerts_filters_by_quoted_labels() -> None:
    config = {
        "route": {"receiver": "null", "group_wait": "1s"},
        "receivers": [{"name": "null"}],
    }
    with running_alertmanager(config) as am:
        svc = unique("svc")
        alerts = [
            firing({"alertname": "ServiceDown", "service": svc, "severity": "critical"}),
            firing({"alertname": "HighLatency", "service": "other", "severity": "warning"}),
        ]
        httpx.post(f"{am.url}/api/v2/alerts", json=alerts, timeout=10).raise_for_status()
        server = AlertmanagerServer(url=am.url)
        all_alerts = firing_alerts.fn(server)
        assert {a.name for a in all_alerts} == {"ServiceDown", "HighLatency"}
        (mine,) = firing_alerts.fn(server, {"service": svc})
        assert mine.name == "ServiceDown" and mine.severity == "critical"
        assert firing_alerts.fn(server, {"service": f'{svc}",alertname=~".+'}) == []
