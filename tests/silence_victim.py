"""Crash-test victim: a guarded run that silences its alert, then dies by SIGKILL while acting.

Run by tests/integration/test_silences.py as
``python -m tests.silence_victim ALERTMANAGER_BLOCK LABELS_JSON SILENCE_MAX_S`` with
PREFECT_API_URL set to the test server. The step it takes is the guard's own path (plan, then
silence, then act); the act kills the process, so no ``finally`` runs and the silence is left to
end by itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from prefect import flow

from runbooks.params import AlertContext, RunbookParams, SafetyParams
from runbooks.report import incident_report
from runbooks.results import Change, ChangeSet
from runbooks.safety import Target


def _die(dry_run: bool) -> ChangeSet:
    change = Change(action="restart", target="victim")
    if dry_run:
        return ChangeSet(dry_run=True, planned=[change])
    print("acting", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


@flow(name="silence-victim")
def silence_victim(params: RunbookParams) -> None:
    with incident_report("silence-victim", "Silence victim", "P3", params) as report:
        with report.guard(Target("victim", f"victim-{os.getpid()}")) as guard:
            guard.act("restart the victim", _die)


def main(block: str, labels: str, max_s: str) -> None:
    alert_labels = json.loads(labels)
    silence_victim(
        RunbookParams(
            alert=AlertContext(
                alertname=alert_labels["alertname"],
                status="firing",
                labels=alert_labels,
            ),
            safety=SafetyParams(
                silence_block=block, silence_max_s=int(max_s), escalation_block=None
            ),
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.exit("the victim was not killed")
