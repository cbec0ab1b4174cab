"""Pushing a maintenance run's result to a Prometheus Pushgateway, for the alert that fires when
the run stops succeeding (a backup missing for too long)."""

from __future__ import annotations

from typing import Annotated

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from pydantic import BeforeValidator


def _http_url(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError("expected an http(s):// URL")
    return value


OptionalPushgatewayUrl = Annotated[str | None, BeforeValidator(_http_url)]
"""A Pushgateway's http(s) URL, or empty for none."""


def push_gauges(
    url: str,
    job: str,
    grouping_key: dict[str, str],
    gauges: dict[str, tuple[str, float]],
    timeout_s: float = 10.0,
) -> str | None:
    """Push ``name -> (help, value)`` gauges labelled with ``grouping_key``; the error, if any.

    The run's work is done when this is called: a Pushgateway that is down is reported by the
    caller (the alert on a stale timestamp may fire), never a reason to fail the run.
    """
    registry = CollectorRegistry()
    labels = sorted(grouping_key)
    for name, (help_text, value) in gauges.items():
        Gauge(name, help_text, labels, registry=registry).labels(
            *(grouping_key[k] for k in labels)
        ).set(value)
    try:
        push_to_gateway(url, job=job, registry=registry, grouping_key=grouping_key, timeout=timeout_s)
    except OSError as exc:
        return str(exc)
    return None
