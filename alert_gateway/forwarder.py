"""Delivery of spooled events to Prefect's ``POST /events``, in order, until Prefect has each one.

The forwarder is woken the moment an alert is committed, so a healthy path adds no polling
delay. While Prefect is unreachable it waits with exponential backoff and jitter (bounded by
``backoff_max_s``) and never drops an event. An event Prefect refuses as invalid (4xx on its
own) is set aside as rejected, so it cannot block the ones behind it. An event whose earlier
attempt failed goes under a new id (``alert_gateway.events.delivery_id``: Prefect may have
recorded the failed attempt's id as seen without publishing it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence

import httpx

from alert_gateway.events import delivery_body
from alert_gateway.metrics import GatewayMetrics
from alert_gateway.settings import GatewaySettings, prefect_auth_headers
from alert_gateway.spool import Spool, SpooledEvent
from runbooks.backoff import backoff_delay

logger = logging.getLogger("alert_gateway.forwarder")

# Housekeeping cadence: forget delivered events past their retention.
PRUNE_INTERVAL_S = 600.0
# A delivery request stays moderate even when every spooled event is near Prefect's 1.5 MB limit.
MAX_BATCH_CHARS = 4 * 1024 * 1024
# Prefect's answers meaning "this event is invalid", as opposed to "try again later".
_INVALID_EVENT_STATUSES = {400, 413, 422}


class DeliveryFailed(Exception):
    """Prefect did not take the batch this time (down, slow, overloaded, misconfigured)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def within_size(events: Sequence[SpooledEvent], max_chars: int) -> list[SpooledEvent]:
    """The leading events whose bodies fit in ``max_chars`` together; always at least one."""
    taken: list[SpooledEvent] = []
    size = 0
    for event in events:
        size += len(event.body)
        if taken and size > max_chars:
            break
        taken.append(event)
    return taken


class Forwarder:
    """Moves events from the spool to Prefect; one delivery request in flight at a time."""

    def __init__(self, spool: Spool, settings: GatewaySettings, metrics: GatewayMetrics):
        self._spool = spool
        self._settings = settings
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._client = httpx.AsyncClient(
            headers={"Content-Type": "application/json", **prefect_auth_headers(settings)},
            timeout=httpx.Timeout(settings.forward_timeout_s, connect=min(settings.forward_timeout_s, 3.0)),
        )
        self._events_url = f"{settings.prefect_api_url.rstrip('/')}/events"
        self._failures = 0

    def wake(self) -> None:
        """Deliver now: new events were committed to the spool."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled."""
        next_prune = time.monotonic()
        try:
            while True:
                self._wake.clear()
                batch: list[SpooledEvent] = []
                try:
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + PRUNE_INTERVAL_S
                        await self._prune()
                    batch = within_size(
                        await self._spool.call(self._spool.pending, self._settings.forward_batch_size),
                        MAX_BATCH_CHARS,
                    )
                    if batch:
                        await self._deliver(batch)
                        self._recovered()
                        continue
                except DeliveryFailed as exc:
                    await self._back_off(exc.reason, str(exc), batch)
                    continue
                except Exception as exc:
                    # a spool error (disk full...) must not end delivery for good
                    logger.exception("forwarder error; retrying")
                    await self._back_off("internal", repr(exc), [])
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=PRUNE_INTERVAL_S)
        finally:
            await self._client.aclose()

    async def _deliver(self, batch: Sequence[SpooledEvent]) -> None:
        response = await self._post(batch)
        if response.is_success:
            await self._spool.call(self._spool.mark_delivered, [e.id for e in batch], time.time())
            now = time.time()
            for event in batch:
                self._metrics.forward_latency.observe(max(0.0, now - event.accepted_at))
            self._metrics.forwarded.inc(len(batch))
            return
        if response.status_code not in _INVALID_EVENT_STATUSES:
            raise DeliveryFailed(
                f"http_{response.status_code}",
                f"Prefect answered {response.status_code}: {response.text[:300]}",
            )
        if len(batch) > 1:
            # find the invalid event(s): the others must still get through
            for event in batch:
                await self._deliver([event])
            return
        error = f"Prefect refused the event ({response.status_code}): {response.text[:500]}"
        logger.error("event %s set aside: %s", batch[0].id, error)
        self._metrics.forward_failures.labels("rejected").inc()
        await self._spool.call(self._spool.mark_rejected, batch[0].id, error, time.time())

    async def _post(self, batch: Sequence[SpooledEvent]) -> httpx.Response:
        content = "[" + ",".join(delivery_body(e.id, e.body, e.attempts + 1) for e in batch) + "]"
        try:
            return await self._client.post(self._events_url, content=content.encode())
        except httpx.TimeoutException as exc:
            raise DeliveryFailed("timeout", f"Prefect did not answer in time: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise DeliveryFailed("unreachable", f"Prefect unreachable: {exc!r}") from exc

    async def _back_off(self, reason: str, message: str, batch: Sequence[SpooledEvent]) -> None:
        self._failures += 1
        self._metrics.forward_failures.labels(reason).inc()
        if batch:
            await self._spool.call(self._spool.record_failure, [e.id for e in batch], message)
        delay = backoff_delay(
            self._failures, self._settings.backoff_initial_s, self._settings.backoff_max_s, random.random()
        )
        # the first failure and then every tenth: a long outage should not flood the log
        if self._failures == 1 or self._failures % 10 == 0:
            logger.warning(
                "delivery to %s failed (%d in a row), retrying in %.1fs: %s",
                self._events_url, self._failures, delay, message,
            )
        await asyncio.sleep(delay)

    def _recovered(self) -> None:
        if self._failures:
            logger.info("delivering to %s again after %d failures", self._events_url, self._failures)
            self._failures = 0

    async def _prune(self) -> None:
        pruned = await self._spool.call(
            self._spool.prune, time.time(), self._settings.retention_s, self._settings.cooldown_s
        )
        if pruned:
            logger.info("forgot %d delivered events past retention", pruned)
