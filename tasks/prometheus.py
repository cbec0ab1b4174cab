"""PromQL against a Prometheus server's HTTP API: instant and range queries, typed results.

Queries are the runbooks' parameters (with defaults for the seed's metric names); a value that
comes from an alert label goes into a query only through ``label_matcher``, which quotes it as a
PromQL string, never by formatting it into the text.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import task
from pydantic import BaseModel, Field

from blocks.prometheus import PrometheusServer
from runbooks.retry import runbook_task_options

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class PrometheusUnavailable(Exception):
    """Prometheus did not answer usefully (connect error, timeout, 5xx, 503 while starting)."""


class PromQLError(Exception):
    """Prometheus refused the query (HTTP 400/422: bad_data, execution error): fix the query."""


class Sample(BaseModel):
    """One series of an instant vector (or a scalar: no labels)."""

    labels: dict[str, str] = Field(default_factory=dict)
    value: float | None = Field(description="None: NaN (e.g. a ratio over no requests).")

    def label(self, name: str, default: str = "") -> str:
        return self.labels.get(name, default)


class Series(BaseModel):
    """One series of a range query: (unix time, value) points."""

    labels: dict[str, str] = Field(default_factory=dict)
    points: list[tuple[float, float | None]]


def promql_string(value: str) -> str:
    """``value`` as a PromQL double-quoted string literal (escapes backslash, quote, newline)."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def label_matcher(name: str, value: str, op: str = "=") -> str:
    """A safe ``name="value"`` matcher; the name must be a label name, the value is quoted."""
    if not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"{name[:60]!r} is not a Prometheus label name")
    if op not in ("=", "!=", "=~", "!~"):
        raise ValueError(f"unknown matcher operator {op!r}")
    return f"{name}{op}{promql_string(value)}"


def _number(text: str) -> float | None:
    value = float(text)  # Prometheus writes "NaN", "+Inf", "-Inf" as strings
    return None if math.isnan(value) else value


def parse_result(data: dict[str, Any]) -> list[Sample]:
    """The ``data`` of an instant query as samples (vector: one per series; scalar: one)."""
    kind, result = data.get("resultType"), data.get("result")
    if kind == "vector":
        return [Sample(labels=r.get("metric", {}), value=_number(r["value"][1])) for r in result]
    if kind == "scalar":
        return [Sample(labels={}, value=_number(result[1]))]
    if kind == "matrix":
        raise PromQLError("the query returns a range vector: wrap it (e.g. rate(...[5m]))")
    raise PromQLError(f"unexpected result type {kind!r}")


