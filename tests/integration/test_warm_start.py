"""Served flow runs start as forks of a warm process (serving.warm_start), still run, and their
tracebacks name the runbook's files."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.popen_forkserver
import os
import time
import uuid
from pathlib import Path

import httpx
import prefect.flow_engine
import pytest
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow_in_subprocess
from prefect.settings import PREFECT_API_URL

from blocks.postgres import PostgresDatabase
from deployments.catalog import load_catalog, load_flow
from serving import warm_start
from serving.pickup import EventDrivenRunner
from tests.servers import PostgresServer
from tests.warm_probe import leave_mark


@pytest.fixture
def warm(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(prefect.flow_engine, "multiprocessing", prefect.flow_engine.multiprocessing)
    return warm_start.enable(["flows.postgres.db_connection_pool_exhausted", "tests.warm_probe"])


def test_flow_run_subprocess_is_a_fork_of_the_warm_server(warm, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    process = run_flow_in_subprocess(leave_mark, parameters={"path": str(mark)})
    assert isinstance(process._popen, multiprocessing.popen_forkserver.Popen)
    process.join(120)
    assert process.exitcode == 0
    pid, preloaded = mark.read_text().split()
    assert int(pid) not in (os.getpid(), 0)
    assert preloaded == "True", "the child had to import the flow modules itself"


def test_prefect_still_starts_flow_runs_with_a_context_it_gets_from_multiprocessing() -> None:
    # warm_start swaps prefect.flow_engine.multiprocessing; this breaks loudly if prefect
    # stops taking its process context from there
    import inspect

    source = inspect.getsource(prefect.flow_engine.run_flow_in_subprocess)
    assert 'multiprocessing.get_context("spawn")' in source


def test_a_served_runs_traceback_names_the_runbooks_files(warm, postgres: PostgresServer) -> None:
    # a real error: the server refuses the password (not retried: it would only repeat)
    block = f"warm-bad-password-{uuid.uuid4().hex[:8]}"
    PostgresDatabase(
        host="127.0.0.1",
        port=postgres.port,
        dbname="postgres",
        user=postgres.user,
        password="not-" + postgres.password,
    ).save(block)
    [spec] = [s for s in load_catalog() if s.name == "db-connection-pool-exhausted"]

    async def served_run() -> tuple[uuid.UUID, str]:
        runner = EventDrivenRunner(
            name=f"warm-{uuid.uuid4().hex[:8]}",
            query_seconds=1,
            pause_on_shutdown=False,
            event_pickup=False,
        )
        # served as `runbooks up` serves it: the flow object its module defines
        deployment_id = await runner.aadd_flow(load_flow(spec), name=f"warm-{uuid.uuid4().hex[:8]}")
        task = asyncio.create_task(runner.start(webserver=False))
        try:
            async with get_client() as client:
                run = await client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={
                        "params": {"db_block": block, "safety": {"escalation_block": None}}
                    },
                )
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    state = (await client.read_flow_run(run.id)).state
                    if state is not None and state.is_final():
                        return run.id, state.type.value
                    await asyncio.sleep(0.5)
                raise AssertionError("the served run did not finish in 120s")
        finally:
            await runner.astop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 60)

    run_id, final = asyncio.run(served_run())
    assert final == "FAILED"

    def logs() -> str:
        found = httpx.post(
            f"{PREFECT_API_URL.value()}/logs/filter",
            timeout=10,
            json={"logs": {"flow_run_id": {"any_": [str(run_id)]}}, "sort": "TIMESTAMP_ASC"},
        ).json()
        return "\n".join(entry["message"] for entry in found)

    deadline = time.monotonic() + 30
    while "Traceback" not in (text := logs()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "password authentication failed" in text
    # the flow's frame and the task's frame, with their lines, as in the source tree
    assert 'flows/postgres/db_connection_pool_exhausted.py", line ' in text, text
    assert 'tasks/postgres.py", line ' in text, text
    assert "<dynamic-code>" not in text
