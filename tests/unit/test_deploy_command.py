"""`runbooks deploy` / `runbooks worker`: the zombie-run automation, the pull step, bad input."""

from __future__ import annotations

from datetime import timedelta

import pytest

from serving.cli import main
from serving.deploy_command import WorkingDirectory, zombie_automation


def test_zombie_automation_crashes_after_three_missed_heartbeats() -> None:
    automation = zombie_automation(30)
    trigger = automation.trigger
    assert trigger.posture == "Proactive"
    assert trigger.within == timedelta(seconds=90)
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.for_each == {"prefect.resource.id"}
    # a run that pauses or suspends for approval sends no heartbeats: that ends the wait too
    assert {"prefect.flow-run.Suspended", "prefect.flow-run.Paused"} <= trigger.expect
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    [action] = automation.actions
    assert action.type == "change-flow-run-state" and action.state == "CRASHED"


def test_pull_step_only_changes_into_the_checkout() -> None:
    assert WorkingDirectory("/srv/runbooks").to_pull_step() == {
        "prefect.deployments.steps.set_working_directory": {"directory": "/srv/runbooks"}
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deploy", "--api-url", "http://x/api", "--heartbeat-seconds", "10"], "at least 30"),
        (["worker", "--api-url", "http://x/api", "--heartbeat-seconds", "5"], "at least 30"),
        (["deploy", "--api-url", "http://x/api", "--directory", "srv/runbooks"], "absolute path"),
    ],
)
def test_bad_input_is_refused_before_anything_is_contacted(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_no_api_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit, match="--api-url or set PREFECT_API_URL"):
        main(["deploy", "--api-url", ""])
