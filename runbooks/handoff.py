"""Hand a finding to the runbook that fixes it: start that runbook's deployment as its own run.

A diagnosing runbook (kafka-consumer-lag-high) finds what another runbook acts on
(consumers-too-slow). The other runbook runs as its own deployment run, so it keeps its own lock,
budget, approvals and report; the diagnosing run links to it. It carries the alert, the mode
(dry-run) and the safety settings over, so a dry-run never hands off to a live run.
"""

from __future__ import annotations

from typing import Any

from prefect.deployments import run_deployment
from prefect.settings import PREFECT_UI_URL

from runbooks.params import RunbookParams


def hand_off(runbook: str, parent: RunbookParams, params: dict[str, Any]) -> str:
    """Start deployment ``runbook`` (flow and deployment share the name); returns its run's link."""
    carried = {
        "alert": parent.alert.model_dump(mode="json") if parent.alert else None,
        "dry_run": parent.dry_run,
        "safety": parent.safety.model_dump(mode="json"),
    }
    run = run_deployment(
        f"{runbook}/{runbook}",
        parameters={"params": {**carried, **params}},
        timeout=0,  # started, not awaited: it takes its own lock and may wait for approval
        as_subflow=True,  # shown under this run in the UI
        tags=["handed-off"],
    )
    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{run.id}" if base else f"flow run {run.id}"
