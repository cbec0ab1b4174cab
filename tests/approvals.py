"""A human at the Prefect UI, for tests: finds a run paused for approval and answers its form.

It goes through the same API the UI uses: reads paused flow runs, reads the description the run
saved for its resume form, and resumes the run with input (``prefect.flow_runs.resume_flow_run``).
"""

from __future__ import annotations

import threading
import time
from typing import Any
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.flow_runs import resume_flow_run


class Approver(threading.Thread):
    """Waits for a run of ``flow_name`` to pause, then answers with ``answer`` (None: never answers)."""

    def __init__(
        self,
        flow_name: str,
        answer: dict[str, Any] | None,
        *,
        wait_s: float = 120.0,
        ignore: set[UUID] | None = None,
    ):
        super().__init__(daemon=True)
        self.flow_name = flow_name
        self.answer = answer
        self.wait_s = wait_s
        self.ignore = ignore or set()
        self.paused_run: UUID | None = None
        self.description: str | None = None
        self.error: BaseException | None = None
        self.seen_paused = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test through .error
            self.error = exc

    def _run(self) -> None:
        deadline = time.monotonic() + self.wait_s
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                # raw filter call: the sync client's read_flow_runs sends limit/sort null (3.8.8)
                response = client.request(
                    "POST",
                    "/flow_runs/filter",
                    json={
                        "flows": {"name": {"any_": [self.flow_name]}},
                        "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}},
                        "sort": "START_TIME_DESC",
                        "limit": 10,
                    },
                )
                runs = [FlowRun.model_validate(r) for r in response.json()]
                runs = [r for r in runs if r.id not in self.ignore]
                keyset = runs[0].state.state_details.run_input_keyset if runs else None
                # the run saves its form (schema, then description) just after pausing
                description = (
                    _read_input(client, runs[0].id, keyset["description"]) if keyset else None
                )
                if runs and description is not None:
                    self.paused_run = runs[0].id
                    self.description = description
                    self.seen_paused.set()
                    if self.answer is not None:
                        resume_flow_run(runs[0].id, run_input=self.answer)
                    return
                time.sleep(0.2)
        raise TimeoutError(f"no run of {self.flow_name} paused for input in {self.wait_s}s")


def _read_input(client: Any, flow_run_id: UUID, key: str) -> str | None:
    try:
        response = client.request(
            "GET", "/flow_runs/{id}/input/{key}", path_params={"id": flow_run_id, "key": key}
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return None
        raise
    return response.json()
