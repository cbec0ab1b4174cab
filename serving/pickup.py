"""Start a served deployment's run the moment Prefect announces it, instead of at the next poll.

Prefect's runner finds new runs by polling (`Runner(query_seconds=...)`): an alert-triggered run
waits for the next poll, and polling the SQLite server more often slows its automations down.
Prefect emits `prefect.flow-run.Scheduled` when a run is created, and serves its events over a
websocket. `EventPickup` subscribes to those events for the runner's deployments and hands each
run, as soon as it is due, to the runner's own submission path
(`ScheduledRunPoller._submit_scheduled_flow_runs`: its concurrency slots and its set of runs being
submitted). The runner's poll keeps running as the fallback: a run whose event is lost (websocket
down, server restarted) is still started by a poll, the one the pickup makes as soon as the
stream is back or else the next regular one.

A run is never started twice by this runner: both paths go through `submit_once`, which acts on
a run's SCHEDULED state at most once (by state id; a retried or re-run flow run gets a new
SCHEDULED state and is started again, as Prefect intends). Between processes, Prefect's server
refuses a second PENDING transition (its `PreventPendingTransitions` rule).

Runs the scheduler creates ahead of time (tag `auto-scheduled`) are left to the poll, which
starts them when due. The same pickup serves our worker type (serving/fast_worker.py): `EventPickup`
hands runs to a target, `RunnerTarget` for a runner's deployments, the worker's for its work pool. Pinned to prefect 3.8.8's runner internals;
tests/integration/test_event_pickup.py fails if they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from prefect.runner import Runner

from serving.approval_timeouts import watch_approval_timeouts

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
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


class SubmittedStates:
    """The SCHEDULED state ids already submitted in this process (the newest REMEMBERED_STATES).

    Used by the runner (`install_submit_once`) and by serving.fast_worker's worker: whichever
    path finds a run (poll or event), it is acted on at most once per SCHEDULED state.
    """

    def __init__(self) -> None:
        self._ids: OrderedDict[UUID, None] = OrderedDict()

    def fresh(self, flow_run: FlowRun) -> bool:
        return flow_run.state is None or flow_run.state.id not in self._ids

    def remember(self, flow_run: FlowRun) -> None:
        if flow_run.state is not None:
            self._ids[flow_run.state.id] = None
        while len(self._ids) > REMEMBERED_STATES:
            self._ids.popitem(last=False)


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
    submitted = SubmittedStates()

    async def submit_once(flow_run_response: list[FlowRun], task_group: Any) -> None:
        fresh = [r for r in flow_run_response if submitted.fresh(r)]
        await original(flow_run_response=fresh, task_group=task_group)
        # no await since the filter: nothing else ran in between on this event loop
        for flow_run in fresh:
            if flow_run.id in poller._submitting_flow_run_ids:
                submitted.remember(flow_run)

    poller._submit_scheduled_flow_runs = submit_once
    poller._runbooks_submit_once = True


class PickupTarget(Protocol):
    """What `EventPickup` hands runs to: a runner (`RunnerTarget`) or a worker
    (serving.fast_worker)."""

    def related_ids(self) -> list[str]:
        """Prefect resource ids (deployment, work pool ...) whose runs' events to follow."""

    def client(self) -> PrefectClient: ...

    def taken(self, flow_run_id: UUID) -> bool:
        """Already being submitted here (no need to read it)."""

    async def submit(self, flow_run: FlowRun) -> bool:
        """Start this SCHEDULED run if it is due, ours and not taken; True if submitted."""

    async def poll(self) -> None:
        """Poll once now, as the runner's or worker's own poll does."""


