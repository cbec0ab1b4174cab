"""The incident report artifact: published however the run ends, shaped like the seeds' template;
how a run ends (escalation without a traceback, a dry-run that never pages) read back from the
Prefect API and a local Slack stand-in."""

from __future__ import annotations

import logging
import re
import time

import pytest
from prefect import flow, tags

from blocks.escalation import EscalationPolicy
from runbooks.errors import Escalation
from runbooks.params import AlertContext, RunbookParams, SafetyParams
from runbooks.report import Outcome, ends_as_reported, incident_report
from runbooks.results import Change, ChangeSet
from tests.conftest import read_flow_run, read_run_logs, unique
from tests.conftest import read_incident_report as read_report
from tests.receivers import HttpReceiver, save_slack_standin

REASON = "cluster-wide outage: page the infrastructure team"


@flow
@ends_as_reported
def sample_runbook(params: RunbookParams, fail: bool, crash: bool = False) -> str:
    with incident_report("sample-runbook", "Sample", "P2", params) as report:
        report.check("brokers reachable", True, "3/3")
        report.check("under-replicated partitions", False, "2 partitions: orders-1, orders-4")
        planned = [
            Change(
                action="restart_pod", target="kafka/kafka-1", detail={"password": "hunter2-secret"}
            )
        ]
        report.record(
            "restart broker pod",
            ChangeSet(
                dry_run=params.dry_run, planned=planned, applied=[] if params.dry_run else planned
            ),
        )
        report.evidence("isr", {"orders-1": [1, 2]})
        if crash:
            raise ValueError("a bug in the runbook")
        if fail:
            raise Escalation(REASON)
        report.follow_ups.append("Check disk space on broker nodes")
        report.finish(
            Outcome.PLANNED if params.dry_run else Outcome.RESOLVED,
            "Broker restarted; ISR caught up.",
        )
        return "done"


@flow
@ends_as_reported
def escalates_before_acting(params: RunbookParams) -> None:
    with incident_report("sample-runbook", "Sample", "P2", params):
        raise Escalation(REASON)


def test_report_of_a_resolved_alert_run() -> None:
    alert = AlertContext(alertname="KafkaBrokerDown", fingerprint="abc123", status="firing")
    state = sample_runbook(RunbookParams(alert=alert), fail=False, return_state=True)
    assert state.is_completed()
    md = read_report(state.state_details.flow_run_id)
    assert "## Incident Report - " in md and "Sample" in md
    assert "| Field | Value |\n|---|---|\n| Runbook | `sample-runbook` |" in md
    assert "| Reported by | alert KafkaBrokerDown (firing, fingerprint abc123) |" in md
    assert "| Mode | LIVE |" in md and "**RESOLVED**" in md
    assert "| under-replicated partitions | FAILING | 2 partitions: orders-1, orders-4 |" in md
    assert "### Actions taken" in md
    assert (
        "| restart broker pod | restart_pod | 1 | kafka/kafka-1 | applied "
        "| `password=**********` → `password=**********` |" in md
    )
    assert "hunter2-secret" not in md
    assert "### Timeline" in md and "Z - check brokers reachable: OK (3/3)" in md
    # sub-second timeline: steps of a fast run are milliseconds apart
    stamps = re.findall(r"^- (\d\d:\d\d:\d\d\.\d{3})Z - ", md, re.M)
    assert len(stamps) >= 4 and len(set(stamps)) > 1, stamps
    assert '"orders-1"' in md and "1. [ ] Check disk space on broker nodes" in md


def test_report_of_a_dry_run_says_nothing_changed() -> None:
    state = sample_runbook(RunbookParams(dry_run=True), fail=False, return_state=True)
    md = read_report(state.state_details.flow_run_id)
    assert "| Mode | DRY-RUN (nothing changed) |" in md
    assert "### Actions planned (dry-run)" in md and "| planned (dry-run) |" in md
    assert "| Reported by | direct call |" in md


def test_report_is_published_when_the_run_escalates() -> None:
    state = sample_runbook(RunbookParams(), fail=True, return_state=True)
    assert state.is_failed()
    assert REASON in state.message
    md = read_report(state.state_details.flow_run_id)
    assert "**ESCALATED**" in md and f"Escalated to a human: {REASON}" in md


def test_an_escalation_before_acting_says_nothing_was_changed() -> None:
    state = escalates_before_acting(RunbookParams(), return_state=True)
    assert state.is_failed()
    md = read_report(state.state_details.flow_run_id)
    assert "### Actions taken\nNothing was changed: escalated before acting." in md
    assert "No change was needed or made." not in md


def test_an_escalation_is_one_log_line_and_a_bug_keeps_its_traceback() -> None:
    quiet = RunbookParams(safety=SafetyParams(escalation_block=None))
    state = sample_runbook(quiet, fail=True, return_state=True)
    assert state.is_failed() and state.message == f"Escalated to a human: {REASON}"
    logs = read_run_logs(state.state_details.flow_run_id)
    loud = [log for log in logs if log["level"] >= logging.WARNING]
    assert [(log["level"], log["message"]) for log in loud] == [
        (logging.ERROR, f"outcome ESCALATED: Escalated to a human: {REASON}")
    ]
    assert not any("Traceback" in log["message"] for log in logs)

    crashed = sample_runbook(quiet, fail=False, crash=True, return_state=True)
    assert crashed.is_failed()
    logs = read_run_logs(crashed.state_details.flow_run_id)
    [trace] = [log for log in logs if "Encountered exception during execution" in log["message"]]
    assert trace["level"] == logging.ERROR
    assert (
        "Traceback" in trace["message"] and "ValueError: a bug in the runbook" in trace["message"]
    )
    assert "test_incident_report.py" in trace["message"]


