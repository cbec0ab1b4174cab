"""Runbook ``slo-report`` (seed 003 "Service Level Objectives", daily): each objective of the SLO
table measured from Prometheus over the day, and the error budget left over the budget period.

Read-only. A breached SLO (past its alert threshold) escalates at the report's severity (a ticket);
one at risk or with little budget left becomes an action item; one that cannot be measured is
said so, with the query and why (an SLO nobody can measure is not met).
"""

from typing import Annotated

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import AfterValidator, BaseModel, Field

from blocks.prometheus import PrometheusServer
from runbooks.errors import Escalation
from runbooks.params import BlockName, RunbookParams, unique_names
from runbooks.report import Outcome, ends_as_reported, incident_report
from runbooks.text import artifact_key
from tasks.prometheus import PrometheusUnavailable, measure
from tasks.slo_decisions import (
    SEED_OBJECTIVES,
    Objective,
    PromDuration,
    SloResult,
    SloStatus,
    assess,
    budget_verdict,
)

RUNBOOK = "slo-report"


class SloReportParams(RunbookParams):
    """Run form of the slo-report runbook."""

    prometheus_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Prometheus Server' block."
    )
    objectives: Annotated[list[Objective], AfterValidator(unique_names)] = Field(
        default_factory=lambda: list(SEED_OBJECTIVES),
        description="The SLO table: name, PromQL over {window}, target, alert threshold.",
    )
    window: PromDuration = Field("1d", description="The period the report measures.")
    budget_period: PromDuration = Field(
        "30d", description="The period the error budget is counted over."
    )
    budget_warn_below: float = Field(
        0.25, ge=0, le=1, description="An action item when less than this share of a budget is left."
    )


class SloReportSummary(BaseModel):
    outcome: Outcome
    results: list[SloResult]
    report: str = Field(description="The report, as markdown.")


@flow(
    name=RUNBOOK,
    description="The SLO table (availability, throughput, p99 latency, error rate, delivery "
    "success) measured from Prometheus, with the error budget left; escalates a breached SLO.",
)
@ends_as_reported
def slo_report(params: SloReportParams) -> SloReportSummary:
    with incident_report(
        runbook=RUNBOOK, title="SLO Report", severity="P3", params=params
    ) as report:
        server = PrometheusServer.load(params.prometheus_block)
        results: list[SloResult] = []
        for objective in params.objectives:
            try:
                now = measure(server, objective.for_window(params.window))
                period = (
                    measure(server, objective.for_window(params.budget_period))
                    if objective.unit == "ratio"
                    else None
                )
            except PrometheusUnavailable as exc:
                report.follow_ups.append(f"Make Prometheus at {server.url} reachable, then run again.")
                raise Escalation(f"Prometheus does not answer ({exc}): no SLO was measured") from None
            result = assess(objective, now.value, period.value if period else None)
            results.append(result)
            report.check(
                objective.name,
                result.status is SloStatus.MET,
                result.describe() + (f" ({now.problem})" if now.problem else ""),
            )
            report.evidence(f"{objective.name} query", {"query": now.query, "value": now.value})
        _publish_table(results, params)
        breached = [r for r in results if r.status is SloStatus.BREACHED]
        at_risk = [r for r in results if r.status is SloStatus.AT_RISK]
        blind = [r for r in results if r.status is SloStatus.NO_DATA]
        low_budget = budget_verdict(results, params.budget_warn_below)
        for r in at_risk:
            report.follow_ups.append(
                f"{r.name} misses its objective ({r.measured}, objective {r.objective}) without "
                "being past the alert threshold yet: find what changed before it is."
            )
        for line in low_budget:
            report.follow_ups.append(f"{line} over {params.budget_period}: slow down risky changes.")
        for r in blind:
            report.follow_ups.append(
                f"{r.name} could not be measured: check the query and that its metrics are scraped."
            )
        table = "; ".join(r.describe() for r in results)
        if breached:
            raise Escalation(
                f"{len(breached)} SLO(s) breached over {params.window}: "
                + "; ".join(f"{r.name} {r.measured} (alert threshold {r.alert_threshold})" for r in breached)
            )
        met = sum(r.status is SloStatus.MET for r in results)
        report.finish(
            Outcome.NO_ACTION_NEEDED,
            f"{met} of {len(results)} SLOs met over {params.window}"
            + (f"; {len(at_risk)} at risk" if at_risk else "")
            + (f"; {len(blind)} not measurable" if blind else "")
            + f". {table}.",
        )
        return SloReportSummary(outcome=report.outcome, results=results, report=report.to_markdown())


def _publish_table(results: list[SloResult], params: SloReportParams) -> None:
    create_table_artifact(
        table=[
            {
                "SLO": r.name,
                "Objective": r.objective,
                "Alert threshold": r.alert_threshold,
                f"Measured ({params.window})": r.measured,
                "Status": r.status.value,
                f"Error budget left ({params.budget_period})": (
                    f"{r.budget_left:.0%}" if r.budget_left is not None else "-"
                ),
            }
            for r in results
        ],
        key=artifact_key("slo-table"),
        description=f"SLOs over {params.window}, error budget over {params.budget_period}",
    )
