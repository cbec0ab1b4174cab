"""One run per alert event and automation, on a real Prefect server and a real PostgreSQL table.

Prefect's automations deliver an event again after an API server crash (issue #16): the actions
service creates a second run of the same deployment with the same rendered parameters and an
idempotency key that differs only in its invocation. Here those runs are created the way that
action creates them (``create_flow_run_from_deployment`` with Prefect's key) and executed by
Prefect's engine (``run_flow``, what a worker's process runs), against event-processing-stuck on
the stuck-events table of tests/integration/test_event_processing_stuck.py.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from prefect import get_client
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.flow_engine import run_flow
from prefect.states import Crashed
from psycopg import sql

from flows.event_store.event_processing_stuck import StuckEventsParams, event_processing_stuck
from runbooks.alert_claims import PREFIX
from runbooks.params import AlertContext
from runbooks.report import Outcome
from tests.conftest import read_incident_report, unique
from tests.integration.test_event_processing_stuck import (  # noqa: F401 (fixtures)
    LOCKED,
    SAFETY,
    STUCK,
    Env,
    env,
    seeded,
)

pytestmark = pytest.mark.integration

AUTOMATION = uuid.uuid4()


@pytest.fixture(scope="module")
def deployment_id(env: Env) -> uuid.UUID:  # noqa: F811
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(event_processing_stuck)
        return client.create_deployment(flow_id=flow_id, name=unique("claims"))


@pytest.fixture
def block(env: Env, seeded: psycopg.Connection) -> Iterator[str]:  # noqa: F811
    seeded.rollback()  # no row held by a consumer here: every stuck row can be reset
    yield env.block()


def alert_params(block: str, event_id: uuid.UUID) -> StuckEventsParams:
    alert = AlertContext(
        alertname="EventProcessingStuck",
        fingerprint=event_id.hex[:16],
        status="firing",
        labels={"event_store": block},
        event_id=event_id,
        event_occurred=datetime.now(UTC),
    )
    return StuckEventsParams(event_store_block=block, safety=SAFETY, alert=alert)


def automation_run(deployment: uuid.UUID, params: StuckEventsParams) -> FlowRun:
    """A run as Prefect's RunDeployment action creates it: a new invocation each firing."""
    key = f"automation {AUTOMATION}, action 0, invocation {uuid.uuid4()}"
    with get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(
            deployment,
            parameters={"params": params.model_dump(mode="json")},
            idempotency_key=key,
        )


def execute(run: FlowRun, params: StuckEventsParams) -> State:
    state = run_flow(
        event_processing_stuck, flow_run=run, parameters={"params": params}, return_type="state"
    )
    assert isinstance(state, State)
    return state


def claims(event_id: uuid.UUID) -> list[dict[str, Any]]:
    with get_client(sync_client=True) as client:
        found = client.request(
            "POST",
            "/variables/filter",
            json={"variables": {"name": {"like_": f"{PREFIX}%{event_id.hex}"}}},
        ).json()
    return sorted(found, key=lambda v: v["name"])


def test_a_redelivered_event_stops_before_acting(
    env: Env,  # noqa: F811
    block: str,
    deployment_id: uuid.UUID,
) -> None:
    event = uuid.uuid4()
    params = alert_params(block, event)
    first, second = automation_run(deployment_id, params), automation_run(deployment_id, params)
    assert first.id != second.id  # two invocations: Prefect's idempotency key does not dedupe

    acted = execute(first, params)
    assert acted.is_completed(), acted.message
    assert env.state([*STUCK, LOCKED]) == {"PENDING"}
    after = env.rows()
    report = read_incident_report(first.id)
    assert f"alert event {event} claimed by this run" in report

    duplicate = execute(second, params)
    # completed, not failed: nothing is wrong, and nobody is paged for it
    assert duplicate.type is StateType.COMPLETED
    assert duplicate.message.startswith(f"Stopped without acting: alert event {event} already")
    assert f"run {first.name}" in duplicate.message and "COMPLETED" in duplicate.message
    assert env.rows() == after  # nothing touched, not even read-and-written back
    dup_report = read_incident_report(second.id)
    assert Outcome.DUPLICATE.value in dup_report
    assert "the run that has this alert acts on it" in dup_report
    assert "### Escalation" not in dup_report  # nobody told: the first run reports
    # one claim, the first run's
    found = claims(event)
    assert [c["value"]["flow_run_id"] for c in found] == [str(first.id)]
    assert found[0]["name"].endswith("_1")


