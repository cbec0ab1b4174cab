"""A real Apache Flink 2.3 session cluster for the tests: one JobManager, one TaskManager.

The distribution comes from the PyPI wheels, cached by scripts/install-flink.sh (run by
`make system-deps`) under ``${RUNBOOKS_CACHE:-~/.cache/runbooks}/flink-<version>``. Each process
runs in the foreground (``bin/jobmanager.sh start-foreground``, which execs java), so a test can
SIGKILL the TaskManager and start it again. Everything binds to 127.0.0.1 on free ports; the
configuration, logs, pid files, uploaded jars and checkpoints live in one temporary directory.

The test job (tests/programs/flink/CountingJob.java) is compiled against the distribution's
``lib/flink-dist-*.jar`` once per source version and cached beside the distribution.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.servers import free_port

FLINK_VERSION = "2.3.0"
JAVA_HOME = Path("/usr/lib/jvm/java-17-openjdk-amd64")
COUNTING_JOB_SOURCE = Path(__file__).parent / "programs" / "flink" / "CountingJob.java"
COUNTING_JOB_CLASS = "runbooks.tests.CountingJob"
TERMINAL = frozenset({"FAILED", "CANCELED", "FINISHED"})


def cache_root() -> Path:
    return Path(os.environ.get("RUNBOOKS_CACHE") or Path.home() / ".cache" / "runbooks")


def flink_home(version: str = FLINK_VERSION) -> Path:
    home = cache_root() / f"flink-{version}"
    if not (home / ".complete").exists():
        raise RuntimeError(
            f"Flink {version} is not cached in {home}: run `make system-deps` "
            "(scripts/install-flink.sh downloads it once)"
        )
    if not (JAVA_HOME / "bin" / "javac").exists():
        raise RuntimeError(f"no Java 17 JDK in {JAVA_HOME}: run `make system-deps`")
    return home


def build_counting_job(home: Path | None = None) -> Path:
    """The test job's jar, compiled once per source (cached by the source's hash)."""
    home = home or flink_home()
    source = COUNTING_JOB_SOURCE.read_bytes()
    digest = hashlib.sha256(source + FLINK_VERSION.encode()).hexdigest()[:16]
    jar = cache_root() / "flink-jobs" / f"counting-job-{digest}.jar"
    if jar.exists():
        return jar
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="counting-job-", dir=jar.parent) as tmp:
        classes = Path(tmp) / "classes"
        classpath = ":".join(str(p) for p in sorted((home / "lib").glob("*.jar")))
        subprocess.run(
            [
                str(JAVA_HOME / "bin" / "javac"),
                "-nowarn",
                "-d",
                str(classes),
                "-cp",
                classpath,
                str(COUNTING_JOB_SOURCE),
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
        built = Path(tmp) / "counting-job.jar"
        subprocess.run(
            [
                str(JAVA_HOME / "bin" / "jar"),
                "--create",
                "--file",
                str(built),
                "--main-class",
                COUNTING_JOB_CLASS,
                "-C",
                str(classes),
                ".",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        os.replace(built, jar)  # atomic: a concurrent session sees no half-written jar
    return jar


class FlinkTestCluster:
    """One JobManager and one TaskManager (4 slots) of a real Flink session cluster."""

    def __init__(self, slots: int = 4, base: Path | None = None) -> None:
        self.home = flink_home()
        self.slots = slots
        self.base = base or Path(tempfile.mkdtemp(prefix="runbooks-flink-"))
        self.conf_dir = self.base / "conf"
        self.log_dir = self.base / "log"
        self.pid_dir = self.base / "pid"
        self.checkpoint_dir = self.base / "checkpoints"
        self.savepoint_dir = self.base / "savepoints"
        self.upload_dir = self.base / "uploads"
        self.rest_port = free_port()
        self.jobmanager: subprocess.Popen | None = None
        self.taskmanager: subprocess.Popen | None = None
        self._taskmanager_starts = 0

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def _write_config(self) -> None:
        for d in (
            self.conf_dir,
            self.log_dir,
            self.pid_dir,
            self.checkpoint_dir,
            self.savepoint_dir,
            self.upload_dir,
            self.base / "tmp",
        ):
            d.mkdir(parents=True, exist_ok=True)
        for name in (
            "log4j-console.properties",
            "log4j.properties",
            "log4j-cli.properties",
            "logback-console.xml",
            "logback.xml",
        ):
            shutil.copy(self.home / "conf" / name, self.conf_dir / name)
        shipped = yaml.safe_load((self.home / "conf" / "config.yaml").read_text())
        config: dict[str, Any] = {
            # Java 17 needs the distribution's --add-opens/--add-exports
            "env.java.opts.all": shipped["env"]["java"]["opts"]["all"],
            "jobmanager.rpc.address": "127.0.0.1",
            "jobmanager.rpc.port": free_port(),
            "jobmanager.bind-host": "127.0.0.1",
            "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1",
            "rest.port": self.rest_port,
            "blob.server.port": str(free_port()),
            "taskmanager.host": "127.0.0.1",
            "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.rpc.port": str(free_port()),
            "taskmanager.data.port": free_port(),
            # a TaskManager that tried too early (or lost its JobManager) tries again soon
            "cluster.registration.error-delay": "1 s",
            "jobmanager.memory.process.size": "640m",
            "taskmanager.memory.process.size": "768m",
            "taskmanager.memory.jvm-metaspace.size": "160m",
            "taskmanager.memory.managed.size": "16m",
            "taskmanager.memory.network.min": "32m",
            "taskmanager.memory.network.max": "32m",
            "taskmanager.numberOfTaskSlots": self.slots,
            "parallelism.default": 1,
            "state.backend.type": "hashmap",
            "execution.checkpointing.interval": "2 s",
            "execution.checkpointing.dir": self.checkpoint_dir.as_uri(),
            "execution.checkpointing.savepoint-dir": self.savepoint_dir.as_uri(),
            "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
            "restart-strategy.type": "none",
            "heartbeat.interval": "1 s",
            "heartbeat.timeout": "8 s",
            "web.upload.dir": str(self.upload_dir),
            "io.tmp.dirs": str(self.base / "tmp"),
        }
        (self.conf_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JAVA_HOME=str(JAVA_HOME),
            PATH=f"{JAVA_HOME / 'bin'}:{env.get('PATH', '')}",
            FLINK_CONF_DIR=str(self.conf_dir),
            FLINK_LOG_DIR=str(self.log_dir),
            FLINK_PID_DIR=str(self.pid_dir),
        )
        return env

    def _spawn(self, script: str, log_name: str) -> subprocess.Popen:
        with (self.log_dir / log_name).open("ab") as out:
            return subprocess.Popen(
                [str(self.home / "bin" / script), "start-foreground"],
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,
            )

    def start(self, timeout_s: float = 90) -> None:
        self._write_config()
        self.jobmanager = self._spawn("jobmanager.sh", "jobmanager.out")
        self.wait_for(
            lambda: self.get("/overview"),
            lambda o: True,
            timeout_s=timeout_s,
            what="JobManager REST API",
        )
        self.start_taskmanager(timeout_s=timeout_s)

    def start_taskmanager(self, wait: bool = True, timeout_s: float = 60) -> None:
        """Start the TaskManager (again, after ``kill_taskmanager``); wait until it registered."""
        if self.taskmanager is not None and self.taskmanager.poll() is None:
            raise RuntimeError("the TaskManager is already running")
        self._taskmanager_starts += 1
        self.taskmanager = self._spawn(
            "taskmanager.sh", f"taskmanager-{self._taskmanager_starts}.out"
        )
        if wait:
            self.wait_for_taskmanagers(1, timeout_s=timeout_s)

    def kill_taskmanager(self) -> None:
        """SIGKILL the TaskManager's JVM: a lost machine, as far as Flink can tell."""
        assert self.taskmanager is not None
        self.taskmanager.send_signal(signal.SIGKILL)
        self.taskmanager.wait(10)

    def wait_for_taskmanagers(self, count: int, timeout_s: float = 60) -> dict[str, Any]:
        """Until /overview shows ``count`` TaskManagers (and, if any, all their slots)."""
        return self.wait_for(
            lambda: self.get("/overview"),
            lambda o: o["taskmanagers"] == count and o["slots-total"] == count * self.slots,
            timeout_s=timeout_s,
            what=f"{count} TaskManager(s)",
        )

    def stop(self) -> None:
        for proc in (self.taskmanager, self.jobmanager):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)

    # --- REST -----------------------------------------------------------------------------

    def _check(self, proc: subprocess.Popen | None, name: str) -> None:
        if proc is not None and proc.poll() is not None and name == "jobmanager":
            log = (self.log_dir / "jobmanager.out").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the Flink JobManager exited ({proc.returncode}): {log}")

    def get(self, path: str) -> Any:
        response = httpx.get(self.rest_url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_for(
        self,
        read: Callable[[], Any],
        done: Callable[[Any], bool],
        *,
        timeout_s: float = 60,
        interval_s: float = 0.2,
        what: str = "condition",
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            self._check(self.jobmanager, "jobmanager")
            with contextlib.suppress(httpx.HTTPError):
                last = read()
                if done(last):
                    return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"Flink: no {what} after {timeout_s}s (last: {last!r})"[:3000])
            time.sleep(interval_s)

    def upload_jar(self, path: Path | str) -> str:
        """POST /jars/upload; returns the jar id (what /jars/:jarid/run takes)."""
        path = Path(path)
        with path.open("rb") as f:
            response = httpx.post(
                f"{self.rest_url}/jars/upload",
                files={"jarfile": (path.name, f, "application/x-java-archive")},
                timeout=60,
            )
        response.raise_for_status()
        return Path(response.json()["filename"]).name

    def counting_jar(self) -> str:
        """The id of the uploaded test job jar (CountingJob); uploads it if it is not there."""
        jar = build_counting_job(self.home)
        mine = [j for j in self.jars() if j["name"] == jar.name]
        if mine:
            return max(mine, key=lambda j: j["uploaded"])["id"]
        return self.upload_jar(jar)

    def jars(self) -> list[dict[str, Any]]:
        return self.get("/jars")["files"]

    def delete_jar(self, jar_id: str) -> None:
        httpx.delete(f"{self.rest_url}/jars/{jar_id}", timeout=10).raise_for_status()

    def submit(
        self,
        jar_id: str,
        args: Iterable[str],
        parallelism: int | None = None,
        savepoint_path: str | None = None,
        entry_class: str | None = COUNTING_JOB_CLASS,
    ) -> str:
        """POST /jars/:jarid/run; returns the new job's id."""
        body: dict[str, Any] = {"programArgsList": list(args)}
        if entry_class:
            body["entryClass"] = entry_class
        if parallelism:
            body["parallelism"] = parallelism
        if savepoint_path:
            body["savepointPath"] = savepoint_path
        response = httpx.post(f"{self.rest_url}/jars/{jar_id}/run", json=body, timeout=60)
        if not response.is_success:
            raise RuntimeError(
                f"submitting {jar_id}: HTTP {response.status_code}: {response.text[:2000]}"
            )
        return response.json()["jobid"]

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster knows (/jobs/overview), running and ended."""
        return self.get("/jobs/overview")["jobs"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}")

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}/checkpoints")

    def wait_for_state(self, job_id: str, state: str, timeout_s: float = 60) -> dict[str, Any]:
        """Until the job is in ``state``; for RUNNING, until every task of it runs, too."""

        def done(job: dict[str, Any]) -> bool:
            if job["state"] != state:
                if job["state"] in TERMINAL and state not in TERMINAL:
                    raise RuntimeError(f"job {job_id} ended {job['state']} waiting for {state}")
                return False
            return state != "RUNNING" or all(v["status"] == "RUNNING" for v in job["vertices"])

        return self.wait_for(
            lambda: self.job(job_id), done, timeout_s=timeout_s, what=f"job {job_id} {state}"
        )

    def wait_for_checkpoints(
        self, job_id: str, completed: int = 1, timeout_s: float = 60
    ) -> dict[str, Any]:
        """Until the job has completed ``completed`` checkpoints since it started."""
        return self.wait_for(
            lambda: self.checkpoints(job_id),
            lambda c: c["counts"]["completed"] >= completed,
            timeout_s=timeout_s,
            what=f"{completed} completed checkpoint(s) of {job_id}",
        )

    def cancel(self, job_id: str) -> None:
        httpx.patch(f"{self.rest_url}/jobs/{job_id}", params={"mode": "cancel"}, timeout=10)

    def cancel_all(self, delete_jars: bool = False, timeout_s: float = 30) -> None:
        """Cancel every job that has not ended and wait until their slots are free again;
        with ``delete_jars`` remove every uploaded jar too."""
        live = [j["jid"] for j in self.jobs() if j["state"] not in TERMINAL]
        for jid in live:
            self.cancel(jid)
        for jid in live:
            self.wait_for(
                lambda jid=jid: self.job(jid)["state"],
                lambda s: s in TERMINAL,
                timeout_s=timeout_s,
                what=f"job {jid} ended",
            )
        if delete_jars:
            for jar in self.jars():
                self.delete_jar(jar["id"])


def start_flink(slots: int = 4) -> FlinkTestCluster:
    cluster = FlinkTestCluster(slots=slots)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def counting_args(
    name: str,
    out: Path | str | None = None,
    *,
    rate: float = 20,
    keys: int = 4,
    fail_file: Path | str | None = None,
    sink_delay_ms: int = 0,
) -> list[str]:
    """programArgsList of the CountingJob."""
    args = ["--name", name, "--rate", str(rate), "--keys", str(keys)]
    if out is not None:
        args += ["--out", str(out)]
    if fail_file is not None:
        args += ["--fail-file", str(fail_file)]
    if sink_delay_ms:
        args += ["--sink-delay-ms", str(sink_delay_ms)]
    return args


def read_counts(out_dir: Path, offsets: dict[str, int] | None = None) -> dict[int, list[int]]:
    """Every count the job wrote per key, in the order written (after ``offsets``, if given:
    byte offsets per part file, see ``part_offsets``)."""
    counts: dict[int, list[int]] = {}
    for part in sorted(out_dir.glob("part-*.txt")):
        data = part.read_bytes()[(offsets or {}).get(part.name, 0) :]
        # a line being written may lack its newline yet: only whole lines
        for line in data.decode().split("\n")[:-1]:
            key, count = line.split()
            counts.setdefault(int(key), []).append(int(count))
    return counts


def part_offsets(out_dir: Path) -> dict[str, int]:
    """Current size of each part file: what a later ``read_counts`` skips."""
    return {p.name: p.stat().st_size for p in out_dir.glob("part-*.txt")}
