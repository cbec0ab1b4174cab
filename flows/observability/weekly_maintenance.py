"""Runbook ``weekly-maintenance`` (seed 003 "Routine Maintenance", weekly): review performance
trends (this week against the last), analyze failed events and their patterns, check the disk
usage of the databases and Kafka; one report.

Read-only: the failed-events analysis is dlq-growing's triage in dry-run, run here as a subflow.
"""

from prefect import flow
from pydantic import Field

from blocks.postgres import PostgresDatabase
from blocks.prometheus import PrometheusServer
from runbooks.params import OptionalBlockName, RunbookParams
from runbooks.report import ends_as_reported, incident_report
from tasks.maintenance import compose, finish
from tasks.maintenance_decisions import Gauge, MaintenanceCheck, MaintenanceSummary, Trend, show
from tasks.postgres import database_sizes
from tasks.slo_decisions import PromDuration

RUNBOOK = "weekly-maintenance"

WEEKLY = [
    MaintenanceCheck(
        task="Analyze failed events and patterns",
        runbook="dlq-growing",
        parameters={"dlq_topic": "match-events-dlq", "newest": 1000},
    ),
]
TRENDS = [
    Trend(
        name="Latency (P99)",
        query="histogram_quantile(0.99, sum by (le) "
        "(rate(event_e2e_latency_seconds_bucket[{window}]{offset})))",
        better="lower",
        unit="seconds",
    ),
    Trend(
        name="Error rate",
        query='sum(rate(http_requests_total{status=~"5.."}[{window}]{offset})) '
        "/ sum(rate(http_requests_total[{window}]{offset}))",
        better="lower",
        unit="ratio",
        tolerance=0.5,
    ),
    Trend(
        name="Throughput",
        query="sum(rate(events_processed_total[{window}]{offset}))",
        better="higher",
        unit="per_second",
    ),
]
DISK = [
    Gauge(
        name="Database disk used",
        query='max(1 - node_filesystem_avail_bytes{mountpoint=~"/var/lib/(postgresql|mysql|mongodb).*"}'
        ' / node_filesystem_size_bytes{mountpoint=~"/var/lib/(postgresql|mysql|mongodb).*"})',
        warn_above=0.8,
        unit="ratio",
    ),
    Gauge(
        name="Kafka disk used",
        query='max(1 - node_filesystem_avail_bytes{mountpoint=~"/var/lib/kafka.*"}'
        ' / node_filesystem_size_bytes{mountpoint=~"/var/lib/kafka.*"})',
        warn_above=0.8,
        unit="ratio",
    ),
]


class WeeklyMaintenanceParams(RunbookParams):
    """Run form of the weekly maintenance run."""

    checks: list[MaintenanceCheck] = Field(
        default_factory=lambda: list(WEEKLY),
        description="The runbooks run as read-only checks (dry-run), with their parameters.",
    )
    prometheus_block: OptionalBlockName = Field(
        None, description="'Runbooks Prometheus Server' block for trends and disk usage."
    )
    trends: list[Trend] = Field(
        default_factory=lambda: list(TRENDS),
        description="Compared with the window before: {window} is the range, {offset} follows it.",
    )
    trend_window: PromDuration = Field("1w", description="This week (and, before it, the last).")
    disk: list[Gauge] = Field(
        default_factory=lambda: list(DISK), description="Disk use of the databases and Kafka."
    )
    database_block: OptionalBlockName = Field(
        None, description="'Runbooks Postgres Database' block: the size of each database."
    )
    database_size_warn_bytes: int = Field(
        100 * 2**30, gt=0, description="A database larger than this is reported."
    )


@flow(
    name=RUNBOOK,
    description="Weekly maintenance: performance trends week over week, failed events and their "
    "patterns, disk usage of the databases and Kafka; one report.",
)
@ends_as_reported
def weekly_maintenance(params: WeeklyMaintenanceParams) -> MaintenanceSummary:
    with incident_report(
        runbook=RUNBOOK, title="Weekly Maintenance", severity="P4", params=params
    ) as report:
        outcomes, problems = compose(
            report,
            params,
            read_only=params.checks,
            prometheus=PrometheusServer.load(params.prometheus_block) if params.prometheus_block else None,
            gauges=params.disk,
            trends=params.trends,
            trend_window=params.trend_window,
            extra=_database_sizes(params),
        )
        finish(report, params, outcomes, problems)
        return MaintenanceSummary(outcomes=outcomes, problems=problems, report=report.to_markdown())


def _database_sizes(params: WeeklyMaintenanceParams) -> list[tuple[bool | None, str]]:
    if not params.database_block:
        return [(None, "Database sizes: not read (no database_block given)")]
    sizes = database_sizes(PostgresDatabase.load(params.database_block))
    large = {n: s for n, s in sizes.items() if s > params.database_size_warn_bytes}
    listed = ", ".join(f"{n} {show('bytes', s)}" for n, s in list(sizes.items())[:8])
    if large:
        return [(False, f"Database sizes: {', '.join(large)} over {show('bytes', params.database_size_warn_bytes)} ({listed})")]
    return [(True, f"Database sizes: {listed}")]
