"""Alertmanager's v2 API: the alerts firing now (not silenced, not inhibited), its running
configuration, and silences (created and expired by runbooks.silences)."""

from __future__ import annotations

from datetime import UTC, datetime
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
        return (
            f"{self.name}"
            + (f" [{self.severity}]" if self.severity else "")
            + (f" ({scope})" if scope else "")
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


def _request(
    server: AlertmanagerServer,
    method: str,
    path: str,
    params: Any = None,
    body: dict[str, Any] | None = None,
) -> httpx.Response:
    """One request to the v2 API: connect errors, timeouts and 5xx are AlertmanagerUnavailable
    (retried by the tasks), another non-2xx answer a ValueError (the request is wrong)."""
    try:
        with server.get_client() as client:
            response = client.request(method, path, params=params, json=body)
    except httpx.TransportError as exc:
        raise AlertmanagerUnavailable(f"{server.url}: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 500:
        raise AlertmanagerUnavailable(f"{server.url}: HTTP {response.status_code}")
    if response.status_code != 200:
        raise ValueError(
            f"Alertmanager refused the request: HTTP {response.status_code} {response.text[:200]}"
        )
    return response


def _get(server: AlertmanagerServer, path: str, params: Any = None) -> httpx.Response:
    return _request(server, "GET", path, params=params)


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


# --- silences (v2 API) --------------------------------------------------------------------------


class Silence(BaseModel):
    """One silence as Alertmanager holds it."""

    id: str
    state: str  # active, pending or expired
    matchers: list[dict[str, Any]]
    starts_at: str
    ends_at: str
    created_by: str
    comment: str


def _silence(raw: dict[str, Any]) -> Silence:
    return Silence(
        id=raw["id"],
        state=raw.get("status", {}).get("state", "?"),
        matchers=raw.get("matchers", []),
        starts_at=raw.get("startsAt", ""),
        ends_at=raw.get("endsAt", ""),
        created_by=raw.get("createdBy", ""),
        comment=raw.get("comment", ""),
    )


@task(**runbook_task_options(AlertmanagerUnavailable))
def list_silences(server: AlertmanagerServer) -> list[Silence]:
    """Every silence Alertmanager keeps (active, pending and recently expired)."""
    return [_silence(raw) for raw in _get(server, "/api/v2/silences").json()]


@task(**runbook_task_options(AlertmanagerUnavailable))
def create_silence(
    server: AlertmanagerServer,
    matchers: list[dict[str, Any]],
    ends_at: datetime,
    created_by: str,
    comment: str,
    marker: str,
) -> Silence:
    """Silence alerts matching ``matchers`` from now until ``ends_at``.

    Idempotent: an active silence whose comment holds ``marker`` (e.g. the run's id) and whose
    matchers are the same is returned instead of a second one, so a retry after a timeout that
    hid a success does not leave two silences.
    """
    for existing in list_silences.fn(server):
        if existing.state == "active" and marker in existing.comment and _same(existing, matchers):
            return existing
    body = {
        "matchers": matchers,
        "startsAt": datetime.now(UTC).isoformat(),
        "endsAt": ends_at.astimezone(UTC).isoformat(),
        "createdBy": created_by,
        "comment": comment,
    }
    silence_id = _request(server, "POST", "/api/v2/silences", body=body).json()["silenceID"]
    return _silence(_get(server, f"/api/v2/silence/{silence_id}").json())


def _same(silence: Silence, matchers: list[dict[str, Any]]) -> bool:
    def key(m: dict[str, Any]) -> tuple[Any, ...]:
        return (m.get("name"), m.get("value"), m.get("isRegex"), m.get("isEqual", True))

    return sorted(map(key, silence.matchers)) == sorted(map(key, matchers))


@task(**runbook_task_options(AlertmanagerUnavailable))
def expire_silence(server: AlertmanagerServer, silence_id: str) -> bool:
    """Expire a silence now; False when it had already expired (a retried call, or it ran out)."""
    current = _silence(_get(server, f"/api/v2/silence/{silence_id}").json())
    if current.state == "expired":
        return False
    _request(server, "DELETE", f"/api/v2/silence/{silence_id}")
    return True
