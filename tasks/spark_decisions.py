"""Pure decisions of the spark-streaming-job-failed runbook: which driver runs the application,
whether its streaming query progresses, what to do, and whether the restarted query continued.

Spark's standalone master lists drivers (``/json/`` ``activedrivers``, ``completeddrivers``) and
applications (``activeapps``, ``completedapps``) separately and names neither after the other: a
driver carries its id, state, start time and main class, an application its name and start time.
A driver in cluster mode starts first and registers its application a few seconds later, so each
application belongs to the newest driver that started before it and no newer application claimed.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pydantic import BaseModel, Field

# Spark's DriverState values (org.apache.spark.deploy.master.DriverState)
LIVE_DRIVER = frozenset({"SUBMITTED", "RUNNING", "RELAUNCHING"})
SETTLING_DRIVER = frozenset({"SUBMITTED", "RELAUNCHING"})
DEAD_DRIVER = frozenset({"FAILED", "KILLED", "ERROR", "UNKNOWN", "FINISHED"})


class SparkDriver(BaseModel):
    """A driver as the master's ``/json/`` lists it (cluster deploy mode)."""

    id: str = Field(description="Submission id, e.g. 'driver-20260101120000-0003'.")
    state: str = Field(description="DriverState: SUBMITTED, RUNNING, FAILED, KILLED, ...")
    start_ms: int = Field(0, description="When the master accepted it, epoch ms.")
    main_class: str = ""
    worker: str | None = None


class SparkApp(BaseModel):
    """An application as the master's ``/json/`` lists it."""

    id: str
    name: str
    state: str = Field(description="ApplicationState: WAITING, RUNNING, FINISHED, FAILED, KILLED.")
    start_ms: int = 0


class DriverMatch(BaseModel):
    """The driver that runs (or last ran) the application, and how it was found."""

    driver: SparkDriver | None = None
    app: SparkApp | None = Field(None, description="The application it registered, if any.")
    how: str = Field(description="How the driver was identified, for the report.")


def match_apps_to_drivers(
    drivers: Sequence[SparkDriver], apps: Sequence[SparkApp]
) -> dict[str, SparkDriver]:
    """App id -> the driver that registered it: newest apps first, each claims the newest
    unclaimed driver that started at or before it (a driver's app starts after the driver)."""
    claimed: set[str] = set()
    owners: dict[str, SparkDriver] = {}
    for app in sorted(apps, key=lambda a: (a.start_ms, a.id), reverse=True):
        before = [d for d in drivers if d.id not in claimed and d.start_ms <= app.start_ms]
        if before:
            owner = max(before, key=lambda d: (d.start_ms, d.id))
            claimed.add(owner.id)
            owners[app.id] = owner
    return owners


def choose_driver(
    drivers: Sequence[SparkDriver],
    apps: Sequence[SparkApp],
    app_name: str,
    main_class: str,
    driver_id: str | None = None,
) -> DriverMatch:
    """The driver that matters now for ``app_name``.

    ``driver_id`` (e.g. from the alert's labels) wins when the master knows it. Otherwise the
    newest application of that name gives its driver; a live driver of the same main class that
    started later and registered no application yet is a newer copy on its way up (a
    resubmission), and wins, so the runbook never starts a second one.
    """
    if driver_id:
        known = [d for d in drivers if d.id == driver_id]
        if known:
            return DriverMatch(driver=known[0], how=f"driver id {driver_id} given")
    owners = match_apps_to_drivers(drivers, apps)
    claimed = {d.id for d in owners.values()}
    pending = sorted(
        (
            d
            for d in drivers
            if d.id not in claimed and d.state in LIVE_DRIVER and d.main_class == main_class
        ),
        key=lambda d: (d.start_ms, d.id),
    )
    named = sorted(
        (a for a in apps if a.name == app_name and a.id in owners),
        key=lambda a: (a.start_ms, a.id),
    )
    if named:
        app = named[-1]
        driver = owners[app.id]
        newer = [d for d in pending if d.start_ms >= driver.start_ms and d.id != driver.id]
        if driver.state not in LIVE_DRIVER and newer:
            return DriverMatch(
                driver=newer[-1],
                how=f"newer driver {newer[-1].id} ({newer[-1].state}) not yet registered; "
                f"application {app.id} belonged to {driver.id} ({driver.state})",
            )
        return DriverMatch(
            driver=driver, app=app, how=f"application {app.id} named {app_name!r} and its driver"
        )
    if pending:
        return DriverMatch(
            driver=pending[-1],
            how=f"no application named {app_name!r} yet; newest unregistered live driver of "
            f"{main_class}",
        )
    return DriverMatch(how=f"no application named {app_name!r} and no unregistered live driver")


