"""Per-target locks that come back right after a crash: a Prefect global concurrency slot held with
a lease, plus a record of who holds it.

Why not only ``prefect.concurrency.sync.concurrency``: a slot whose holder died is counted until its
lease expires, and the default lease storage lives in the server's memory, so a server restart
forgot the lease and kept the slot forever (issue #9). Three things fix that:

- ``runbooks up`` starts its Prefect server with Prefect's *filesystem* lease storage, so a lease
  outlives a server restart and the server's repossessor frees the slot when it expires: a dead
  holder's lock is free at most ``LEASE_S`` + the repossessor's loop (15 s) after its last renewal.
- The holder writes who it is (flow run, host, pid and the pid's start time, lease id) into a
  Prefect Variable next to the lock. A run that finds the target busy reads it: when the holder's
  run is in a final state, or its process on this host is gone, the stale lease is released at once
  instead of waiting for the expiry. The record also names the holder in the waiting run's report.
- A run that suspends for approval keeps its lease until the approval deadline, and the same run,
  resumed, adopts it again: nobody else acts on the target while a human decides.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    VariableCreate,
    VariableUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.variables import Variable
from pydantic import BaseModel, Field

logger = logging.getLogger("runbooks.locks")

# Prefect's shortest lease by default (RUNBOOKS_LOCK_LEASE_S, 60-3600 s). A killed holder's slot
# is free this long (+ the repossessor's loop) after its last renewal, or at once when a waiting
# run on the same host sees the holder's process is gone.
LEASE_S = min(max(float(os.environ.get("RUNBOOKS_LOCK_LEASE_S", "60")), 60.0), 3600.0)
# How long after the approval deadline a suspended run's lease still holds the target, so the run
# resumed by the timeout can adopt it and escalate.
APPROVAL_LEASE_MARGIN_S = 120.0
RETRY_S = 1.0
RENEW_EVERY_S = LEASE_S / 4

FINAL_STATES = {
    StateType.COMPLETED,
    StateType.FAILED,
    StateType.CRASHED,
    StateType.CANCELLED,
}


class LockHolder(BaseModel):
    """Who holds a target's lock; kept in the Prefect Variable ``runbooks_lock_<target>``."""

    lease_id: UUID
    flow_run_id: UUID | None = None
    flow_run_name: str | None = None
    runbook: str = ""
    host: str = ""
    pid: int | None = None
    pid_started: str | None = Field(None, description="The process's start time (/proc stat).")
    since: datetime
    awaiting_approval_until: datetime | None = None

    def describe(self) -> str:
        who = f"run {self.flow_run_name or self.flow_run_id or '?'}"
        if self.runbook:
            who += f" of {self.runbook}"
        return f"{who} since {self.since:%H:%M:%S}Z"


class HolderStatus(StrEnum):
    ACTIVE = "active"
    AWAITING_APPROVAL = "awaiting approval"
    FINISHED = "its run has ended"
    DEAD = "its process is gone"
    UNKNOWN = "unknown holder"


def judge_holder(
    holder: LockHolder | None,
    run_state: StateType | None,
    run_found: bool,
    process_alive: bool | None,
    now: datetime,
) -> HolderStatus:
    """What the record of a busy lock's holder says about it (``process_alive`` None: not checkable)."""
    if holder is None:
        return HolderStatus.UNKNOWN
    if holder.flow_run_id is not None and not run_found:
        return HolderStatus.FINISHED
    if run_state in FINAL_STATES:
        return HolderStatus.FINISHED
    if run_state is StateType.PAUSED:
        # suspended for approval: no process by design; its lease ends after the deadline
        if holder.awaiting_approval_until and now < holder.awaiting_approval_until:
            return HolderStatus.AWAITING_APPROVAL
        return HolderStatus.ACTIVE
    if process_alive is False:
        return HolderStatus.DEAD
    return HolderStatus.ACTIVE


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/<pid>/stat): tells pid reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces; fields after its closing parenthesis are fixed
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(holder: LockHolder) -> bool | None:
    """Whether the holder's process still runs; None when it ran on another host."""
    if holder.pid is None or holder.host != socket.gethostname():
        return None
    started = process_start_time(holder.pid)
    return started is not None and started == holder.pid_started


@dataclass
class Busy:
    """The target is held by someone else."""

    holder: LockHolder | None
    status: HolderStatus


