"""When a run silences its alert, and what the silence matches (runbooks.silences)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from runbooks.params import AlertContext, SafetyParams
from runbooks.silences import silence_comment, silence_matchers, why_not_silence

FIRING = AlertContext(alertname="A", status="firing", labels={"alertname": "A", "instance": "x"})

WHY_NOT_CASES = [
    # alert, block, dry_run, reason (None: silence)
    (FIRING, "am", False, None),
    (FIRING, None, False, "silences are off (safety.silence_block is empty)"),
    (FIRING, "am", True, "a dry run changes nothing, so it silences nothing"),
    (None, "am", False, "no alert started this run"),
    (AlertContext(status="firing"), "am", False, "no alert started this run"),
    (FIRING.model_copy(update={"status": "resolved"}), "am", False,
     "the alert is resolved, not firing"),
    (FIRING.model_copy(update={"status": None}), "am", False,
     "the alert is of unknown status, not firing"),
    # a run started by hand with an alert name but no labels: a silence would be too broad
    (AlertContext(alertname="A", status="firing"), "am", False,
     "the alert's labels are unknown: a silence could match other alerts"),
]  # fmt: skip


@pytest.mark.parametrize(("alert", "block", "dry_run", "reason"), WHY_NOT_CASES)
def test_why_not_silence(
    alert: AlertContext | None, block: str | None, dry_run: bool, reason: str | None
) -> None:
    assert why_not_silence(alert, block, dry_run) == reason


MATCHER_CASES = [
    ({"alertname": "A"}, [("alertname", "A")]),
    # every label, sorted; regex-looking values stay literal
    ({"instance": ".*", "alertname": "A", "job": "pg|redis"},
     [("alertname", "A"), ("instance", ".*"), ("job", "pg|redis")]),
    ({"alertname": "A", "note": '"} or vector(1)'}, [("alertname", "A"), ("note", '"} or vector(1)')]),
]  # fmt: skip


@pytest.mark.parametrize(("labels", "expected"), MATCHER_CASES)
def test_silence_matchers_are_every_label_literally(
    labels: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    matchers = silence_matchers(labels)
    assert [(m["name"], m["value"]) for m in matchers] == expected
    assert all(m["isRegex"] is False and m["isEqual"] is True for m in matchers)


@pytest.mark.parametrize("labels", [{}, {"instance": "x"}, {"alertname": ""}])
def test_an_alert_without_a_name_is_never_silenced(labels: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="alertname"):
        silence_matchers(labels)


def test_the_comment_names_runbook_run_and_end() -> None:
    until = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    text = silence_comment("redis-degraded", "http://ui/runs/flow-run/r1", "r1", until)
    assert text == (
        "runbook redis-degraded is acting on this alert's target: http://ui/runs/flow-run/r1 "
        "(expires when the run ends, at the latest 2026-12-01 09:30 UTC) [run r1]"
    )
    assert "flow run r1" in silence_comment("x", None, "r1", until)


@pytest.mark.parametrize(("value", "ok"), [(5, True), (86400, True), (4, False), (86401, False)])
def test_a_silence_is_bounded(value: int, ok: bool) -> None:
    if ok:
        assert SafetyParams(silence_max_s=value).silence_max_s == value
    else:
        with pytest.raises(ValueError, match="silence_max_s"):
            SafetyParams(silence_max_s=value)
