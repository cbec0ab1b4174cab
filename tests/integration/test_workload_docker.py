"""The Docker backend against a real Docker-compatible engine (podman 4.3's API service).

Containers are real processes of busybox-static on the host's network (free ports): a web
service whose health endpoint is a file served by busybox httpd, a worker, and a service that
allocates 40 MB. Changes go through the Prefect tasks of tasks/workloads.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import httpx
import pytest
import requests
from docker.models.containers import Container
from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

from blocks.docker_host import DockerHost
from tasks.docker_decisions import NUMBER_LABEL, PROJECT_LABEL, SERVICE_LABEL
from tasks.docker_engine import (
    DockerBackend,
    RecreationInterrupted,
    ServiceNotFound,
    is_transient_docker_error,
)
from tasks.workloads import (
    Capability,
    Unsupported,
    WorkloadBackend,
    WorkloadRef,
    restart_workload,
    scale_workload,
    set_memory_limit,
    workload_events,
    workload_logs,
    workload_status,
)
from tests.conftest import unique
from tests.podman import PodmanService, container_spec
from tests.servers import free_port
from tests.tls_proxy import TlsProxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
T = TypeVar("T")

# every script stops at once on SIGTERM: `docker stop` would otherwise wait out its timeout
# (a shell that is PID 1 ignores signals it has no handler for)
WEB = (
    'trap "exit 0" TERM; mkdir -p /tmp/www; echo ok > /tmp/www/health; '
    'echo "serving on {port}"; httpd -f -p 127.0.0.1:{port} -h /tmp/www & wait'
)
WORKER = 'trap "exit 0" TERM; echo "worker up"; while :; do sleep 1 & wait $!; done'
# holds 40 MB in a shell variable, then idles; the pause lets conmon watch the cgroup first
HOG = (
    'trap "exit 0" TERM; echo allocating; sleep 0.3; '
    'x=$(head -c 40000000 /dev/zero | tr "\\0" x); echo "allocated ${#x} bytes"; '
    "while :; do sleep 1 & wait $!; done"
)


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 10) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).text == "ok\n"
    except httpx.HTTPError:
        return False


@pytest.fixture(autouse=True)
def _tasks_outside_flows() -> Iterator[None]:
    # the tasks run on their own, as a flow would call them; their logs stay local
    with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        yield


@pytest.fixture
def engine(podman: PodmanService) -> Iterator[docker.DockerClient]:
    with contextlib.closing(podman.client()) as client:
        yield client


@pytest.fixture
def project() -> str:
    return unique("shop")


@pytest.fixture
def backend(podman: PodmanService, project: str) -> DockerBackend:
    host = DockerHost(
        base_url=podman.base_url, compose_project=project, request_timeout_s=10, stop_timeout_s=3
    )
    return DockerBackend(host)


def compose_container(
    engine: docker.DockerClient, project: str, service: str, script: str, number: int = 1,
    start: bool = True, **options: Any,
) -> Container:  # fmt: skip
    """A container as `docker compose up` makes it: labels, <project>-<service>-<n> name."""
    labels = {
        SERVICE_LABEL: service,
        PROJECT_LABEL: project,
        NUMBER_LABEL: str(number),
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.config-hash": "3f2a",
    }
    spec = container_spec(
        name=f"{project}-{service}-{number}", command=["sh", "-c", script], labels=labels,
        environment={"SERVICE": service}, **options,
    )  # fmt: skip
    if start:
        return engine.containers.run(**spec)
    del spec["detach"]
    return engine.containers.create(**spec)


def state(engine: docker.DockerClient, name: str) -> dict:
    return engine.containers.get(name).attrs


def healthcheck(port: int) -> dict:
    # busybox wget's own -T crashes (static build); `timeout` bounds a hung server
    test = f"timeout 1 wget -q -O- http://127.0.0.1:{port}/health"
    # an hour apart: podman runs no timers here, the test runs the check (run_healthcheck)
    return {"test": ["CMD-SHELL", test], "interval": 3600 * 10**9, "retries": 1}


# --- not responding -> restart ----------------------------------------------------------------


def test_restart_brings_back_a_service_that_stopped_answering(
    podman: PodmanService, engine: docker.DockerClient, backend: DockerBackend, project: str
) -> None:
    port = free_port()
    compose_container(engine, project, "web", WEB.format(port=port), healthcheck=healthcheck(port))
    name = f"{project}-web-1"
    ref = WorkloadRef(name="web")
    assert wait_for(lambda: answers(port), bool)
    assert podman.run_healthcheck(name) == "healthy"
    healthy = workload_status(backend, ref)
    (before,) = healthy.instances
    assert (healthy.exists, healthy.desired_replicas, before.running, before.ready) == (
        True, 1, True, True,
    )  # fmt: skip
    assert before.state == "running (healthy)" and before.pid

    # the web server hangs: its endpoint stops answering, the engine's healthcheck fails
    sh_pid = state(engine, name)["State"]["Pid"]
    os.kill(podman.host_pid(name, "httpd"), signal.SIGSTOP)
    assert not answers(port)
    assert podman.run_healthcheck(name) == "unhealthy"
    (hung,) = workload_status(backend, ref).instances
    assert (hung.running, hung.ready, hung.state) == (True, False, "running (unhealthy)")
    since = datetime.now(UTC)
    observed = state(engine, name)

    plan = restart_workload(backend, ref, since=since, dry_run=True)
    assert [(c.action, c.target) for c in plan.planned] == [
        ("restart_container", f"{name} ({observed['Id'][:12]})")
    ]
    assert plan.applied == [] and plan.dry_run
    unchanged = state(engine, name)
    assert (unchanged["Id"], unchanged["State"]["StartedAt"], unchanged["State"]["Pid"]) == (
        observed["Id"], observed["State"]["StartedAt"], sh_pid,
    )  # fmt: skip
    assert not answers(port), "a dry run restarts nothing"

    done = restart_workload(backend, ref, since=since, dry_run=False)
    (applied,) = done.applied
    assert (applied.action, applied.target) == (plan.planned[0].action, plan.planned[0].target)
    after = state(engine, name)
    assert after["Id"] == observed["Id"], "a restart keeps the container"
    assert after["State"]["StartedAt"] > observed["State"]["StartedAt"]
    assert after["State"]["Pid"] != sh_pid and applied.detail["pid"] == after["State"]["Pid"]
    assert applied.detail["previous_pid"] == sh_pid
    assert wait_for(lambda: answers(port), bool), "the endpoint answers again"
    assert podman.run_healthcheck(name) == "healthy"
    (back,) = workload_status(backend, ref).instances
    assert (back.ready, back.pid) == (True, after["State"]["Pid"])
    assert back.started_at and back.started_at > since

    # the same decision again (a retried task, a re-run flow): nothing to do
    again = restart_workload(backend, ref, since=since, dry_run=False)
    assert (again.planned, again.applied) == ([], [])
    assert "restarted already, left alone" in again.notes[0]
    assert state(engine, name)["State"]["StartedAt"] == after["State"]["StartedAt"]

    events = workload_events(backend, ref, since=since)
    reasons = [e.reason for e in events if e.instance == name]
    for reason in ("restart", "die", "start", "health_status"):
        assert reason in reasons, f"{reason} missing from {reasons}"
    assert reasons.index("restart") < len(reasons) - 1 - reasons[::-1].index("start")
    assert all(e.at and e.at >= since.replace(microsecond=0) for e in events)
    assert [e for e in events if e.reason == "die"][0].message == "exited with code 0"

    logs = workload_logs(backend, ref, lines=5)
    # printed once per start: the restart's start is the last line
    assert list(logs) == [name]
    assert logs[name].splitlines()[-2:] == [f"serving on {port}", f"serving on {port}"]
    assert workload_logs(backend, ref, lines=1)[name] == f"serving on {port}\n"


def test_a_stopped_container_is_started_and_a_plain_container_is_a_service(
    podman: PodmanService, engine: docker.DockerClient
) -> None:
    name = unique("cron")
    engine.containers.run(**container_spec(name=name, command=["sh", "-c", "echo ran; exit 3"]))
    backend = DockerBackend(DockerHost(base_url=podman.base_url, stop_timeout_s=1))
    ref = WorkloadRef(name=name)
    exited = wait_for(lambda: workload_status(backend, ref), lambda s: not s.running)
    (instance,) = exited.instances
    assert (instance.state, instance.exit_code, instance.finished_at is not None) == (
        "exited", 3, True,
    )  # fmt: skip
    assert exited.capabilities == [Capability.MEMORY_LIMIT], "one container: nothing to scale"

    done = restart_workload(backend, ref, since=datetime.now(UTC), dry_run=False)
    assert len(done.applied) == 1
    ran = wait_for(
        lambda: workload_logs(backend, ref, lines=10)[name], lambda t: t.count("ran") == 2
    )
    assert ran == "ran\nran\n"
    with pytest.raises(Unsupported, match="not part of a Compose service"):
        backend.scale(ref, 2, dry_run=True)
    with pytest.raises(ServiceNotFound):
        backend.restart(WorkloadRef(name=unique("nothing")), since=datetime.now(UTC), dry_run=True)


# --- OOM -> raise the memory limit -----------------------------------------------------------


def test_oom_killed_service_gets_a_higher_limit_and_stays_up(
    podman: PodmanService, engine: docker.DockerClient, backend: DockerBackend, project: str
) -> None:
    since = datetime.now(UTC)
    hog = compose_container(
        engine, project, "consumer", HOG, start=False, mem_limit="16m", memswap_limit="16m"
    )
    name = hog.name
    podman.start_detecting_oom(hog.id)
    ref = WorkloadRef(name="consumer")

    killed = wait_for(lambda: workload_status(backend, ref), lambda s: bool(s.oom_killed))
    (instance,) = killed.oom_killed
    assert (instance.running, instance.exit_code, instance.memory_limit_bytes) == (
        False, 137, 16 * MiB,
    )  # fmt: skip
    assert killed.memory_limit_bytes == 16 * MiB
    assert {Capability.MEMORY_LIMIT, Capability.SCALE} <= set(killed.capabilities)
    assert "allocated" not in workload_logs(backend, ref, lines=10)[name]
    # podman's state shows the exit as soon as conmon writes it; the "died" event comes from the
    # cleanup process a moment later (seen in CI: the state first, the event 0.1 s+ after)
    deaths = wait_for(
        lambda: [e for e in workload_events(backend, ref, since=since) if e.reason == "die"],
        bool,
    )
    assert [e.message for e in deaths] == ["exited with code 137"]

    plan = set_memory_limit(backend, ref, 128 * MiB, dry_run=True)
    (change,) = plan.planned
    assert change.target == f"{name} ({hog.id[:12]})"
    # podman 4.3 has no /containers/{id}/update: the container is recreated
    assert change.detail | {"effect": None} == {
        "from_bytes": 16 * MiB, "to_bytes": 128 * MiB, "memory_swap_bytes": 128 * MiB,
        "method": "recreate", "effect": None,
    }  # fmt: skip
    assert "`mem_limit: 128m`" in plan.notes[0] and f"project {project}" in plan.notes[0]
    assert state(engine, name)["Id"] == hog.id, "a dry run changes nothing"
    assert state(engine, name)["HostConfig"]["Memory"] == 16 * MiB

    done = set_memory_limit(backend, ref, 128 * MiB, dry_run=False)
    (applied,) = done.applied
    assert (applied.action, applied.target) == (change.action, change.target)
    replaced = state(engine, name)
    assert replaced["Id"] != hog.id and applied.detail["id"] == replaced["Id"][:12]
    assert (replaced["HostConfig"]["Memory"], replaced["HostConfig"]["MemorySwap"]) == (
        128 * MiB, 128 * MiB,
    )  # fmt: skip
    assert replaced["Config"]["Labels"] == hog.attrs["Config"]["Labels"]
    assert replaced["Config"]["Cmd"] == hog.attrs["Config"]["Cmd"]
    assert "SERVICE=consumer" in replaced["Config"]["Env"]
    assert replaced["HostConfig"]["NetworkMode"] == "host"
    assert [c.name for c in engine.containers.list(all=True, filters={"name": name})] == [name]
    assert set_memory_limit(backend, ref, 128 * MiB, dry_run=False).planned == []

    # it stopped by its OOM kill and stays stopped until restarted, as after `docker update`
    restart_workload(backend, ref, since=datetime.now(UTC), dry_run=False)
    up = wait_for(
        lambda: workload_status(backend, ref),
        lambda s: "allocated" in workload_logs(backend, ref, lines=5)[name],
    )
    (running,) = up.instances
    assert running.running and not running.oom_killed
    assert running.memory_limit_bytes == 128 * MiB
    # one stats sample: most of the 40 MB it holds (the sample lags the kernel's count by a
    # few MB at times), under the new limit
    assert running.memory_usage_bytes and 30_000_000 < running.memory_usage_bytes < 128 * MiB
    assert "allocated 40000000 bytes" in workload_logs(backend, ref, lines=5)[name]


def test_raising_the_limit_of_a_running_service_keeps_it_serving(
    engine: docker.DockerClient, backend: DockerBackend, project: str
) -> None:
    port = free_port()
    web = compose_container(engine, project, "web", WEB.format(port=port), mem_limit="64m")
    assert wait_for(lambda: answers(port), bool)
    ref = WorkloadRef(name="web")

    done = set_memory_limit(backend, ref, 96 * MiB, dry_run=False)
    assert len(done.applied) == 1
    replaced = state(engine, web.name)
    assert replaced["State"]["Running"] and replaced["HostConfig"]["Memory"] == 96 * MiB
    # 64m with Docker's default swap (as much again) keeps that swap: 96m + 64m
    assert replaced["HostConfig"]["MemorySwap"] == 160 * MiB
    assert wait_for(lambda: answers(port), bool), "the replacement serves on the same port"
    (instance,) = workload_status(backend, ref).instances
    assert instance.memory_limit_bytes == 96 * MiB and instance.memory_usage_bytes


def test_a_limit_below_the_reservation_is_refused_before_anything_changes(
    engine: docker.DockerClient, backend: DockerBackend, project: str
) -> None:
    worker = compose_container(
        engine, project, "worker", WORKER, mem_limit="64m", mem_reservation="48m"
    )
    with pytest.raises(ValueError, match="below its memory reservation"):
        backend.set_memory_limit(WorkloadRef(name="worker"), 32 * MiB, dry_run=True)
    assert state(engine, worker.name)["Id"] == worker.id


# --- scale ----------------------------------------------------------------------------------


def test_scale_a_compose_worker_up_and_down(
    engine: docker.DockerClient, backend: DockerBackend, project: str
) -> None:
    first = compose_container(engine, project, "worker", WORKER, mem_limit="32m")
    ref = WorkloadRef(name="worker")

    plan = scale_workload(backend, ref, 3, dry_run=True)
    assert [(c.action, c.target) for c in plan.planned] == [
        ("create_container", f"{project}-worker-2"),
        ("create_container", f"{project}-worker-3"),
    ]
    assert any("host's network" in note for note in plan.notes)
    assert len(engine.containers.list(filters={"label": f"{PROJECT_LABEL}={project}"})) == 1

    up = scale_workload(backend, ref, 3, dry_run=False)
    assert [c.target for c in up.applied] == [c.target for c in plan.planned]
    status = workload_status(backend, ref)
    assert [i.name for i in status.running] == [f"{project}-worker-{n}" for n in (1, 2, 3)]
    assert status.desired_replicas == 3
    third = state(engine, f"{project}-worker-3")
    assert third["Config"]["Labels"] == {**first.attrs["Config"]["Labels"], NUMBER_LABEL: "3"}
    assert third["Config"]["Cmd"] == first.attrs["Config"]["Cmd"]
    assert third["HostConfig"]["Memory"] == 32 * MiB
    assert scale_workload(backend, ref, 3, dry_run=False).planned == []

    down = scale_workload(backend, ref, 1, dry_run=False)
    assert [(c.action, c.target.split(" ")[0]) for c in down.applied] == [
        ("remove_container", f"{project}-worker-3"),
        ("remove_container", f"{project}-worker-2"),
    ]
    left = engine.containers.list(all=True, filters={"label": f"{PROJECT_LABEL}={project}"})
    assert [c.id for c in left] == [first.id]
    with pytest.raises(Unsupported, match="remove every container"):
        backend.scale(ref, 0, dry_run=True)


def test_a_service_publishing_a_fixed_port_cannot_scale(
    engine: docker.DockerClient, backend: DockerBackend, project: str
) -> None:
    port = free_port()
    # created only: what it is configured with is enough, and no bridge network runs here
    compose_container(
        engine, project, "api", WORKER, start=False, network_mode="bridge",
        ports={"8080/tcp": port},
    )  # fmt: skip
    status = workload_status(backend, WorkloadRef(name="api"))
    assert Capability.SCALE not in status.capabilities
    with pytest.raises(Unsupported, match=f"fixed host ports .*:{port}->8080/tcp"):
        backend.scale(WorkloadRef(name="api"), 2, dry_run=True)


# --- what Docker cannot do, and errors ------------------------------------------------------


def test_no_history_no_rollback_no_autoscaler(backend: DockerBackend) -> None:
    assert isinstance(backend, WorkloadBackend)
    ref = WorkloadRef(name="web")
    assert backend.history(ref) == []
    with pytest.raises(Unsupported, match="no revision history"):
        backend.rollback(ref, to_revision=1, dry_run=True)
    with pytest.raises(Unsupported, match="no autoscaler"):
        backend.set_autoscaler_min(ref, 2, dry_run=True)
    missing = backend.status(WorkloadRef(name=unique("nothing")))
    assert (missing.exists, missing.instances, missing.capabilities) == (False, [], [])


def test_an_engine_that_does_not_answer_is_a_transient_error(tmp_path) -> None:
    backend = DockerBackend(DockerHost(base_url=f"unix://{tmp_path}/none.sock"))
    with pytest.raises(Exception) as error:
        backend.status(WorkloadRef(name="web"))
    assert is_transient_docker_error(error.value)


def test_an_interrupted_recreation_stops_changes_until_a_person_decides(
    engine: docker.DockerClient, backend: DockerBackend, project: str
) -> None:
    worker = compose_container(engine, project, "worker", WORKER)
    # what a recreation killed midway leaves: the old container stopped and set aside, no
    # replacement yet
    worker.stop(timeout=1)
    aside = f"{worker.name}-runbooks-replaced-{worker.id[:12]}"
    worker.rename(aside)
    ref = WorkloadRef(name="worker")

    assert not backend.status(ref).exists, "the set-aside container is not the service"
    with pytest.raises(RecreationInterrupted, match=f"{aside} \\(exited\\) is the old"):
        backend.set_memory_limit(ref, 64 * MiB, dry_run=True)
    with pytest.raises(RecreationInterrupted):
        backend.restart(ref, since=datetime.now(UTC), dry_run=True)
    assert engine.containers.get(aside).status == "exited", "nothing was touched"


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def tls_engine(podman: PodmanService) -> Iterator[TlsProxy]:
    proxy = TlsProxy(str(podman.socket)).start()
    yield proxy
    proxy.stop()


def test_an_engine_behind_tls_with_client_certificates(
    engine: docker.DockerClient, tls_engine: TlsProxy
) -> None:
    name = unique("tls-worker")
    engine.containers.run(**container_spec(name=name, command=["sh", "-c", WORKER]))
    host = DockerHost(
        base_url=f"tcp://127.0.0.1:{tls_engine.port}",
        tls=True,
        tls_ca_cert=tls_engine.ca_pem,
        tls_client_cert=tls_engine.client_cert_pem,
        # pasted into the UI's one-line secret field: line breaks became spaces
        tls_client_key=tls_engine.client_key_pem.replace("\n", " "),
    )
    client = host.get_client()
    tls_dir = Path(client.api.cert[0]).parent
    assert sorted(os.listdir(tls_dir)) == ["ca.pem", "cert.pem", "key.pem"]
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in tls_dir.iterdir()} == {0o600}
    assert client.ping()
    client.close()
    assert not tls_dir.exists(), "the key leaves the disk with the client"

    (instance,) = DockerBackend(host).status(WorkloadRef(name=name)).instances
    assert instance.running

    without_certificate = host.model_copy(update={"tls_client_cert": None, "tls_client_key": None})
    other_ca = TlsProxy("/nonexistent").start()
    other_ca.stop()
    unknown_ca = host.model_copy(update={"tls_ca_cert": other_ca.ca_pem})
    for refused in (without_certificate, unknown_ca):
        with pytest.raises(requests.exceptions.SSLError) as error:
            refused.get_client()
        assert not is_transient_docker_error(error.value), "configuration: no retries"
