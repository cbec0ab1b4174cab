"""A fake Flink JobManager REST API: the documented JSON of exactly the endpoints tasks/flink.py calls.

Serves, from an in-memory model of jobs, checkpoints and uploaded jars:
``GET /jobs/overview``, ``GET /jobs/:jobid``, ``GET /jobs/:jobid/checkpoints``,
``GET /jobs/:jobid/exceptions``, ``GET /jars``, ``POST /jars/:jarid/run``, and a fixed
capacity at ``GET /overview`` and ``GET /taskmanagers``
(shapes from https://nightlies.apache.org/flink/flink-docs-stable/docs/ops/rest_api/).
Every request is recorded. A submitted job goes INITIALIZING -> RUNNING (or FAILED) after a
configurable delay, and a test can hook a callback on its start.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers import free_port

# the fields Flink's JarRunRequestBody accepts; Flink rejects unknown ones with 400
RUN_BODY_FIELDS = {
    "entryClass",
    "programArgs",
    "programArgsList",
    "parallelism",
    "jobId",
    "allowNonRestoredState",
    "savepointPath",
    "restoreMode",
    "claimMode",
    "flinkConfiguration",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def completed_checkpoint(
    checkpoint_id: int,
    external_path: str,
    ack_ms: int,
    *,
    savepoint: bool = False,
    discarded: bool = False,
) -> dict[str, Any]:
    """A CompletedCheckpointStatistics entry as in ``latest.completed`` / ``history``."""
    return {
        "className": ".CompletedCheckpointStatistics",
        "id": checkpoint_id,
        "status": "COMPLETED",
        "is_savepoint": savepoint,
        "savepointFormat": "CANONICAL" if savepoint else None,
        "trigger_timestamp": ack_ms - 1500,
        "latest_ack_timestamp": ack_ms,
        "checkpointed_size": 48_213,
        "state_size": 1_204_551,
        "end_to_end_duration": 1500,
        "alignment_buffered": 0,
        "processed_data": 0,
        "persisted_data": 0,
        "num_subtasks": 4,
        "num_acknowledged_subtasks": 4,
        "checkpoint_type": "SAVEPOINT" if savepoint else "CHECKPOINT",
        "tasks": {},
        "external_path": external_path,
        "discarded": discarded,
    }


def failed_checkpoint(checkpoint_id: int, failed_ms: int, message: str) -> dict[str, Any]:
    return {
        "className": ".FailedCheckpointStatistics",
        "id": checkpoint_id,
        "status": "FAILED",
        "is_savepoint": False,
        "trigger_timestamp": failed_ms - 600_000,
        "latest_ack_timestamp": -1,
        "state_size": 0,
        "end_to_end_duration": 600_000,
        "num_subtasks": 4,
        "num_acknowledged_subtasks": 2,
        "checkpoint_type": "CHECKPOINT",
        "tasks": {},
        "failure_timestamp": failed_ms,
        "failure_message": message,
    }


def checkpoint_stats(
    *,
    completed: dict | None = None,
    savepoint: dict | None = None,
    failed: dict | None = None,
    restored: dict | None = None,
) -> dict[str, Any]:
    """The body of ``GET /jobs/:jobid/checkpoints`` (CheckpointingStatistics)."""
    history = sorted(
        (c for c in (completed, savepoint, failed) if c), key=lambda c: c["id"], reverse=True
    )
    return {
        "counts": {
            "restored": 1 if restored else 0,
            "total": len(history),
            "in_progress": 0,
            "completed": sum(c["status"] == "COMPLETED" for c in history),
            "failed": sum(c["status"] == "FAILED" for c in history),
        },
        "latest": {
            "completed": completed,
            "savepoint": savepoint,
            "failed": failed,
            "restored": restored,
        },
        "history": history,
    }


@dataclass
class Call:
    method: str
    path: str
    body: Any = None


@dataclass
class FakeJob:
    jid: str
    name: str
    state: str
    start_time: int
    end_time: int = -1
    # None: checkpointing not enabled for the job (Flink answers 404)
    checkpoints: dict[str, Any] | None = None
    exceptions: list[dict[str, Any]] = field(default_factory=list)

    def overview(self) -> dict[str, Any]:
        end = self.end_time if self.end_time > 0 else now_ms()
        return {
            "jid": self.jid,
            "name": self.name,
            "start-time": self.start_time,
            "end-time": self.end_time,
            "duration": end - self.start_time if self.start_time > 0 else -1,
            "last-modification": now_ms(),
            "state": self.state,
            "tasks": {
                "total": 4,
                "created": 0,
                "scheduled": 0,
                "deploying": 0,
                "running": 4 if self.state == "RUNNING" else 0,
                "finished": 0,
                "canceling": 0,
                "canceled": 0,
                "failed": 4 if self.state == "FAILED" else 0,
                "reconciling": 0,
                "initializing": 0,
            },
        }


@dataclass
class FakeJar:
    id: str
    name: str
    job_name: str
    entry_class: str
    uploaded: int


@dataclass
class _Fault:
    method: str
    path_prefix: str
    status: int | None  # None: answer normally (after the stall)
    times: int
    apply_first: bool = False
    stall_s: float = 0.0


class FakeFlink:
    """In-memory Flink cluster behind a threaded HTTP server on a free port.

    ``new_job_delay_s``/``new_job_final_state`` shape what a submitted job does;
    ``on_job_start(job)`` runs when a job reaches RUNNING (submitted, or moved by the test).
    """

    def __init__(self, *, required_auth: str | None = None) -> None:
        self.required_auth = required_auth
        self.jobs: dict[str, FakeJob] = {}
        self.jars: dict[str, FakeJar] = {}
        self.calls: list[Call] = []
        self.new_job_delay_s = 0.2
        self.new_job_final_state = "RUNNING"
        # what /overview and /taskmanagers report: room for a few 4-slot jobs
        self.taskmanagers = 4
        self.slots_per_taskmanager = 4
        self.on_job_start: Callable[[FakeJob], None] | None = None
        self._faults: list[_Fault] = []
        self._pending: dict[str, tuple[str, int]] = {}
        self._timers: list[threading.Timer] = []
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeFlink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for timer in self._timers:
            timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    # --- model setup --------------------------------------------------------------------------

    def add_jar(self, name: str, *, job_name: str, entry_class: str) -> str:
        jar_id = f"{uuid.uuid4()}_{name}"
        self.jars[jar_id] = FakeJar(jar_id, name, job_name, entry_class, now_ms())
        return jar_id

    def add_job(
        self,
        name: str,
        state: str,
        *,
        started_ago_s: float = 3600,
        checkpoints: dict[str, Any] | None = None,
        exceptions: list[dict[str, Any]] | None = None,
    ) -> FakeJob:
        start = now_ms() - int(started_ago_s * 1000)
        job = FakeJob(
            jid=uuid.uuid4().hex,
            name=name,
            state=state,
            start_time=start,
            end_time=now_ms() - 60_000 if state in {"FAILED", "CANCELED", "FINISHED"} else -1,
            checkpoints=checkpoints,
            exceptions=exceptions or [],
        )
        self.jobs[job.jid] = job
        return job

    def set_state_after_reads(self, jid: str, state: str, reads: int) -> None:
        """Move a job to ``state`` once ``GET /jobs/:jobid`` has answered ``reads`` times.

        Stands in for Flink's restart strategy finishing while someone watches the job.
        """
        self._pending[jid] = (state, reads)

    def fail_next(
        self,
        method: str,
        path_prefix: str,
        status: int,
        *,
        times: int = 1,
        apply_first: bool = False,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status``.

        ``apply_first``: process the request (its effects happen) and then answer the error,
        like a response lost on the way back.
        """
        self._faults.append(_Fault(method, path_prefix, status, times, apply_first))

    def stall_next(self, method: str, path_prefix: str, seconds: float, *, times: int = 1) -> None:
        """Hold the next ``times`` matching requests for ``seconds`` before answering: a hung JobManager."""
        self._faults.append(_Fault(method, path_prefix, None, times, stall_s=seconds))

    # --- queries for assertions ----------------------------------------------------------------

    def calls_to(self, method: str, path_prefix: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.startswith(path_prefix)]

    def runs(self) -> list[Call]:
        return [c for c in self.calls if c.method == "POST" and c.path.endswith("/run")]

    def jobs_named(self, name: str) -> list[FakeJob]:
        return [j for j in self.jobs.values() if j.name == name]

    # --- behaviour ----------------------------------------------------------------------------

    def _later(self, delay_s: float, fn: Callable[[], None]) -> None:
        timer = threading.Timer(delay_s, fn)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _set_state(self, job: FakeJob, state: str) -> None:
        with self._lock:
            job.state = state
            if state in {"FAILED", "CANCELED", "FINISHED"}:
                job.end_time = now_ms()
        if state == "RUNNING" and self.on_job_start:
            self.on_job_start(job)

    def _known_path(self, path: str) -> dict[str, Any] | None:
        for job in self.jobs.values():
            latest = (job.checkpoints or {}).get("latest") or {}
            for kind in ("completed", "savepoint", "restored"):
                entry = latest.get(kind)
                if entry and entry.get("external_path") == path and not entry.get("discarded"):
                    return entry
        return None

    def _run_jar(self, jar_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        unknown = set(body) - RUN_BODY_FIELDS
        if unknown:
            return 400, {
                "errors": [
                    f"Request did not match expected format JarRunRequestBody: {sorted(unknown)}"
                ]
            }
        jar = self.jars.get(jar_id)
        if jar is None:
            return 400, {"errors": [f"Jar file /tmp/flink-web-upload/{jar_id} does not exist"]}
        jid = body.get("jobId") or uuid.uuid4().hex
        if jid in self.jobs:
            # Flink 2.3's answer: one entry, the whole Java stack trace (trimmed here)
            return 400, {
                "errors": [
                    "org.apache.flink.runtime.rest.handler.RestHandlerException: Could not execute "
                    "application.\n\tat org.apache.flink.runtime.webmonitor.handlers.JarRunHandler"
                    ".lambda$handleRequest$1(JarRunHandler.java:114)\n"
                    "Caused by: org.apache.flink.util.FlinkException: Failed to execute job.\n"
                    "\t... 8 more\n"
                    "Caused by: org.apache.flink.runtime.client.DuplicateApplicationSubmissionException: "
                    f"Application has already been submitted. (job {jid})\n"
                ]
            }
        restored = None
        final_state = self.new_job_final_state
        if path := body.get("savepointPath"):
            source = self._known_path(path)
            if source is None:
                # Flink fails the job when it cannot read the state it was told to restore
                final_state = "FAILED"
            else:
                restored = {
                    "id": source["id"],
                    "restore_timestamp": now_ms(),
                    "is_savepoint": source.get("is_savepoint", False),
                    "external_path": path,
                }
        job = FakeJob(
            jid=jid,
            name=jar.job_name,
            state="INITIALIZING",
            start_time=now_ms(),
            checkpoints=checkpoint_stats(restored=restored),
        )
        self.jobs[jid] = job
        self._later(self.new_job_delay_s, lambda: self._set_state(job, final_state))
        return 200, {"jobid": jid}

    def handle(self, method: str, path: str, body: Any, auth: str | None) -> tuple[int, Any]:
        with self._lock:
            self.calls.append(Call(method, path, body))
            if self.required_auth is not None and auth != self.required_auth:
                return 401, {"errors": ["Unauthorized"]}
            fault = next(
                (
                    f
                    for f in self._faults
                    if f.times > 0 and f.method == method and path.startswith(f.path_prefix)
                ),
                None,
            )
            if fault is not None:
                fault.times -= 1
        if fault is not None and fault.stall_s:
            time.sleep(fault.stall_s)
        with self._lock:
            injected = fault is not None and fault.status is not None
            if injected and not fault.apply_first:
                return fault.status, {"errors": [f"injected HTTP {fault.status}"]}
            status, answer = self._route(method, path, body)
            if injected:
                return fault.status, {"errors": [f"injected HTTP {fault.status}"]}
            return status, answer

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/jobs/overview":
            return 200, {"jobs": [j.overview() for j in self.jobs.values()]}
        if method == "GET" and path == "/overview":
            slots = self.taskmanagers * self.slots_per_taskmanager
            busy = 4 * sum(
                j.state not in {"FAILED", "CANCELED", "FINISHED"} for j in self.jobs.values()
            )
            return 200, {
                "taskmanagers": self.taskmanagers,
                "slots-total": slots,
                "slots-available": max(0, slots - busy),
                "jobs-running": sum(j.state == "RUNNING" for j in self.jobs.values()),
                "flink-version": "2.3.0",
            }
        if method == "GET" and path == "/taskmanagers":
            return 200, {
                "taskmanagers": [
                    {
                        "id": f"flink-taskmanager-{i}",
                        "slotsNumber": self.slots_per_taskmanager,
                        "freeSlots": self.slots_per_taskmanager,
                        "timeSinceLastHeartbeat": now_ms(),
                    }
                    for i in range(self.taskmanagers)
                ]
            }
        if method == "GET" and path == "/jars":
            return 200, {
                "address": self.url,
                "files": [
                    {
                        "id": j.id,
                        "name": j.name,
                        "uploaded": j.uploaded,
                        "entry": [{"name": j.entry_class, "description": None}],
                    }
                    for j in self.jars.values()
                ],
            }
        if method == "POST" and (m := re.fullmatch(r"/jars/([^/]+)/run", path)):
            return self._run_jar(m.group(1), body or {})
        m = re.fullmatch(r"/jobs/([0-9a-f]{32})(/checkpoints|/exceptions)?", path)
        if method == "GET" and m:
            job = self.jobs.get(m.group(1))
            if job is None:
                return 404, {
                    "errors": [
                        f"org.apache.flink.runtime.rest.NotFoundException: Job {m.group(1)} not found"
                    ]
                }
            if m.group(2) == "/checkpoints":
                if job.checkpoints is None:
                    return 404, {"errors": ["Checkpointing has not been enabled."]}
                return 200, job.checkpoints
            if m.group(2) == "/exceptions":
                return 200, _exceptions(job)
            if job.jid in self._pending:
                state, reads = self._pending[job.jid]
                if reads <= 1:
                    del self._pending[job.jid]
                    self._set_state(job, state)
                else:
                    self._pending[job.jid] = (state, reads - 1)
            return 200, {
                **job.overview(),
                "isStoppable": False,
                "maxParallelism": -1,
                "now": now_ms(),
                "timestamps": {job.state: now_ms()},
                "vertices": [],
                "status-counts": {},
                "plan": {"jid": job.jid, "name": job.name, "type": "STREAMING", "nodes": []},
            }
        return 404, {"errors": ["Not found: " + path]}


def _exceptions(job: FakeJob) -> dict[str, Any]:
    """``GET /jobs/:jobid/exceptions`` (JobExceptionsInfoWithHistory), newest entry first."""
    entries = sorted(job.exceptions, key=lambda e: e["timestamp"], reverse=True)
    root = entries[0] if entries else None
    return {
        "root-exception": root["stacktrace"] if root else None,
        "timestamp": root["timestamp"] if root else None,
        "all-exceptions": [],
        "truncated": False,
        "exceptionHistory": {"entries": entries, "truncated": False},
    }


def exception_entry(
    name: str, message: str, at_ms: int, task: str = "Enrich -> Sink (2/4)"
) -> dict[str, Any]:
    """One RootExceptionInfo of the exception history."""
    return {
        "exceptionName": name,
        "stacktrace": f"{name}: {message}\n\tat com.example.enrich.EnrichFunction.processElement(EnrichFunction.java:88)\n"
        "\tat org.apache.flink.streaming.api.operators.KeyedProcessOperator.processElement(KeyedProcessOperator.java:83)",
        "timestamp": at_ms,
        "taskName": task,
        "endpoint": "10.0.3.17:41233",
        "taskManagerId": "flink-taskmanager-1",
        "failureLabels": {},
        "concurrentExceptions": [],
    }


def _handler_for(fake: FakeFlink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, answer = 400, {"errors": ["Request body is not valid JSON"]}
            else:
                status, answer = fake.handle(
                    method, self.path, body, self.headers.get("Authorization")
                )
            payload = json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out on a stalled request and hung up

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, *args: object) -> None:
            pass

    return Handler
