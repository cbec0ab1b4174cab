"""Ends approval waits nobody answered: resumes suspended runs whose deadline passed.

A run waiting for approval is suspended (runbooks.approvals): no process of it is alive to notice
its own deadline. This loop, part of the process that serves the runbooks, resumes such a run
without an answer when its deadline passes; the run starts again, finds no answer, records the
timeout in its report and escalates. Only runs whose approval step saved a deadline (ours) are
touched. A runner that was down at the deadline catches up when it starts again, within
``PAUSE_GRACE_S``, after which Prefect itself fails the run.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.exceptions import ObjectNotFound

from runbooks.approvals import deadline_key

logger = logging.getLogger("serving.approval_timeouts")

CHECK_EVERY_S = 5.0


async def resume_expired_approvals(client: PrefectClient, now: datetime) -> list[UUID]:
    """Resume (without an answer) every suspended approval step whose deadline has passed."""
    # the REST filter endpoint: Prefect 3.8.8's client helpers send null limit/sort here
    response = await client._client.post(
        "/flow_runs/filter",
        json={
            "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}, "name": {"any_": ["Suspended"]}}},
            "limit": 200,
            "sort": "START_TIME_ASC",
        },
    )
    response.raise_for_status()
    resumed = []
    for run in response.json():
        keyset = ((run.get("state") or {}).get("state_details") or {}).get("run_input_keyset")
        if not keyset:
            continue
        deadline = await _deadline(client, run["id"], keyset)
        if deadline is None or now < deadline:
            continue
        reply = await client._client.post(f"/flow_runs/{run['id']}/resume", json={})
        if reply.status_code < 300 and reply.json().get("status") == "ACCEPT":
            logger.info("approval of flow run %s timed out: resumed it to escalate", run["id"])
            resumed.append(UUID(run["id"]))
        else:
            logger.warning("could not resume timed-out flow run %s: %s", run["id"], reply.text)
    return resumed


async def _deadline(client: PrefectClient, run_id: str, keyset: dict[str, Any]) -> datetime | None:
    try:
        raw = await client.read_flow_run_input(UUID(run_id), deadline_key(keyset))
    except (ObjectNotFound, httpx.HTTPStatusError):
        return None  # no saved deadline: not one of our approval steps
    return datetime.fromisoformat(json.loads(raw))


async def watch_approval_timeouts(every_s: float = CHECK_EVERY_S) -> None:
    """Run ``resume_expired_approvals`` forever; a failed pass is logged and retried."""
    while True:
        try:
            async with get_client() as client:
                await resume_expired_approvals(client, datetime.now(UTC))
        except (httpx.HTTPError, OSError) as exc:
            logger.warning("approval timeout check failed: %s", exc)
        await asyncio.sleep(every_s)
