"""Running a maintenance run's parts: the read-only checks of other runbooks as subflows (forced
to dry-run), the changing runbooks the seed's monthly list names as their own runs, and the
gauges and trends read from Prometheus."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import ValidationError

from blocks.prometheus import PrometheusServer
from runbooks.escalation import flow_run_url
from runbooks.handoff import hand_off
from runbooks.params import RunbookParams
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
    report_summary,
)
from tasks.prometheus import measure


def _spec(name: str) -> Any:
    from deployments.catalog import load_catalog

    for spec in load_catalog():
        if spec.name == name:
            return spec
    return None


def _link(flow_run_id: object) -> str:
    return flow_run_url(str(flow_run_id)) or f"flow run {flow_run_id}"


def run_read_only(check: MaintenanceCheck, parent: RunbookParams) -> CheckOutcome:
    """Run ``check``'s runbook here, as a subflow of the maintenance run, in dry-run: it runs
    every check of its own and changes nothing. Its report is its own (linked)."""
    from deployments.catalog import load_flow

    spec = _spec(check.runbook)
    if spec is None:
        return CheckOutcome(
            task=check.task, runbook=check.runbook, status=CheckStatus.FAILED,
            summary="no such runbook in prefect.yaml",
        )
    flow = load_flow(spec)
    model = typing.get_type_hints(flow.fn)["params"]
    try:
        params = model.model_validate(
            {
                **check.parameters,
                "dry_run": True,
                "safety": parent.safety.model_dump(mode="json"),
            }
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return CheckOutcome(
            task=check.task, runbook=check.runbook, status=CheckStatus.FAILED,
            summary=f"its parameters are not valid: {problems}"[:400],
        )
    state = flow(params, return_state=True)
    status = classify_check(state.is_completed(), state.message, WOULD_ESCALATE)
    summary = state.message or ""
    if status is CheckStatus.OK:
        result = state.result(raise_on_failure=False)
        summary = report_summary(getattr(result, "report", "") or "") or summary or "completed"
    return CheckOutcome(
        task=check.task, runbook=check.runbook, status=status,
        summary=summary.removeprefix(WOULD_ESCALATE)[:500],
        run=_link(state.state_details.flow_run_id),
    )


def start_changing(check: MaintenanceCheck, parent: RunbookParams) -> CheckOutcome:
    """Start ``check``'s runbook as its own deployment run (its own lock, budget, approvals and
    report; dry-run carried over): the changes the seed's monthly list names."""
    if _spec(check.runbook) is None:
        return CheckOutcome(
            task=check.task, runbook=check.runbook, status=CheckStatus.FAILED,
            summary="no such runbook in prefect.yaml",
        )
    link = hand_off(check.runbook, parent, check.parameters)
    mode = "dry-run" if parent.dry_run else "live"
    return CheckOutcome(
        task=check.task, runbook=check.runbook, status=CheckStatus.STARTED,
        summary=f"started as its own run ({mode}); it reports, asks for approval and escalates by itself",
        run=link,
    )


def read_gauges(server: PrometheusServer, gauges: list[Gauge]) -> list[tuple[bool | None, str]]:
    out = []
    for gauge in gauges:
        m = measure(server, gauge.query)
        ok, words = judge_gauge(gauge, m.value)
        out.append((ok, words if m.value is not None else f"{words} ({m.problem})"))
    return out


def read_trends(
    server: PrometheusServer, trends: list[Trend], window: str
) -> list[tuple[bool | None, str]]:
    return [
        judge_trend(t, measure(server, t.now(window)).value, measure(server, t.before(window)).value)
        for t in trends
    ]


def compose(
    report: Any,
    params: RunbookParams,
    *,
    read_only: list[MaintenanceCheck],
    changing: list[MaintenanceCheck] = (),
    prometheus: PrometheusServer | None = None,
    gauges: list[Gauge] = (),
    trends: list[Trend] = (),
    trend_window: str = "1w",
    extra: list[tuple[bool | None, str]] = (),
) -> tuple[list[CheckOutcome], list[str]]:
    """Run a maintenance run's parts in order and record each in ``report``; returns the checks'
    outcomes and the problems a person should look at (empty: a clean run)."""
    from prefect.artifacts import create_table_artifact

    from runbooks.text import artifact_key
    from tasks.maintenance_decisions import maintenance_problems
    from tasks.prometheus import PrometheusUnavailable

    outcomes: list[CheckOutcome] = []
    for check in read_only:
        outcome = run_read_only(check, params)
        outcomes.append(outcome)
        report.check(check.task, outcome.status is CheckStatus.OK, outcome.line())
    for check in changing:
        outcome = start_changing(check, params)
        outcomes.append(outcome)
        report.check(check.task, outcome.status is CheckStatus.STARTED, outcome.line())
    read_gauges_, read_trends_ = list(extra), []
    if prometheus is not None and (gauges or trends):
        try:
            read_gauges_ += read_gauges(prometheus, list(gauges))
            read_trends_ = read_trends(prometheus, list(trends), trend_window)
        except PrometheusUnavailable as exc:
            read_gauges_.append((False, f"Prometheus does not answer: {exc}"))
    elif gauges or trends:
        read_gauges_.append((None, "gauges and trends not read: no prometheus_block given"))
    for ok, words in read_gauges_ + read_trends_:
        report.check(words.split(":", 1)[0], ok is not False, words)
    create_table_artifact(
        table=[
            {"Task": o.task, "Runbook": o.runbook, "Status": o.status.value, "Summary": o.summary,
             "Run": o.run or "-"}
            for o in outcomes
        ]
        + [{"Task": w.split(":", 1)[0], "Runbook": "-",
            "Status": {True: "OK", False: "WARN", None: "NO DATA"}[ok], "Summary": w, "Run": "-"}
           for ok, w in read_gauges_ + read_trends_],
        key=artifact_key(f"maintenance-{report.runbook}"),
        description=f"{report.title}: every task, its status and its run",
    )
    return outcomes, maintenance_problems(outcomes, read_gauges_, read_trends_)


def finish(report: Any, params: RunbookParams, outcomes: list[CheckOutcome], problems: list[str]) -> None:
    """End the maintenance run: clean, or escalated with what a person should look at (at the
    run's severity, a ticket)."""
    from runbooks.errors import Escalation
    from runbooks.report import Outcome

    started = [o for o in outcomes if o.status is CheckStatus.STARTED]
    done = sum(o.status is CheckStatus.OK for o in outcomes)
    tail = f"; {len(started)} changing runbook(s) started as their own runs" if started else ""
    if problems:
        report.follow_ups += problems
        raise Escalation(
            f"{len(problems)} maintenance finding(s): " + "; ".join(problems)[:1500]
        )
    report.finish(
        Outcome.NO_ACTION_NEEDED,
        f"Every task passed: {done} check(s) clean{tail}.",
    )
