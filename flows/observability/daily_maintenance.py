"""Runbook ``daily-maintenance`` (seed 003 "Routine Maintenance", daily): check error rate and
alert status, review consumer lag across all topics, verify all services healthy, review the dead
letter queue; one report linking each runbook's own.

Each task is another runbook's read-only check, run here as a subflow in dry-run: it changes
nothing. What needs a person is escalated at the run's severity (a ticket), not paged.
"""

from prefect import flow
from pydantic import Field

from blocks.prometheus import AlertmanagerServer
from runbooks.params import OptionalBlockName, RunbookParams
from runbooks.report import ends_as_reported, incident_report
from tasks.alertmanager import AlertmanagerUnavailable, firing_alerts
from tasks.maintenance import compose, finish
from tasks.maintenance_decisions import MaintenanceCheck, MaintenanceSummary

RUNBOOK = "daily-maintenance"

DAILY = [
    MaintenanceCheck(task="Check error rate", runbook="slo-report", parameters={"window": "1d"}),
    MaintenanceCheck(task="Review consumer lag across all topics", runbook="kafka-consumer-lag-high"),
    MaintenanceCheck(task="Verify all services healthy", runbook="service-health-sweep"),
    MaintenanceCheck(
        task="Review dead letter queue", runbook="dlq-growing", parameters={"dlq_topic": "match-events-dlq"}
    ),
]


class DailyMaintenanceParams(RunbookParams):
    """Run form of the daily maintenance run."""

    checks: list[MaintenanceCheck] = Field(
        default_factory=lambda: list(DAILY),
        description="The runbooks run as read-only checks (dry-run), with their parameters.",
    )
    alertmanager_block: OptionalBlockName = Field(
        None, description="'Runbooks Alertmanager' block for 'check alert status'; empty: skipped."
    )


@flow(
    name=RUNBOOK,
    description="Daily maintenance: error rate and alert status, consumer lag across all topics, "
    "all services healthy, the dead letter queue; one report linking each check's run.",
)
@ends_as_reported
def daily_maintenance(params: DailyMaintenanceParams) -> MaintenanceSummary:
    with incident_report(
        runbook=RUNBOOK, title="Daily Maintenance", severity="P3", params=params
    ) as report:
        alerts = _alert_status(params)
        outcomes, problems = compose(report, params, read_only=params.checks, extra=alerts)
        finish(report, params, outcomes, problems)
        return MaintenanceSummary(outcomes=outcomes, problems=problems, report=report.to_markdown())


def _alert_status(params: DailyMaintenanceParams) -> list[tuple[bool | None, str]]:
    """'Check alert status': what fires now; a critical alert firing is a finding."""
    if not params.alertmanager_block:
        return [(None, "Alert status: not checked (no alertmanager_block given)")]
    try:
        alerts = firing_alerts(AlertmanagerServer.load(params.alertmanager_block))
    except AlertmanagerUnavailable as exc:
        return [(False, f"Alert status: Alertmanager does not answer ({exc})")]
    critical = [a for a in alerts if (a.severity or "").lower() in ("critical", "page")]
    if not alerts:
        return [(True, "Alert status: no alert firing")]
    listed = "; ".join(a.describe() for a in alerts[:10]) + (" ..." if len(alerts) > 10 else "")
    if critical:
        return [(False, f"Alert status: {len(critical)} critical of {len(alerts)} firing: {listed}")]
    return [(True, f"Alert status: {len(alerts)} firing, none critical: {listed}")]
