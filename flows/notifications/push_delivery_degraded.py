"""Runbook: push notification delivery rate < 99% (P3): delivery and error classes per provider
(FCM, APNs) from Prometheus, the providers' status pages, stale device tokens; prunes stale tokens,
escalates what only a person (or the provider) can fix."""

import psycopg
from prefect import flow
from pydantic import BaseModel, Field

from blocks.postgres import PostgresDatabase
from blocks.prometheus import PrometheusServer
from runbooks.errors import Escalation, VerificationFailed
from runbooks.params import BlockName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.postgres import get_system_identifier
from tasks.prometheus import PrometheusUnavailable, PromQLError, query_prometheus
from tasks.provider_status import StatusPage, read_status_page
from tasks.push_decisions import (
    PageState,
    ProviderDelivery,
    PushDecision,
    PushThresholds,
    ResultClass,
    StatusReading,
    decide_push,
    summarize_delivery,
)
from tasks.push_tokens import (
    PruneResult,
    TokenSurvey,
    TokenTable,
    prune_stale_tokens,
    survey_tokens,
)
from tasks.slo_decisions import WINDOW_PLACEHOLDER, PromDuration

RUNBOOK = "push-delivery-degraded"

# pruning more than a few times a day means the dispatcher does not clean up after itself
PRUNE_BUDGET = Budget(max_actions=3, window_s=86400)
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"

DEFAULT_STATUS_PAGES = [
    StatusPage(
        provider="fcm",
        url="https://status.firebase.google.com/incidents.json",
        component="Cloud Messaging",
    ),
    StatusPage(
        provider="apns",
        url="https://www.apple.com/support/systemstatus/data/developer/system_status_en_US.js",
        component="APNS",
    ),
]


class PushDeliveryDegradedParams(RunbookParams):
    """Run form of the push-delivery-degraded runbook. The query may use `{window}`."""

    prometheus_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Prometheus Server' block."
    )
    db_block: BlockName = Field(
        "default",
        description="Name of the 'Runbooks PostgreSQL Database' block of the device-token table "
        "(its role needs SELECT and DELETE on the table).",
    )
    window: PromDuration = Field("10m", description="Window the delivery rate is measured over.")
    delivery_query: str = Field(
        "sum by (provider, result) (increase(notifications_sent_total[{window}]))",
        min_length=1,
        max_length=2000,
        description="Sends in the window by provider and result (the dispatcher's counter).",
    )
    provider_label: str = Field("provider", pattern=LABEL_NAME, description="Provider label.")
    result_label: str = Field(
        "result",
        pattern=LABEL_NAME,
        description="Result label: success, an FCM error code, an APNs reason or an HTTP status.",
    )
    min_success_rate: float = Field(0.99, gt=0, le=1, description="Delivery target (0.99 = 99%).")
    min_sends: int = Field(
        100, ge=0, le=10**9, description="Judge a provider only over this many sends in the window."
    )
    cause_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="An error class with this share of a provider's failures is a cause.",
    )
    status_pages: list[StatusPage] = Field(
        default_factory=lambda: [p.model_copy() for p in DEFAULT_STATUS_PAGES],
        description="Providers' status pages; an unreachable page counts as unknown, not failing.",
    )
    status_timeout_s: float = Field(5.0, gt=0, le=60, description="Timeout of each status page.")
    tokens: TokenTable = Field(
        default_factory=TokenTable,
        title="Token table",
        description="The device-token table and what makes a token stale.",
    )
    max_stale_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Prune even without 'unregistered' errors above this stale share.",
    )
    batch_size: int = Field(
        1000, ge=1, le=10_000, description="Tokens deleted per statement (its own transaction)."
    )
    approve_over: int = Field(
        10_000, ge=0, le=10**9, description="Deleting more tokens than this needs approval."
    )
    time_budget_s: float = Field(
        300, gt=0, le=3600, description="No batch starts after this; the next run continues."
    )
    verify_timeout_s: float = Field(30, gt=0, le=600, description="How long to wait for the count.")