def _api(server: PrometheusServer, path: str, params: dict[str, Any]) -> Any:
    """One GET of the v1 API; its ``data``. 4xx -> PromQLError, the rest of failures transient."""
    try:
        with server.get_client() as client:
            response = client.get(path, params=params)
    except httpx.TransportError as exc:  # connect errors and timeouts
        raise PrometheusUnavailable(f"{server.url}: {type(exc).__name__}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code in (400, 422):
        raise PromQLError(f"{body.get('errorType', 'error')}: {body.get('error', response.text[:300])}")
    if response.status_code in (401, 403):
        raise PromQLError(f"HTTP {response.status_code}: the block's credentials were refused")
    if response.status_code != 200 or body.get("status") != "success":
        raise PrometheusUnavailable(
            f"{server.url}: HTTP {response.status_code} {body.get('error', response.text[:200])}"
        )
    return body["data"]


def instant_query(server: PrometheusServer, expr: str, at: datetime | None = None) -> list[Sample]:
    """Evaluate ``expr`` now (or at ``at``); Prometheus stops the query after the block's timeout."""
    params: dict[str, Any] = {"query": expr, "timeout": f"{server.timeout_s:g}s"}
    if at is not None:
        params["time"] = at.astimezone(UTC).timestamp()
    return parse_result(_api(server, "/api/v1/query", params))


def range_query(
    server: PrometheusServer, expr: str, start: datetime, end: datetime, step_s: float
) -> list[Series]:
    """Evaluate ``expr`` from ``start`` to ``end`` every ``step_s`` seconds."""
    data = _api(
        server,
        "/api/v1/query_range",
        {
            "query": expr,
            "start": start.astimezone(UTC).timestamp(),
            "end": end.astimezone(UTC).timestamp(),
            "step": f"{step_s:g}",
            "timeout": f"{server.timeout_s:g}s",
        },
    )
    if data.get("resultType") != "matrix":
        raise PromQLError(f"unexpected result type {data.get('resultType')!r} for a range query")
    return [
        Series(labels=r.get("metric", {}), points=[(float(t), _number(v)) for t, v in r["values"]])
        for r in data["result"]
    ]


@task(**runbook_task_options(PrometheusUnavailable))
def query_prometheus(server: PrometheusServer, expr: str) -> list[Sample]:
    """Instant PromQL query; retried only when Prometheus is unreachable or failing (5xx)."""
    return instant_query(server, expr)


@task(**runbook_task_options(PrometheusUnavailable))
def query_prometheus_range(
    server: PrometheusServer, expr: str, start: datetime, end: datetime, step_s: float
) -> list[Series]:
    """Range PromQL query (for trends); retried only on transient failures."""
    return range_query(server, expr, start, end, step_s)


class PrometheusAlert(BaseModel):
    """An alert of Prometheus's own rule evaluation (/api/v1/alerts)."""

    name: str
    state: str = Field(description="pending or firing.")
    labels: dict[str, str]
    active_at: str | None = None
    value: str | None = None


@task(**runbook_task_options(PrometheusUnavailable))
def prometheus_alerts(server: PrometheusServer) -> list[PrometheusAlert]:
    """The alerts Prometheus's rules hold now, pending and firing."""
    data = _api(server, "/api/v1/alerts", {})
    return [
        PrometheusAlert(
            name=a.get("labels", {}).get("alertname", "?"),
            state=a.get("state", "?"),
            labels=a.get("labels", {}),
            active_at=a.get("activeAt"),
            value=a.get("value"),
        )
        for a in data.get("alerts", [])
    ]


class Measurement(BaseModel):
    """One number a query was meant to give, or why there is none."""

    query: str
    value: float | None = None
    problem: str | None = Field(None, description="Why no value: no data, several series, error.")


def single_value(query: str, samples: list[Sample]) -> Measurement:
    """The one value of an aggregated query; several series are a query that forgot its sum()."""
    if not samples:
        return Measurement(query=query, problem="no data (no series matched)")
    if len(samples) > 1:
        return Measurement(
            query=query,
            problem=f"{len(samples)} series where one number was expected: aggregate the query "
            "(sum, avg or max by nothing)",
        )
    if samples[0].value is None:
        return Measurement(query=query, problem="no data (NaN: e.g. a ratio over no requests)")
    return Measurement(query=query, value=samples[0].value)


@task(**runbook_task_options(PrometheusUnavailable))
def measure(server: PrometheusServer, expr: str) -> Measurement:
    """One number from Prometheus; a refused query is a Measurement with its problem, so one bad
    query in a list does not stop the others (an unreachable server still raises)."""
    try:
        return single_value(expr, instant_query(server, expr))
    except PromQLError as exc:
        return Measurement(query=expr, problem=f"query refused: {exc}")


class ScrapeTarget(BaseModel):
    job: str
    instance: str
    health: str = Field(description="up, down or unknown.")
    last_error: str = ""


@task(**runbook_task_options(PrometheusUnavailable))
def scrape_targets(server: PrometheusServer) -> list[ScrapeTarget]:
    """Prometheus's active scrape targets and whether the last scrape worked."""
    data = _api(server, "/api/v1/targets", {"state": "active"})
    return [
        ScrapeTarget(
            job=t.get("labels", {}).get("job", t.get("scrapePool", "?")),
            instance=t.get("labels", {}).get("instance", t.get("scrapeUrl", "?")),
            health=t.get("health", "unknown"),
            last_error=t.get("lastError", ""),
        )
        for t in data.get("activeTargets", [])
    ]
