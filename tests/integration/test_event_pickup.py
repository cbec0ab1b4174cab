"""Runs start on their `prefect.flow-run.Scheduled` event (serving/pickup.py); the runner's poll
still starts the runs whose event was missed; no run is started twice. Real Prefect server (the
session test harness), a real Runner serving a flow, runs created through Prefect's API."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL

from serving.pickup import EventDrivenRunner
from tests.pickup_probe import append_line

# effectively "never again": the poll runs once when the runner starts, before any test run exists
NO_POLL_S = 3600.0


class CuttableProxy:
    """A TCP proxy in front of the Prefect API that can drop every connection and refuse new ones,
    as a lost network path does."""

    def __init__(self, target: str):
        url = urlparse(target)
        self._target = (url.hostname or "127.0.0.1", url.port or 80)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self.port = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self._transports):
            transport.abort()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self._target), 5)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._transports -= {writer.transport, up_writer.transport}


async def _until(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s")


async def _state_types(client: Any, flow_run_id: uuid.UUID) -> list[tuple[StateType, str]]:
    return [(s.type, s.name) for s in await client.read_flow_run_states(flow_run_id)]


async def _finished(client: Any, flow_run_id: uuid.UUID) -> bool:
    run = await client.read_flow_run(flow_run_id)
    return run.state is not None and run.state.is_final()


async def _serving(runner: EventDrivenRunner) -> tuple[asyncio.Task[None], uuid.UUID]:
    deployment_id = await runner.aadd_flow(append_line, name=f"pickup-{uuid.uuid4().hex[:8]}")
    task = asyncio.create_task(runner.start(webserver=False))
    await _until(lambda: _true(getattr(runner, "started", False)), 30, "runner started")
    return task, deployment_id


async def _true(value: object) -> object:
    return value


async def _stop(runner: EventDrivenRunner, task: asyncio.Task[None]) -> None:
    await runner.astop()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)


async def _run_of(client: Any, deployment_id: uuid.UUID, mark: Path) -> uuid.UUID:
    run = await client.create_flow_run_from_deployment(
        deployment_id, parameters={"path": str(mark)}
    )
    return run.id


@contextlib.asynccontextmanager
async def _stream_cut(
    query_seconds: float,
) -> AsyncIterator[tuple[CuttableProxy, EventDrivenRunner, uuid.UUID]]:
    """A runner serving a flow whose event stream goes through a proxy, cut once the pickup has
    connected (and noticed the cut); stopped afterwards."""
    proxy = CuttableProxy(PREFECT_API_URL.value())
    await proxy.open()
    runner = EventDrivenRunner(
        name=f"pickup-{uuid.uuid4().hex[:8]}",
        query_seconds=query_seconds,
        pause_on_shutdown=False,
        events_api_url=proxy.url(),
    )
    task, deployment_id = await _serving(runner)
    try:
        assert runner.pickup is not None
        await asyncio.wait_for(runner.pickup.connected.wait(), 30)
        await proxy.cut()
        await _until(
            lambda: _true(not runner.pickup.connected.is_set()),
            60,
            "the pickup noticed the lost stream",
        )
        yield proxy, runner, deployment_id
    finally:
        await _stop(runner, task)
        with contextlib.suppress(Exception):
            await proxy.cut()


def _assert_started_once(states: list[tuple[StateType, str]], mark: Path) -> None:
    # one submission: Pending (the runner took it), Submitting (its executor), then one start
    assert [name for _, name in states if _ == StateType.PENDING] == ["Pending", "Submitting"], (
        states
    )
    assert [t for t, _ in states].count(StateType.RUNNING) == 1, states
    assert states[-1][0] == StateType.COMPLETED, states
    assert len(mark.read_text().splitlines()) == 1, "the flow ran more than once"


def test_a_run_starts_on_its_scheduled_event_without_a_poll(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner = EventDrivenRunner(
            name=f"pickup-{uuid.uuid4().hex[:8]}", query_seconds=NO_POLL_S, pause_on_shutdown=False
        )
        task, deployment_id = await _serving(runner)
        try:
            assert runner.pickup is not None
            await asyncio.wait_for(runner.pickup.connected.wait(), 30)
            async with get_client() as client:
                mark = tmp_path / "mark"
                run_id = await _run_of(client, deployment_id, mark)
                await _until(lambda: _finished(client, run_id), 90, "the run finished")
                _assert_started_once(await _state_types(client, run_id), mark)
                assert runner.pickup.submitted == 1

                # a poll answer from before the run started, handled after it finished, must not
                # start it again (Prefect's server would let COMPLETED go back to PENDING)
                poller = runner._scheduled_run_poller
                await _until(
                    lambda: _true(run_id not in poller._submitting_flow_run_ids),
                    60,
                    "the runner let go of the finished run",
                )
                stale = await client.read_flow_run(run_id)
                scheduled = next(
                    s
                    for s in await client.read_flow_run_states(run_id)
                    if s.type == StateType.SCHEDULED
                )
                await poller._submit_scheduled_flow_runs(
                    flow_run_response=[stale.model_copy(update={"state": scheduled})],
                    task_group=runner._runs_task_group,
                )
                await _until(
                    lambda: _true(run_id not in poller._submitting_flow_run_ids),
                    90,
                    "the stale submission was dealt with",
                )
                _assert_started_once(await _state_types(client, run_id), mark)
        finally:
            await _stop(runner, task)

    asyncio.run(scenario())


def test_runs_missed_while_the_event_stream_is_down_are_started_by_the_poll(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _stream_cut(1.0) as (proxy, runner, deployment_id), get_client() as client:
            assert runner.pickup is not None
            missed = tmp_path / "missed"
            run_id = await _run_of(client, deployment_id, missed)
            await _until(lambda: _finished(client, run_id), 90, "the poll started the run")
            _assert_started_once(await _state_types(client, run_id), missed)
            assert runner.pickup.submitted == 0

            # the stream comes back: the pickup reconnects on its own
            await proxy.open()
            await asyncio.wait_for(runner.pickup.connected.wait(), 60)
            after = tmp_path / "after"
            run_id = await _run_of(client, deployment_id, after)
            await _until(lambda: _finished(client, run_id), 90, "the run finished")
            _assert_started_once(await _state_types(client, run_id), after)

    asyncio.run(scenario())


def test_a_run_gone_late_while_the_stream_was_down_starts_when_it_is_back(
    tmp_path: Path,
) -> None:
    """The event stream is down when a run is created, and the run is marked Late before the
    pickup reconnects (Prefect's late-runs service does that 15 s after its start time; an API
    server restart takes longer): the run starts as soon as the stream is back, without the
    regular poll (an hour away here), once. The pickup polls once on reconnecting (the
    subscriber's backfill only has what Prefect's event persister already wrote, seconds late),
    and a backfilled Scheduled event of a run gone Late is taken too. Before, the run waited for
    the regular poll (seen on the team topology: `runbooks worker` after its API server
    restarted)."""
    from prefect.states import Late

    async def scenario() -> None:
        async with _stream_cut(NO_POLL_S) as (proxy, _, deployment_id), get_client() as client:
            late = tmp_path / "late"
            run_id = await _run_of(client, deployment_id, late)
            await client.set_flow_run_state(run_id, Late(), force=True)
            await proxy.open()
            await _until(lambda: _finished(client, run_id), 120, "the Late run finished")
            states = await _state_types(client, run_id)
            assert (StateType.SCHEDULED, "Late") in states, states
            _assert_started_once(states, late)

    asyncio.run(scenario())


def test_event_and_fast_poll_together_start_each_run_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner = EventDrivenRunner(
            name=f"pickup-{uuid.uuid4().hex[:8]}", query_seconds=0.2, pause_on_shutdown=False
        )
        task, deployment_id = await _serving(runner)
        try:
            assert runner.pickup is not None
            await asyncio.wait_for(runner.pickup.connected.wait(), 30)
            async with get_client() as client:
                marks = [tmp_path / f"mark-{i}" for i in range(5)]
                run_ids = await asyncio.gather(*(_run_of(client, deployment_id, m) for m in marks))

                async def all_finished() -> bool:
                    return all([await _finished(client, r) for r in run_ids])

                await _until(all_finished, 180, "every run finished")
                for run_id, mark in zip(run_ids, marks, strict=True):
                    _assert_started_once(await _state_types(client, run_id), mark)
        finally:
            await _stop(runner, task)

    asyncio.run(scenario())