class PushDeliverySummary(BaseModel):
    """What a push-delivery-degraded run found and did."""

    outcome: Outcome
    deliveries: list[ProviderDelivery]
    status_pages: list[StatusReading]
    tokens: TokenSurvey | None = Field(None, description="None: the table could not be read.")
    decision: PushDecision
    pruned: PruneResult | None = None
    tokens_after: TokenSurvey | None = None
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name=RUNBOOK,
    description="Delivery and error classes per push provider from Prometheus, the providers' "
    "status pages and stale device tokens; prune stale tokens in batches (approval above a count), "
    "escalate provider outages and quota.",
)
@ends_as_reported
def push_delivery_degraded(params: PushDeliveryDegradedParams) -> PushDeliverySummary:
    with incident_report(
        runbook=RUNBOOK, title="Push Notification Delivery Rate Low", severity="P3", params=params
    ) as report:
        prometheus = PrometheusServer.load(params.prometheus_block)
        db = PostgresDatabase.load(params.db_block)
        spec = params.tokens
        deliveries = _read_delivery(report, prometheus, params)
        pages = [read_status_page(page, params.status_timeout_s) for page in params.status_pages]
        for page in pages:
            report.check(
                f"{page.provider} status page",
                page.state is not PageState.DEGRADED,
                f"{page.state.value}: {page.detail} ({page.url})",
            )
        report.evidence("status pages", [p.model_dump(mode="json") for p in pages])
        survey = _survey(report, db, spec)
        decision = decide_push(
            deliveries,
            pages,
            survey.stale if survey else None,
            survey.share if survey else None,
            PushThresholds(
                min_success_rate=params.min_success_rate,
                min_sends=params.min_sends,
                cause_share=params.cause_share,
                max_stale_share=params.max_stale_share,
            ),
        )
        report.step(f"decision: {decision.reason}")
        report.follow_ups.extend(decision.notes)

        def summary(**more) -> PushDeliverySummary:
            return PushDeliverySummary(
                outcome=report.outcome,
                deliveries=deliveries,
                status_pages=pages,
                tokens=survey,
                decision=decision,
                report=report.to_markdown(),
                **more,
            )

        if not decision.prune:
            if decision.escalate:
                _advise(report, decision)
                raise Escalation("; ".join(decision.escalate))
            report.finish(Outcome.NO_ACTION_NEEDED, f"Push delivery is healthy: {decision.reason}.")
            return summary()

        identity = get_system_identifier(db)
        target = Target(
            "token-table",
            f"{db.host}:{db.port}/{db.dbname} {spec.name}",
            f"{identity}/{db.dbname}/{spec.name}",
        )
        with report.guard(target) as guard:
            pruned = guard.act(
                "prune stale tokens",
                lambda dry_run: prune_stale_tokens(
                    db, spec, params.batch_size, params.time_budget_s, dry_run
                ),
                budget=PRUNE_BUDGET,
                approval=lambda plan: _prune_danger(plan, spec, params.approve_over),
            )
            if params.dry_run:
                _advise(report, decision)
                if decision.escalate:
                    raise Escalation("; ".join(decision.escalate))
                report.finish(
                    Outcome.PLANNED,
                    f"Would delete {_rows(pruned)} stale token(s) from {spec.name} "
                    f"({spec.criteria()}).",
                )
                return summary(pruned=pruned)
            verified = guard.verify(
                f"no stale token left in {spec.name}",
                lambda: survey_tokens(db, spec),
                lambda s: s.stale == 0,
                timeout_s=params.verify_timeout_s,
                describe=lambda s: s.describe(spec),
            )
            after = verified.last
            done = (
                f"Deleted {pruned.deleted} stale token(s) from {spec.name} in "
                f"{len(pruned.batches)} batch(es) of at most {params.batch_size}"
            )
            report.follow_ups.append(
                "The delivery rate recovers as the pruned tokens leave the metric's window; make "
                "the dispatcher delete (or mark) a token as soon as the provider answers "
                "'unregistered', so they do not pile up again."
            )
            if not verified.ok:
                raise VerificationFailed(
                    f"{done}, but {after.describe(spec) if after else 'the table could not be read'}"
                )
            if decision.escalate:
                _advise(report, decision)
                raise Escalation(f"{done}; left for a person: " + "; ".join(decision.escalate))
            report.finish(Outcome.RESOLVED, f"{done}; {after.describe(spec)}.")
            return summary(pruned=pruned, tokens_after=after)


