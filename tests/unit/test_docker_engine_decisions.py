"""Docker backend decisions as data tables: which containers are the service, what a container's
state means, which containers a restart or scale touches, limits, recreation specs, events,
transient errors. The inputs are Engine API JSON as Docker and podman 4.3 return it."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone

import pytest
import requests
from docker.errors import APIError, DockerException, NotFound
from pydantic import ValidationError

from blocks.docker_host import DockerHost, normalize_pem
from tasks.docker_decisions import (
    AmbiguousService,
    ScalePlan,
    choose_service_containers,
    clone_name,
    compose_limit_note,
    create_body,
    format_memory_size,
    instance_from_inspect,
    memory_limit_problem,
    memory_usage,
    memswap_for,
    parse_engine_time,
    parse_memory_size,
    plan_scale,
    restart_targets,
    scale_blockers,
    service_memory_limit,
    workload_event,
)
from tasks.docker_engine import is_transient_docker_error
from tasks.workloads import Instance, is_transient

T0 = datetime(2026, 5, 4, 12, 0, 0, tzinfo=UTC)
MiB = 1024 * 1024

# --- timestamps -----------------------------------------------------------------------------

TIMES = [
    ("2026-05-04T12:00:00.123456789Z", T0 + timedelta(microseconds=123456)),
    ("2026-05-04T12:00:00Z", T0),
    ("2026-05-04T14:00:00.5+02:00", T0 + timedelta(milliseconds=500)),
    ("0001-01-01T00:00:00Z", None),  # Go's zero time: never
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("raw", "expected"), TIMES)
def test_parse_engine_time(raw: str | None, expected: datetime | None) -> None:
    assert parse_engine_time(raw) == expected


def test_parse_engine_time_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        parse_engine_time("yesterday")


# --- state -> Instance ----------------------------------------------------------------------


def inspect(
    status: str = "running",
    *,
    health: str | None = None,
    started: str = "2026-05-04T12:00:00Z",
    finished: str = "0001-01-01T00:00:00Z",
    exit_code: int = 0,
    oom: bool = False,
    pid: int = 4242,
    memory: int = 0,
    restarts: int = 0,
    name: str = "/shop-web-1",
    labels: dict[str, str] | None = None,
    cid: str = "0123456789abcdef0123",
) -> dict:
    state = {
        "Status": status,
        "Running": status in ("running", "restarting", "paused"),
        "Restarting": status == "restarting",
        "OOMKilled": oom,
        "Pid": pid if status == "running" else 0,
        "ExitCode": exit_code,
        "StartedAt": started,
        "FinishedAt": finished,
    }
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0, "Log": None}
    return {
        "Id": cid,
        "Name": name,
        "Created": "2026-05-04T11:00:00Z",
        "RestartCount": restarts,
        "State": state,
        "Config": {"Labels": labels or {}},
        "HostConfig": {"Memory": memory},
    }


STATS_V1 = {"memory_stats": {"usage": 50 * MiB, "stats": {"total_inactive_file": 10 * MiB}}}
STATS_V2 = {"memory_stats": {"usage": 50 * MiB, "stats": {"inactive_file": 20 * MiB}}}
STATS_PODMAN = {"memory_stats": {"usage": 40800256, "limit": 134217728}}

# (inspect, stats, expected fields of the Instance, why)
INSTANCES = [
    (inspect(), None,
     {"state": "running", "running": True, "ready": None, "started_at": T0, "pid": 4242,
      "exit_code": None, "finished_at": None, "memory_limit_bytes": None}, "no healthcheck"),
    (inspect(health=""), None, {"ready": None, "state": "running"},
     "podman: empty Health.Status means no healthcheck"),
    (inspect(health="healthy"), None, {"ready": True, "state": "running (healthy)"}, "healthy"),
    (inspect(health="starting"), None, {"ready": False}, "healthcheck not passed yet"),
    (inspect(health="unhealthy"), None, {"ready": False, "state": "running (unhealthy)"},
     "unhealthy"),
    (inspect("exited", health="healthy", finished="2026-05-04T12:05:00Z", exit_code=137,
             oom=True, memory=16 * MiB), None,
     {"running": False, "ready": False, "state": "exited", "exit_code": 137, "oom_killed": True,
      "pid": None, "finished_at": T0 + timedelta(minutes=5), "memory_limit_bytes": 16 * MiB},
     "OOM-killed, a stale 'healthy' is not ready"),
    (inspect("exited", finished="2026-05-04T12:05:00Z", exit_code=0), None,
     {"exit_code": 0, "oom_killed": False}, "exited cleanly"),
    (inspect("created", started="0001-01-01T00:00:00Z"), None,
     {"started_at": None, "running": False, "exit_code": None}, "never started"),
    (inspect("restarting", restarts=7, finished="2026-05-04T12:01:00Z", exit_code=1), None,
     {"running": False, "restarts": 7, "exit_code": 1}, "restart policy looping"),
    (inspect(), STATS_V1, {"memory_usage_bytes": 40 * MiB}, "cgroup v1: minus inactive cache"),
    (inspect(), STATS_V2, {"memory_usage_bytes": 30 * MiB}, "cgroup v2: minus inactive_file"),
    (inspect(), STATS_PODMAN, {"memory_usage_bytes": 40800256}, "podman: usage alone"),
    (inspect("exited", finished="2026-05-04T12:05:00Z"), STATS_PODMAN,
     {"memory_usage_bytes": None}, "a stopped container uses nothing"),
    (inspect(name="/web", cid="fedcba9876543210aaaa"), None, {"name": "web", "id": "fedcba987654"},
     "name without slash, short id"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("attrs", "stats", "expected", "why"), INSTANCES, ids=[c[3] for c in INSTANCES]
)
def test_instance_from_inspect(attrs: dict, stats: dict | None, expected: dict, why: str) -> None:
    instance = instance_from_inspect(attrs, stats)
    assert {k: getattr(instance, k) for k in expected} == expected


MEMORY_USAGE = [
    (None, None),
    ({}, None),
    ({"memory_stats": {}}, None),  # Docker on a stopped container
    (STATS_V1, 40 * MiB),
    ({"memory_stats": {"usage": 5, "stats": {"inactive_file": 9}}}, 5),  # nonsense cache: usage
]


@pytest.mark.parametrize(("stats", "expected"), MEMORY_USAGE)
def test_memory_usage(stats: dict | None, expected: int | None) -> None:
    assert memory_usage(stats) == expected


def inst(name: str, started: datetime | None, limit: int | None = None) -> Instance:
    return Instance(id=name, name=name, state="running", running=True, started_at=started,
                    memory_limit_bytes=limit)  # fmt: skip


SERVICE_LIMITS = [
    ([], None),
    ([inst("a", T0), inst("b", T0)], None),
    ([inst("a", T0, 64 * MiB), inst("b", T0, 64 * MiB)], 64 * MiB),
    # half-applied raise: the smaller, so a re-run computes the same target again
    ([inst("a", T0, 128 * MiB), inst("b", T0, 64 * MiB)], 64 * MiB),
    ([inst("a", T0), inst("b", T0, 64 * MiB)], 64 * MiB),
]


@pytest.mark.parametrize(("instances", "expected"), SERVICE_LIMITS)
def test_service_memory_limit(instances: list[Instance], expected: int | None) -> None:
    assert service_memory_limit(instances) == expected


# --- restart: which containers --------------------------------------------------------------

# (started at of each instance, since, names restarted)
RESTARTS = [
    ({"a": T0, "b": T0}, T0 + timedelta(seconds=1), ["a", "b"]),
    ({"a": T0, "b": T0 + timedelta(seconds=5)}, T0 + timedelta(seconds=1), ["a"]),
    ({"a": T0}, T0, ["a"]),  # started exactly at since: it is what the run observed
    ({"a": T0 + timedelta(microseconds=1)}, T0, []),  # restarted already
    ({"a": None}, T0, ["a"]),  # never started: start it
    ({"a": T0}, (T0 + timedelta(seconds=1)).replace(tzinfo=None), ["a"]),  # naive since: UTC
    # 14:30+02:00 is 12:30 UTC: the 13:00 UTC start came after it
    ({"a": T0 + timedelta(hours=1)}, datetime(2026, 5, 4, 14, 30, tzinfo=timezone(timedelta(hours=2))), []),
]  # fmt: skip


@pytest.mark.parametrize(("started", "since", "expected"), RESTARTS)
def test_restart_targets(
    started: dict[str, datetime | None], since: datetime, expected: list[str]
) -> None:
    due, fresh = restart_targets([inst(n, s) for n, s in started.items()], since)
    assert [i.name for i in due] == expected
    assert sorted(i.name for i in due + fresh) == sorted(started)


# --- which containers are the service -------------------------------------------------------


def member(name: str, service: str | None = "web", project: str | None = "shop",
           number: int | None = 1, oneoff: bool = False) -> dict:  # fmt: skip
    labels = {}
    if service:
        labels["com.docker.compose.service"] = service
    if project:
        labels["com.docker.compose.project"] = project
    if number is not None:
        labels["com.docker.compose.container-number"] = str(number)
    if oneoff:
        labels["com.docker.compose.oneoff"] = "True"
    return {"Id": name, "Name": f"/{name}", "Config": {"Labels": labels}, "HostConfig": {}}


# (labelled, named, project, expected names, why)
CHOOSE = [
    ([member("shop-web-2", number=2), member("shop-web-1")], [], None,
     ["shop-web-1", "shop-web-2"], "compose service, ordered by number"),
    ([member("shop-web-1"), member("blog-web-1", project="blog")], [], "shop", ["shop-web-1"],
     "project filter"),
    ([member("shop-web-1"), member("shop-web-run-1", oneoff=True)], [], None, ["shop-web-1"],
     "docker compose run containers are not the service"),
    ([member("shop-web-1"), member("shop-web-1-runbooks-replaced-0123456789ab")], [], None,
     ["shop-web-1"], "a container set aside by a recreation is not the service"),
    ([member("shop-db-1", service="db")], [], None, [], "another service's label"),
    ([], [member("web-2", service=None), member("web", service=None)], None, ["web"],
     "plain container: exact name only (the name filter is a regex)"),
    ([], [member("web-runbooks-replaced-0123456789ab", service=None)], None, [],
     "a set-aside plain container"),
    ([], [], None, [], "nothing"),
    ([member("web-1", project=None)], [], None, ["web-1"], "labelled without a project"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("labelled", "named", "project", "expected", "why"), CHOOSE, ids=[c[4] for c in CHOOSE]
)
def test_choose_service_containers(
    labelled: list[dict], named: list[dict], project: str | None, expected: list[str], why: str
) -> None:
    chosen = choose_service_containers(labelled, named, "web", project)
    assert [c["Name"].lstrip("/") for c in chosen] == expected


def test_same_service_in_two_projects_is_ambiguous_without_a_project() -> None:
    labelled = [member("shop-web-1"), member("blog-web-1", project="blog")]
    with pytest.raises(AmbiguousService, match="blog, shop: set compose_project"):
        choose_service_containers(labelled, [], "web", None)


# --- memory limits --------------------------------------------------------------------------

SIZES = [
    ("512m", 512 * MiB),
    ("1g", 1024 * MiB),
    ("1.5GiB", 1536 * MiB),
    ("64 MB", 64 * MiB),  # Compose's binary reading of MB
    ("100k", 102400),
    ("4096", 4096),
    (268435456, 268435456),
]


@pytest.mark.parametrize(("text", "expected"), SIZES)
def test_parse_memory_size(text: str | int, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1m", "1x", "1.5.2g", True, -5])
def test_parse_memory_size_refuses(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_memory_size(text)


FORMATS = [(512 * MiB, "512m"), (2048 * MiB, "2g"), (1536 * MiB, "1536m"), (1000, "1000b"),
           (4096, "4k")]  # fmt: skip


@pytest.mark.parametrize(("size", "expected"), FORMATS)
def test_format_memory_size_reads_back(size: int, expected: str) -> None:
    assert format_memory_size(size) == expected
    assert parse_memory_size(expected) == size


# (old memory, old memory+swap, new memory, expected memory+swap)
MEMSWAP = [
    (64 * MiB, 128 * MiB, 96 * MiB, 160 * MiB),  # keeps 64m of swap
    (64 * MiB, 64 * MiB, 96 * MiB, 96 * MiB),  # no swap stays no swap
    (64 * MiB, -1, 96 * MiB, -1),  # unlimited swap stays unlimited
    (0, 0, 96 * MiB, 192 * MiB),  # no limit before: Docker's default for -m
    (0, -1, 96 * MiB, -1),
    (128 * MiB, 256 * MiB, 64 * MiB, 192 * MiB),  # lowering keeps the swap too
]


@pytest.mark.parametrize(("old", "old_swap", "new", "expected"), MEMSWAP)
def test_memswap_for(old: int, old_swap: int, new: int, expected: int) -> None:
    assert memswap_for(old, old_swap, new) == expected


LIMIT_PROBLEMS = [
    ({}, 64 * MiB, None),
    ({"MemoryReservation": 48 * MiB}, 64 * MiB, None),
    ({"MemoryReservation": 64 * MiB}, 64 * MiB, None),
    ({"MemoryReservation": 96 * MiB}, 64 * MiB, "64m is below its memory reservation (96m)"),
]


@pytest.mark.parametrize(("host", "limit", "problem"), LIMIT_PROBLEMS)
def test_memory_limit_problem(host: dict, limit: int, problem: str | None) -> None:
    found = memory_limit_problem(host, limit)
    assert (found or "").startswith(problem or "") and (found is None) == (problem is None)


def test_compose_note_names_the_value_to_write() -> None:
    note = compose_limit_note("web", "shop", 192 * MiB)
    assert "`mem_limit: 192m`" in note and "project shop" in note and "docker compose up" in note


# --- scale ----------------------------------------------------------------------------------

# (members: (number, name, running), replicas, plan)
SCALES = [
    ([(1, "w1", True)], 3, ScalePlan(create=[2, 3])),
    ([(1, "w1", True), (2, "w2", True), (3, "w3", True)], 1, ScalePlan(remove=["w3", "w2"])),
    ([(1, "w1", True), (2, "w2", True)], 2, ScalePlan()),
    ([(1, "w1", True), (2, "w2", False)], 2, ScalePlan(start=["w2"])),
    ([(1, "w1", False), (3, "w3", True)], 3, ScalePlan(start=["w1"], create=[4])),  # after max
    ([(2, "w2", True), (1, "w1", True), (5, "w5", False)], 2, ScalePlan(remove=["w5"])),
    ([(None, "odd", True), (1, "w1", True)], 1, ScalePlan(remove=["odd"])),
]


@pytest.mark.parametrize(("members", "replicas", "expected"), SCALES)
def test_plan_scale(
    members: list[tuple[int | None, str, bool]], replicas: int, expected: ScalePlan
) -> None:
    assert plan_scale(members, replicas) == expected


# (template name, its number, new number, project, expected)
CLONE_NAMES = [
    ("shop-worker-1", 1, 3, "shop", "shop-worker-3"),  # Compose v2
    ("shop_worker_2", 2, 3, "shop", "shop_worker_3"),  # Compose v1
    ("shop-worker-11", 11, 12, "shop", "shop-worker-12"),
    ("my-worker", 1, 2, "shop", "shop-worker-2"),  # no numbered style to follow
    ("my-worker", None, 2, None, "worker-2"),
]


@pytest.mark.parametrize(("template", "number", "new", "project", "expected"), CLONE_NAMES)
def test_clone_name(
    template: str, number: int | None, new: int, project: str | None, expected: str
) -> None:
    assert clone_name(template, number, new, "worker", project) == expected


def with_host(attrs: dict, **host) -> dict:
    return {**attrs, "HostConfig": {**attrs["HostConfig"], **host}}


BLOCKERS = [
    (member("shop-web-1"), []),
    (with_host(member("shop-web-1"), PortBindings={"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}),
     ["it publishes fixed host ports (0.0.0.0:8080->80/tcp)"]),
    (with_host(member("shop-web-1"), PortBindings={"80/tcp": [{"HostIp": "", "HostPort": ""}]}),
     []),  # an engine-chosen port
    ({**member("shop-web-1"), "NetworkSettings": {"Networks": {"shop_default": {
        "IPAMConfig": {"IPv4Address": "172.20.0.5"}}}}}, ["it has a fixed IP address"]),
    (member("web-frontend"), ["its name is fixed (container_name)"]),
    (member("shop-web-1", number=None), ["it has no com.docker.compose.container-number label"]),
]  # fmt: skip


@pytest.mark.parametrize(("attrs", "expected"), BLOCKERS)
def test_scale_blockers(attrs: dict, expected: list[str]) -> None:
    assert scale_blockers(attrs) == expected


# --- what a replacement or a copy is created with -------------------------------------------

PODMAN_CONTAINER = {
    "Id": "8a6c51c1c549980c090778bebfd5a3b08ceafe5fa761c5813b7baa766744618a",
    "Name": "/shop-web-1",
    "Image": "sha256:283036296214955ec9d31ec86bc53a9f952f0eaa443559bfff6257d263b50fa1",
    "Config": {
        "Hostname": "vm", "User": "", "Tty": False, "OpenStdin": False,
        "Env": ["PATH=/bin", "container=podman", "HOSTNAME=vm"],
        "Cmd": ["sh", "-c", "exec httpd -f"], "Entrypoint": [],
        "Image": "localhost/runbooks-busybox:test", "WorkingDir": "/",
        "Labels": {"com.docker.compose.service": "web", "com.docker.compose.container-number": "1"},
        "StopSignal": "15", "StopTimeout": 0,
        "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 1000000000},
    },
    "HostConfig": {
        "Binds": ["/srv/www:/www:ro,rprivate,rbind"], "NetworkMode": "host", "PortBindings": {},
        "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
        "LogConfig": {"Type": "json-file", "Config": None}, "IpcMode": "shareable",
        "PidMode": "private", "UTSMode": "private", "Runtime": "oci", "ShmSize": 65536000,
        "Memory": 16 * MiB, "MemorySwap": 32 * MiB, "MemorySwappiness": 0, "PidsLimit": 2048,
        "Ulimits": [{"Name": "RLIMIT_NOFILE", "Hard": 1024, "Soft": 1024}], "CapAdd": [],
        "Devices": [{"PathOnHost": "/dev/null", "PathInContainer": "/dev/rbdev",
                     "CgroupPermissions": ""}],
    },
    "Mounts": [
        {"Type": "bind", "Source": "/srv/www", "Destination": "/www", "RW": False},
        {"Type": "volume", "Name": "a1b2c3", "Destination": "/data", "RW": True},
    ],
    "NetworkSettings": {"Networks": {}},
}  # fmt: skip

DOCKER_CONTAINER = {
    "Id": "c0ffee0123456789abcdef",
    "Name": "/shop-api-2",
    "Image": "sha256:feedbeef",
    "Config": {
        "Hostname": "c0ffee012345", "Env": ["A=1"], "Cmd": None, "Entrypoint": ["/api"],
        "Image": "shop/api:1.4", "Labels": {"com.docker.compose.service": "api"},
        "StopTimeout": 30,
    },
    "HostConfig": {
        "NetworkMode": "shop_default", "Memory": 0, "MemorySwap": 0,
        "Mounts": [{"Type": "volume", "Source": "shop_data", "Target": "/data"}],
        "PortBindings": {"8080/tcp": [{"HostIp": "", "HostPort": ""}]},
    },
    "Mounts": [{"Type": "volume", "Name": "shop_data", "Destination": "/data", "RW": True}],
    "NetworkSettings": {"Networks": {
        "shop_default": {"Aliases": ["shop-api-2", "api", "c0ffee012345"],
                         "IPAMConfig": {"IPv4Address": "172.20.0.9"}},
        "shop_backend": {"Aliases": ["api"]},
    }},
}  # fmt: skip


def test_replacement_of_a_podman_container() -> None:
    body, more = create_body(PODMAN_CONTAINER, memory=64 * MiB, memswap=80 * MiB)
    host = body["HostConfig"]
    assert body["Image"] == PODMAN_CONTAINER["Image"], "the same image, by id"
    assert body["Cmd"] == ["sh", "-c", "exec httpd -f"] and body["Env"][0] == "PATH=/bin"
    assert body["Labels"] == PODMAN_CONTAINER["Config"]["Labels"]
    assert "StopTimeout" not in body, "podman's 0 means unset"
    assert "Hostname" not in body, "Docker refuses a hostname with the host's network"
    assert (host["Memory"], host["MemorySwap"]) == (64 * MiB, 80 * MiB)
    assert host["NetworkMode"] == "host" and host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["Ulimits"] == [{"Name": "nofile", "Hard": 1024, "Soft": 1024}]
    assert not {"IpcMode", "PidMode", "UTSMode", "Runtime", "MemorySwappiness"} & set(host)
    # podman reports no device permissions and refuses them empty: Docker's default
    assert host["Devices"] == [
        {"PathOnHost": "/dev/null", "PathInContainer": "/dev/rbdev", "CgroupPermissions": "rwm"}
    ]
    # the anonymous volume keeps its data; the bind mount is not mounted twice
    assert host["Binds"] == ["/srv/www:/www:ro,rprivate,rbind", "a1b2c3:/data"]
    assert "NetworkingConfig" not in body and more == []


def test_copy_of_a_podman_container_gets_its_own_volumes() -> None:
    labels = {**PODMAN_CONTAINER["Config"]["Labels"], "com.docker.compose.container-number": "2"}
    body, _ = create_body(PODMAN_CONTAINER, labels=labels, same_identity=False)
    assert body["Labels"]["com.docker.compose.container-number"] == "2"
    assert body["HostConfig"]["Binds"] == ["/srv/www:/www:ro,rprivate,rbind"]
    assert body["HostConfig"]["Memory"] == 16 * MiB, "limits as the template's"


def test_replacement_of_a_docker_container_on_two_networks() -> None:
    body, more = create_body(DOCKER_CONTAINER, memory=64 * MiB, memswap=128 * MiB)
    assert body["StopTimeout"] == 30 and body["Entrypoint"] == ["/api"] and "Cmd" not in body
    assert "Hostname" not in body, "the generated hostname (short id) is not configuration"
    assert body["HostConfig"]["Mounts"] == DOCKER_CONTAINER["HostConfig"]["Mounts"]
    assert "Binds" not in body["HostConfig"], "the named volume is mounted once, by Mounts"
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"shop_default": {
        "Aliases": ["shop-api-2", "api"], "IPAMConfig": {"IPv4Address": "172.20.0.9"}}}}  # fmt: skip
    assert more == [("shop_backend", {"Aliases": ["api"]})]


def test_copy_of_a_docker_container_has_no_fixed_address() -> None:
    body, _ = create_body(DOCKER_CONTAINER, same_identity=False)
    endpoint = body["NetworkingConfig"]["EndpointsConfig"]["shop_default"]
    assert endpoint == {"Aliases": ["shop-api-2", "api"]}


# --- events ---------------------------------------------------------------------------------

SINCE, UNTIL = T0, T0 + timedelta(minutes=10)
AT = int((T0 + timedelta(minutes=1)).timestamp())


def raw_event(action: str, when: int = AT, type_: str = "container", **attributes) -> dict:
    return {"Type": type_, "Action": action, "status": action, "time": when,
            "timeNano": when * 10**9, "Actor": {"ID": "abc", "Attributes": {"name": "web-1",
                                                                           **attributes}}}  # fmt: skip


EVENTS = [
    (raw_event("die", exitCode="137"), ("die", "exited with code 137")),
    (raw_event("die", containerExitCode="1"), ("die", "exited with code 1")),  # podman, older
    (raw_event("oom"), ("oom", "killed for exceeding its memory limit")),
    (raw_event("kill", signal="9"), ("kill", "signal 9")),
    (raw_event("kill"), ("kill", "")),  # podman names no signal
    (raw_event("health_status: unhealthy"), ("health_status", "unhealthy")),  # Docker
    (raw_event("health_status"), ("health_status", "")),  # podman
    (raw_event("restart"), ("restart", "")),
    (raw_event("start"), ("start", "")),
    (raw_event("exec_start: sh -c true"), None),
    (raw_event("create"), None),
    (raw_event("cleanup"), None),
    (raw_event("die", when=AT - 3600), None),  # before since
    (raw_event("die", when=AT + 3600), None),  # after until
    (raw_event("connect", type_="network"), None),
]


@pytest.mark.parametrize(("raw", "expected"), EVENTS)
def test_workload_event(raw: dict, expected: tuple[str, str] | None) -> None:
    event = workload_event(raw, SINCE, UNTIL)
    if expected is None:
        assert event is None
        return
    assert event is not None
    assert (event.reason, event.message) == expected
    assert event.instance == "web-1" and event.at == T0 + timedelta(minutes=1)


# --- transient errors -----------------------------------------------------------------------


def api_error(status: int, cls: type[APIError] = APIError) -> APIError:
    response = requests.Response()
    response.status_code = status
    return cls("engine said no", response=response)


def wrapped_connection_error() -> DockerException:
    try:
        try:
            raise requests.ConnectionError("connection refused")
        except requests.ConnectionError as exc:
            raise DockerException("Error while fetching server API version") from exc
    except DockerException as exc:
        return exc


TRANSIENT = [
    (api_error(500), True),
    (api_error(503), True),
    (api_error(404, NotFound), False),
    (api_error(409), False),
    (api_error(400), False),
    (api_error(429), False),  # never a 4xx
    (requests.ConnectionError("refused"), True),
    (requests.ReadTimeout("slow"), True),
    (wrapped_connection_error(), True),
    (DockerException("Invalid bind address format"), False),
    (ValueError("bad"), False),
    (ConnectionRefusedError(), True),
    (requests.exceptions.SSLError("certificate verify failed"), False),  # configuration
]


@pytest.mark.parametrize(("exc", "expected"), TRANSIENT, ids=[repr(e) for e, _ in TRANSIENT])
def test_transient_docker_errors(exc: BaseException, expected: bool) -> None:
    assert is_transient_docker_error(exc) == expected
    # registered at import: the workload tasks retry exactly these
    assert is_transient(exc) == expected


# --- the block ------------------------------------------------------------------------------

PEM_BODY = "MIIBszCCAVmgAwIBAgIUQ" + "A" * 100 + "=="
PEM = f"-----BEGIN CERTIFICATE-----\n{PEM_BODY[:64]}\n{PEM_BODY[64:]}\n-----END CERTIFICATE-----\n"

PEMS = [
    (PEM, PEM),
    (PEM.replace("\n", " "), PEM),  # pasted into a one-line field
    (PEM.replace("\n", ""), PEM),
    ("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----", None),
    ("just text", None),
]


@pytest.mark.parametrize(("text", "expected"), PEMS)
def test_normalize_pem(text: str, expected: str | None) -> None:
    assert normalize_pem(text) == expected


BLOCKS = [
    ({}, True),
    ({"base_url": "tcp://docker.example:2376", "tls": True, "tls_ca_cert": PEM}, True),
    ({"base_url": "unix:///run/podman/podman.sock", "compose_project": "shop_1"}, True),
    ({"base_url": "ssh://me@docker"}, False),
    ({"base_url": "unix://relative.sock"}, False),
    ({"tls": True}, False),  # TLS on a unix socket
    ({"compose_project": "Shop"}, False),
    ({"compose_project": "shop/../x"}, False),
    ({"compose_project": ""}, True),  # empty form field: any project
    ({"tls_client_cert": PEM}, False),  # without its key
    ({"tls_ca_cert": "not a cert"}, False),
    ({"request_timeout_s": 0}, False),
]


@pytest.mark.parametrize(("fields", "valid"), BLOCKS)
def test_docker_host_fields(fields: dict, valid: bool) -> None:
    if valid:
        DockerHost(**fields)
    else:
        with pytest.raises(ValidationError):
            DockerHost(**fields)


def test_tls_files_are_removed_when_the_engine_cannot_be_reached() -> None:
    host = DockerHost(
        base_url="tcp://127.0.0.1:9",  # nothing listens: the version request fails
        tls=True, tls_ca_cert=PEM, tls_client_cert=PEM, tls_client_key=PEM, request_timeout_s=2,
    )  # fmt: skip
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    with pytest.raises(requests.ConnectionError) as error:
        host.get_client()
    assert is_transient_docker_error(error.value), "an engine that is not up yet is retried"
    after = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    assert not [d for d in after - before if d.startswith("runbooks-docker-tls-")]
