"""supervisord backend decisions as data tables: process info -> Instance, which processes a
restart touches, which a scale starts and stops, what counts as transient, log tails."""

from __future__ import annotations

import http.client
import xmlrpc.client
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError
from supervisor.xmlrpc import Faults

from blocks.supervisor import SupervisorHost, TimeoutTransport
from tasks import workloads
from tasks.supervisord import (
    SupervisorBackend,
    copies_of_one_program,
    is_transient_supervisor_error,
    log_bytes,
    process_events,
    restart_step,
    scale_plan,
    service_processes,
    tail_lines,
    to_instance,
)
from tasks.workloads import Unsupported, WorkloadRef

T0 = 1_800_000_000  # a supervisord timestamp (whole seconds)
SINCE = datetime.fromtimestamp(T0 + 100, UTC) + timedelta(milliseconds=400)


def proc(
    name: str,
    state: str,
    *,
    group: str | None = None,
    pid: int = 0,
    start: int = T0,
    stop: int = 0,
    exitstatus: int = 0,
    spawnerr: str = "",
) -> dict[str, Any]:
    """A getProcessInfo answer, as supervisord 4 sends it."""
    return {
        "name": name, "group": group or name, "statename": state, "pid": pid, "start": start,
        "stop": stop, "now": T0 + 200, "exitstatus": exitstatus, "spawnerr": spawnerr,
        "state": 0, "description": "", "logfile": "", "stdout_logfile": "",
        "stderr_logfile": "",
    }


# --- which processes make a service --------------------------------------------------------------

ALL = [
    proc("web", "RUNNING", pid=10),
    proc("worker_10", "RUNNING", group="worker", pid=12),
    proc("worker_2", "STOPPED", group="worker"),
    proc("worker_1", "RUNNING", group="worker", pid=11),
    proc("web", "RUNNING", group="webapp", pid=20),
]

SERVICES = [
    # (service, namespecs in order)
    ("web", ["web:web"]),
    ("worker", ["worker:worker_1", "worker:worker_2", "worker:worker_10"]),
    ("worker:worker_2", ["worker:worker_2"]),
    ("webapp", ["webapp:web"]),
    ("webapp:web", ["webapp:web"]),
    ("worker:worker_3", []),
    ("work", []),
    ("missing", []),
]


@pytest.mark.parametrize(("service", "expected"), SERVICES, ids=[s for s, _ in SERVICES])
def test_service_processes(service: str, expected: list[str]) -> None:
    found = service_processes(ALL, service)
    assert [f"{p['group']}:{p['name']}" for p in found] == expected


COPIES = [
    # (service, processes' names, scales)
    ("worker", ["worker_00", "worker_01", "worker_02"], True),
    ("worker", ["worker_1", "worker_10"], True),
    ("worker", ["worker_00"], False),
    ("web", ["web"], False),
    ("worker:worker_01", ["worker_01"], False),
    # a [group:x] of different programs: stopping some would stop a different service
    ("app", ["web", "worker"], False),
    ("app", ["web_00", "worker_00"], False),
]


@pytest.mark.parametrize(("service", "names", "scales"), COPIES)
def test_copies_of_one_program(service: str, names: list[str], scales: bool) -> None:
    processes = [proc(name, "RUNNING", group=service.partition(":")[0]) for name in names]
    assert copies_of_one_program(processes, service) is scales


# --- process info -> Instance ----------------------------------------------------------------

INSTANCES = [
    # (info, expected fields)
    (proc("web", "RUNNING", pid=42),
     {"id": "web:web", "running": True, "ready": True, "pid": 42, "exit_code": None,
      "started_at": datetime.fromtimestamp(T0, UTC), "finished_at": None}),
    (proc("web", "STARTING", pid=42),
     {"running": True, "ready": False, "pid": 42}),
    (proc("web", "STOPPING", pid=42),
     {"running": True, "ready": False}),
    # killed by a signal: supervisord reports -1
    (proc("web", "EXITED", stop=T0 + 5, exitstatus=-1, spawnerr="Bad exit code -1"),
     {"running": False, "ready": False, "pid": None, "exit_code": -1,
      "finished_at": datetime.fromtimestamp(T0 + 5, UTC)}),
    (proc("web", "EXITED", stop=T0 + 5, exitstatus=3), {"exit_code": 3}),
    (proc("web", "STOPPED", stop=T0 + 5, exitstatus=0), {"running": False, "exit_code": 0}),
    # running again: supervisord forgot how it last ended (the 0 it sends means nothing)
    (proc("web", "RUNNING", pid=43, start=T0 + 6, stop=T0 + 5, exitstatus=0),
     {"exit_code": None, "finished_at": datetime.fromtimestamp(T0 + 5, UTC)}),
    # died before startsecs: no exit status, only a spawn error
    (proc("web", "BACKOFF", stop=T0 + 1, spawnerr="Exited too quickly (process log may have "
          "details)"), {"running": False, "ready": False, "exit_code": None}),
    (proc("web", "FATAL", stop=T0 + 1, spawnerr="Exited too quickly"), {"exit_code": None}),
    (proc("web", "STOPPED", start=0), {"started_at": None, "running": False}),
    (proc("consumer_01", "RUNNING", group="consumer", pid=7),
     {"id": "consumer:consumer_01", "name": "consumer_01", "state": "RUNNING"}),
]


