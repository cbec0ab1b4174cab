"""Services run as supervised processes: the supervisord backend of tasks.workloads (issue #12).

A service is a supervisord process group: a ``[program:x]`` is group ``x`` with one process
``x``, a program with ``numprocs=N`` is group ``x`` with N processes (``x_00``, ``x_01``, ... as
its ``process_name`` says); ``group:name`` names one process of a group. Everything goes
through supervisord's XML-RPC interface (``supervisor.*`` methods), with the block's timeouts.

What supervisord cannot do is refused with ``Unsupported``: it sets no memory limits, keeps no
revision history and has no autoscaler. Scaling works on a program configured with ``numprocs``
copies (the spare ones ``autostart=false``): running n of them is starting or stopping some;
more than ``numprocs`` needs a configuration change. A ``[group:x]`` of different programs does
not scale (its processes are not copies of each other).

Idempotent changes: supervisord reports start and stop times in whole seconds of its own clock,
so a process that started in the same second as ``since`` counts as started after it (left
alone): a retried restart never restarts twice, at the price of not restarting a process that
started less than a second before the run looked at it. The hosts' clocks are assumed in sync.
"""

from __future__ import annotations

import http.client
import re
import time
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from supervisor.xmlrpc import Faults

from blocks.supervisor import SupervisorHost
from runbooks.results import Change, ChangeSet
from tasks.workloads import (
    TRANSIENT_CHECKS,
    Capability,
    Instance,
    Revision,
    Unsupported,
    WorkloadEvent,
    WorkloadRef,
    WorkloadStatus,
)

PLATFORM = "supervisord"

# supervisor.states.ProcessStates by name, as getProcessInfo's `statename` spells them
ACTIVE_STATES = frozenset({"STARTING", "RUNNING", "BACKOFF"})  # supervisord's RUNNING_STATES
ALIVE_STATES = frozenset({"STARTING", "RUNNING", "STOPPING"})  # a process with a pid
STOPPED_STATES = frozenset({"STOPPED", "STOPPING"})  # stopped on purpose

# one log tail: enough bytes for `lines` lines of ordinary length, within a bound
LOG_BYTES_PER_LINE = 512
LOG_BYTES_MIN = 4096
LOG_BYTES_MAX = 1 << 20

Step = Literal["restart", "start"]


# --- pure decisions ----------------------------------------------------------------------------


def namespec(info: dict[str, Any]) -> str:
    """supervisord's name of one process: ``group:name``."""
    return f"{info['group']}:{info['name']}"


def _natural_key(name: str) -> list[Any]:
    # consumer_2 before consumer_10 even where process_name does not pad the number
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def service_processes(infos: list[dict[str, Any]], service: str) -> list[dict[str, Any]]:
    """The processes of ``service`` (a group, or ``group:name``) in name order."""
    group, colon, name = service.partition(":")
    chosen = [
        info
        for info in infos
        if info["group"] == group and (not colon or info["name"] == name)
    ]
    return sorted(chosen, key=lambda info: _natural_key(info["name"]))


def copies_of_one_program(processes: list[dict[str, Any]], service: str) -> bool:
    """The service is a group of more than one copy of one program (``numprocs``), the unit
    that scales: names alike but for their numbers (``%(process_num)``). A ``[group:x]`` of
    different programs (``web``, ``worker``) is no such unit, nor is one ``group:name``."""
    if ":" in service or len(processes) < 2:
        return False
    return len({re.sub(r"\d+", "#", info["name"]) for info in processes}) == 1


def _when(seconds: int) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def _iso(seconds: int) -> str | None:
    # change details go into audit events as JSON
    when = _when(seconds)
    return when.isoformat() if when else None


def has_exit_status(info: dict[str, Any]) -> bool:
    """supervisord knows how the process last ended: it is down after running (EXITED) or
    after a stop (STOPPED). A spawn forgets the status (reported as 0), and a process that died
    before ``startsecs`` (BACKOFF, FATAL) has none, only a spawn error."""
    return bool(info["stop"]) and info["statename"] in ("EXITED", "STOPPED")


def to_instance(info: dict[str, Any]) -> Instance:
    """One process as an ``Instance``: running while it has a process (STARTING, RUNNING,
    STOPPING), ready once supervisord counts it RUNNING (up for ``startsecs``; supervisord has
    no health checks). The exit code is the last exit's (-1: killed by a signal) where
    supervisord still knows it (``has_exit_status``)."""
    state = info["statename"]
    has_exit = has_exit_status(info)
    return Instance(
        id=namespec(info),
        name=info["name"],
        state=state,
        running=state in ALIVE_STATES and bool(info["pid"]),
        ready=state == "RUNNING",
        started_at=_when(info["start"]),
        pid=info["pid"] or None,
        exit_code=info["exitstatus"] if has_exit else None,
        finished_at=_when(info["stop"]),
    )


