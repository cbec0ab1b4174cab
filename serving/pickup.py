"""Start a served deployment's run the moment Prefect announces it, instead of at the next poll.

Prefect's runner finds new runs by polling (`Runner(query_seconds=...)`): an alert-triggered run
waits for the next poll, and polling the SQLite server more often slows its automations down.
Prefect emits `prefect.flow-run.Scheduled` when a run is created, and serves its events over a
websocket. `EventPickup` subscribes to those events for the runner's deployments and hands each
run, as soon as it is due, to the runner's own submission path
(`ScheduledRunPoller._submit_scheduled_flow_runs`: its concurrency slots and its set of runs being
submitted). The runner's poll keeps running as the fallback: a run whose event is lost (websocket
down, server restarted) is still started by the next poll.

A run is never started twice by this runner: both paths go through `submit_once`, which acts on
a run's SCHEDULED state at most once (by state id; a retried or re-run flow run gets a new
SCHEDULED state and is started again, as Prefect intends). Between processes, Prefect's server
refuses a second PENDING transition (its `PreventPendingTransitions` rule).

Runs the scheduler creates ahead of time (tag `auto-scheduled`) are left to the poll, which
starts them when due. Pinned to prefect 3.8.8's runner internals;
tests/integration/test_event_pickup.py fails if they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect.runner import Runner

from serving.approval_timeouts import watch_approval_timeouts

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.events import Event

logger = logging.getLogger("serving.pickup")

SCHEDULED_EVENT = "prefect.flow-run.Scheduled"
# a run suspended for approval and then answered is rescheduled as "Resuming" (runbooks.approvals)
RESUMING_EVENT = "prefect.flow-run.Resuming"
PICKUP_EVENTS = (SCHEDULED_EVENT, RESUMING_EVENT)
# The event is published while the API request that creates the run is still committing: read
# the run a few times before leaving it to the poll.
READ_ATTEMPTS = 6
READ_RETRY_S = 0.05
# Reconnection backoff when the event stream is down (the poll covers meanwhile).
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# How many submitted SCHEDULED states to remember (far more than runs in a poll's reach).
REMEMBERED_STATES = 10_000


def install_submit_once(runner: Runner) -> None:
    """Make the runner act on each SCHEDULED state of a run at most once, whoever finds it.

    The poller's answer can be older than a run started meanwhile from an event; once that run
    has finished, the runner no longer counts it as submitting, and Prefect's server lets a
    COMPLETED run (without a persisted result) go to PENDING again. Remembering the state ids
    this runner already submitted closes that gap. Call after the runner has started.
    """
    poller = runner._scheduled_run_poller
    if getattr(poller, "_runbooks_submit_once", False):
        return
    original = poller._submit_scheduled_flow_runs
    submitted: OrderedDict[UUID, None] = OrderedDict()

    async def submit_once(flow_run_response: list[FlowRun], task_group: Any) -> None:
        fresh = [r for r in flow_run_response if r.state is None or r.state.id not in submitted]
        await original(flow_run_response=fresh, task_group=task_group)
        # no await since the filter: nothing else ran in between on this event loop
        for flow_run in fresh:
            if flow_run.state is not None and flow_run.id in poller._submitting_flow_run_ids:
                submitted[flow_run.state.id] = None
        while len(submitted) > REMEMBERED_STATES:
            submitted.popitem(last=False)

    poller._submit_scheduled_flow_runs = submit_once
    poller._runbooks_submit_once = True


class EventPickup:
    """Submits the runner's runs on their `prefect.flow-run.Scheduled` event."""

    def __init__(self, runner: Runner, api_url: str | None = None, reconnection_attempts: int = 2):
        self._runner = runner
        self._api_url = api_url  # default: the API the runner uses
        self._reconnection_attempts = reconnection_attempts
        self.connected = asyncio.Event()
        self.submitted = 0  # runs this pickup handed to the runner (for tests and logs)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Follow the event stream until cancelled; reconnect with backoff when it drops."""
        failures = 0
        while True:
            try:
                async with self._subscriber() as events:
                    self.connected.set()
                    if failures:
                        logger.info("event pickup reconnected after %d failures", failures)
                    failures = 0
                    async for event in events:
                        self._handle(event)
                # a clean close ends iteration: reconnect
                failures += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning(
                        "event pickup disconnected (%d in a row; the runner's poll still starts "
                        "runs): %r",
                        failures,
                        exc,
                    )
            finally:
                self.connected.clear()
            ceiling = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(failures - 1, 16))
            await asyncio.sleep(ceiling * (0.5 + 0.5 * random.random()))

    async def aclose(self) -> None:
        """Cancel submissions still looking up their run (the runner is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _subscriber(self) -> Any:
        from prefect.events.clients import PrefectEventSubscriber, get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

        deployments = sorted(str(d) for d in self._runner._deployment_registry.get_deployment_ids())
        event_filter = EventFilter(
            event=EventNameFilter(name=list(PICKUP_EVENTS)),
            related=EventRelatedFilter(id=[f"prefect.deployment.{d}" for d in deployments]),
        )
        if self._api_url:
            return PrefectEventSubscriber(
                api_url=self._api_url,
                filter=event_filter,
                reconnection_attempts=self._reconnection_attempts,
            )
        return get_events_subscriber(
            filter=event_filter, reconnection_attempts=self._reconnection_attempts
        )

    def _handle(self, event: Event) -> None:
        if event.event not in PICKUP_EVENTS:
            return
        if any(r.id == "prefect.tag.auto-scheduled" for r in event.related):
            return  # the scheduler's runs ahead of time: the poll starts them when due
        resource_id = event.resource.id
        if not resource_id.startswith("prefect.flow-run."):
            return
        try:
            flow_run_id = UUID(resource_id.removeprefix("prefect.flow-run."))
        except ValueError:
            return
        task = asyncio.create_task(self._submit(flow_run_id, state_id=event.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(self, flow_run_id: UUID, state_id: UUID) -> None:
        try:
            flow_run = await self._read_scheduled(flow_run_id, state_id)
        except Exception as exc:  # the poll takes it from here
            logger.warning("event pickup could not read flow run %s: %r", flow_run_id, exc)
            return
        runner = self._runner
        poller = runner._scheduled_run_poller
        if (
            flow_run is None
            or not _due(flow_run, runner._prefetch_seconds)
            or flow_run.deployment_id not in runner._deployment_registry.get_deployment_ids()
            or not getattr(runner, "started", False)
            or poller.stopping
            or flow_run_id in poller._submitting_flow_run_ids
        ):
            return  # changed meanwhile, not due yet, not ours, or already taken
        await poller._submit_scheduled_flow_runs(
            flow_run_response=[flow_run], task_group=runner._runs_task_group
        )
        if flow_run_id in poller._submitting_flow_run_ids:
            self.submitted += 1
            logger.debug("flow run %s submitted on its Scheduled event", flow_run_id)

    async def _read_scheduled(self, flow_run_id: UUID, state_id: UUID) -> FlowRun | None:
        """The flow run, once Prefect shows it in the state the event announced."""
        from prefect.exceptions import ObjectNotFound

        for attempt in range(READ_ATTEMPTS):
            if flow_run_id in self._runner._scheduled_run_poller._submitting_flow_run_ids:
                return None
            with contextlib.suppress(ObjectNotFound):
                flow_run = await self._runner._client.read_flow_run(flow_run_id)
                if flow_run.state is not None and flow_run.state.id == state_id:
                    return flow_run
            # not committed yet (or still the previous state): look again shortly
            await asyncio.sleep(READ_RETRY_S * (attempt + 1))
        return None


def _due(flow_run: FlowRun, prefetch_s: float) -> bool:
    """Scheduled, and due within the runner's prefetch window (as its poll would take it)."""
    from prefect.types._datetime import now

    state = flow_run.state
    if state is None or not state.is_scheduled():
        return False
    scheduled = state.state_details.scheduled_time or flow_run.next_scheduled_start_time
    horizon = now("UTC") + datetime.timedelta(seconds=int(prefetch_s))
    return scheduled is None or scheduled <= horizon