@pytest.mark.parametrize(("info", "expected"), INSTANCES,
                         ids=[f"{i['statename']}-{n}" for n, (i, _) in enumerate(INSTANCES)])
def test_to_instance(info: dict[str, Any], expected: dict[str, Any]) -> None:
    instance = to_instance(info)
    assert {k: getattr(instance, k) for k in expected} == expected
    assert instance.oom_killed is False and instance.memory_limit_bytes is None


# --- what a restart does to each process --------------------------------------------------------

BEFORE = T0 + 50  # well before SINCE
SAME_SECOND = T0 + 100  # the second SINCE falls in: may have been after it
AFTER = T0 + 101

RESTART_STEPS = [
    # (info, single process, expected step, why)
    (proc("web", "RUNNING", start=BEFORE), True, "restart", "running since before"),
    (proc("web", "RUNNING", start=AFTER), True, None, "restarted after since"),
    (proc("web", "RUNNING", start=SAME_SECOND), True, None, "same second counts as after"),
    (proc("web", "RUNNING", start=SAME_SECOND - 1), True, "restart", "the second before"),
    (proc("web", "STARTING", start=BEFORE), True, "restart", "stuck starting"),
    (proc("web", "STARTING", start=AFTER), True, None, "starting after since"),
    (proc("web", "BACKOFF", start=AFTER), True, "restart", "backoff is not up: restart"),
    (proc("web", "EXITED", start=BEFORE, stop=BEFORE + 1), True, "start", "exited"),
    (proc("web", "EXITED", start=AFTER, stop=AFTER), True, "start", "exited after since"),
    (proc("web", "FATAL", start=AFTER), True, "start", "fatal is started"),
    (proc("web", "STOPPED", start=BEFORE, stop=BEFORE), True, "start", "a stopped program"),
    (proc("c_2", "STOPPED", start=BEFORE, stop=BEFORE), False, None, "scaled down in a group"),
    (proc("c_2", "STOPPED", start=0, stop=0), False, None, "never started spare"),
    (proc("c_2", "STOPPED", start=BEFORE, stop=AFTER), False, "start", "our own half restart"),
    (proc("web", "STOPPING", start=BEFORE), True, None, "someone is stopping it"),
    (proc("web", "UNKNOWN", start=BEFORE), True, None, "unknown"),
]


@pytest.mark.parametrize(("info", "single", "expected", "why"), RESTART_STEPS,
                         ids=[r[3] for r in RESTART_STEPS])
def test_restart_step(info: dict[str, Any], single: bool, expected: str | None, why: str) -> None:
    step, reason = restart_step(info, SINCE, single=single)
    assert step == expected
    assert reason


def test_restart_step_reads_since_in_any_timezone() -> None:
    info = proc("web", "RUNNING", start=AFTER)
    east = SINCE.astimezone(timezone(timedelta(hours=5)))
    naive_utc = SINCE.replace(tzinfo=None)
    assert restart_step(info, east, single=True)[0] is None
    assert restart_step(info, naive_utc, single=True)[0] is None


# --- which processes a scale starts and stops -----------------------------------------------------


def group(*states: str) -> list[dict[str, Any]]:
    return [proc(f"c_{i:02d}", s, group="c") for i, s in enumerate(states)]


