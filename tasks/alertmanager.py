"""Alertmanager's v2 API: the alerts firing now (not silenced, not inhibited)."""

from __future__ import annotations

from typing import Any

import httpx
from prefect import task
from pydantic import BaseModel, Field

from blocks.prometheus import AlertmanagerServer
from runbooks.retry import runbook_task_options
from tasks.prometheus import label_matcher


class AlertmanagerUnavailable(Exception):
    """Alertmanager did not answer usefully (connect error, timeout, 5xx)."""


class FiringAlert(BaseModel):
    """One active alert as Alertmanager holds it."""

    name: str
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: str | None = None
    fingerprint: str | None = None
    severity: str | None = None

    def describe(self) -> str:
        scope = ", ".join(
            f"{k}={v}" for k, v in sorted(self.labels.items()) if k not in ("alertname", "severity")
        )
        return f"{self.name}" + (f" [{self.severity}]" if self.severity else "") + (
            f" ({scope})" if scope else ""
        )


def parse_alerts(body: list[dict[str, Any]]) -> list[FiringAlert]:
    return [
        FiringAlert(
            name=a.get("labels", {}).get("alertname", "?"),
            labels=a.get("labels", {}),
            annotations=a.get("annotations", {}),
            starts_at=a.get("startsAt"),
            fingerprint=a.get("fingerprint"),
            severity=a.get("labels", {}).get("severity"),
        )
        for a in body
    ]


def _get(server: AlertmanagerServer, path: str, params: Any = None) -> httpx.Response:
    """One GET of the v2 API: connect errors, timeouts and 5xx are AlertmanagerUnavailable
    (retried by the tasks), another non-2xx answer a ValueError (the request is wrong)."""
    try:
        with server.get_client() as client:
            response = client.get(path, params=params)
    except httpx.TransportError as exc:
        raise AlertmanagerUnavailable(f"{server.url}: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 500:
        raise AlertmanagerUnavailable(f"{server.url}: HTTP {response.status_code}")
    if response.status_code != 200:
        raise ValueError(
            f"Alertmanager refused the request: HTTP {response.status_code} {response.text[:200]}"
        )
    return response


@task(**runbook_task_options(AlertmanagerUnavailable))
def firing_alerts(
    server: AlertmanagerServer, matchers: dict[str, str] | None = None
) -> list[FiringAlert]:
    """Active alerts that are neither silenced nor inhibited, optionally only those whose labels
    equal ``matchers`` (values quoted: they may come from alert labels); oldest first."""
    params: list[tuple[str, str]] = [
        ("active", "true"),
        ("silenced", "false"),
        ("inhibited", "false"),
        ("unprocessed", "true"),
    ]
    params += [("filter", label_matcher(k, v)) for k, v in sorted((matchers or {}).items())]
    alerts = parse_alerts(_get(server, "/api/v2/alerts", params).json())
    return sorted(alerts, key=lambda a: (a.starts_at or "", a.name))


@task(**runbook_task_options(AlertmanagerUnavailable))
def alertmanager_config(server: AlertmanagerServer) -> dict[str, Any]:
    """The configuration Alertmanager runs (GET /api/v2/status, `config.original`), parsed.
    Its secrets (receivers' URLs and tokens) stay in this process: callers report only what they
    derive from it."""
    import yaml

    original = _get(server, "/api/v2/status").json().get("config", {}).get("original", "")
    return yaml.safe_load(original) or {}