def _read_delivery(
    report: IncidentReport, server: PrometheusServer, params: PushDeliveryDegradedParams
) -> list[ProviderDelivery]:
    query = params.delivery_query.replace(WINDOW_PLACEHOLDER, params.window)
    try:
        samples = query_prometheus(server, query)
    except PrometheusUnavailable as exc:
        report.check("Prometheus", False, str(exc))
        raise Escalation(
            f"Prometheus at {server.url} does not answer ({exc}): delivery per provider cannot be "
            "read; check the FCM and APNs dashboards by hand"
        ) from None
    except PromQLError as exc:
        raise Escalation(f"Prometheus refused delivery_query ({exc}): fix the parameter") from None
    deliveries = summarize_delivery(
        [
            (
                s.label(params.provider_label, "unknown"),
                s.label(params.result_label, "unknown"),
                s.value,
            )
            for s in samples
        ]
    )
    report.evidence("delivery query", query)
    report.evidence("delivery", [d.model_dump(mode="json") for d in deliveries])
    for d in deliveries:
        rate = d.success_rate
        report.check(
            f"{d.provider} delivery",
            rate is None or d.sent < params.min_sends or rate >= params.min_success_rate,
            d.describe() + f" (target {params.min_success_rate:.1%})",
        )
    if not deliveries:
        report.check("delivery", False, f"no sends in the last {params.window}")
    return deliveries


def _survey(report: IncidentReport, db: PostgresDatabase, spec: TokenTable) -> TokenSurvey | None:
    try:
        survey = survey_tokens(db, spec)
    except psycopg.Error as exc:
        report.check(
            "device tokens", False, f"{spec.name} not readable: {type(exc).__name__}: {exc}"
        )
        report.follow_ups.append(
            f"Give the block's role SELECT and DELETE on {spec.name} (or fix the table and "
            "column parameters), then run again."
        )
        return None
    report.evidence("device tokens", survey.model_dump(mode="json") | {"share": survey.share})
    report.check("stale device tokens", not survey.stale, survey.describe(spec))
    return survey


def _rows(plan: PruneResult) -> int:
    return sum(int(c.detail.get("rows", 0)) for c in plan.planned)


def _prune_danger(plan: PruneResult, spec: TokenTable, approve_over: int) -> str | None:
    rows = _rows(plan)
    if rows <= approve_over:
        return None
    return (
        f"deletes {rows} device tokens from {spec.name} for good (more than approve_over = "
        f"{approve_over}); a device whose token is wrongly stale gets no push until its app "
        "registers again"
    )


def _advise(report: IncidentReport, decision: PushDecision) -> None:
    classes = {c for causes in decision.causes.values() for c in causes}
    if ResultClass.PROVIDER in classes:
        report.follow_ups.append(
            "Provider outage: watch its status page, keep the dispatcher retrying with backoff; "
            "nothing on our side fixes it."
        )
    if ResultClass.QUOTA in classes:
        report.follow_ups.append(
            "Quota: request a higher FCM quota or spread sends (the dispatcher's rate limit)."
        )
    if ResultClass.OTHER in classes:
        report.follow_ups.append(
            "Check the push dispatcher's logs for the error patterns named above."
        )
