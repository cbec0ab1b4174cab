"""The incident report artifact: published however the run ends, shaped like the seeds' template."""

from __future__ import annotations

from prefect import flow

from runbooks.errors import Escalation
from runbooks.params import AlertContext, RunbookParams
from runbooks.report import Outcome, incident_report
from runbooks.results import Change, ChangeSet
from tests.conftest import read_incident_report as read_report


@flow
def sample_runbook(params: RunbookParams, fail: bool) -> str:
    with incident_report("sample-runbook", "Sample", "P2", params) as report:
        report.check("brokers reachable", True, "3/3")
        report.check("under-replicated partitions", False, "2 partitions: orders-1, orders-4")
        planned = [Change(action="restart_pod", target="kafka/kafka-1", detail={"password": "x"})]
        report.record(
            "restart broker pod",
            ChangeSet(dry_run=params.dry_run, planned=planned, applied=[] if params.dry_run else planned),
        )
        report.evidence("isr", {"orders-1": [1, 2]})
        if fail:
            raise Escalation("cluster-wide outage: page the infrastructure team")
        report.follow_ups.append("Check disk space on broker nodes")
        report.finish(Outcome.PLANNED if params.dry_run else Outcome.RESOLVED, "Broker restarted; ISR caught up.")
        return "done"


def test_report_of_a_resolved_alert_run() -> None:
    alert = AlertContext(alertname="KafkaBrokerDown", fingerprint="abc123", status="firing")
    state = sample_runbook(RunbookParams(alert=alert), fail=False, return_state=True)
    assert state.is_completed()
    md = read_report(state.state_details.flow_run_id)
    assert "## Incident Report - " in md and "Sample" in md
    assert "| Reported by | alert KafkaBrokerDown (firing, fingerprint abc123) |" in md
    assert "| Mode | LIVE |" in md and "**RESOLVED**" in md
    assert "| under-replicated partitions | FAILING | 2 partitions: orders-1, orders-4 |" in md
    assert "### Actions taken" in md and "| restart broker pod | restart_pod | kafka/kafka-1 | applied |" in md
    assert "### Timeline" in md and "Z - check brokers reachable: OK (3/3)" in md
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
    assert "cluster-wide outage" in state.message
    md = read_report(state.state_details.flow_run_id)
    assert "**ESCALATED**" in md and "Escalated to a human: cluster-wide outage" in md
