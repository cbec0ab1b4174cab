"""A throwaway real supervisord (PyPI ``supervisor``) running the test programs of tests/programs.

Programs:

- ``health`` and ``other``: tests/programs/health_service.py on their own ports. ``health``
  has ``autorestart=false`` (a killed one stays EXITED until a runbook restarts it; supervisord
  would otherwise restart it before the runbook could) and ``startretries=1`` (one that crashes
  at start is given up after one retry; supervisord may also count it EXITED, as it reaps a
  child up to a second after its output ends); ``other`` is the program tests leave alone.
- ``flaky``: a program whose command is missing: FATAL from the start (a spawn error, and
  ``startretries=0``), until a test writes the command and starts it.
- ``consumer``: ``numprocs=4`` copies of tests/programs/kafka_consumer.py, ``autostart=false``,
  one consumer group on one topic: scaling runs 0-4 of them.

The consumers' broker, topic and group are in their command lines, so they are known when the
configuration is written: the supervisord is session-scoped and takes the session's broker;
the topic and group names are made here and the test that uses them creates the topic.
A function-scoped supervisord per test would cost ~2 s each (startsecs=1 for every program)
for no isolation the tests need: they act on different programs, and `reset()` puts the
programs back between tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from blocks.supervisor import SupervisorHost
from tests.servers import free_port, wait_for_port

PROGRAMS = Path(__file__).parent / "programs"
USERNAME = "runbooks"
CONSUMERS = 4
CONSUMER_SLEEP_MS = 20  # 50 records/s per consumer: slow enough that more of them show


@dataclass
class SupervisorServer:
    bootstrap: str
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="runbooks-sv-")))
    port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    other_port: int = field(default_factory=free_port)
    flaky_port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: f"sv-{uuid.uuid4().hex}")
    topic: str = field(default_factory=lambda: f"sv-work-{uuid.uuid4().hex[:8]}")
    group: str = field(default_factory=lambda: f"sv-workers-{uuid.uuid4().hex[:8]}")
    # a second consumer group of its own (`scaler`), for the consumers-too-slow runbook's test:
    # `consumer`'s test counts its backlog exactly, whichever test runs first
    scaler_topic: str = field(default_factory=lambda: f"sv-scale-{uuid.uuid4().hex[:8]}")
    scaler_group: str = field(default_factory=lambda: f"sv-scalers-{uuid.uuid4().hex[:8]}")
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/RPC2"

    @property
    def socket_path(self) -> Path:
        return self.home / "supervisor.sock"

    @property
    def exit_file(self) -> Path:
        """While it exists, ``health`` exits with status 3 (at start too)."""
        return self.home / "health.exit"

    @property
    def flaky_command(self) -> Path:
        """``flaky``'s command, missing until a test writes it: supervisord fails to spawn it
        and gives up at once (FATAL, startretries=0), like a program whose deploy removed it."""
        return self.home / "flaky"

    def write_flaky_command(self) -> None:
        """Make ``flaky`` startable: a health service on ``flaky_port``."""
        health = PROGRAMS / "health_service.py"
        self.flaky_command.write_text(
            f"#!/bin/sh\nexec {sys.executable} {health} --name flaky --port {self.flaky_port}\n"
        )
        self.flaky_command.chmod(0o755)

    def block(self, **overrides: object) -> SupervisorHost:
        fields = {"url": self.url, "username": USERNAME, "password": self.password,
                  "request_timeout_s": 5, "change_timeout_s": 20, **overrides}
        return SupervisorHost(**fields)

    def rpc(self) -> xmlrpc.client.ServerProxy:
        """A proxy for the tests' own checks and set-up (not the code under test's)."""
        return self.block().get_client()

    def config(self) -> str:
        python = sys.executable
        health = PROGRAMS / "health_service.py"
        return (
            f"""\
[supervisord]
nodaemon=true
logfile={self.home}/supervisord.log
pidfile={self.home}/supervisord.pid
childlogdir={self.home}
loglevel=info

[inet_http_server]
port=127.0.0.1:{self.port}
username={USERNAME}
password={self.password}

[unix_http_server]
file={self.socket_path}
username={USERNAME}
password={self.password}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=http://127.0.0.1:{self.port}
username={USERNAME}
password={self.password}

