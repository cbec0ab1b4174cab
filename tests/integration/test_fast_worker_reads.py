"""Our worker's client reuses a deployment or flow it just read (serving/fast_worker.py
`_reuse_reads`), against the session's Prefect server: each caller gets its own copy (resolving a
job updates the deployment's env in place, which must not reach the next run), and a change made
on the server is seen once READ_REUSE_S has passed, not before."""

from __future__ import annotations

import asyncio
import uuid
from uuid import UUID

import httpx
import pytest
from prefect import get_client
from prefect.settings import PREFECT_API_URL

from serving import fast_worker

pytestmark = pytest.mark.integration


def _describe(deployment_id: str, description: str) -> None:
    httpx.patch(
        f"{PREFECT_API_URL.value()}/deployments/{deployment_id}",
        json={"description": description},
        timeout=30,
    ).raise_for_status()


def test_reads_are_copies_and_expire(
    deployment_ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment_id = UUID(deployment_ids["db-connection-pool-exhausted"])
    original = httpx.get(
        f"{PREFECT_API_URL.value()}/deployments/{deployment_id}", timeout=30
    ).json()["description"]
    # long enough for a loaded machine's reads below; expiry is then shown by shortening it
    monkeypatch.setattr(fast_worker, "READ_REUSE_S", 120.0)

    async def scenario() -> None:
        async with get_client() as client:
            fast_worker._reuse_reads(client)
            first = await client.read_deployment(deployment_id)
            # what BaseJobConfiguration.resolve_for_flow_run does to the deployment it gets
            first.job_variables.setdefault("env", {})["FLOW_RUN_ONLY"] = "x"
            second = await client.read_deployment(deployment_id)
            assert "FLOW_RUN_ONLY" not in (second.job_variables.get("env") or {})
            assert second.id == first.id and second is not first

            flow = await client.read_flow(first.flow_id)
            assert (await client.read_flow(first.flow_id)).name == flow.name

            changed = f"changed {uuid.uuid4().hex[:8]}"
            _describe(str(deployment_id), changed)
            assert (await client.read_deployment(deployment_id)).description == original
            monkeypatch.setattr(fast_worker, "READ_REUSE_S", 0.0)
            await asyncio.sleep(0.01)
            assert (await client.read_deployment(deployment_id)).description == changed

    try:
        asyncio.run(scenario())
    finally:
        _describe(str(deployment_id), original or "")
