"""Waiting for a human's approval in a way that survives restarts of every process of ours.

A run started from a deployment (every alert, schedule or UI run) **suspends**: Prefect's
``suspend_flow_run`` pattern. The run's process ends with the run PAUSED ("Suspended") and its
resume form saved; the answer, whenever it comes, makes Prefect reschedule the run, the runner
starts it again from the top (every check re-reads the live system) and at the same approval step
the saved answer is read instead of asking again. Nothing is held in memory while a human decides,
so a Ctrl-C, SIGKILL or restart of ``runbooks up`` or of the Prefect server loses nothing
(issue #9). A suspended run keeps its target's lock until the deadline (runbooks.locks).

Nobody answering is handled by ``serving.approval_timeouts``: at the deadline it resumes the run
without an answer, the run finds no answer, counts it as a timeout and escalates.

A flow called directly (no deployment: tests, notebooks) cannot be rescheduled, so it pauses
in-process as before.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prefect import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import Pause
from prefect.input import RunInput, keyset_from_paused_state
from prefect.input.run_input import read_flow_run_input
from prefect.states import Paused, Suspended
from prefect.utilities.engine import propose_state_sync
from pydantic import Field

# Prefect's own pause expiry comes this long after our deadline: in that window the timeout
# service (or the in-process wait) can still end the run with the real reason and escalate,
# rather than Prefect failing it with "paused and never resumed".
PAUSE_GRACE_S = 3600


class Approval(RunInput):
    """The resume form of a run waiting for approval of a destructive step."""

    approve: bool = Field(False, description="Tick to let the run apply the plan shown above.")
    approver: str = Field("", description="Who decides (name or handle), for the report.")
    reason: str = Field("", description="Why; goes into the incident report.")


class ConfirmedApproval(Approval):
    """An approval that also makes the approver type what will be lost.

    GitHub's "type the repository name to delete it": a tick is too easy to give at 3 a.m. to a
    step that loses data nobody has read, so the names must be typed as well.
    """

    confirm: str = Field(
        "",
        description="Type the names the request above asks for (separated by commas) to confirm "
        "that their data may be lost.",
    )


def confirmation_missing(typed: str, wanted: list[str]) -> list[str]:
    """The names the approver was asked to type and did not (any order; commas or spaces)."""
    given = {name for name in re.split(r"[\s,]+", typed) if name}
    return sorted(set(wanted) - given)


@dataclass
class Answer:
    """What came back from an approval step."""

    form: Approval | None  # None: nobody answered before the deadline
    plan: list[str] | None  # the plan the human saw, when it was shown in an earlier process


def request_approval(
    form: type[Approval],
    *,
    key: str,
    timeout_s: int,
    poll_s: int,
    plan: list[str],
    before_suspending: Callable[[datetime], None],
    on_waiting: Callable[[str], None] | None = None,
) -> Answer:
    """The human's answer to this approval step (and the plan they were shown).

    From a deployment run the first call suspends the run (raises Prefect's ``Pause`` after
    ``before_suspending(deadline)``, which hands the target's lock over); the resumed run's call
    returns the saved answer with the plan saved beside it, for the caller to compare with its
    fresh plan. ``on_waiting(pause_key)`` is called once the run shows as paused, form saved
    (e.g. to post the request to chat, whose answer resumes the run).
    """
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        raise RuntimeError("approval needs a flow run to pause")
    run = ctx.flow_run
    if run.deployment_id is None:
        answer = _pause_in_process(
            form, key=key, timeout_s=timeout_s, poll_s=poll_s, on_waiting=on_waiting
        )
        return Answer(answer, None)

    proposed = Suspended(timeout_seconds=timeout_s + PAUSE_GRACE_S, pause_key=key)
    keyset = keyset_from_paused_state(proposed)
    proposed.state_details.run_input_keyset = keyset
    if key in (run.empirical_policy.pause_keys or set()):
        # this step suspended before and the run was resumed: answered, or timed out
        shown = read_flow_run_input(_plan_key(keyset), flow_run_id=run.id)
        return Answer(_answer(form, keyset, run.id), shown)
    deadline = datetime.now(UTC) + timedelta(seconds=timeout_s)
    with get_client(sync_client=True) as client:
        # everything the resume form and the timeout service need is saved, and the target's
        # lock handed over, before the run shows as paused: a human answering at once, or a
        # Ctrl-C right after the run shows as paused, finds the request complete
        _save_form(client, form, keyset, run.id)
        _save_input(client, run.id, _plan_key(keyset), plan)
        _save_input(client, run.id, deadline_key(keyset), deadline.isoformat())
        before_suspending(deadline)
        state = _propose_pause(client, proposed, run.id)
    if not state.is_paused():
        raise RuntimeError(f"the run cannot suspend for approval (state {state.type.value})")
    if on_waiting is not None:
        on_waiting(key)
    raise Pause(state=state)


def _propose_pause(client: Any, proposed: Any, run_id: Any) -> Any:
    """Propose the pause; a client retry of a proposal the server had already accepted counts.

    The client retries a request whose answer was lost (on a busy SQLite server: a 500 "database
    is locked" after the commit). The retry carries the same transition id, so Prefect rejects it
    as "already made this state transition" and ``propose_state_sync`` raises ``Pause`` with the
    run's current state: our own pause (same key) means the first proposal landed.
    """
    try:
        return propose_state_sync(client, proposed, flow_run_id=run_id)
    except Pause as exc:
        state = exc.state
        key = proposed.state_details.pause_key
        if state is not None and state.is_paused() and state.state_details.pause_key == key:
            return state
        raise


def deadline_key(keyset: dict[str, str]) -> str:
    """The run input where a suspended approval step keeps its deadline (serving reads it)."""
    return keyset["response"].removesuffix("-response") + "-deadline"


def _plan_key(keyset: dict[str, str]) -> str:
    return keyset["response"].removesuffix("-response") + "-plan"


def _answer(form: type[Approval], keyset: dict[str, str], run_id: Any) -> Approval | None:
    value = read_flow_run_input(keyset["response"], flow_run_id=run_id)
    return form(**value) if value else None


def _pause_in_process(
    form: type[Approval],
    *,
    key: str,
    timeout_s: int,
    poll_s: int,
    on_waiting: Callable[[str], None] | None = None,
) -> Approval | None:
    """Pause this run in its own process until answered or the deadline (no deployment to resume).

    What ``prefect.flow_runs.pause_flow_run(wait_for_input=...)`` does, with two differences an
    approval needs: saving the form tolerates "already exists" (a client retry of a save the
    server had stored; seen on a busy SQLite server), and the deadline is ours while Prefect's
    pause expires ``PAUSE_GRACE_S`` later, so the run ends with the real reason.
    """
    run_id = FlowRunContext.get().flow_run.id  # type: ignore[union-attr]
    proposed = Paused(timeout_seconds=timeout_s + PAUSE_GRACE_S, reschedule=False, pause_key=key)
    keyset = keyset_from_paused_state(proposed)
    proposed.state_details.run_input_keyset = keyset
    with get_client(sync_client=True) as client:
        state = _propose_pause(client, proposed, run_id)
        if state.is_running():  # this very pause was answered before (the run was re-run)
            return _answer(form, keyset, run_id)
        if not state.is_paused():
            raise RuntimeError(f"the run cannot pause for approval (state {state.type.value})")
        _save_form(client, form, keyset, run_id)
        if on_waiting is not None:
            on_waiting(key)
        deadline = time.monotonic() + timeout_s
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_running():
                return _answer(form, keyset, run_id)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(poll_s, left))


def _save_form(client: Any, form: type[Approval], keyset: dict[str, str], run_id: Any) -> None:
    """The resume form's schema and description; a retried save that already landed is fine."""
    try:
        form.save(keyset, flow_run_id=run_id)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 409:
            raise
        _save_input(client, run_id, keyset["description"], form._description)


def _save_input(client: Any, run_id: Any, key: str, value: Any) -> None:
    try:
        client.create_flow_run_input(flow_run_id=run_id, key=key, value=json.dumps(value))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 409:
            raise