[program:health]
command={python} {health} --name health --port {self.health_port} --exit-file {self.exit_file}
startsecs=1
startretries=1
stopwaitsecs=2
autorestart=false
stdout_logfile={self.home}/health.out
stderr_logfile={self.home}/health.err

[program:other]
command={python} {health} --name other --port {self.other_port}
startsecs=1
stopwaitsecs=2
stdout_logfile={self.home}/other.out
redirect_stderr=true

[program:flaky]
command={self.flaky_command}
startretries=0
startsecs=1
stopwaitsecs=2
stdout_logfile={self.home}/flaky.out
redirect_stderr=true

"""  # noqa: E501
            + self._consumer_group("consumer", self.topic, self.group)
            + self._consumer_group("scaler", self.scaler_topic, self.scaler_group)
        )

    def _consumer_group(self, name: str, topic: str, group: str) -> str:
        """A program of ``numprocs`` copies of the consumer, all of one group on one topic."""
        consumer = PROGRAMS / "kafka_consumer.py"
        return f"""
[program:{name}]
command={sys.executable} {consumer} --bootstrap {self.bootstrap} --topic {topic} --group {group} --sleep-ms {CONSUMER_SLEEP_MS}
process_name=%(program_name)s_%(process_num)02d
numprocs={CONSUMERS}
autostart=false
startsecs=1
stopwaitsecs=5
stdout_logfile={self.home}/%(program_name)s_%(process_num)02d.out
redirect_stderr=true
"""  # noqa: E501

    def start(self, timeout_s: float = 30) -> None:
        conf = self.home / "supervisord.conf"
        conf.write_text(self.config())
        supervisord = Path(sys.executable).parent / "supervisord"
        self.proc = subprocess.Popen(
            [str(supervisord), "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=(self.home / "stderr").open("wb"),
        )
        wait_for_port(self.port, timeout_s)
        self.wait_running(["health:health", "other:other"], timeout_s)

    def infos(self) -> dict[str, dict]:
        with self.rpc() as rpc:
            return {f"{i['group']}:{i['name']}": i for i in rpc.supervisor.getAllProcessInfo()}

    def pids(self) -> dict[str, int]:
        return {name: info["pid"] for name, info in self.infos().items()}

    def wait_running(self, names: list[str], timeout_s: float = 20) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            infos = self.infos()
            if all(infos[n]["statename"] == "RUNNING" for n in names):
                return infos
            if time.monotonic() > deadline:
                raise TimeoutError(f"not RUNNING after {timeout_s}s: {infos}")
            time.sleep(0.1)

    def wait_state(self, name: str, states: set[str], timeout_s: float = 20) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.infos()[name]
            if info["statename"] in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not in {states} after {timeout_s}s: {info}")
            time.sleep(0.1)

    def reset(self) -> None:
        """Back to what tests expect: health and other RUNNING (none stopped by a signal),
        every consumer stopped, no exit file; flaky, once a test made it start, stopped and
        its command gone again."""
        self.exit_file.unlink(missing_ok=True)
        with self.rpc() as rpc:
            for name, info in self.infos().items():
                if info["pid"]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(info["pid"], signal.SIGCONT)
                group = name.partition(":")[0]
                active = info["statename"] in ("STARTING", "RUNNING", "BACKOFF")
                if group in ("consumer", "scaler", "flaky") and active:
                    rpc.supervisor.stopProcess(name, True)
                elif group in ("health", "other") and info["statename"] != "RUNNING":
                    if active:
                        rpc.supervisor.stopProcess(name, True)
                    rpc.supervisor.startProcess(name, True)
        self.flaky_command.unlink(missing_ok=True)
        self.wait_running(["health:health", "other:other"])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # a program a test hung with SIGSTOP would only die at stopwaitsecs' SIGKILL
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            for info in self.infos().values():
                if info["pid"]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(info["pid"], signal.SIGCONT)
        self.proc.terminate()  # supervisord stops its programs, then exits
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)


def start_supervisord(bootstrap: str) -> SupervisorServer:
    server = SupervisorServer(bootstrap=bootstrap)
    server.start()
    return server
