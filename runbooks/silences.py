"""Silence the alert a run is acting on, for as long as it acts (opt-in per deployment).

When a guarded step is about to change something (``Guard.act``, after plan, budget and
approval), the run creates an Alertmanager silence that matches the alert that started it: every
one of the alert's labels as an equality matcher, so it can never match an alert with a different
label set (Alertmanager identifies an alert by its labels). The comment names the runbook, the
run's link and how long the silence may last. The guard expires it when it lets go of the target,
however the run ends (fixed, failed, escalated, suspended for another approval), and that is
before the report notifies anyone: an escalation pages. A run killed mid-way cannot expire it: the
silence ends by itself at ``safety.silence_max_s``.

A silence is a convenience for the person on call, never a condition of acting: Alertmanager not
answering is a line in the report and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from runbooks.params import AlertContext

if TYPE_CHECKING:
    from runbooks.report import IncidentReport

CREATED_BY = "runbooks"


def why_not_silence(alert: AlertContext | None, block: str | None, dry_run: bool) -> str | None:
    """Why this run creates no silence; None when it should create one."""
    if block is None:
        return "silences are off (safety.silence_block is empty)"
    if dry_run:
        return "a dry run changes nothing, so it silences nothing"
    if alert is None or not alert.alertname:
        return "no alert started this run"
    if alert.status != "firing":
        return f"the alert is {alert.status or 'of unknown status'}, not firing"
    if not alert.labels.get("alertname"):
        return "the alert's labels are unknown: a silence could match other alerts"
    return None


def silence_matchers(labels: dict[str, str]) -> list[dict[str, Any]]:
    """Equality matchers on every label of the alert (values are data: sent as JSON strings,
    never as regular expressions)."""
    if not labels.get("alertname"):
        raise ValueError("an alert without an alertname label is not silenced")
    return [
        {"name": name, "value": value, "isRegex": False, "isEqual": True}
        for name, value in sorted(labels.items())
    ]


def silence_comment(runbook: str, run_url: str | None, run_id: str, until: datetime) -> str:
    """What the silence says in Alertmanager's UI: who silenced it, why, until when."""
    link = run_url or f"flow run {run_id}"
    return (
        f"runbook {runbook} is acting on this alert's target: {link} "
        f"(expires when the run ends, at the latest {until:%Y-%m-%d %H:%M} UTC) [run {run_id}]"
    )


@dataclass
class RunSilence:
    """The silence one guarded run holds (at most one at a time)."""

    block: str
    silence_id: str | None = None
    tried: bool = False

    def start(self, report: IncidentReport, run_id: str, run_url: str | None, max_s: float) -> None:
        """Silence the run's alert, once; a failure is reported, never raised."""
        if self.tried:
            return
        self.tried = True
        from blocks.prometheus import AlertmanagerServer
        from tasks.alertmanager import create_silence

        alert = report.params.alert
        assert alert is not None  # why_not_silence said there is one
        until = datetime.now(UTC) + timedelta(seconds=max_s)
        try:
            server = AlertmanagerServer.load(self.block)
            silence = create_silence(
                server,
                silence_matchers(alert.labels),
                until,
                f"{CREATED_BY}/{report.runbook}",
                silence_comment(report.runbook, run_url, run_id, until),
                f"[run {run_id}]",
            )
        except Exception as exc:  # noqa: BLE001 - a silence never stops a fix
            report.step(
                f"could not silence {alert.alertname} in Alertmanager ({self.block}): "
                f"{type(exc).__name__}: {str(exc)[:200]}; acting anyway"
            )
            return
        self.silence_id = silence.id
        report.step(
            f"silenced {alert.alertname} in Alertmanager while acting (silence {silence.id}, "
            f"until {silence.ends_at} at the latest)"
        )

    def end(self, report: IncidentReport) -> None:
        """Expire the silence now (before any escalation pages); a failure is reported."""
        if self.silence_id is None:
            return
        from blocks.prometheus import AlertmanagerServer
        from tasks.alertmanager import expire_silence

        silence_id, self.silence_id = self.silence_id, None
        try:
            expire_silence(AlertmanagerServer.load(self.block), silence_id)
        except Exception as exc:  # noqa: BLE001 - the silence still ends by itself
            report.step(
                f"could not expire silence {silence_id}: {type(exc).__name__}: "
                f"{str(exc)[:200]}; it ends by itself at its end time"
            )
            return
        report.step(f"silence {silence_id} expired: the alert notifies again")
