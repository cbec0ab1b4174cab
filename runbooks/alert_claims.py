"""Once per alert event: a second run that an automation starts for the same event stops at once.

Prefect's automations deliver at least once across a crash. Its triggers consumer (prefect 3.8.8
``server/events/triggers.py``) records an event as seen only after evaluating it, and Redis
redelivers a message that was not acknowledged when an API server died, so after the restart the
same automation fires again for the same event: two runs of one runbook for one alert (seen in the
team topology's chaos test, issue #16). Each runbook is idempotent (it re-checks the live system
before acting, under its target's lock), but the second run would still report, and possibly
escalate, a second time. The alert gateway's own retries do the same on purpose: an attempt that
failed may still have been published, and the next goes under a new event id (Prefect may have
recorded the failed one as seen without publishing it: alert_gateway/events.py ``delivery_id``).
So "the alert event" here is the alert's own id, the gateway's ``payload.alertEventId`` (the
event's id for events from elsewhere): prefect.yaml's ``alert_context`` passes it as ``event_id``.

So every run that an automation started (its idempotency key is Prefect's ``automation <id>,
action <n>, invocation <id>``) claims its alert event for that automation and action before it
does anything: it creates the Prefect Variable ``runbooks_alert_<day>_<event>_<automation>a<n>_<k>``.
Creating a variable is atomic on the server (a second create of the same name is refused with
409), so of two runs that race, exactly one claims; the other ends COMPLETED "NOT ACTED:
DUPLICATE ALERT" and names the run that has the event, without a page. Runs a person starts (no
idempotency key from an automation), schedules and direct calls claim nothing: a person who runs
a runbook again with an earlier run's parameters means it.

A claim whose run CRASHED (or was deleted) before finishing is taken over by the next firing with
attempt ``k + 1`` (again an atomic create: one of several racers wins); after ``MAX_ATTEMPTS`` the
run escalates instead of starting the same crash again. The same run resumed after an approval (or
a flow retry) finds its own claim and goes on.

Claims are kept ``RETENTION_DAYS`` (redelivery happens within minutes of a restart); each claim
deletes a few expired ones, oldest first (the day in the name sorts them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, ValidationError

PREFIX = "runbooks_alert_"
TAGS = ["runbooks", "alert-claim"]
MAX_ATTEMPTS = 3
RETENTION_DAYS = 7
PRUNE_BATCH = 20

# Prefect's RunDeployment action (server/events/schemas/automations.py `idempotency_key`)
_AUTOMATION_KEY = re.compile(
    r"^automation (?P<automation>[0-9a-f-]{36}), action (?P<action>\d+), invocation [0-9a-f-]{36}$"
)


class ClaimRecord(BaseModel):
    """Which run has an alert event; the value of a claim variable."""

    flow_run_id: UUID
    flow_run_name: str | None = None
    claimed_at: datetime
    attempt: int = 1


class Verdict(StrEnum):
    FIRST = "first"  # nobody has the event: claim attempt 1
    OWN = "own"  # this run has it already (resumed after an approval, or retried)
    TAKE_OVER = "take over"  # its run crashed before finishing: claim the next attempt
    DUPLICATE = "duplicate"  # another run has it: stop without acting
    EXHAUSTED = "exhausted"  # every attempt crashed: a human must look


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    attempt: int  # the attempt this run claims (FIRST, TAKE_OVER) or found (others)


def automation_scope(idempotency_key: str | None) -> str | None:
    """``<automation id hex, 12>a<action>`` for a run an automation created; None otherwise."""
    match = _AUTOMATION_KEY.match(idempotency_key or "")
    if match is None:
        return None
    return f"{match['automation'].replace('-', '')[:12]}a{match['action']}"


def claim_name(day: date, event_id: UUID, scope: str, attempt: int) -> str:
    """The claim variable's name: the day first, so that names sort oldest first."""
    return f"{PREFIX}{day:%Y%m%d}_{event_id.hex}_{scope}_{attempt}"


def claim_day(name: str) -> date | None:
    """The day a claim variable's name starts with (None: not a claim)."""
    if not name.startswith(PREFIX):
        return None
    try:
        return datetime.strptime(name[len(PREFIX) : len(PREFIX) + 8], "%Y%m%d").date()
    except ValueError:
        return None