class Progress(StrEnum):
    NO_CHECKPOINT = "no checkpoint"
    STARTING = "starting"
    PROGRESSING = "progressing"
    STALLED = "stalled"
    IDLE = "idle"


class CheckpointProgress(BaseModel):
    """What a streaming query's checkpoint directory says about its batches."""

    location: str
    exists: bool = Field(description="The location holds a checkpoint (metadata or offsets).")
    query_id: str | None = Field(None, description="The query id in the checkpoint's metadata.")
    last_offset_batch: int | None = Field(None, description="Newest batch planned (offsets/).")
    last_offset_mtime: float | None = None
    last_commit_batch: int | None = Field(None, description="Newest batch committed (commits/).")
    last_commit_mtime: float | None = None
    commit_batches: list[int] = Field(
        default_factory=list, description="The newest committed batch ids, oldest first."
    )

    @property
    def in_flight(self) -> int | None:
        """The batch planned but not committed (a partial batch the restart replays), if any."""
        if self.last_offset_batch is None:
            return None
        if self.last_commit_batch is None or self.last_offset_batch > self.last_commit_batch:
            return self.last_offset_batch
        return None


class ProgressVerdict(BaseModel):
    progress: Progress
    reason: str


def assess_progress(cp: CheckpointProgress, now: float, stall_after_s: float) -> ProgressVerdict:
    """Judge the query's progress from its checkpoint at time ``now`` (epoch s).

    Stalled: a batch was planned (offsets/N) and not committed within ``stall_after_s``, or the
    query committed before and planned nothing since for that long while a batch is in flight.
    Idle: the last planned batch is committed and nothing newer came for ``stall_after_s``;
    Spark plans no batch while its source has no new data, so that alone is not a stall.
    """
    if not cp.exists:
        return ProgressVerdict(
            progress=Progress.NO_CHECKPOINT, reason=f"no checkpoint at {cp.location}"
        )
    in_flight = cp.in_flight
    if in_flight is not None:
        age = now - (cp.last_offset_mtime or now)
        done = (
            f"last committed {cp.last_commit_batch}"
            if cp.last_commit_batch is not None
            else ("none committed yet")
        )
        if age > stall_after_s:
            return ProgressVerdict(
                progress=Progress.STALLED,
                reason=f"batch {in_flight} planned {age:.0f}s ago and not committed ({done}; "
                f"window {stall_after_s:.0f}s)",
            )
        if cp.last_commit_batch is None:
            return ProgressVerdict(
                progress=Progress.STARTING,
                reason=f"batch {in_flight} in flight for {age:.0f}s, none committed yet",
            )
        return ProgressVerdict(
            progress=Progress.PROGRESSING,
            reason=f"batch {in_flight} in flight for {age:.0f}s ({done})",
        )
    if cp.last_commit_batch is None:
        return ProgressVerdict(
            progress=Progress.STARTING, reason="checkpoint metadata written, no batch planned yet"
        )
    age = now - (cp.last_commit_mtime or now)
    if age > stall_after_s:
        return ProgressVerdict(
            progress=Progress.IDLE,
            reason=f"batch {cp.last_commit_batch} committed {age:.0f}s ago and nothing planned "
            f"since (window {stall_after_s:.0f}s): the source may have no new data",
        )
    return ProgressVerdict(
        progress=Progress.PROGRESSING,
        reason=f"batch {cp.last_commit_batch} committed {age:.0f}s ago",
    )


class Action(StrEnum):
    NOTHING = "nothing"
    WAIT = "wait"
    RESUBMIT = "resubmit"
    KILL_AND_RESUBMIT = "kill and resubmit"
    ESCALATE = "escalate"


