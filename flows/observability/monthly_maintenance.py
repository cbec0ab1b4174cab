"""Runbook ``monthly-maintenance`` (seed 003 "Routine Maintenance", monthly): database index
optimization, review and archive old events, capacity planning, the disaster recovery drill; one
report.

The seed's monthly tasks change things, so each runbook starts as its own run (its own lock,
budget, approvals and report, linked here; a dry-run maintenance starts them in dry-run):
event-store-slow builds missing indexes after approval, archive-old-events moves old events
(approval above its count), disaster-recovery-drill restores the latest backup into a scratch
database. Capacity planning is read here from Prometheus.
"""

from prefect import flow
from pydantic import Field

from blocks.prometheus import PrometheusServer
from runbooks.params import OptionalBlockName, RunbookParams
from runbooks.report import ends_as_reported, incident_report
from tasks.maintenance import compose, finish
from tasks.maintenance_decisions import Gauge, MaintenanceCheck, MaintenanceSummary

RUNBOOK = "monthly-maintenance"

MONTHLY = [
    MaintenanceCheck(task="Database index optimization", runbook="event-store-slow"),
    MaintenanceCheck(task="Review and archive old events", runbook="archive-old-events"),
    MaintenanceCheck(task="Disaster recovery drill", runbook="disaster-recovery-drill"),
]
CAPACITY = [
    Gauge(
        name="Days until a data disk is full",
        # only disks that fill up: a falling free space, at last week's pace
        query='min(node_filesystem_avail_bytes{mountpoint=~"/var/lib/(postgresql|mysql|kafka|mongodb).*"}'
        ' / -(deriv(node_filesystem_avail_bytes{mountpoint=~"/var/lib/(postgresql|mysql|kafka|mongodb).*"}[7d]) < 0)'
        " / 86400)",
        warn_below=60,
        unit="days",
    ),
    Gauge(
        name="Peak throughput against capacity",
        # the busiest hour of the month against the 100K events/s the platform is built for
        query="max_over_time(sum(rate(events_processed_total[5m]))[30d:1h]) / 100000",
        warn_above=0.7,
        unit="ratio",
    ),
]


class MonthlyMaintenanceParams(RunbookParams):
    """Run form of the monthly maintenance run."""

    runs: list[MaintenanceCheck] = Field(
        default_factory=lambda: list(MONTHLY),
        description="The runbooks started as their own runs, with their parameters.",
    )
    checks: list[MaintenanceCheck] = Field(
        default_factory=list,
        description="Runbooks run here as read-only checks (dry-run), with their parameters.",
    )
    prometheus_block: OptionalBlockName = Field(
        None, description="'Runbooks Prometheus Server' block for capacity planning."
    )
    capacity: list[Gauge] = Field(
        default_factory=lambda: list(CAPACITY), description="Capacity planning: each with its threshold."
    )


@flow(
    name=RUNBOOK,
    description="Monthly maintenance: index optimization, archiving old events and the disaster "
    "recovery drill started as their own runs, capacity planning from Prometheus; one report.",
)
@ends_as_reported
def monthly_maintenance(params: MonthlyMaintenanceParams) -> MaintenanceSummary:
    with incident_report(
        runbook=RUNBOOK, title="Monthly Maintenance", severity="P4", params=params
    ) as report:
        outcomes, problems = compose(
            report,
            params,
            read_only=params.checks,
            changing=params.runs,
            prometheus=PrometheusServer.load(params.prometheus_block) if params.prometheus_block else None,
            gauges=params.capacity,
        )
        finish(report, params, outcomes, problems)
        return MaintenanceSummary(outcomes=outcomes, problems=problems, report=report.to_markdown())
