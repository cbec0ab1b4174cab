"""A real Apache Spark standalone cluster for the session: one master with REST submission on, one
small worker, each its own process, everything on 127.0.0.1 free ports.

Spark comes from scripts/install-spark.sh (the PyPI pyspark sdist, cached once under
``${RUNBOOKS_CACHE:-~/.cache/runbooks}/spark-<version>``); Java 17 from Debian. Drivers run in
cluster deploy mode on the worker, so killing a driver's processes is how a machine loses it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port, wait_for_port

SPARK_VERSION = "4.3.0"
JAVA_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"
REPO = Path(__file__).resolve().parent.parent
COUNTING_STREAM = REPO / "tests" / "programs" / "spark" / "counting_stream.py"
PYTHON_RUNNER = "org.apache.spark.deploy.PythonRunner"


def spark_home() -> Path:
    """The cached Spark distribution; installs it (once) when missing."""
    cache = Path(os.environ.get("RUNBOOKS_CACHE") or Path.home() / ".cache" / "runbooks")
    home = cache / f"spark-{SPARK_VERSION}"
    if not (home / ".complete").exists():
        subprocess.run(
            ["bash", str(REPO / "scripts" / "install-spark.sh")],
            check=True,
            env={**os.environ, "SPARK_VERSION": SPARK_VERSION},
        )
    return home


def python_path(home: Path) -> str:
    """PYTHONPATH for a Python driver: pyspark and py4j from the distribution."""
    py4j = sorted((home / "python" / "lib").glob("py4j-*.zip"))
    return os.pathsep.join([str(home / "python"), *map(str, py4j)])


@dataclass
class SparkTestCluster:
    home: Path = field(default_factory=spark_home)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="runbooks-spark-")))
    master_port: int = field(default_factory=free_port)
    rest_port: int = field(default_factory=free_port)
    ui_port: int = field(default_factory=free_port)
    worker_port: int = field(default_factory=free_port)
    worker_ui_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def worker_dir(self) -> Path:
        return self.workdir / "worker"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "JAVA_HOME": JAVA_HOME,
            "SPARK_HOME": str(self.home),
            "SPARK_LOG_DIR": str(self.workdir / "logs"),
            "SPARK_CONF_DIR": str(self.workdir / "conf"),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_LOCAL_DIRS": str(self.workdir / "local"),
            "SPARK_DAEMON_MEMORY": "384m",
            "PYSPARK_PYTHON": sys.executable,
        }

    def _daemon(self, name: str, *args: str) -> None:
        log = (self.workdir / "logs" / f"{name}.out").open("ab")
        self.procs[name] = subprocess.Popen(
            [str(self.home / "bin" / "spark-class"), *args],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )

    def start(self) -> SparkTestCluster:
        for sub in ("logs", "conf", "local", "worker"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "conf" / "spark-defaults.conf").write_text(
            "spark.master.rest.enabled true\n"
            f"spark.master.rest.port {self.rest_port}\n"
            f"spark.master.ui.port {self.ui_port}\n"
            "spark.ui.showConsoleProgress false\n"
        )
        self._daemon(
            "master",
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.master_port),
            "--webui-port",
            str(self.ui_port),
        )
        wait_for_port(self.rest_port, timeout_s=90)
        self._daemon(
            "worker",
            "org.apache.spark.deploy.worker.Worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.worker_port),
            "--webui-port",
            str(self.worker_ui_port),
            "--cores",
            "2",
            "--memory",
            "1536m",
            "--work-dir",
            str(self.worker_dir),
            self.master_url,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.master_json().get("aliveworkers"):
                return self
            time.sleep(0.5)
        raise TimeoutError(f"no worker registered with {self.master_url}: see {self.workdir}/logs")

    def master_json(self) -> dict[str, Any]:
        try:
            return httpx.get(f"{self.ui_url}/json/", timeout=5).json()
        except httpx.HTTPError:
            return {}

    def submission(
        self,
        app_name: str,
        sink: Path,
        checkpoint: Path,
        *,
        rows_per_second: int = 5,
        trigger_s: float = 1.0,
    ) -> dict[str, Any]:
        """The CreateSubmissionRequest fields of the counting stream (what the block holds)."""
        return {
            "app_resource": str(COUNTING_STREAM),
            "main_class": PYTHON_RUNNER,
            "app_args": [
                str(COUNTING_STREAM),
                "",
                str(sink),
                str(checkpoint),
                str(rows_per_second),
                str(trigger_s),
            ],
            "spark_properties": {
                "spark.app.name": app_name,
                "spark.driver.memory": "512m",
                "spark.driver.cores": "1",
                "spark.executor.memory": "512m",
                "spark.executor.cores": "1",
                "spark.cores.max": "1",
                "spark.sql.shuffle.partitions": "1",
                "spark.ui.enabled": "false",
            },
            "environment_variables": {
                "PYSPARK_PYTHON": sys.executable,
                "PYTHONPATH": python_path(self.home),
                "SPARK_HOME": str(self.home),
                "JAVA_HOME": JAVA_HOME,
            },
        }

    def submit(self, app_name: str, sink: Path, checkpoint: Path, **kwargs: Any) -> str:
        """Submit the counting stream through the REST API; returns the driver (submission) id."""
        sub = self.submission(app_name, sink, checkpoint, **kwargs)
        body = {
            "action": "CreateSubmissionRequest",
            "clientSparkVersion": SPARK_VERSION,
            "appResource": sub["app_resource"],
            "mainClass": sub["main_class"],
            "appArgs": sub["app_args"],
            "environmentVariables": sub["environment_variables"],
            "sparkProperties": {
                **sub["spark_properties"],
                "spark.master": self.master_url,
                "spark.submit.deployMode": "cluster",
                "spark.driver.supervise": "false",
            },
        }
        answer = httpx.post(f"{self.rest_url}/v1/submissions/create", json=body, timeout=30).json()
        if not answer.get("success"):
            raise RuntimeError(f"submission refused: {json.dumps(answer)}")
        return answer["submissionId"]

    def driver_state(self, driver_id: str) -> str | None:
        answer = httpx.get(f"{self.rest_url}/v1/submissions/status/{driver_id}", timeout=10).json()
        return answer.get("driverState")

    def driver_pids(self, driver_id: str) -> list[int]:
        """The driver's processes (its JVM and its Python): those working in its work directory."""
        return processes_under(self.worker_dir / driver_id)

    def executor_pids(self, app_id: str) -> list[int]:
        """The executors of an application on the worker."""
        return processes_under(self.worker_dir / app_id)

    def kill_driver_process(self, driver_id: str) -> list[int]:
        """SIGKILL every process of the driver, the way a lost machine ends it."""
        pids = self.driver_pids(driver_id)
        if not pids:
            raise RuntimeError(f"no process of driver {driver_id} under {self.worker_dir}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def kill_all_drivers(self) -> None:
        """Kill every driver still running (through the REST API), between tests."""
        for driver in self.master_json().get("activedrivers", []):
            httpx.post(f"{self.rest_url}/v1/submissions/kill/{driver['id']}", timeout=10)

    def stop(self) -> None:
        for name in ("worker", "master"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # drivers and executors the worker started outlive it when it is killed: end them too
        for driver in self.worker_dir.iterdir() if self.worker_dir.exists() else []:
            for pid in self.driver_pids(driver.name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_spark() -> SparkTestCluster:
    return SparkTestCluster().start()


def committed_files(sink: Path) -> list[Path]:
    """The files of a file sink its log lists as committed (``_spark_metadata``), as Spark's own
    readers see the sink: files of a batch that died before its commit are left out."""
    added: set[str] = set()
    deleted: set[str] = set()
    log = sink / "_spark_metadata"
    for entry in sorted(log.iterdir()) if log.exists() else []:
        if entry.name.startswith("."):
            continue
        for line in entry.read_text().splitlines()[1:]:  # first line: the log version
            if not line.strip():
                continue
            record = json.loads(line)
            (deleted if record.get("action") == "delete" else added).add(record["path"])
    return [Path(p.removeprefix("file://")) for p in sorted(added - deleted)]


def sink_values(sink: Path) -> list[int]:
    """Every ``value`` the counting stream committed to its JSON sink, in file order."""
    return [
        json.loads(line)["value"]
        for f in committed_files(sink)
        for line in f.read_text().splitlines()
        if line.strip()
    ]


def commits(checkpoint: Path) -> list[int]:
    """Committed batch ids of a streaming query's checkpoint."""
    found = checkpoint / "commits"
    return (
        sorted(int(p.name) for p in found.iterdir() if p.name.isdigit()) if found.exists() else []
    )


def processes_under(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` or below (a driver's, an executor's)."""
    wanted = directory.resolve()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd")).resolve()
        except OSError:
            continue
        if cwd == wanted or wanted in cwd.parents:
            pids.append(int(proc.name))
    return pids