def _seconds(moment: datetime) -> float:
    """Epoch seconds of ``moment``; a naive datetime is taken as UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def started_after(start: int, since: datetime) -> bool:
    """The process may have started after ``since``: its whole-second start time is not wholly
    before it (a start in the same second counts as after, see the module docstring)."""
    return bool(start) and start + 1 > _seconds(since)


def restart_step(info: dict[str, Any], since: datetime, *, single: bool) -> tuple[Step | None, str]:
    """What a restart does to one process, and why.

    - RUNNING or STARTING since after ``since``: nothing (restarted already, by an earlier
      attempt or by someone else);
    - RUNNING or STARTING since before: stop, then start;
    - BACKOFF (supervisord is retrying a process that died at start): stop, then start; EXITED
      or FATAL: start. Whenever they last started: they are not up, so nothing was restarted;
    - STOPPED: start when the service is this one process, or when it was stopped after
      ``since`` (an earlier attempt stopped it and failed before starting it); a STOPPED
      process of a group is otherwise scaled down on purpose, and stays stopped;
    - STOPPING (someone is stopping it) or UNKNOWN: nothing.
    """
    state = info["statename"]
    if state in ("RUNNING", "STARTING"):
        if started_after(info["start"], since):
            when = since.isoformat(timespec="seconds")
            return None, f"{state} since after {when}: restarted already"
        return "restart", f"{state}: stop and start"
    if state == "BACKOFF":
        return "restart", "BACKOFF: stop and start"
    if state in ("EXITED", "FATAL"):
        return "start", f"{state}: start"
    if state == "STOPPED":
        if single:
            return "start", "STOPPED: start"
        if info["stop"] and info["stop"] + 1 > _seconds(since):
            return "start", "stopped after the run looked: finish the restart"
        return None, "STOPPED in a group: scaled down on purpose, left stopped"
    return None, f"{state}: left alone"


def scale_plan(infos: list[dict[str, Any]], replicas: int) -> tuple[list[str], list[str]]:
    """Processes to start and to stop so that ``replicas`` of the group's run (namespecs).

    Processes running or starting (RUNNING, STARTING, BACKOFF) stay as they are where they are
    needed: more are started in name order (the first idle ones), fewer stopped from the end of
    the name order. A group configured as ``numprocs`` processes with the spare ones not
    autostarted thus runs its first n processes.
    """
    if replicas < 0:
        raise ValueError(f"cannot run {replicas} processes")
    ordered = sorted(infos, key=lambda info: _natural_key(info["name"]))
    if replicas > len(ordered):
        raise Unsupported(
            f"{replicas} processes asked for, the group has {len(ordered)}: supervisord runs "
            f"only the processes it is configured with; configure numprocs={replicas} or more "
            "(spare ones autostart=false) and `supervisorctl update`"
        )
    active = [info for info in ordered if info["statename"] in ACTIVE_STATES]
    idle = [info for info in ordered if info["statename"] not in ACTIVE_STATES]
    if len(active) < replicas:
        return [namespec(i) for i in idle[: replicas - len(active)]], []
    return [], [namespec(i) for i in active[replicas:]]


def process_events(info: dict[str, Any], since: datetime) -> list[WorkloadEvent]:
    """What supervisord remembers of one process after ``since``: its last start, its last
    exit (stop time, exit status, spawn error), a spawn that gave up (FATAL) or is retried."""
    after = _seconds(since)
    events: list[WorkloadEvent] = []
    state, spawnerr = info["statename"], info["spawnerr"]

    def seen(seconds: int) -> bool:
        return bool(seconds) and seconds + 1 > after

    # a spawn that died before startsecs shows as the exit and the BACKOFF/FATAL below
    if seen(info["start"]) and state not in ("BACKOFF", "FATAL"):
        message = f"pid {info['pid']}" if info["pid"] else "started"
        events.append(WorkloadEvent(at=_when(info["start"]), reason="STARTED",
                                    message=message, instance=info["name"]))
    if seen(info["stop"]):
        if not has_exit_status(info):
            message = spawnerr or "ended; exit status not kept once started again"
        elif info["exitstatus"] == -1:
            message = "killed by a signal"
        else:
            message = f"exit status {info['exitstatus']}"
        if spawnerr and spawnerr not in message:
            message += f"; {spawnerr}"
        reason = "STOPPED" if state == "STOPPED" else "EXITED"
        events.append(WorkloadEvent(at=_when(info["stop"]), reason=reason, message=message,
                                    instance=info["name"]))
    if state in ("FATAL", "BACKOFF"):
        last = max(info["start"], info["stop"])
        if seen(last) or not last:
            events.append(WorkloadEvent(at=_when(last), reason=state,
                                        message=spawnerr or state, instance=info["name"]))
    return events


def tail_lines(text: str, lines: int, *, cut: bool) -> str:
    """The last ``lines`` lines of a log tail; ``cut``: it starts mid-file, so its first line
    may be partial and is dropped unless it is all there is."""
    rows = text.splitlines()
    if cut and len(rows) > 1:
        rows = rows[1:]
    return "\n".join(rows[-lines:]) if lines > 0 else ""


def log_bytes(lines: int) -> int:
    return min(max(lines * LOG_BYTES_PER_LINE, LOG_BYTES_MIN), LOG_BYTES_MAX)


def is_transient_supervisor_error(exc: BaseException) -> bool:
    """Worth retrying: supervisord unreachable or slow, restarting (SHUTDOWN_STATE), or a proxy
    in front of it overloaded. Never a wrong name, a refused login or a failed spawn."""
    if isinstance(exc, xmlrpc.client.Fault):
        return exc.faultCode == Faults.SHUTDOWN_STATE
    if isinstance(exc, xmlrpc.client.ProtocolError):
        return exc.errcode == 429 or exc.errcode in (502, 503, 504)
    # refused, reset, aborted, broken pipe; a read or connect timeout; a cut-off answer
    return isinstance(
        exc, ConnectionError | TimeoutError | http.client.IncompleteRead | http.client.BadStatusLine
    )


TRANSIENT_CHECKS.append(is_transient_supervisor_error)


# --- the backend -------------------------------------------------------------------------------


class SupervisorBackend:
    """``WorkloadBackend`` of services run by one supervisord (a ``SupervisorHost`` block)."""

    platform = PLATFORM

    def __init__(self, block: SupervisorHost) -> None:
        self.block = block

    @contextmanager
    def _server(self, *, change: bool = False) -> Iterator[Any]:
        """A proxy of the ``supervisor`` namespace; waits for stop/start take the change timeout.

        One proxy per call: a proxy holds one connection, which threads must not share.
        """
        timeout = self.block.change_timeout_s if change else self.block.request_timeout_s
        with self.block.get_client(timeout) as proxy:
            yield proxy.supervisor

    def _processes(self, ref: WorkloadRef) -> list[dict[str, Any]]:
        with self._server() as server:
            return service_processes(server.getAllProcessInfo(), ref.name)

    def _existing(self, ref: WorkloadRef) -> list[dict[str, Any]]:
        processes = self._processes(ref)
        if not processes:
            raise LookupError(
                f"supervisord at {self.block.url} has no program or group {ref.name!r}"
            )
        return processes

    def status(self, ref: WorkloadRef) -> WorkloadStatus:
        processes = self._processes(ref)
        return WorkloadStatus(
            platform=PLATFORM,
            service=ref.name,
            exists=bool(processes),
            instances=[to_instance(info) for info in processes],
            # wanted: every process nobody stopped on purpose. STOPPED is supervisorctl stop (or a
            # scale-down); EXITED, BACKOFF and FATAL are processes that died and should run
            desired_replicas=sum(info["statename"] not in STOPPED_STATES for info in processes),
            capabilities=(
                [Capability.SCALE] if copies_of_one_program(processes, ref.name) else []
            ),
        )

    def restart(self, ref: WorkloadRef, *, since: datetime, dry_run: bool) -> ChangeSet:
        processes = self._existing(ref)
        single = len(processes) == 1
        planned: list[Change] = []
        notes: list[str] = []
        steps: list[tuple[Change, Step, dict[str, Any]]] = []
        for info in processes:
            step, why = restart_step(info, since, single=single)
            if step is None:
                notes.append(f"{namespec(info)} not restarted: {why}")
                continue
            change = Change(
                action="restart_process",
                target=namespec(info),
                detail={"state": info["statename"], "pid": info["pid"] or None,
                        "started_at": _iso(info["start"]), "step": step},
            )
            planned.append(change)
            steps.append((change, step, info))
        if dry_run:
            return ChangeSet(dry_run=True, planned=planned, notes=notes)
        applied: list[Change] = []
        for change, step, info in steps:
            if step == "restart":
                self._stop(change.target)
            after, problem = self._start(change.target)
            if problem is None and after["pid"] == info["pid"]:
                problem = f"still pid {after['pid']}"
            if problem:
                notes.append(f"{change.target} not restarted: {problem}")
                continue
            applied.append(change.model_copy(update={"detail": {
                **change.detail, "old_pid": info["pid"] or None, "pid": after["pid"],
                "state": after["statename"], "started_at": _iso(after["start"]),
            }}))
        return ChangeSet(dry_run=False, planned=planned, applied=applied, notes=notes)

    def _stop(self, name: str) -> dict[str, Any]:
        """Stop one process and wait until it is (supervisord waits out ``stopwaitsecs``)."""
        with self._server(change=True) as server:
            try:
                server.stopProcess(name, True)
            except xmlrpc.client.Fault as fault:
                # it stopped or died on its own meanwhile: stopped is what was wanted
                if fault.faultCode != Faults.NOT_RUNNING:
                    raise
            return server.getProcessInfo(name)

    def _start(self, name: str) -> tuple[dict[str, Any], str | None]:
        """Start one process, wait until RUNNING; its info, and what went wrong if it isn't."""
        with self._server(change=True) as server:
            try:
                server.startProcess(name, True)
            except xmlrpc.client.Fault as fault:
                if fault.faultCode in (Faults.SPAWN_ERROR, Faults.ABNORMAL_TERMINATION):
                    info = server.getProcessInfo(name)
                    why = info["spawnerr"] or fault.faultString
                    return info, f"did not stay up: {info['statename']} ({why})"
                # someone else started it meanwhile: wait for it below like for ours
                if fault.faultCode != Faults.ALREADY_STARTED:
                    raise
            return self._wait_running(server, name)

    def _wait_running(self, server: Any, name: str) -> tuple[dict[str, Any], str | None]:
        deadline = time.monotonic() + self.block.change_timeout_s
        while True:
            info = server.getProcessInfo(name)
            if info["statename"] == "RUNNING":
                return info, None
            if info["statename"] not in ("STARTING", "BACKOFF") or time.monotonic() > deadline:
                return info, f"{info['statename']} ({info['spawnerr'] or 'not running'})"
            time.sleep(0.2)

    def scale(self, ref: WorkloadRef, replicas: int, *, dry_run: bool) -> ChangeSet:
        processes = self._existing(ref)
        if not copies_of_one_program(processes, ref.name):
            raise Unsupported(
                f"{ref.name!r} is not copies of one program: scaling needs a program with "
                "numprocs copies (the spare ones autostart=false); configure numprocs on it"
            )
        start, stop = scale_plan(processes, replicas)
        by_name = {namespec(info): info for info in processes}
        planned = [
            Change(action=action, target=name,
                   detail={"state": by_name[name]["statename"], "replicas": replicas})
            for action, names in (("start_process", start), ("stop_process", stop))
            for name in names
        ]
        if dry_run or not planned:
            return ChangeSet(dry_run=dry_run, planned=planned)
        applied: list[Change] = []
        notes: list[str] = []
        for change in planned:
            if change.action == "start_process":
                info, problem = self._start(change.target)
            else:
                info = self._stop(change.target)
                problem = None if info["statename"] == "STOPPED" else info["statename"]
            if problem:
                notes.append(f"{change.target} not {change.action.split('_')[0]}ed: {problem}")
                continue
            applied.append(change.model_copy(update={"detail": {
                **change.detail, "state": info["statename"], "pid": info["pid"] or None,
            }}))
        return ChangeSet(dry_run=False, planned=planned, applied=applied, notes=notes)

    def set_autoscaler_min(self, ref: WorkloadRef, minimum: int, *, dry_run: bool) -> ChangeSet:
        raise Unsupported(
            f"supervisord has no autoscaler for {ref.name!r}: scale the group's processes instead"
        )

    def set_memory_limit(self, ref: WorkloadRef, limit_bytes: int, *, dry_run: bool) -> ChangeSet:
        raise Unsupported(
            f"supervisord sets no memory limits ({ref.name!r}): limit the program itself "
            "(e.g. its runtime's heap option, or ulimit in its command) and restart it"
        )

    def history(self, ref: WorkloadRef) -> list[Revision]:
        return []

    def rollback(self, ref: WorkloadRef, *, to_revision: int, dry_run: bool) -> ChangeSet:
        raise Unsupported(
            f"supervisord keeps no revision history of {ref.name!r}: roll back by deploying "
            "the previous version of its program, then restart it"
        )

    def events(self, ref: WorkloadRef, *, since: datetime) -> list[WorkloadEvent]:
        found = [event for info in self._processes(ref) for event in process_events(info, since)]
        epoch = datetime.fromtimestamp(0, UTC)
        return sorted(found, key=lambda event: event.at or epoch)

    def logs(self, ref: WorkloadRef, *, lines: int) -> dict[str, str]:
        """stdout's last ``lines`` lines per process, then stderr's when it has any."""
        processes = self._existing(ref)
        size = log_bytes(lines)
        out: dict[str, str] = {}
        with self._server() as server:
            for info in processes:
                name = namespec(info)
                text, _, cut = server.tailProcessStdoutLog(name, 0, size)
                err, _, err_cut = server.tailProcessStderrLog(name, 0, size)
                body = tail_lines(text, lines, cut=cut)
                errors = tail_lines(err, lines, cut=err_cut)
                if errors:
                    body = f"{body}\n--- stderr ---\n{errors}" if body else f"--- stderr ---\n{errors}"
                out[info["name"]] = body
        return out