@pytest.fixture
def observe_channel() -> HttpReceiver:
    with HttpReceiver() as receiver:
        yield receiver


def policy_with(paging: HttpReceiver, observe: HttpReceiver | None = None) -> str:
    name = unique("oncall")
    EscalationPolicy(
        notification_blocks=[save_slack_standin(paging)],
        observe_notification_blocks=[save_slack_standin(observe)] if observe else [],
    ).save(name)
    return name


def test_a_dry_run_that_would_escalate_pages_nobody_and_completes(slack: HttpReceiver) -> None:
    policy = policy_with(slack)
    safety = SafetyParams(escalation_block=policy)

    dry = sample_runbook(RunbookParams(dry_run=True, safety=safety), fail=True, return_state=True)

    assert dry.is_completed(), dry.message
    assert dry.message == f"Would escalate to a human: {REASON} (dry-run: nobody was paged)"
    md = read_report(dry.state_details.flow_run_id)
    assert "| Outcome | **DRY-RUN: WOULD ESCALATE** |" in md
    assert f"policy {policy!r} has no observe channel" in md
    run = read_flow_run(dry.state_details.flow_run_id)
    assert "dry-run" in run["tags"] and run["name"].startswith("dry-run: ")
    time.sleep(1)  # a page would have arrived by now
    assert slack.requests == []

    # the same input, live: pages and fails
    live = sample_runbook(RunbookParams(safety=safety), fail=True, return_state=True)
    assert live.is_failed()
    [page] = slack.wait_for(1)
    assert REASON in page.json()["text"] and "[dry-run]" not in page.json()["text"]
    run = read_flow_run(live.state_details.flow_run_id)
    assert "dry-run" not in run["tags"] and not run["name"].startswith("dry-run: ")


def test_findings_of_an_observe_run_go_to_the_observe_channel_only(
    slack: HttpReceiver, observe_channel: HttpReceiver
) -> None:
    policy = policy_with(slack, observe_channel)

    with tags("observe"):
        state = sample_runbook(
            RunbookParams(safety=SafetyParams(escalation_block=policy)),
            fail=True,
            return_state=True,
        )

    assert state.is_completed(), state.message
    [finding] = observe_channel.wait_for(1)
    text = finding.json()["text"]
    assert text.startswith("*[P2] [dry-run] sample-runbook would have escalated*")
    assert REASON in text and "nobody was paged" in text
    run = read_flow_run(state.state_details.flow_run_id)
    assert {"observe", "dry-run"} <= set(run["tags"]) and run["name"].startswith("observe: ")
    md = read_report(state.state_details.flow_run_id)
    assert "OBSERVE" in md and "observe:custom-webhook/" in md and "delivered" in md
    time.sleep(1)
    assert slack.requests == []


@flow
@ends_as_reported
def minor_runbook(params: RunbookParams) -> None:
    with incident_report("sample-runbook", "Sample", "P3", params):
        raise Escalation(REASON)


def test_the_report_shows_the_severitys_response_target_and_whether_it_was_met() -> None:
    from datetime import UTC, datetime, timedelta

    started = (datetime.now(UTC) - timedelta(minutes=20)).isoformat().replace("+00:00", "Z")
    late = AlertContext(alertname="KafkaBrokerDown", severity="warning", starts_at=started)
    state = sample_runbook(RunbookParams(alert=late), fail=False, return_state=True)
    md = read_report(state.state_details.flow_run_id)
    # a warning does not lower the runbook's P2; 20 minutes is past P2's 15
    assert "| Severity | P2 (major degradation) |" in md
    assert "| Response target | page on-call now, respond within 15 min: missed: done 20 min after" in md

    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    critical = AlertContext(alertname="KafkaBrokerDown", severity="critical", starts_at=now)
    state = sample_runbook(RunbookParams(alert=critical), fail=True, return_state=True)
    md = read_report(state.state_details.flow_run_id)
    assert "| Severity | P1 (complete outage); raised from the runbook's P2 by the alert's" in md
    assert "respond within 5 min: met so far: handed to a person " in md and "must respond by" in md


def test_a_ticket_severity_goes_to_the_ticket_channel_and_never_pages(
    slack: HttpReceiver, observe_channel: HttpReceiver
) -> None:
    name = unique("oncall")
    EscalationPolicy(
        notification_blocks=[save_slack_standin(slack)],
        ticket_notification_blocks=[save_slack_standin(observe_channel)],
    ).save(name)
    params = RunbookParams(safety=SafetyParams(escalation_block=name))

    state = minor_runbook(params, return_state=True)

    assert state.is_failed()
    [ticket] = observe_channel.wait_for(1)
    text = ticket.json()["text"]
    assert "[P3] sample-runbook escalated" in text
    assert "Severity: P3 (ticket for the team, respond within 1 h)" in text
    md = read_report(state.state_details.flow_run_id)
    assert "ticket:custom-webhook/" in md and "delivered" in md
    # a P2 run of the same policy pages
    sample_runbook(params, fail=True, return_state=True)
    [page] = slack.wait_for(1)
    assert "[P2] sample-runbook escalated" in page.json()["text"]
    assert len(observe_channel.requests) == 1