def judge_claim(
    mine: UUID,
    latest: ClaimRecord | None,
    holder_state: StateType | None,
    holder_found: bool,
    max_attempts: int = MAX_ATTEMPTS,
) -> Decision:
    """What this run does about its alert event, given the latest claim and its run's state."""
    if latest is None:
        return Decision(Verdict.FIRST, 1)
    if latest.flow_run_id == mine:
        return Decision(Verdict.OWN, latest.attempt)
    if holder_found and holder_state is not StateType.CRASHED:
        # running, paused, finished (even failed or cancelled: it decided, a person can re-run)
        return Decision(Verdict.DUPLICATE, latest.attempt)
    if latest.attempt >= max_attempts:
        return Decision(Verdict.EXHAUSTED, latest.attempt)
    return Decision(Verdict.TAKE_OVER, latest.attempt + 1)


def holder_state_text(state: StateType | None, found: bool) -> str:
    """How the report names the state of the run that had the event."""
    if not found:
        return "deleted"
    return state.value if state is not None else "not started yet"


@dataclass(frozen=True)
class Claim:
    """What claiming found: the decision, and the run that had the event before (if any)."""

    decision: Decision
    event_id: UUID
    holder: ClaimRecord | None = None
    holder_state: str = ""


def claim_alert_event(
    event_id: UUID,
    occurred: datetime | None,
    idempotency_key: str | None,
    flow_run_id: UUID,
    flow_run_name: str | None,
    now: datetime | None = None,
) -> Claim | None:
    """Claim ``event_id`` for this run's automation and action; None if no automation started it.

    Network errors propagate (the run fails before acting, and Prefect's client already retried
    transient ones): a run that cannot tell whether it is a duplicate does not act.
    """
    scope = automation_scope(idempotency_key)
    if scope is None:
        return None
    now = now or datetime.now(UTC)
    day = (occurred or now).astimezone(UTC).date()
    names = [claim_name(day, event_id, scope, k) for k in range(1, MAX_ATTEMPTS + 1)]
    with get_client(sync_client=True) as client:
        _prune(client, now)
        # a racer that claimed between our read and our create makes the create fail: read again
        for _ in range(MAX_ATTEMPTS + 2):
            latest = _latest(client, names)
            state, found = _run_state(client, latest.flow_run_id) if latest else (None, True)
            decision = judge_claim(flow_run_id, latest, state, found)
            if decision.verdict not in (Verdict.FIRST, Verdict.TAKE_OVER):
                return Claim(decision, event_id, latest, holder_state_text(state, found))
            record = ClaimRecord(
                flow_run_id=flow_run_id,
                flow_run_name=flow_run_name,
                claimed_at=now,
                attempt=decision.attempt,
            )
            try:
                client.create_variable(
                    VariableCreate(
                        name=names[decision.attempt - 1],
                        value=record.model_dump(mode="json"),
                        tags=TAGS,
                    )
                )
            except ObjectAlreadyExists:
                continue
            return Claim(decision, event_id, latest, holder_state_text(state, found))
    raise RuntimeError(f"could not claim alert event {event_id}: the claim kept changing")


def _latest(client: Any, names: list[str]) -> ClaimRecord | None:
    response = client.request(
        "POST",
        "/variables/filter",
        json={"variables": {"name": {"any_": names}}, "limit": len(names)},
    )
    records: list[ClaimRecord] = []
    for variable in response.json():
        try:
            records.append(ClaimRecord.model_validate(variable["value"]))
        except (ValidationError, KeyError, TypeError):
            continue  # not ours to judge: a claim with another shape is ignored
    return max(records, key=lambda r: r.attempt, default=None)


def _run_state(client: Any, flow_run_id: UUID) -> tuple[StateType | None, bool]:
    try:
        run = client.read_flow_run(flow_run_id)
    except ObjectNotFound:
        return None, False
    return (run.state.type if run.state else None), True


def expired(names: list[str], today: date, retention_days: int = RETENTION_DAYS) -> list[str]:
    """The claim names older than the retention (the day in the name), in the order given."""
    cutoff = today - timedelta(days=retention_days)
    return [n for n in names if (d := claim_day(n)) is not None and d < cutoff]


def _prune(client: Any, now: datetime) -> None:
    response = client.request(
        "POST",
        "/variables/filter",
        json={
            "variables": {"name": {"like_": PREFIX}},
            "sort": "NAME_ASC",
            "limit": PRUNE_BATCH,
        },
    )
    for name in expired([v["name"] for v in response.json()], now.date()):
        try:
            client.delete_variable_by_name(name)
        except (ObjectNotFound, httpx.HTTPStatusError):
            continue  # pruned by another run meanwhile