SCALE_PLANS = [
    # (group's states, replicas, start, stop)
    (("STOPPED", "STOPPED", "STOPPED", "STOPPED"), 1, ["c:c_00"], []),
    (("RUNNING", "STOPPED", "STOPPED", "STOPPED"), 3, ["c:c_01", "c:c_02"], []),
    (("RUNNING", "RUNNING", "RUNNING", "STOPPED"), 3, [], []),
    (("RUNNING", "RUNNING", "RUNNING", "STOPPED"), 1, [], ["c:c_01", "c:c_02"]),
    (("RUNNING", "RUNNING", "RUNNING", "RUNNING"), 0, [], ["c:c_00", "c:c_01", "c:c_02", "c:c_03"]),
    (("RUNNING", "RUNNING", "RUNNING", "RUNNING"), 4, [], []),
    # the ones running stay, wherever they are in the order
    (("STOPPED", "STOPPED", "RUNNING", "RUNNING"), 2, [], []),
    (("STOPPED", "STOPPED", "RUNNING", "RUNNING"), 3, ["c:c_00"], []),
    (("STOPPED", "RUNNING", "STOPPED", "RUNNING"), 1, [], ["c:c_03"]),
    # starting and backing off count as running (supervisord is bringing them up)
    (("STARTING", "BACKOFF", "STOPPED", "STOPPED"), 2, [], []),
    (("RUNNING", "FATAL", "EXITED", "STOPPED"), 3, ["c:c_01", "c:c_02"], []),
    (("STOPPED",) * 4, 0, [], []),
]


@pytest.mark.parametrize(("states", "replicas", "start", "stop"), SCALE_PLANS)
def test_scale_plan(states: tuple[str, ...], replicas: int, start: list[str],
                    stop: list[str]) -> None:
    assert scale_plan(group(*states), replicas) == (start, stop)


def test_scale_plan_orders_numbers_naturally() -> None:
    processes = [proc(f"w_{i}", "STOPPED", group="w") for i in (10, 2, 1)]
    assert scale_plan(processes, 2) == (["w:w_1", "w:w_2"], [])


@pytest.mark.parametrize("replicas", [5, 40])
def test_scale_above_numprocs_is_unsupported(replicas: int) -> None:
    with pytest.raises(Unsupported, match=f"configure numprocs={replicas}"):
        scale_plan(group("RUNNING", "STOPPED", "STOPPED", "STOPPED"), replicas)


def test_scale_below_zero_is_an_error() -> None:
    with pytest.raises(ValueError, match="-1"):
        scale_plan(group("RUNNING"), -1)


# --- events ------------------------------------------------------------------------------------

EVENTS = [
    # (info, expected (reason, message) pairs)
    (proc("web", "RUNNING", pid=5, start=AFTER), [("STARTED", "pid 5")]),
    (proc("web", "RUNNING", pid=5, start=BEFORE), []),
    (proc("web", "EXITED", start=BEFORE, stop=AFTER, exitstatus=-1, spawnerr="Bad exit code -1"),
     [("EXITED", "killed by a signal; Bad exit code -1")]),
    (proc("web", "EXITED", start=BEFORE, stop=AFTER, exitstatus=3, spawnerr="Bad exit code 3"),
     [("EXITED", "exit status 3; Bad exit code 3")]),
    (proc("web", "EXITED", start=BEFORE, stop=BEFORE + 1, exitstatus=3), []),
    (proc("web", "STOPPED", start=BEFORE, stop=AFTER, exitstatus=0),
     [("STOPPED", "exit status 0")]),
    # restarted by supervisord after a crash: the exit is known to have happened, not how
    (proc("web", "RUNNING", pid=6, start=AFTER + 1, stop=AFTER),
     [("STARTED", "pid 6"), ("EXITED", "ended; exit status not kept once started again")]),
    (proc("web", "FATAL", start=AFTER, stop=AFTER, spawnerr="Exited too quickly"),
     [("EXITED", "Exited too quickly"), ("FATAL", "Exited too quickly")]),
    # a spawn that failed outright (e.g. the command is gone) never ran
    (proc("web", "FATAL", start=0, stop=0, spawnerr="can't find command '/x'"),
     [("FATAL", "can't find command '/x'")]),
]


