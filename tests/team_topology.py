"""A team's Prefect topology as real processes on free ports (issue #16), for tests.

- PostgreSQL of its own for Prefect's database (tests/servers.py start_postgres);
- one Redis (no persistence): Prefect's messaging (events, the broker between API servers and
  the services) and the concurrency lease storage (``prefect_redis.lease_storage``), shared by
  both API servers;
- API server A: ``prefect server start`` (API + every service: triggers, scheduler, ...);
- API server B: ``prefect server start --no-services`` (API only), on the same database and Redis:
  what Prefect 3.8.8 supports for more API replicas (``--workers N`` also implies no services);
- ``runbooks deploy`` against A: the `runbooks` process work pool, every deployment of prefect.yaml;
- two ``runbooks worker`` processes (our worker type, serving/fast_worker.py: what a team runs),
  worker-1 talking to A and worker-2 to B, each polling the pool's default queue and a queue of its own (``w1``/``w2``) so a
  test can place a run on one worker.

Every process is in its own session: a test SIGKILLs a worker with its process group (the worker
and the flow runs it started: machine death) and starts it again.
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.servers import PostgresServer, free_port, start_postgres, wait_for_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_SECONDS = 30  # Prefect's minimum flow-run heartbeat interval


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}


@dataclass
class Proc:
    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the process and every child it started."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if not self.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@dataclass
class TeamTopology:
    home: Path
    postgres: PostgresServer
    redis_port: int
    api_a: str
    api_b: str
    procs: dict[str, Proc] = field(default_factory=dict)

    def server_env(self) -> dict[str, str]:
        return {
            **_clean_env(),
            "PREFECT_HOME": str(self.home / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                f"postgresql+asyncpg://{self.postgres.user}:{self.postgres.password}"
                f"@127.0.0.1:{self.postgres.port}/prefect"
            ),
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
            "PREFECT_REDIS_MESSAGING_PORT": str(self.redis_port),
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            # which events the triggers service already evaluated: in Redis, not in the server's
            # memory, or events Redis redelivers after a server died fire their triggers again
            # (a second run for one alert: tests/integration/test_team_gateways.py)
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        }

    def client_env(self, api_url: str) -> dict[str, str]:
        return {
            **_clean_env(),
            "PREFECT_HOME": str(self.home / "prefect-home"),
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
            # a run's result persisted: Prefect's server then refuses to take a COMPLETED run
            # back to PENDING (HandleFlowTerminalStateTransitions), which a worker's submission
            # retried across an API server's death otherwise can (test_team_gateways.py)
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        }

    def _start_server(self, name: str, api_url: str, extra: list[str]) -> None:
        port = api_url.rsplit(":", 1)[1].split("/")[0]
        p = Proc(
            name,
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                *extra,
            ],
            self.server_env(),
            self.home / f"{name}.log",
        )
        self.procs[name] = p
        p.start()
        wait_healthy(api_url, p)

    def start_worker(self, name: str, api_url: str, queue: str, stock: bool = False) -> Proc:
        """`runbooks worker` (ours), or `runbooks worker --stock` (Prefect's process worker)."""
        env = self.client_env(api_url)
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_SECONDS)
        env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
        env["PREFECT_WORKER_PREFETCH_SECONDS"] = "5"
        p = Proc(
            name,
            [
                sys.executable,
                "-m",
                "serving.cli",
                "worker",
                "--name",
                name,
                "--work-queue",
                "default",
                "--work-queue",
                queue,
                "--heartbeat-seconds",
                str(HEARTBEAT_SECONDS),
                *(["--stock"] if stock else []),
            ],
            env,
            self.home / f"{name}.log",
        )
        self.procs[name] = p
        p.start()
        return p

    def wait_worker_online(self, name: str, timeout_s: float = 60) -> None:
        """Until the server lists the worker as online (it polled the pool)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if not proc.alive:
                raise RuntimeError(f"{name} exited: {proc.tail()}")
            resp = httpx.post(
                f"{self.api_a}/work_pools/runbooks/workers/filter", json={}, timeout=10
            )
            if resp.status_code == 200 and any(
                w["name"] == name and w.get("status") == "ONLINE" for w in resp.json()
            ):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{name} not online after {timeout_s}s: {self.procs[name].tail()}")

    def start_gateway(
        self, name: str, api_url: str, token: str, **settings: str
    ) -> tuple[Proc, str]:
        """An alert gateway (``python -m alert_gateway``) forwarding to ``api_url``, with a spool
        of its own (``<home>/<name>-spool.sqlite3``); ``settings``: more ``RUNBOOKS_GATEWAY_*``
        values (``cooldown_s="0"``). Returns the process, healthy, and its base URL; restart it
        with ``proc.start()`` (same port, same spool)."""
        port = free_port()
        env = {
            **self.client_env(api_url),
            "RUNBOOKS_GATEWAY_TOKEN": token,
            "RUNBOOKS_GATEWAY_SPOOL_PATH": str(self.home / f"{name}-spool.sqlite3"),
            **{f"RUNBOOKS_GATEWAY_{k.upper()}": v for k, v in settings.items()},
        }
        p = Proc(
            name,
            [sys.executable, "-m", "alert_gateway", "--host", "127.0.0.1", "--port", str(port)],
            env,
            self.home / f"{name}.log",
        )
        self.procs[name] = p
        p.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if not p.alive:
                raise RuntimeError(f"{name} exited: {p.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return p, url
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy after 60s: {p.tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()
        subprocess.run(
            ["redis-cli", "-p", str(self.redis_port), "shutdown", "nosave"],
            capture_output=True,
            timeout=10,
        )
        if "redis" in self.procs:
            self.procs["redis"].stop()
        self.postgres.stop()
        if os.environ.get("RUNBOOKS_KEEP_TEST_LOGS"):  # every process's log, to read a failure
            print(f"team topology logs kept in {self.home}")
            return
        shutil.rmtree(self.home, ignore_errors=True)


def wait_healthy(api_url: str, proc: Proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not healthy after {timeout_s}s: {proc.tail()}")


def start_team_topology() -> TeamTopology:
    home = Path(tempfile.mkdtemp(prefix="runbooks-team-"))
    postgres = start_postgres(max_connections=120)
    topology = TeamTopology(
        home,
        postgres,
        free_port(),
        f"http://127.0.0.1:{free_port()}/api",
        f"http://127.0.0.1:{free_port()}/api",
    )
    try:
        import psycopg

        with psycopg.connect(postgres.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE prefect")
        redis = Proc(
            "redis",
            [
                "redis-server",
                "--port",
                str(topology.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            _clean_env(),
            home / "redis.log",
        )
        topology.procs["redis"] = redis
        redis.start()
        wait_for_port(topology.redis_port)
        # A first: it migrates the database; B then starts on the migrated schema
        topology._start_server("api-a", topology.api_a, [])
        topology._start_server("api-b", topology.api_b, ["--no-services"])
        deployed = subprocess.run(
            [
                sys.executable,
                "-m",
                "serving.cli",
                "deploy",
                "--api-url",
                topology.api_a,
                "--heartbeat-seconds",
                str(HEARTBEAT_SECONDS),
            ],
            env=topology.client_env(topology.api_a),
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if deployed.returncode != 0:
            raise RuntimeError(
                f"runbooks deploy failed: {deployed.stdout[-2000:]}{deployed.stderr[-4000:]}"
            )
        (home / "deploy.log").write_text(deployed.stdout + deployed.stderr)
        # a queue of each worker's own (a worker polling a queue that does not exist gets no
        # runs at all, from any of its queues)
        for queue in ("w1", "w2"):
            httpx.post(
                f"{topology.api_a}/work_pools/runbooks/queues", json={"name": queue}, timeout=10
            ).raise_for_status()
        topology.start_worker("worker-1", topology.api_a, "w1")
        topology.start_worker("worker-2", topology.api_b, "w2")
        topology.wait_worker_online("worker-1")
        topology.wait_worker_online("worker-2")
    except BaseException:
        topology.stop()
        raise
    return topology
