"""Issue #9 defect 3: an alert label that names a block is taken literally.

The real path: an `alert.firing` event posted to a real Prefect server, the deployment trigger of
prefect.yaml creating the run with the label templated into `db_block`, and Prefect's engine
executing the run (`run_flow` on it, as `python -m prefect.engine`, what a runner starts, does).
Labels that walk the block API (`no-such/../default` reached the `default` block, `../../..` a
Secret) must fail the run with a message naming the label, before any block is loaded: Prefect
emits `prefect.block.<type>.loaded`, related to the run, for every block a run loads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from uuid import UUID

import httpx
import pytest
from prefect import get_client
from prefect.blocks.system import Secret
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL

from blocks.postgres import PostgresDatabase
from deployments.catalog import load_catalog, load_flow
from tests.conftest import runs_of
from tests.gateway_proc import read_events
from tests.integration.test_alert_triggers import post_alert_event
from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

DEPLOYMENT = "db-connection-pool-exhausted"
SPEC = next(s for s in load_catalog() if s.name == DEPLOYMENT)
TRAVERSALS = ["no-such/../default", "../../../secret/block_documents/name/othersecret"]


@pytest.fixture
def blocks_a_traversal_would_reach(postgres: PostgresServer) -> Iterator[None]:
    """The `default` database block (on a real server) and a Secret named `othersecret`."""
    PostgresDatabase(
        host=postgres.host, port=postgres.port, user=postgres.user, password=postgres.password
    ).save("default", overwrite=True)
    Secret(value="do-not-fetch-me").save("othersecret", overwrite=True)
    yield
    PostgresDatabase.delete("default")
    Secret.delete("othersecret")


def run_for_alert(deployment_id: str, database_label: str) -> dict:
    """Post the alert, wait for the trigger's run, execute it as a runner would; its final state."""
    before = {r["id"] for r in runs_of(deployment_id)}
    post_alert_event({"alertname": "PostgresTooManyConnections", "database": database_label})
    deadline = time.monotonic() + 30
    new: list[dict] = []
    while not new and time.monotonic() < deadline:
        new = [r for r in runs_of(deployment_id) if r["id"] not in before]
        time.sleep(0.3)
    assert len(new) == 1, f"the trigger created {len(new)} runs for {database_label!r}"
    return new[0]


def execute(run_id: str) -> None:
    """Prefect's engine on the run, as `python -m prefect.engine` (what a runner starts) does."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
    run_flow(load_flow(SPEC), flow_run=run, return_type="state")


def flow_run(run_id: str) -> dict:
    resp = httpx.get(f"{PREFECT_API_URL.value()}/flow_runs/{run_id}", timeout=10)
    resp.raise_for_status()
    return resp.json()


def blocks_loaded_by(run_id: str) -> list[str]:
    """Names of the blocks a run loaded (Prefect's own `prefect.block.*.loaded` events)."""
    events = read_events(
        PREFECT_API_URL.value(),
        {
            "event": {"prefix": ["prefect.block."]},
            "related": {"id": [f"prefect.flow-run.{run_id}"]},
        },
    )
    return [e["resource"].get("prefect.resource.name") for e in events]


def test_traversal_labels_fail_the_run_before_any_block_is_loaded(
    deployment_ids: dict[str, str], blocks_a_traversal_would_reach: None
) -> None:
    deployment_id = deployment_ids[DEPLOYMENT]
    # a run whose label names the block properly loads it: the events below do show loads
    control = run_for_alert(deployment_id, "default")
    hostile = {label: run_for_alert(deployment_id, label) for label in TRAVERSALS}
    for label, run in hostile.items():
        assert run["parameters"]["params"]["db_block"] == label, "the trigger templated the label"
    for run in [control, *hostile.values()]:
        execute(run["id"])

    assert flow_run(control["id"])["state"]["type"] == "COMPLETED"
    deadline = time.monotonic() + 20  # Prefect stores events asynchronously
    while not blocks_loaded_by(control["id"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "default" in blocks_loaded_by(control["id"])

    for label, run in hostile.items():
        state = flow_run(run["id"])["state"]
        assert state["type"] == "FAILED", (label, state)
        message = state["message"]
        assert f"db_block {label!r} (from alert label database) is not a block name" in message
        assert "lowercase letters, numbers and dashes" in message
        assert "do-not-fetch-me" not in message
        assert blocks_loaded_by(run["id"]) == [], f"{label!r} loaded a block"