class EventDrivenRunner(Runner):
    """A `prefect.runner.Runner` (same arguments) that also starts runs on their Scheduled event.

    `event_pickup=False` keeps only the poll (still with `install_submit_once`);
    `events_api_url` subscribes through another address of the same API (tests cut it).
    """

    def __init__(
        self,
        *args: Any,
        event_pickup: bool = True,
        events_api_url: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._event_pickup = event_pickup
        self._events_api_url = events_api_url
        self.pickup: EventPickup | None = None
        self._pickup_task: asyncio.Task[None] | None = None
        self._timeouts_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventDrivenRunner:
        await super().__aenter__()
        install_submit_once(self)
        if self._event_pickup:
            self.pickup = EventPickup(self, api_url=self._events_api_url)
            self._pickup_task = asyncio.create_task(self.pickup.run(), name="event-pickup")
        # suspended approval steps have no process to notice their deadline: the server does
        self._timeouts_task = asyncio.create_task(
            watch_approval_timeouts(), name="approval-timeouts"
        )
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._timeouts_task is not None:
            self._timeouts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timeouts_task
            self._timeouts_task = None
        if self._pickup_task is not None and self.pickup is not None:
            self._pickup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pickup_task
            await self.pickup.aclose()
            self._pickup_task = None
        await super().__aexit__(*exc_info)
