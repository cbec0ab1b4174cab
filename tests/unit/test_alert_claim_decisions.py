"""One run per alert event and automation: who claims, who stops, who takes over a crashed claim."""

from datetime import UTC, date, datetime
from uuid import UUID, uuid4

import pytest
from prefect.client.schemas.objects import StateType

from runbooks.alert_claims import (
    ClaimRecord,
    Verdict,
    automation_scope,
    claim_day,
    claim_name,
    expired,
    holder_state_text,
    judge_claim,
)
from runbooks.params import AlertContext

NOW = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
ME = uuid4()
OTHER = uuid4()


def record(run: UUID, attempt: int = 1) -> ClaimRecord:
    return ClaimRecord(flow_run_id=run, claimed_at=NOW, attempt=attempt)


JUDGE_CASES = [
    # (latest claim, its run's state, its run found, expected verdict, expected attempt)
    (None, None, True, Verdict.FIRST, 1),
    (record(ME), StateType.RUNNING, True, Verdict.OWN, 1),  # resumed after approval / retried
    (record(ME, 2), StateType.RUNNING, True, Verdict.OWN, 2),
    (record(OTHER), StateType.PENDING, True, Verdict.DUPLICATE, 1),  # the redelivery, 0.6 s later
    (record(OTHER), StateType.RUNNING, True, Verdict.DUPLICATE, 1),
    (record(OTHER), StateType.PAUSED, True, Verdict.DUPLICATE, 1),  # waits for a human
    (record(OTHER), StateType.COMPLETED, True, Verdict.DUPLICATE, 1),
    # it decided (escalated, or a person cancelled it): a redelivery does not undo that
    (record(OTHER), StateType.FAILED, True, Verdict.DUPLICATE, 1),
    (record(OTHER), StateType.CANCELLED, True, Verdict.DUPLICATE, 1),
    (record(OTHER), None, True, Verdict.DUPLICATE, 1),  # created, no state yet
    # died before finishing: the next firing acts
    (record(OTHER), StateType.CRASHED, True, Verdict.TAKE_OVER, 2),
    (record(OTHER), None, False, Verdict.TAKE_OVER, 2),  # run deleted
    (record(OTHER, 2), StateType.CRASHED, True, Verdict.TAKE_OVER, 3),
    (record(OTHER, 3), StateType.CRASHED, True, Verdict.EXHAUSTED, 3),  # crash loop: a human
    (record(OTHER, 3), StateType.COMPLETED, True, Verdict.DUPLICATE, 3),
]


@pytest.mark.parametrize("latest,state,found,verdict,attempt", JUDGE_CASES)
def test_judge_claim(latest, state, found, verdict, attempt):
    decision = judge_claim(ME, latest, state, found, max_attempts=3)
    assert (decision.verdict, decision.attempt) == (verdict, attempt)


AUTOMATION = "09750d2e-1b7a-4f0c-8c39-6a3f2d1e0b99"
INVOCATION = "01a23419-7c1d-4e5f-9a8b-3c2d1e0f4a5b"
SCOPE_CASES = [
    (f"automation {AUTOMATION}, action 0, invocation {INVOCATION}", "09750d2e1b7aa0"),
    (f"automation {AUTOMATION}, action 12, invocation {INVOCATION}", "09750d2e1b7aa12"),
    (None, None),  # a manual run from the UI
    ("", None),
    ("scheduled 5f0c... 2026-12-02", None),  # a schedule's key
    (f"automation {AUTOMATION}, action 0", None),  # not Prefect's shape: nothing assumed
    (f"automation ../../x, action 0, invocation {INVOCATION}", None),
]


@pytest.mark.parametrize("key,scope", SCOPE_CASES)
def test_automation_scope(key, scope):
    assert automation_scope(key) == scope


def test_claim_names_sort_by_day_and_fit_prefect():
    event = UUID("5b0f4a43-8d2e-4c1c-9a55-2f0e0c7a1e13")
    name = claim_name(date(2026, 12, 2), event, "09750d2e1b7aa0", 3)
    assert name == "runbooks_alert_20261202_5b0f4a438d2e4c1c9a552f0e0c7a1e13_09750d2e1b7aa0_3"
    # Prefect's variable names: letters, digits, dashes and underscores, at most 255
    assert len(name) <= 255 and name.replace("_", "").isalnum()
    assert claim_day(name) == date(2026, 12, 2)
    older = claim_name(date(2026, 11, 30), event, "ffffffffffffa9", 1)
    assert sorted([name, older]) == [older, name]


EXPIRY_CASES = [
    # (names, today, expired)
    (
        ["runbooks_alert_20261124_x", "runbooks_alert_20261125_x"],
        date(2026, 12, 2),
        ["runbooks_alert_20261124_x"],
    ),
    (["runbooks_alert_20261201_x"], date(2026, 12, 2), []),
    (["runbooks_alert_2026xx01_x", "runbooks_lock_x", "other"], date(2027, 1, 1), []),  # not claims
    ([], date(2026, 12, 2), []),
]


@pytest.mark.parametrize("names,today,gone", EXPIRY_CASES)
def test_expired_claims(names, today, gone):
    assert expired(names, today, retention_days=7) == gone


PARAM_CASES = [
    # what the trigger template renders -> what the run gets
    (
        {"event_id": "5b0f4a43-8d2e-4c1c-9a55-2f0e0c7a1e13"},
        UUID("5b0f4a43-8d2e-4c1c-9a55-2f0e0c7a1e13"),
        None,
    ),
    ({"event_id": "None", "event_occurred": "None"}, None, None),  # rendered from nothing
    ({"event_id": "", "event_occurred": ""}, None, None),
    ({}, None, None),  # a manual run
    (
        {"event_occurred": "2026-12-02T03:00:00.5+00:00"},
        None,
        datetime(2026, 12, 2, 3, 0, 0, 500000, tzinfo=UTC),
    ),
]


@pytest.mark.parametrize("rendered,event_id,occurred", PARAM_CASES)
def test_alert_context_event_fields(rendered, event_id, occurred):
    alert = AlertContext.model_validate(rendered)
    assert (alert.event_id, alert.event_occurred) == (event_id, occurred)


def test_alert_context_rejects_a_garbled_event_id():
    with pytest.raises(ValueError, match="event_id"):
        AlertContext.model_validate({"event_id": "../../etc/passwd"})


@pytest.mark.parametrize(
    "state,found,text",
    [
        (StateType.COMPLETED, True, "COMPLETED"),
        (StateType.CRASHED, True, "CRASHED"),
        (None, True, "not started yet"),
        (None, False, "deleted"),
    ],
)
def test_holder_state_text(state, found, text):
    assert holder_state_text(state, found) == text