class Decision(BaseModel):
    action: Action
    reason: str
    without_checkpoint: bool = Field(
        False, description="The resubmitted query would start with no checkpoint (approval)."
    )


def decide_action(
    driver: SparkDriver | None, verdict: ProgressVerdict, idle_is_stalled: bool = False
) -> Decision:
    """What the runbook does, from the driver's state and the query's progress."""
    no_checkpoint = verdict.progress is Progress.NO_CHECKPOINT
    if driver is None or driver.state in DEAD_DRIVER - {"FINISHED"}:
        what = (
            "no driver runs the application"
            if driver is None
            else (f"driver {driver.id} is {driver.state}")
        )
        if no_checkpoint:
            return Decision(
                action=Action.RESUBMIT,
                reason=f"{what} and {verdict.reason}: a new query would start without its "
                "progress (reprocessing or skipping data)",
                without_checkpoint=True,
            )
        return Decision(action=Action.RESUBMIT, reason=f"{what}: resubmit it from its checkpoint")
    if driver.state == "FINISHED":
        return Decision(
            action=Action.ESCALATE,
            reason=f"driver {driver.id} FINISHED on its own (its query was stopped, it did not "
            "crash): a human must decide whether it should run again",
        )
    if driver.state in SETTLING_DRIVER:
        return Decision(
            action=Action.WAIT,
            reason=f"driver {driver.id} is {driver.state}: the master is starting it, wait",
        )
    if driver.state != "RUNNING":
        return Decision(
            action=Action.ESCALATE,
            reason=f"driver {driver.id} is in unknown state {driver.state!r}",
        )
    if verdict.progress is Progress.STALLED or (
        verdict.progress is Progress.IDLE and idle_is_stalled
    ):
        return Decision(
            action=Action.KILL_AND_RESUBMIT,
            reason=f"driver {driver.id} is RUNNING but its query is stalled ({verdict.reason}): "
            "kill it and resubmit from the checkpoint",
        )
    if no_checkpoint:
        return Decision(
            action=Action.ESCALATE,
            reason=f"driver {driver.id} is RUNNING but {verdict.reason}: the block's "
            "checkpoint_location is not the query's, a human must check",
        )
    return Decision(
        action=Action.NOTHING,
        reason=f"driver {driver.id} is RUNNING and its query is {verdict.progress.value} "
        f"({verdict.reason})",
    )


class Continuation(BaseModel):
    ok: bool
    reason: str
    new_batches: list[int] = Field(default_factory=list)


def check_continuation(
    last_before: int | None,
    query_id_before: str | None,
    commits_now: Sequence[int],
    query_id_now: str | None,
    min_new: int = 1,
) -> Continuation:
    """Did the restarted query continue where the dead one stopped?

    Yes when it is the same query (checkpoint query id), committed at least ``min_new`` batches
    after ``last_before``, the first being ``last_before + 1`` (none skipped) and the rest
    following without gaps; batches from scratch (0 again) show up as a changed query id or as
    no batch after ``last_before``.
    """
    new = sorted(b for b in set(commits_now) if last_before is None or b > last_before)
    first = 0 if last_before is None else last_before + 1
    if query_id_before is not None and query_id_now != query_id_before:
        return Continuation(
            ok=False,
            reason=f"checkpoint query id changed from {query_id_before} to {query_id_now}: the "
            "query started over",
            new_batches=new,
        )
    if len(new) < min_new:
        return Continuation(
            ok=False,
            reason=f"{len(new)} batch(es) committed after {last_before} (waiting for {min_new})",
            new_batches=new,
        )
    if new[0] != first:
        return Continuation(
            ok=False,
            reason=f"first batch committed after {last_before} is {new[0]}, not {first}: "
            f"batches skipped",
            new_batches=new,
        )
    expected = list(range(first, first + len(new)))
    if new != expected:
        gaps = sorted(set(expected) - set(new))
        return Continuation(
            ok=False, reason=f"batches missing from the commit log: {gaps}", new_batches=new
        )
    return Continuation(
        ok=True,
        reason=f"batches {new[0]}..{new[-1]} committed after {last_before}, none skipped",
        new_batches=new,
    )
