"""Maintenance runs (seed 003 "Routine Maintenance": daily, weekly, monthly) as data: which
runbooks a run composes, how each one's ending reads in the maintenance report, and the metric
gauges and week-over-week trends it judges. Pure; the running is in tasks/maintenance.py."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from tasks.slo_decisions import WINDOW_PLACEHOLDER, show_unit

OFFSET_PLACEHOLDER = "{offset}"
_RUNBOOK = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
MAINTENANCE_RUNBOOKS = {"daily-maintenance", "weekly-maintenance", "monthly-maintenance"}


def _runbook_name(value: str) -> str:
    if not _RUNBOOK.fullmatch(value):
        raise ValueError(f"{value[:70]!r} is not a runbook (deployment) name")
    if value in MAINTENANCE_RUNBOOKS:
        raise ValueError(f"{value} is a maintenance run itself: it cannot be one of its checks")
    return value


class MaintenanceCheck(BaseModel):
    """One runbook a maintenance run composes, with the parameters it runs with."""

    task: str = Field(min_length=1, max_length=120, description="The seed's words for the task.")
    runbook: Annotated[str, AfterValidator(_runbook_name)] = Field(
        description="Deployment name of the runbook, e.g. kafka-consumer-lag-high."
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Its parameters (blocks, topics...); dry_run is set by the run."
    )


class CheckStatus(StrEnum):
    OK = "OK"
    FINDINGS = "FINDINGS"  # a read-only check that would have escalated: something needs a person
    FAILED = "FAILED"  # the check itself failed (an error, a block not saved, a bad parameter)
    STARTED = "STARTED"  # a changing runbook started as its own run (monthly archive, drill...)


class CheckOutcome(BaseModel):
    task: str
    runbook: str
    status: CheckStatus
    summary: str
    run: str | None = Field(None, description="Link to the run of the runbook.")

    def line(self) -> str:
        link = f" [{self.run}]" if self.run else ""
        return f"{self.task} ({self.runbook}): {self.status.value}: {self.summary}{link}"


class MaintenanceSummary(BaseModel):
    """What a maintenance run found."""

    outcomes: list[CheckOutcome]
    problems: list[str]
    report: str = Field(description="The report, as markdown.")


def classify_check(completed: bool, message: str | None, would_escalate_prefix: str) -> CheckStatus:
    """A dry-run check's ending: completed means done; completed with the report's 'would
    escalate' message means it found what a person must see; anything else failed."""
    if not completed:
        return CheckStatus.FAILED
    if message and message.startswith(would_escalate_prefix):
        return CheckStatus.FINDINGS
    return CheckStatus.OK


def report_summary(markdown: str) -> str | None:
    """The first paragraph of a report's '### Summary' section (what the run concluded)."""
    found = re.search(r"^### Summary\n(.+?)(?:\n\n|\n###|\Z)", markdown, re.S | re.M)
    return " ".join(found.group(1).split()) if found else None


class Gauge(BaseModel):
    """A number a maintenance run reads and judges, e.g. a disk's use or days until it is full."""

    name: str = Field(min_length=1, max_length=80)
    query: str = Field(min_length=1, description="PromQL giving one number.")
    warn_above: float | None = None
    warn_below: float | None = None
    unit: Literal["ratio", "bytes", "days", "per_second", "seconds", "count"] = "count"

    @model_validator(mode="after")
    def _has_a_threshold(self) -> Gauge:
        if self.warn_above is None and self.warn_below is None:
            raise ValueError(f"gauge {self.name!r} needs warn_above or warn_below")
        return self


class Trend(BaseModel):
    """A weekly trend: the query over the last window against the window before."""

    name: str = Field(min_length=1, max_length=80)
    query: str = Field(
        description=f"PromQL with {WINDOW_PLACEHOLDER} (the range) and {OFFSET_PLACEHOLDER} after "
        f"each range selector, e.g. rate(x_total[{WINDOW_PLACEHOLDER}]{OFFSET_PLACEHOLDER})."
    )
    better: Literal["higher", "lower"]
    unit: Literal["ratio", "per_second", "seconds", "count"] = "count"
    tolerance: float = Field(0.2, ge=0, le=10, description="A change past this share is reported.")

    @model_validator(mode="after")
    def _placeholders(self) -> Trend:
        if WINDOW_PLACEHOLDER not in self.query or OFFSET_PLACEHOLDER not in self.query:
            raise ValueError(f"trend {self.name!r}: the query needs {WINDOW_PLACEHOLDER} and {OFFSET_PLACEHOLDER}")
        return self

    def now(self, window: str) -> str:
        return self.query.replace(WINDOW_PLACEHOLDER, window).replace(OFFSET_PLACEHOLDER, "")

    def before(self, window: str) -> str:
        return self.query.replace(WINDOW_PLACEHOLDER, window).replace(OFFSET_PLACEHOLDER, f" offset {window}")


def show(unit: str, value: float | None) -> str:
    """Bytes, days and counts here; ratios, seconds and rates as the SLO report writes them."""
    if value is None or unit in ("ratio", "seconds", "per_second"):
        return show_unit(unit, value)
    if unit == "bytes":
        for size, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.3g} {name}"
        return f"{value:.0f} B"
    if unit == "days":
        return f"{value:.1f} days"
    return f"{value:.4g}"


def judge_gauge(gauge: Gauge, value: float | None) -> tuple[bool | None, str]:
    """(ok, words); ok None: no data."""
    if value is None:
        return None, f"{gauge.name}: no data"
    if gauge.warn_above is not None and value > gauge.warn_above:
        return False, f"{gauge.name}: {show(gauge.unit, value)}, over {show(gauge.unit, gauge.warn_above)}"
    if gauge.warn_below is not None and value < gauge.warn_below:
        return False, f"{gauge.name}: {show(gauge.unit, value)}, under {show(gauge.unit, gauge.warn_below)}"
    return True, f"{gauge.name}: {show(gauge.unit, value)}"


def judge_trend(trend: Trend, now: float | None, before: float | None) -> tuple[bool | None, str]:
    """(ok, words): worse than before by more than the tolerance is not ok; None without data."""
    if now is None or before is None:
        return None, f"{trend.name}: {show(trend.unit, now)} now, {show(trend.unit, before)} before"
    if before == 0:
        change = 0.0 if now == 0 else float("inf")
    else:
        change = (now - before) / abs(before)
    worse = change < -trend.tolerance if trend.better == "higher" else change > trend.tolerance
    direction = "up" if change > 0 else "down" if change < 0 else "unchanged"
    amount = "" if direction == "unchanged" or change == float("inf") else f" {abs(change):.0%}"
    words = (
        f"{trend.name}: {show(trend.unit, now)} against {show(trend.unit, before)} the window "
        f"before ({direction}{amount})"
    )
    return not worse, words + (" - worse" if worse else "")


def maintenance_problems(
    outcomes: list[CheckOutcome], gauges: list[tuple[bool | None, str]], trends: list[tuple[bool | None, str]]
) -> list[str]:
    """What a person should look at, in the report's order; empty: a clean run."""
    problems = [
        f"{o.task}: {o.summary}" for o in outcomes if o.status in (CheckStatus.FINDINGS, CheckStatus.FAILED)
    ]
    problems += [words for ok, words in gauges if ok is False]
    problems += [words for ok, words in trends if ok is False]
    return problems
