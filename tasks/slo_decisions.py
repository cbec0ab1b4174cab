"""Service level objectives: the seed 003 table, how a measurement compares with an objective, and
how much error budget is left. Pure functions; the measuring is in tasks/slo.py."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

_DURATION = re.compile(r"[1-9][0-9]{0,5}(ms|s|m|h|d|w|y)")
WINDOW_PLACEHOLDER = "{window}"


def _duration(value: str) -> str:
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{value[:40]!r} is not a Prometheus duration such as 30s, 5m, 1d")
    return value


PromDuration = Annotated[str, AfterValidator(_duration)]


def _windowed(query: str) -> str:
    if WINDOW_PLACEHOLDER not in query:
        raise ValueError(f"the query must contain {WINDOW_PLACEHOLDER} (the measured window)")
    return query


WindowedQuery = Annotated[str, AfterValidator(_windowed)]
"""PromQL with a ``{window}`` placeholder, replaced by a validated ``PromDuration``."""


class Objective(BaseModel):
    """One SLO: what to measure (PromQL over ``{window}``), its target and its alert threshold."""

    name: str = Field(min_length=1, max_length=80, description="e.g. 'Availability'.")
    query: Annotated[str, AfterValidator(_windowed)] = Field(
        description="PromQL giving one number over the window; `{window}` is replaced by the "
        "window (e.g. `sum(rate(x_total[{window}]))`)."
    )
    target: float = Field(description="The objective (a ratio 0-1, seconds or per second).")
    alert_threshold: float = Field(description="Past this the SLO is breached (seed 003).")
    better: Literal["higher", "lower"] = Field(description="Which direction is good.")
    unit: Literal["ratio", "seconds", "per_second"] = Field(description="How to show values.")

    def for_window(self, window: str) -> str:
        return self.query.replace(WINDOW_PLACEHOLDER, window)


# seed 003 "Service Level Objectives", with the metric names of the platform's services
SEED_OBJECTIVES: tuple[Objective, ...] = (
    Objective(
        name="Availability",
        query='avg(avg_over_time(up{job=~"event-.*"}[{window}]))',
        target=0.9999,
        alert_threshold=0.999,
        better="higher",
        unit="ratio",
    ),
    Objective(
        name="Throughput",
        query="sum(rate(events_processed_total[{window}]))",
        target=100_000,
        alert_threshold=50_000,
        better="higher",
        unit="per_second",
    ),
    Objective(
        name="Latency (P99)",
        query="histogram_quantile(0.99, sum by (le) (rate(event_e2e_latency_seconds_bucket[{window}])))",
        target=1.0,
        alert_threshold=2.0,
        better="lower",
        unit="seconds",
    ),
    Objective(
        name="Error Rate",
        query='sum(rate(http_requests_total{status=~"5.."}[{window}])) '
        "/ sum(rate(http_requests_total[{window}]))",
        target=0.001,
        alert_threshold=0.05,
        better="lower",
        unit="ratio",
    ),
    Objective(
        name="Delivery Success",
        query='sum(rate(notifications_sent_total{result="success"}[{window}])) '
        "/ sum(rate(notifications_sent_total[{window}]))",
        target=0.999,
        alert_threshold=0.99,
        better="higher",
        unit="ratio",
    ),
)


class SloStatus(StrEnum):
    MET = "MET"
    AT_RISK = "AT RISK"  # misses the objective, not (yet) past the alert threshold
    BREACHED = "BREACHED"  # past the alert threshold
    NO_DATA = "NO DATA"


def slo_status(objective: Objective, observed: float | None) -> SloStatus:
    if observed is None:
        return SloStatus.NO_DATA
    sign = 1 if objective.better == "higher" else -1
    if sign * observed >= sign * objective.target:
        return SloStatus.MET
    if sign * observed >= sign * objective.alert_threshold:
        return SloStatus.AT_RISK
    return SloStatus.BREACHED


def budget_left(objective: Objective, observed: float | None) -> float | None:
    """Share of the error budget left over the budget period (1.0 untouched, 0 spent, below 0
    overspent); None for objectives that are not ratios (no budget) or without data.

    Higher-is-better ratios (availability 99.99%) allow 1 - target bad; lower-is-better ratios
    (error rate 0.1%) allow the target itself.
    """
    if objective.unit != "ratio" or observed is None:
        return None
    if objective.better == "higher":
        allowed, spent = 1.0 - objective.target, 1.0 - observed
    else:
        allowed, spent = objective.target, observed
    if allowed <= 0:
        return None
    return 1.0 - max(spent, 0.0) / allowed


def show_unit(unit: str, value: float | None) -> str:
    """A ratio, seconds or per-second value as a report writes it: '99.99%', '250 ms', '1,234/s'."""
    if value is None:
        return "no data"
    if unit == "ratio":
        return f"{value * 100:.4g}%"
    if unit == "seconds":
        return f"{value * 1000:.0f} ms"
    return f"{value:,.0f}/s" if abs(value) >= 100 else f"{value:.3g}/s"


def show(objective: Objective, value: float | None) -> str:
    return show_unit(objective.unit, value)


def compare(objective: Objective, value: float) -> str:
    """The objective as the seed's table writes it, e.g. '>= 99.99%' or '< 1000 ms'."""
    op = ">=" if objective.better == "higher" else "<="
    return f"{op} {show(objective, value)}"


class SloResult(BaseModel):
    name: str
    objective: str
    alert_threshold: str
    measured: str
    status: SloStatus
    budget_left: float | None = Field(None, description="Share of the budget period's error budget left.")
    value: float | None = None

    def describe(self) -> str:
        budget = f"; {self.budget_left:.0%} of the error budget left" if self.budget_left is not None else ""
        return f"{self.name}: {self.measured} (objective {self.objective}) {self.status.value}{budget}"


def assess(
    objective: Objective, observed: float | None, observed_over_period: float | None
) -> SloResult:
    return SloResult(
        name=objective.name,
        objective=compare(objective, objective.target),
        alert_threshold=("< " if objective.better == "higher" else "> ")
        + show(objective, objective.alert_threshold),
        measured=show(objective, observed),
        status=slo_status(objective, observed),
        budget_left=budget_left(objective, observed_over_period),
        value=observed,
    )


def budget_verdict(results: list[SloResult], warn_below: float) -> list[str]:
    """SLOs whose error budget over the period is below ``warn_below`` (a share), in words."""
    return [
        f"{r.name}: {r.budget_left:.0%} of the error budget left"
        + (" (overspent)" if r.budget_left < 0 else "")
        for r in results
        if r.budget_left is not None and r.budget_left < warn_below
    ]