class EventPickup:
    """Submits a runner's or a worker's runs on their `prefect.flow-run.Scheduled` event."""

    def __init__(
        self, target: PickupTarget, api_url: str | None = None, reconnection_attempts: int = 2
    ):
        self._target = target
        self._api_url = api_url  # default: the API the target uses
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
                        # runs announced while the stream was down: the subscriber backfills
                        # only what Prefect had persisted (its event persister writes a few
                        # seconds late), so poll once now instead of at the next poll
                        logger.info("event pickup reconnected after %d failures", failures)
                        self._spawn(self._poll())
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

        event_filter = EventFilter(
            event=EventNameFilter(name=list(PICKUP_EVENTS)),
            related=EventRelatedFilter(id=self._target.related_ids()),
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
        self._spawn(self._submit(flow_run_id, state_id=event.id))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        try:
            await self._target.poll()
        except Exception as exc:  # the regular poll comes anyway
            logger.warning("event pickup could not poll after reconnecting: %r", exc)

    async def _submit(self, flow_run_id: UUID, state_id: UUID) -> None:
        try:
            flow_run = await self._read_scheduled(flow_run_id, state_id)
        except Exception as exc:  # the poll takes it from here
            logger.warning("event pickup could not read flow run %s: %r", flow_run_id, exc)
            return
        if flow_run is None:
            return
        try:
            submitted = await self._target.submit(flow_run)
        except Exception as exc:  # e.g. the API is unreachable: the poll takes it from here
            logger.warning("event pickup could not submit flow run %s: %r", flow_run_id, exc)
            return
        if submitted:
            self.submitted += 1
            logger.debug("flow run %s submitted on its Scheduled event", flow_run_id)

    async def _read_scheduled(self, flow_run_id: UUID, state_id: UUID) -> FlowRun | None:
        """The flow run, once Prefect shows it in the state the event announced, or in a
        SCHEDULED state that has replaced it since: Prefect's late-runs service marks a run
        "Late" 15 s after its start time, and an event can reach us that late when the stream
        was down and the reconnected subscriber backfills it. Such a run is as due as before,
        and the poll would start it (once per state: SubmittedStates)."""
        from prefect.client.schemas.objects import StateType
        from prefect.exceptions import ObjectNotFound

        for attempt in range(READ_ATTEMPTS):
            if self._target.taken(flow_run_id):
                return None
            with contextlib.suppress(ObjectNotFound):
                flow_run = await self._target.client().read_flow_run(flow_run_id)
                state = flow_run.state
                if state is not None and (
                    state.id == state_id or state.type == StateType.SCHEDULED
                ):
                    return flow_run
            # not committed yet (or still the previous state): look again shortly
            await asyncio.sleep(READ_RETRY_S * (attempt + 1))
        return None


class RunnerTarget:
    """A `Runner`'s deployments, submitted through its poller's own path."""

    def __init__(self, runner: Runner):
        self._runner = runner

    def related_ids(self) -> list[str]:
        deployments = sorted(str(d) for d in self._runner._deployment_registry.get_deployment_ids())
        return [f"prefect.deployment.{d}" for d in deployments]

    def client(self) -> PrefectClient:
        return self._runner._client

    def taken(self, flow_run_id: UUID) -> bool:
        return flow_run_id in self._runner._scheduled_run_poller._submitting_flow_run_ids

    async def poll(self) -> None:
        await self._runner._get_and_submit_flow_runs()

    async def submit(self, flow_run: FlowRun) -> bool:
        runner = self._runner
        poller = runner._scheduled_run_poller
        if (
            not due(flow_run, runner._prefetch_seconds)
            or flow_run.deployment_id not in runner._deployment_registry.get_deployment_ids()
            or not getattr(runner, "started", False)
            or poller.stopping
            or self.taken(flow_run.id)
        ):
            return False  # changed meanwhile, not due yet, not ours, or already taken
        await poller._submit_scheduled_flow_runs(
            flow_run_response=[flow_run], task_group=runner._runs_task_group
        )
        return self.taken(flow_run.id)


def due(flow_run: FlowRun, prefetch_s: float) -> bool:
    """Scheduled, and due within the prefetch window (as a runner's or worker's poll takes it)."""
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
            self.pickup = EventPickup(RunnerTarget(self), api_url=self._events_api_url)
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