def test_two_deliveries_at_once_one_acts(
    env: Env,  # noqa: F811
    block: str,
    deployment_id: uuid.UUID,
) -> None:
    event = uuid.uuid4()
    params = alert_params(block, event)
    runs = [automation_run(deployment_id, params) for _ in range(2)]
    states: dict[uuid.UUID, State] = {}
    start = threading.Barrier(2)

    def go(run: FlowRun) -> None:
        start.wait()
        states[run.id] = execute(run, params)

    threads = [threading.Thread(target=go, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(states) == 2
    messages = {run_id: s.message or "" for run_id, s in states.items()}
    assert all(s.is_completed() for s in states.values()), messages
    duplicates = [r for r, m in messages.items() if "Stopped without acting: alert event" in m]
    assert len(duplicates) == 1, messages
    winner = next(r for r in messages if r not in duplicates)
    assert [c["value"]["flow_run_id"] for c in claims(event)] == [str(winner)]
    assert env.state([*STUCK, LOCKED]) == {"PENDING"}
    assert "RESOLVED" in read_incident_report(winner)


def test_a_claim_whose_run_crashed_is_taken_over(
    env: Env,  # noqa: F811
    block: str,
    deployment_id: uuid.UUID,
) -> None:
    """The first run claimed the event and its process died (the worker then marks it
    CRASHED): the redelivered event's run acts instead of stopping as a duplicate."""
    from runbooks.alert_claims import claim_alert_event

    event = uuid.uuid4()
    params = alert_params(block, event)
    dead, second = automation_run(deployment_id, params), automation_run(deployment_id, params)
    # what the dead run did before it died: its claim (the same call its start makes)
    claimed = claim_alert_event(
        event, params.alert.event_occurred, dead.idempotency_key, dead.id, dead.name
    )
    assert claimed is not None and claimed.decision.attempt == 1
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(dead.id, Crashed(message="process killed"), force=True)

    state = execute(second, params)
    assert state.is_completed(), state.message
    assert env.state([*STUCK, LOCKED]) == {"PENDING"}
    report = read_incident_report(second.id)
    assert f"run {dead.name}" in report and "CRASHED before finishing" in report
    assert "takes it over (attempt 2 of 3)" in report
    assert [c["value"]["flow_run_id"] for c in claims(event)] == [str(dead.id), str(second.id)]


def test_a_person_running_it_again_with_the_same_alert_acts(
    env: Env,  # noqa: F811
    block: str,
    deployment_id: uuid.UUID,
) -> None:
    """A manual run with an earlier run's parameters (the UI's "run again") is meant: it claims
    nothing and acts, though an automation's run already had the event."""
    event = uuid.uuid4()
    params = alert_params(block, event)
    first = automation_run(deployment_id, params)
    assert execute(first, params).is_completed()
    env.admin.execute(
        sql.SQL(
            "UPDATE {} SET state = 'PROCESSING', touched_at = now() - interval '3 hours'"
            " WHERE event_id = ANY(%s)"
        ).format(env.table),
        (STUCK[:5],),
    )
    with get_client(sync_client=True) as client:
        manual = client.create_flow_run_from_deployment(
            deployment_id, parameters={"params": params.model_dump(mode="json")}
        )
    state = execute(manual, params)
    assert state.is_completed(), state.message
    assert env.state(STUCK[:5]) == {"PENDING"}
    assert "RESOLVED" in read_incident_report(manual.id)
    assert [c["value"]["flow_run_id"] for c in claims(event)] == [str(first.id)]
