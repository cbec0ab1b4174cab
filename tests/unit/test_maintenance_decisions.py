"""Maintenance decisions: how a check's ending reads, gauges and week-over-week trends judged,
what a person must look at."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runbooks.report import WOULD_ESCALATE
from tasks.maintenance_decisions import (
    CheckOutcome,
    CheckStatus,
    Gauge,
    MaintenanceCheck,
    Trend,
    classify_check,
    judge_gauge,
    judge_trend,
    maintenance_problems,
    report_summary,
    show,
)

CLASSIFY_CASES = [
    (True, None, CheckStatus.OK),
    (True, "All good", CheckStatus.OK),
    (True, f"{WOULD_ESCALATE}lag 20,000 and growing (dry-run: nobody was paged)", CheckStatus.FINDINGS),
    (False, "Run failed: ValueError: no block", CheckStatus.FAILED),
    (False, f"{WOULD_ESCALATE}x", CheckStatus.FAILED),
]


@pytest.mark.parametrize(("completed", "message", "status"), CLASSIFY_CASES)
def test_classify_check(completed: bool, message: str | None, status: CheckStatus) -> None:
    assert classify_check(completed, message, WOULD_ESCALATE) is status


@pytest.mark.parametrize(
    ("markdown", "summary"),
    [
        ("## R\n\n### Summary\nAll 3 groups\ncaught up.\n\n### Timeline\n- x", "All 3 groups caught up."),
        ("### Summary\nlast line", "last line"),
        ("no summary here", None),
    ],
)
def test_report_summary(markdown: str, summary: str | None) -> None:
    assert report_summary(markdown) == summary


GAUGE = {"name": "Disk", "query": "q", "unit": "ratio"}
GAUGE_CASES = [
    ({"warn_above": 0.8}, 0.5, True, "Disk: 50%"),
    ({"warn_above": 0.8}, 0.9, False, "Disk: 90%, over 80%"),
    ({"warn_below": 0.1}, 0.05, False, "Disk: 5%, under 10%"),
    ({"warn_above": 0.8}, None, None, "Disk: no data"),
]


@pytest.mark.parametrize(("limits", "value", "ok", "words"), GAUGE_CASES)
def test_judge_gauge(limits: dict, value: float | None, ok: bool | None, words: str) -> None:
    assert judge_gauge(Gauge(**GAUGE, **limits), value) == (ok, words)


def test_a_gauge_needs_a_threshold() -> None:
    with pytest.raises(ValidationError):
        Gauge(**GAUGE)


P99 = {"name": "p99", "query": "rate(x[{window}]{offset})", "unit": "seconds"}
TREND_CASES = [
    ("lower", 0.12, 0.1, True, "(up 20%)"),  # within the 20% tolerance
    ("lower", 0.4, 0.1, False, "(up 300%) - worse"),
    ("lower", 0.05, 0.1, True, "(down 50%)"),
    ("higher", 50, 100, False, "(down 50%) - worse"),
    ("higher", 150, 100, True, "(up 50%)"),
    ("lower", 0.1, 0.1, True, "(unchanged)"),
    ("lower", 0.1, 0.0, False, "(up) - worse"),
    ("lower", None, 0.1, None, "no data now"),
]


@pytest.mark.parametrize(("better", "now", "before", "ok", "words"), TREND_CASES)
def test_judge_trend(better: str, now, before, ok: bool | None, words: str) -> None:
    found_ok, found = judge_trend(Trend(**P99, better=better), now, before)
    assert found_ok is ok
    assert words.replace("no data now", "no data") in found


def test_trend_queries_put_the_offset_after_each_range() -> None:
    t = Trend(name="e", query="sum(rate(a[{window}]{offset})) / sum(rate(b[{window}]{offset}))",
              better="lower")
    assert t.now("1w") == "sum(rate(a[1w])) / sum(rate(b[1w]))"
    assert t.before("1w") == "sum(rate(a[1w] offset 1w)) / sum(rate(b[1w] offset 1w))"


@pytest.mark.parametrize("query", ["rate(a[5m])", "rate(a[{window}])"])
def test_a_trend_needs_both_placeholders(query: str) -> None:
    with pytest.raises(ValidationError):
        Trend(name="e", query=query, better="lower")


@pytest.mark.parametrize(
    ("runbook", "ok"),
    [("slo-report", True), ("daily-maintenance", False), ("../x", False), ("Slo", False)],
)
def test_a_check_names_a_runbook_that_is_not_maintenance(runbook: str, ok: bool) -> None:
    if ok:
        assert MaintenanceCheck(task="t", runbook=runbook).runbook == runbook
    else:
        with pytest.raises(ValidationError):
            MaintenanceCheck(task="t", runbook=runbook)


@pytest.mark.parametrize(
    ("unit", "value", "text"),
    [("bytes", 5 * 2**30, "5 GiB"), ("bytes", 512, "512 B"), ("days", 12.34, "12.3 days"),
     ("seconds", 0.25, "250 ms"), ("per_second", 1234.5, "1,234/s"), ("ratio", None, "no data")],
)
def test_show(unit: str, value, text: str) -> None:
    assert show(unit, value) == text


def test_problems_list_findings_failures_and_warnings_not_the_rest() -> None:
    outcomes = [
        CheckOutcome(task="a", runbook="r", status=CheckStatus.OK, summary="fine"),
        CheckOutcome(task="b", runbook="r", status=CheckStatus.FINDINGS, summary="lag"),
        CheckOutcome(task="c", runbook="r", status=CheckStatus.FAILED, summary="no block"),
        CheckOutcome(task="d", runbook="r", status=CheckStatus.STARTED, summary="started"),
    ]
    assert maintenance_problems(outcomes, [(False, "disk 90%"), (None, "x")], [(True, "p99")]) == [
        "b: lag", "c: no block", "disk 90%"]