@pytest.mark.parametrize(("info", "expected"), EVENTS, ids=[str(n) for n in range(len(EVENTS))])
def test_process_events(info: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    events = process_events(info, SINCE)
    assert [(e.reason, e.message) for e in events] == expected
    assert all(e.instance == "web" for e in events)


# --- log tails -----------------------------------------------------------------------------------

TAILS = [
    # (text, lines, cut, expected)
    ("a\nb\nc\n", 2, False, "b\nc"),
    ("a\nb\nc\n", 10, False, "a\nb\nc"),
    ("tial line\nb\nc\n", 10, True, "b\nc"),
    ("only part of one line", 5, True, "only part of one line"),
    ("", 5, False, ""),
    ("a\nb\n", 0, False, ""),
]


@pytest.mark.parametrize(("text", "lines", "cut", "expected"), TAILS)
def test_tail_lines(text: str, lines: int, cut: bool, expected: str) -> None:
    assert tail_lines(text, lines, cut=cut) == expected


@pytest.mark.parametrize(("lines", "expected"), [(1, 4096), (50, 25600), (10**6, 1 << 20)])
def test_log_bytes(lines: int, expected: int) -> None:
    assert log_bytes(lines) == expected


# --- transient errors ----------------------------------------------------------------------------

TRANSIENT = [
    (ConnectionRefusedError(111, "Connection refused"), True),
    (ConnectionResetError(104, "reset"), True),
    (http.client.RemoteDisconnected("closed"), True),
    (BrokenPipeError(), True),
    (TimeoutError("timed out"), True),
    (http.client.IncompleteRead(b"x"), True),
    (xmlrpc.client.Fault(Faults.SHUTDOWN_STATE, "SHUTDOWN_STATE"), True),
    (xmlrpc.client.ProtocolError("h/RPC2", 503, "Service Unavailable", {}), True),
    (xmlrpc.client.ProtocolError("h/RPC2", 429, "Too Many Requests", {}), True),
    (xmlrpc.client.Fault(Faults.BAD_NAME, "BAD_NAME: web"), False),
    (xmlrpc.client.Fault(Faults.SPAWN_ERROR, "SPAWN_ERROR: web"), False),
    (xmlrpc.client.Fault(Faults.ALREADY_STARTED, "ALREADY_STARTED: web"), False),
    (xmlrpc.client.ProtocolError("h/RPC2", 401, "Unauthorized", {}), False),
    (xmlrpc.client.ProtocolError("h/RPC2", 500, "Internal Server Error", {}), False),
    (FileNotFoundError(2, "No such file"), False),
    (LookupError("no program"), False),
    (Unsupported("no"), False),
    (ValueError("x"), False),
]


@pytest.mark.parametrize(("exc", "expected"), TRANSIENT, ids=[repr(e)[:40] for e, _ in TRANSIENT])
def test_transient_errors(exc: BaseException, expected: bool) -> None:
    assert is_transient_supervisor_error(exc) is expected
    # registered at import: the workload tasks retry exactly these
    assert workloads.is_transient(exc) is expected


# --- what supervisord cannot do ------------------------------------------------------------------

# nothing listens here: refusing must not need supervisord
NOWHERE = SupervisorHost(url="http://127.0.0.1:9/RPC2", request_timeout_s=1)
REF = WorkloadRef(name="web")

UNSUPPORTED = [
    ("set_memory_limit", {"limit_bytes": 1 << 30}, "supervisord sets no memory limits"),
    ("rollback", {"to_revision": 1}, "no revision history"),
    ("set_autoscaler_min", {"minimum": 2}, "no autoscaler"),
]


@pytest.mark.parametrize(("method", "args", "message"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
@pytest.mark.parametrize("dry_run", [True, False])
def test_unsupported_changes(method: str, args: dict, message: str, dry_run: bool) -> None:
    with pytest.raises(Unsupported, match=message):
        getattr(SupervisorBackend(NOWHERE), method)(REF, **args, dry_run=dry_run)
    assert workloads.is_transient(Unsupported(message)) is False


def test_no_history_and_it_is_a_backend() -> None:
    backend = SupervisorBackend(NOWHERE)
    assert backend.history(REF) == []
    assert backend.platform == "supervisord"
    assert isinstance(backend, workloads.WorkloadBackend)
    assert workloads.platform_block_type("supervisord") is SupervisorHost


# --- the block -----------------------------------------------------------------------------------

URLS = [
    # (url, accepted)
    ("http://sv:9001/RPC2", True),
    ("https://sv.example/RPC2", True),
    ("unix:///run/supervisor.sock", True),
    ("ftp://sv/RPC2", False),
    ("sv:9001", False),
    ("http:///RPC2", False),
    ("unix://relative.sock", False),
    ("http://admin:pw-in-url@sv:9001/RPC2", False),
]


@pytest.mark.parametrize(("url", "accepted"), URLS)
def test_block_url(url: str, accepted: bool) -> None:
    if accepted:
        SupervisorHost(url=url)
        return
    with pytest.raises(ValidationError) as error:
        SupervisorHost(url=url)
    assert "pw-in-url" not in str(error.value)


def test_client_keeps_the_password_out_of_its_url_and_repr() -> None:
    block = SupervisorHost(url="http://sv:9001/RPC2", username="u", password="pw-kept-secret",
                           request_timeout_s=3, change_timeout_s=40)
    proxy = block.get_client()
    assert "pw-kept-secret" not in repr(proxy)
    transport = proxy._ServerProxy__transport  # what ServerProxy would use for every call
    assert isinstance(transport, TimeoutTransport)
    assert "pw-kept-secret" not in repr(transport)
    assert transport.timeout == 3
    assert block.get_client(40)._ServerProxy__transport.timeout == 40
