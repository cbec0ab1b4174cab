"""SLO decisions: status against objective and alert threshold, error budget left, one value per
query. Cases are the seed 003 table's objectives."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.prometheus import Sample, single_value
from tasks.slo_decisions import (
    SEED_OBJECTIVES,
    Objective,
    SloStatus,
    assess,
    budget_left,
    budget_verdict,
    slo_status,
)

SLO = {o.name: o for o in SEED_OBJECTIVES}

STATUS_CASES = [
    ("Availability", 0.99995, SloStatus.MET),
    ("Availability", 0.9999, SloStatus.MET),
    ("Availability", 0.9995, SloStatus.AT_RISK),
    ("Availability", 0.998, SloStatus.BREACHED),
    ("Throughput", 120_000, SloStatus.MET),
    ("Throughput", 60_000, SloStatus.AT_RISK),
    ("Throughput", 40_000, SloStatus.BREACHED),
    ("Latency (P99)", 0.8, SloStatus.MET),
    ("Latency (P99)", 1.5, SloStatus.AT_RISK),
    ("Latency (P99)", 2.5, SloStatus.BREACHED),
    ("Error Rate", 0.0005, SloStatus.MET),
    ("Error Rate", 0.02, SloStatus.AT_RISK),
    ("Error Rate", 0.10, SloStatus.BREACHED),
    ("Delivery Success", 0.9995, SloStatus.MET),
    ("Delivery Success", 0.995, SloStatus.AT_RISK),
    ("Delivery Success", 0.98, SloStatus.BREACHED),
    ("Error Rate", None, SloStatus.NO_DATA),
]


@pytest.mark.parametrize(("name", "observed", "status"), STATUS_CASES)
def test_slo_status(name: str, observed: float | None, status: SloStatus) -> None:
    assert slo_status(SLO[name], observed) is status


BUDGET_CASES = [
    ("Availability", 1.0, 1.0),
    ("Availability", 0.99995, 0.5),  # half of the 0.01% spent
    ("Availability", 0.9998, -1.0),  # twice the budget: overspent
    ("Error Rate", 0.0, 1.0),
    ("Error Rate", 0.00075, 0.25),
    ("Delivery Success", 0.9995, 0.5),
    ("Latency (P99)", 0.5, None),  # not a ratio: no budget
    ("Throughput", 1e5, None),
    ("Availability", None, None),
]


@pytest.mark.parametrize(("name", "observed", "left"), BUDGET_CASES)
def test_budget_left(name: str, observed: float | None, left: float | None) -> None:
    found = budget_left(SLO[name], observed)
    assert found == (pytest.approx(left) if left is not None else None)


def test_the_report_names_slos_with_little_budget_left() -> None:
    results = [
        assess(SLO["Availability"], 0.99999, 0.99998),  # 80% left
        assess(SLO["Error Rate"], 0.0009, 0.0009),  # 10% left
        assess(SLO["Delivery Success"], 0.99, 0.998),  # overspent
        assess(SLO["Latency (P99)"], 0.4, None),
    ]
    assert budget_verdict(results, 0.25) == [
        "Error Rate: 10% of the error budget left",
        "Delivery Success: -100% of the error budget left (overspent)",
    ]


SHOW_CASES = [
    ("Availability", 0.99987, "99.99%", ">= 99.99%", "< 99.9%"),
    ("Latency (P99)", 1.234, "1234 ms", "<= 1000 ms", "> 2000 ms"),
    ("Throughput", 61234.5, "61,234/s", ">= 100,000/s", "< 50,000/s"),
    ("Error Rate", None, "no data", "<= 0.1%", "> 5%"),
]


@pytest.mark.parametrize(("name", "value", "measured", "objective", "threshold"), SHOW_CASES)
def test_results_read_like_the_seeds_table(
    name: str, value: float | None, measured: str, objective: str, threshold: str
) -> None:
    result = assess(SLO[name], value, None)
    assert (result.measured, result.objective, result.alert_threshold) == (
        measured,
        objective,
        threshold,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("query", "sum(rate(x_total[5m]))"), ("name", "")],
)
def test_objectives_are_checked(field: str, value: str) -> None:
    data = SLO["Error Rate"].model_dump() | {field: value}
    with pytest.raises(ValidationError):
        Objective.model_validate(data)


SINGLE_CASES = [
    ([], None, "no data"),
    ([Sample(value=0.5)], 0.5, None),
    ([Sample(value=None)], None, "NaN"),
    ([Sample(labels={"a": "1"}, value=1), Sample(labels={"a": "2"}, value=2)], None, "2 series"),
]


@pytest.mark.parametrize(("samples", "value", "problem"), SINGLE_CASES)
def test_single_value(samples: list[Sample], value: float | None, problem: str | None) -> None:
    found = single_value("q", samples)
    assert found.value == value
    assert (problem is None) == (found.problem is None)
    if problem:
        assert problem in found.problem