class LockBusy(Exception):
    """The lock could not be taken within the patience."""

    def __init__(self, busy: Busy):
        super().__init__(busy.status.value)
        self.busy = busy


@dataclass
class Acquired:
    waited_s: float
    adopted: bool
    released_stale: list[str]
    waited_for: LockHolder | None


class TargetLock:
    """One target's lock for one flow run."""

    def __init__(
        self,
        name: str,
        variable: str,
        *,
        runbook: str,
        flow_run_id: UUID | None,
        flow_run_name: str | None,
    ):
        self.name = name
        self.variable = variable
        self.runbook = runbook
        self.flow_run_id = flow_run_id
        self.flow_run_name = flow_run_name
        self.lease_id: UUID | None = None
        self._kept: UUID | None = None  # handed over to a suspension about to happen
        self._stop = threading.Event()
        self._renewing = threading.Lock()

    # taking and giving back -------------------------------------------------------------

    def acquire(self, patience_s: float) -> Acquired:
        """Take the lock, waiting up to ``patience_s``; stale holders are released on the way.

        Raises ``LockBusy`` when the holder is alive and did not let go in time, or at once when
        the holder is a run suspended waiting for a human's approval on this target.
        """
        started = time.monotonic()
        self._ensure_limit()
        if self._adopt():
            return Acquired(0.0, True, [], None)
        released: list[str] = []
        last: Busy | None = None
        while True:
            lease_id = self._try_take()
            if lease_id is not None:
                self.lease_id = lease_id
                self._write_holder(None)
                waited_for = last.holder if last else None
                return Acquired(time.monotonic() - started, False, released, waited_for)
            holder = self._read_holder()
            last = Busy(holder, self._status(holder))
            if last.status in (HolderStatus.FINISHED, HolderStatus.DEAD) and holder is not None:
                self._release_lease(holder.lease_id)
                self._clear_holder(holder.lease_id)
                released.append(f"{holder.describe()} ({last.status.value})")
                continue
            if last.status is HolderStatus.AWAITING_APPROVAL:
                raise LockBusy(last)
            left = patience_s - (time.monotonic() - started)
            if left <= 0:
                raise LockBusy(last)
            time.sleep(min(left, RETRY_S * random.uniform(0.8, 1.2)))

    @contextmanager
    def renewed(self) -> Iterator[None]:
        """Renew the lease in the background while the block runs.

        Our own thread rather than ``prefect.concurrency._leases.maintain_concurrency_lease``: a
        run suspending for approval must stop the renewals and stretch the lease to the approval
        deadline in one step (``keep_while_suspended``), which Prefect's renewal cannot be told.
        """
        assert self.lease_id is not None
        self._stop.clear()
        # in this run's context: the Prefect settings in force here (e.g. a test harness's
        # temporary API URL) are context variables, which a plain thread would not see
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(self._renew_until_stopped,), name="target-lock", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=5)

    def release(self) -> None:
        """Give the slot back; a lease kept for a suspension that never happened included."""
        lease_id = self.lease_id or self._kept
        if lease_id is None:
            return
        self._stop.set()
        # the slot first: a run that dies in between leaves a record whose lease is gone, which
        # waiters see as a finished holder, never a slot without a record
        self._release_lease(lease_id)
        self._clear_holder(lease_id)
        self.lease_id = self._kept = None

    def keep_while_suspended(self, deadline: datetime) -> None:
        """Hold the target past this process, until the approval deadline (and a margin).

        Called before the run suspends; ``suspended()`` then tells ``release`` to leave it.
        """
        if self.lease_id is None:
            return
        self._stop.set()
        with self._renewing:  # a renewal in flight would shorten the lease again
            until = deadline + timedelta(seconds=APPROVAL_LEASE_MARGIN_S)
            seconds = max(LEASE_S, (until - datetime.now(UTC)).total_seconds())
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(self.lease_id, lease_duration=seconds)
            self._write_holder(deadline)
            self._kept, self.lease_id = self.lease_id, None

    def suspended(self) -> None:
        """The run did suspend: the kept lease is the resumed run's to adopt, not ours to release."""
        self._kept = None

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            with self._renewing:
                if self._stop.is_set() or self.lease_id is None:
                    return
                try:
                    with get_client(sync_client=True) as client:
                        client.renew_concurrency_lease(self.lease_id, lease_duration=LEASE_S)
                except (httpx.HTTPError, OSError) as exc:
                    # the lease is long enough for a few misses; the expiry is the backstop
                    logger.warning("renewing the lock %s failed: %s", self.name, exc)

    # internals --------------------------------------------------------------------------

    def _ensure_limit(self) -> None:
        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(self.name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=self.name, limit=1)
                    )
                except ObjectAlreadyExists:
                    pass  # created by a concurrent run between the read and the create
                return
            if limit.limit != 1:
                client.update_global_concurrency_limit(
                    self.name, GlobalConcurrencyLimitUpdate(limit=1)
                )

    def _try_take(self) -> UUID | None:
        holder = (
            ConcurrencyLeaseHolder(type="flow_run", id=self.flow_run_id)
            if self.flow_run_id
            else None
        )
        with get_client(sync_client=True) as client:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[self.name],
                    slots=1,
                    mode="concurrency",
                    lease_duration=LEASE_S,
                    holder=holder,
                )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 423:
                    return None
                raise
        return UUID(response.json()["lease_id"])

    def _adopt(self) -> bool:
        """A run resumed after approval takes back the lease it kept while suspended."""
        holder = self._read_holder()
        if holder is None or self.flow_run_id is None or holder.flow_run_id != self.flow_run_id:
            return False
        with get_client(sync_client=True) as client:
            try:
                client.renew_concurrency_lease(holder.lease_id, lease_duration=LEASE_S)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in (404, 410):
                    return False  # expired meanwhile: take the lock like anyone else
                raise
        self.lease_id = holder.lease_id
        self._write_holder(None)
        return True

    def _status(self, holder: LockHolder | None) -> HolderStatus:
        run_state: StateType | None = None
        found = True
        if holder is not None and holder.flow_run_id is not None:
            with get_client(sync_client=True) as client:
                try:
                    run = client.read_flow_run(holder.flow_run_id)
                    run_state = run.state.type if run.state else None
                except ObjectNotFound:
                    found = False
        alive = process_alive(holder) if holder else None
        return judge_holder(holder, run_state, found, alive, datetime.now(UTC))

    def _read_holder(self) -> LockHolder | None:
        raw = Variable.get(self.variable, default=None)
        if not raw:
            return None
        try:
            return LockHolder.model_validate(raw)
        except ValueError:
            return None

    def _write_holder(self, awaiting_approval_until: datetime | None) -> None:
        assert self.lease_id is not None
        pid = os.getpid()
        holder = LockHolder(
            lease_id=self.lease_id,
            flow_run_id=self.flow_run_id,
            flow_run_name=self.flow_run_name,
            runbook=self.runbook,
            host=socket.gethostname(),
            pid=pid if awaiting_approval_until is None else None,
            pid_started=process_start_time(pid) if awaiting_approval_until is None else None,
            since=datetime.now(UTC),
            awaiting_approval_until=awaiting_approval_until,
        )
        put_variable(self.variable, holder.model_dump(mode="json"), ["runbooks", "target-lock"])

    def _clear_holder(self, lease_id: UUID) -> None:
        # read-then-unset is not atomic: at worst a new holder's record is lost, and waiters then
        # wait for it without naming it; the slot itself is never freed by this
        holder = self._read_holder()
        if holder is not None and holder.lease_id == lease_id:
            Variable.unset(self.variable)

    def _release_lease(self, lease_id: UUID) -> None:
        # an unknown or expired lease is a no-op on the server: releasing twice is safe
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id)


def put_variable(name: str, value: object, tags: list[str]) -> None:
    """Create or replace a Prefect Variable, whatever another run does to it meanwhile.

    Not ``Variable.set(overwrite=True)``: it reads, then updates, then reads again, and a finished
    holder clearing its record in between (``release`` gives the slot back first, by design)
    turned that into a 404 that failed the new holder's run (seen with 50 queued alerts for one
    server, `python -m bench restart-backlog`).
    """
    with get_client(sync_client=True) as client:
        for _ in range(5):
            try:
                client.update_variable(VariableUpdate(name=name, value=value, tags=tags))
                return
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
            try:
                client.create_variable(VariableCreate(name=name, value=value, tags=tags))
                return
            except ObjectAlreadyExists:
                continue  # created by someone else meanwhile: replace it
    raise RuntimeError(f"could not write the Prefect Variable {name!r}: it kept changing")
