"""A deployment re-applied (every start of `runbooks up`) keeps its alert automations in place
(serving/triggers.py): same ids, never a moment without them; changes land on the same automation;
automations a person made in the UI to run the deployment are left alone."""

from __future__ import annotations

import uuid

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from deployments.catalog import deployment_options, load_catalog, load_flow
from serving import triggers


def _api() -> str:
    return PREFECT_API_URL.value()


def _related(deployment_id: str) -> dict[str, dict]:
    owner = f"prefect.deployment.{deployment_id}"
    found = httpx.get(f"{_api()}/automations/related-to/{owner}", timeout=10)
    found.raise_for_status()
    return {a["id"]: a for a in found.json()}


@pytest.fixture
def deployment():
    """The pool runbook's deployment under a name of its own, triggers as prefect.yaml says."""
    triggers.install()
    [spec] = [s for s in load_catalog() if s.name == "db-connection-pool-exhausted"]
    options = deployment_options(spec) | {"name": f"trigger-sync-{uuid.uuid4().hex[:8]}"}
    return load_flow(spec).to_deployment(**options)


def test_reapplying_keeps_changes_and_leaves_peoples_automations(deployment) -> None:
    deployment_id = str(deployment.apply())
    first = _related(deployment_id)
    assert [a["name"] for a in first.values()] == [deployment.triggers[0].name]
    [ours] = first
    assert triggers.MARK in first[ours]["tags"]

    # a person's automation in the UI that also runs this deployment
    mine = httpx.post(
        f"{_api()}/automations/", timeout=10,
        json={
            "name": "my own trigger", "enabled": True,
            "trigger": {"type": "event", "expect": ["my.event"], "posture": "Reactive",
                        "threshold": 1, "within": 0},
            "actions": [{"type": "run-deployment", "source": "selected",
                         "deployment_id": deployment_id, "parameters": {}}],
        },
    )
    mine.raise_for_status()
    mine_id = mine.json()["id"]

    # a restart: nothing changed, nothing touched (stock Prefect deletes and re-creates)
    deployment.apply()
    again = _related(deployment_id)
    assert set(again) == {ours, mine_id}
    assert again[ours]["updated"] == first[ours]["updated"]

    # prefect.yaml changed: the same automation, updated
    deployment.triggers[0].enabled = False
    deployment.apply()
    changed = _related(deployment_id)
    assert set(changed) == {ours, mine_id}
    assert changed[ours]["enabled"] is False

    # the trigger removed from prefect.yaml: ours goes, the person's stays
    deployment.triggers = []
    deployment.apply()
    assert set(_related(deployment_id)) == {mine_id}
