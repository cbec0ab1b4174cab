"""A throwaway Docker-compatible engine for the tests: podman's API service on a unix socket.

Everything podman keeps lives under one temporary directory: its storage (--root), run state
(--runroot, --tmpdir), runc's state, the events log, the socket. The settings are those known
to work on these machines (shared/ENVIRONMENT.md): runtime runc (crun lacks CAP_SYS_RESOURCE
here), ulimits nofile and nproc 1024:1024, the host's network (a bridge puts containers on
10.88.x), and an image imported from Debian's busybox-static, as no registry is reachable.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

IMAGE = "localhost/runbooks-busybox:test"
BUSYBOX = "/usr/bin/busybox"
SYSTEM_CACHE_DIR = "/var/lib/containers"


@dataclass
class PodmanService:
    """``podman system service`` on ``<base>/podman.sock``, with storage of its own."""

    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="runbooks-podman-")))
    proc: subprocess.Popen | None = None
    # `podman import` writes a blob cache there whatever --root says; removed again if the
    # service made it
    _made_cache_dir: bool = False

    @property
    def socket(self) -> Path:
        return self.base / "podman.sock"

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    def _flags(self) -> list[str]:
        return [
            "--root", str(self.base / "root"),
            "--runroot", str(self.base / "run"),
            "--tmpdir", str(self.base / "tmp"),
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            # runc, with its state here rather than in /run/runc: a wrapper, because podman
            # passes --runtime-flag to its own runc calls but not to the cleanup command
            # conmon runs when a container exits
            "--runtime", str(self.base / "bin" / "runc"),
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.base / "containers.conf")}

    def cli(self, *args: str, cwd: Path | str | None = None, timeout: float = 60) -> str:
        """Run ``podman <args>`` against this service's storage; its output."""
        done = subprocess.run(
            ["podman", *self._flags(), *args],
            env=self._env(), cwd=cwd or self.base, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def start(self, timeout_s: float = 30) -> None:
        if not shutil.which("podman") or not os.path.exists(BUSYBOX):
            raise RuntimeError("podman or busybox-static missing: run `make system-deps`")
        for sub in ("root", "run", "tmp", "runc", "svc", "bin"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        runc = self.base / "bin" / "runc"
        runc.write_text(f'#!/bin/sh\nexec /usr/bin/runc --root "{self.base / "runc"}" "$@"\n')
        runc.chmod(0o755)
        (self.base / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.base / "events.log"}"\n'
        )
        self._made_cache_dir = not os.path.exists(SYSTEM_CACHE_DIR)
        self._import_image()
        # conmon, which podman starts for each container, works in the service's directory
        with (self.base / "service.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["podman", *self._flags(), "system", "service", "--time=0", self.base_url],
                env=self._env(), cwd=self.base / "svc", stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"podman service exited: {self.log_tail()}")
            if self.socket.exists():
                with (
                    contextlib.suppress(docker.errors.DockerException),
                    contextlib.closing(self.client(5)) as c,
                ):
                    c.ping()
                    return
            time.sleep(0.05)
        raise TimeoutError(f"podman service not answering after {timeout_s}s: {self.log_tail()}")

    def _import_image(self) -> None:
        """An image of busybox-static: one binary, every applet a link to it."""
        applets = subprocess.run(
            [BUSYBOX, "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        rootfs = self.base / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            for directory in ("bin", "tmp", "etc"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
                tar.addfile(info)
            tar.add(BUSYBOX, "bin/busybox")
            for applet in applets:
                if applet != "busybox":
                    info = tarfile.TarInfo(f"bin/{applet}")
                    info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                    tar.addfile(info)
        self.cli("import", "--change", "ENV=PATH=/bin", str(rootfs), IMAGE)

    def client(self, timeout: float = 10) -> docker.DockerClient:
        # the API version podman 4.3 serves; "auto" would ask /version, which takes podman
        # half a second (it runs conmon and runc for their versions)
        return docker.DockerClient(base_url=self.base_url, version="1.41", timeout=timeout)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "service.log").read_text()[-2000:]
        return ""

    def run_healthcheck(self, container: str) -> str:
        """Run the container's healthcheck once; its new health status.

        podman schedules healthchecks with systemd timers, and systemd does not run here: the
        test runs them, through podman's own API (``/libpod/containers/{id}/healthcheck``),
        which records the result in the container's State.Health as a timer would.
        """
        with contextlib.closing(self.client()) as client:
            response = client.api.get(
                f"{client.api.base_url}/v4.0.0/libpod/containers/{container}/healthcheck",
                timeout=15,
            )
            response.raise_for_status()
            return response.json()["Status"]

    def start_detecting_oom(self, container_id: str) -> None:
        """Start a created container so that an OOM kill of it is recorded (State.OOMKilled).

        podman 4.3 + conmon 2.1.6 lose OOM kills: conmon writes its ``oom`` marker into its
        working directory (the service's), while podman reads it from the container's bundle
        directory. A container started by the podman command run *in* its bundle directory
        gets the marker where podman reads it; the kernel's OOM kill, conmon's cgroup event
        and podman's recording of it are all real.
        """
        bundle = self.cli("inspect", "--format", "{{.StaticDir}}", container_id).strip()
        self.cli("start", container_id, cwd=bundle)

    def host_pid(self, container: str, command: str) -> int:
        """The host PID of the container's process running ``command`` (its first process or
        one of that process's children)."""
        with contextlib.closing(self.client()) as client:
            pid = client.containers.get(container).attrs["State"]["Pid"]
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for candidate in [pid, *map(int, children)]:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{candidate}/comm").read_text().strip() == command:
                    return candidate
        raise LookupError(f"no {command} process in {container}")

    def remove_all(self) -> None:
        """Remove every container (and those sharing a namespace with one: --depend)."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.cli("rm", "--all", "--force", "--depend", "--time", "0")

    def stop(self) -> None:
        """Remove every container, stop the service, unmount and delete its directory."""
        self.remove_all()
        # what a failed removal left running: the monitors (conmon) of this service's
        # containers, found by its directory in their command lines, and their containers
        for pid in _processes_mentioning(self.base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # the overlay driver bind-mounts its own directory; containers' mounts are gone with
        # them, but a killed run can leave some: deepest first
        for mount_point in sorted(_mounts_under(self.base), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30)
        # runc removes a container's cgroups when podman cleans it up; after a kill above
        # nobody did: the empty ones of this service's containers (ids from its events log)
        with contextlib.suppress(OSError):
            ids = set(re.findall(r'"ID":"([0-9a-f]{64})"', (self.base / "events.log").read_text()))
            for cgroup in Path("/sys/fs/cgroup").glob("*/libpod_parent/libpod-*"):
                if cgroup.name.removeprefix("libpod-") in ids:
                    with contextlib.suppress(OSError):
                        cgroup.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)
        if self._made_cache_dir:
            shutil.rmtree(SYSTEM_CACHE_DIR, ignore_errors=True)


def _processes_mentioning(base: Path) -> list[int]:
    """PIDs of conmon processes whose command line names ``base``, with their children."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if cmdline[0].endswith(b"conmon") and str(base).encode() in b" ".join(cmdline):
                children = (proc / "task" / proc.name / "children").read_text().split()
                found += [*map(int, children), int(proc.name)]
    return found


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base.resolve())
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def start_podman() -> PodmanService:
    service = PodmanService()
    try:
        service.start()
    except BaseException:
        service.stop()
        raise
    return service


def container_spec(**overrides: Any) -> dict[str, Any]:
    """``containers.run`` arguments every test container shares (the host's network)."""
    return {"image": IMAGE, "detach": True, "network_mode": "host", **overrides}
