"""Decisions of the Docker backend (tasks/docker_engine.py), as pure functions of what the
Engine API returned: which containers are the service, what its state means, which containers
a restart or a scale touches, what a recreated or added container is created with.

Everything here reads the Engine API's JSON (``GET /containers/{id}/json``, ``/stats``,
``/events``) as Docker documents it, with podman's differences noted where they matter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tasks.workloads import Instance, WorkloadEvent

SERVICE_LABEL = "com.docker.compose.service"
PROJECT_LABEL = "com.docker.compose.project"
NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"
# a container set aside while its replacement starts (see DockerBackend._recreate): its name
# is "<name><ASIDE_MARK><short id>"; it is never one of the service's instances
ASIDE_MARK = "-runbooks-replaced-"

# what the engine reports for "never": Go's zero time
_ZERO_TIME = "0001-01-01T00:00:00Z"
_ISO = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?")


class AmbiguousService(LookupError):
    """The service name is used by more than one Compose project on the host."""


def parse_engine_time(value: str | None) -> datetime | None:
    """An Engine API timestamp (RFC 3339 with nanoseconds) as an aware datetime; None for
    Go's zero time or nothing. Python reads at most microseconds: the rest is cut off."""
    if not value or value.startswith("0001-01-01"):
        return None
    m = _ISO.fullmatch(value.strip())
    if not m:
        raise ValueError(f"not an engine timestamp: {value[:40]!r}")
    fraction = (m.group(2) or "")[:7]
    zone = m.group(3) or "Z"
    parsed = datetime.fromisoformat(m.group(1) + fraction + ("+00:00" if zone == "Z" else zone))
    return parsed.astimezone(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; a naive one is taken as UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def memory_usage(stats: dict[str, Any] | None) -> int | None:
    """Memory in use as ``docker stats`` shows it: usage minus the inactive page cache (which
    the kernel reclaims before it OOM-kills); None when the engine gave no usage.

    cgroup v1 engines report ``total_inactive_file``, cgroup v2 ones ``inactive_file``;
    podman 4 reports the usage alone.
    """
    memory = (stats or {}).get("memory_stats") or {}
    usage = memory.get("usage")
    if not isinstance(usage, int):
        return None
    detail = memory.get("stats") or {}
    cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    return usage - cache if isinstance(cache, int) and 0 <= cache <= usage else usage


def _health(state: dict[str, Any]) -> str | None:
    # podman reports Health with an empty Status for containers without a healthcheck;
    # Docker leaves Health out
    return ((state.get("Health") or {}).get("Status") or None) if state else None


def container_name(attrs: dict[str, Any]) -> str:
    return (attrs.get("Name") or "").lstrip("/")


def container_number(attrs: dict[str, Any]) -> int | None:
    value = ((attrs.get("Config") or {}).get("Labels") or {}).get(NUMBER_LABEL)
    return int(value) if value and str(value).isdigit() else None


def instance_from_inspect(attrs: dict[str, Any], stats: dict[str, Any] | None = None) -> Instance:
    """One container (``docker inspect``) as an Instance; ``stats``: one ``/stats`` sample."""
    state = attrs.get("State") or {}
    status = state.get("Status") or ("running" if state.get("Running") else "unknown")
    running = status == "running"
    health = _health(state)
    finished_at = parse_engine_time(state.get("FinishedAt"))
    memory_limit = (attrs.get("HostConfig") or {}).get("Memory") or None
    return Instance(
        id=(attrs.get("Id") or "")[:12],
        name=container_name(attrs),
        state=f"{status} ({health})" if health and running else status,
        running=running,
        # no healthcheck: no readiness to report; a healthcheck that has not passed yet
        # ("starting") is not ready
        ready=None if health is None else (running and health == "healthy"),
        started_at=parse_engine_time(state.get("StartedAt")),
        restarts=int(attrs.get("RestartCount") or 0),
        pid=state.get("Pid") or None,
        # ExitCode is 0 for a container that never stopped: only a termination has one
        exit_code=state.get("ExitCode") if finished_at else None,
        oom_killed=bool(state.get("OOMKilled")),
        finished_at=finished_at,
        memory_limit_bytes=memory_limit,
        memory_usage_bytes=memory_usage(stats) if running else None,
    )


def service_memory_limit(instances: list[Instance]) -> int | None:
    """The service's memory limit per instance: the smallest limit among its containers.

    They differ only while a change is half applied (or by hand); the smallest is the one an
    instance runs out of first, and a runbook that raises "the" limit by a factor and re-runs
    after a partial change computes the same target again rather than compounding it.
    """
    limits = [i.memory_limit_bytes for i in instances if i.memory_limit_bytes]
    return min(limits) if limits else None


def choose_service_containers(
    labelled: list[dict[str, Any]], named: list[dict[str, Any]], name: str, project: str | None
) -> list[dict[str, Any]]:
    """The containers that are service ``name``: those labelled with it as a Compose service
    (of ``project`` when given; never one-off ``docker compose run`` containers), or else the
    one container called ``name``. Containers set aside by a recreation are never part of it.

    Raises AmbiguousService when, without a project, the label names services of more than
    one project: acting on all of them would restart another application's service.
    """

    def keep(attrs: dict[str, Any]) -> bool:
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        return ASIDE_MARK not in container_name(attrs) and labels.get(ONEOFF_LABEL) != "True"

    members = [
        a
        for a in labelled
        if keep(a)
        and (a.get("Config") or {}).get("Labels", {}).get(SERVICE_LABEL) == name
        and (project is None or a["Config"]["Labels"].get(PROJECT_LABEL) == project)
    ]
    if members:
        projects = {a["Config"]["Labels"].get(PROJECT_LABEL) for a in members}
        if project is None and len(projects) > 1:
            raise AmbiguousService(
                f"service {name!r} exists in Compose projects {', '.join(sorted(map(str, projects)))}: "
                "set compose_project on the Docker host block"
            )
        return sorted(members, key=lambda a: (container_number(a) or 0, container_name(a)))
    return [a for a in named if keep(a) and container_name(a) == name][:1]


def restart_targets(
    instances: list[Instance], since: datetime
) -> tuple[list[Instance], list[Instance]]:
    """(to restart, left alone): an instance that started after ``since`` was restarted
    already (by an earlier attempt, or by someone else) and is left alone; one that never
    started, or started at or before ``since``, is restarted (a stopped one is started)."""
    since = as_utc(since)
    due = [i.started_at is None or i.started_at <= since for i in instances]
    return (
        [i for i, d in zip(instances, due, strict=True) if d],
        [i for i, d in zip(instances, due, strict=True) if not d],
    )


# --- memory limits ------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?", re.I)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory_size(value: str | int) -> int:
    """A memory size as Docker and Compose write it ("512m", "1g", "1.5GiB", 268435456) in
    bytes; units are binary (1k = 1024), as in ``docker run -m``."""
    if isinstance(value, bool):
        raise ValueError("not a memory size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a memory size is not negative")
        return value
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{value[:40]!r} is not a memory size (e.g. 512m, 2g)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_memory_size(size: int) -> str:
    """Bytes as the largest whole unit Compose reads back exactly: 536870912 -> "512m"."""
    for unit in ("g", "m", "k"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}b"


def memswap_for(old_memory: int, old_memswap: int, new_memory: int) -> int:
    """The memory+swap limit to set with a new memory limit, keeping the container's swap.

    Docker refuses a memory limit above the memory+swap limit in force, so an update sets
    both. -1 (unlimited swap) stays; a container that had a limit keeps its swap allowance
    (memswap - memory); one without a limit (memswap unset) gets Docker's default for
    ``-m``: as much swap as memory (memswap = 2 x memory).
    """
    if old_memswap == -1:
        return -1
    if old_memory > 0 and old_memswap >= old_memory:
        return new_memory + (old_memswap - old_memory)
    return 2 * new_memory


def memory_limit_problem(host_config: dict[str, Any], limit: int) -> str | None:
    """Why a container cannot have ``limit`` (what the engine would refuse), or None."""
    reservation = host_config.get("MemoryReservation") or 0
    if limit < reservation:
        return (
            f"{format_memory_size(limit)} is below its memory reservation "
            f"({format_memory_size(reservation)}), which engines refuse"
        )
    return None


def compose_limit_note(service: str, project: str | None, limit_bytes: int) -> str:
    where = f" of project {project}" if project else ""
    return (
        f"follow-up: set `mem_limit: {format_memory_size(limit_bytes)}` (or "
        f"deploy.resources.limits.memory) for service {service}{where} in the compose file: "
        "the next `docker compose up` that recreates its containers reverts to the file's limit"
    )


# --- scale --------------------------------------------------------------------------------


@dataclass
class ScalePlan:
    """What scaling a Compose service to ``replicas`` does."""

    start: list[str] = field(default_factory=list)  # kept containers not running (names)
    create: list[int] = field(default_factory=list)  # container numbers to add
    remove: list[str] = field(default_factory=list)  # containers to stop and remove (names)


def plan_scale(members: list[tuple[int | None, str, bool]], replicas: int) -> ScalePlan:
    """Scale to ``replicas`` running containers, as ``docker compose up --scale`` does.

    ``members``: (container number, name, running) of each container of the service. The
    lowest numbers stay (stopped ones are started), the highest go; new containers take the
    numbers after the highest.
    """
    if replicas < 0:
        raise ValueError("replicas must not be negative")
    ordered = sorted(members, key=lambda m: (m[0] is None, m[0] or 0, m[1]))
    kept, dropped = ordered[:replicas], ordered[replicas:]
    top = max((m[0] or 0 for m in members), default=0)
    return ScalePlan(
        start=[name for _, name, running in kept if not running],
        create=list(range(top + 1, top + 1 + replicas - len(kept))),
        remove=[name for _, name, _ in reversed(dropped)],
    )


def clone_name(
    template: str, template_number: int | None, number: int, service: str, project: str | None
) -> str:
    """The name of container ``number`` of a service, in the template container's style:
    Compose v2 names them <project>-<service>-<n>, v1 <project>_<service>_<n>."""
    if template_number is not None:
        m = re.fullmatch(rf"(.*[-_]){template_number}", template)
        if m:
            return f"{m.group(1)}{number}"
    return f"{project}-{service}-{number}" if project else f"{service}-{number}"


def scale_blockers(attrs: dict[str, Any]) -> list[str]:
    """Why a second copy of this container cannot run beside it (Compose refuses the same)."""
    host = attrs.get("HostConfig") or {}
    problems = []
    fixed = sorted(
        f"{b.get('HostIp') or '0.0.0.0'}:{b['HostPort']}->{port}"
        for port, bindings in (host.get("PortBindings") or {}).items()
        for b in bindings or []
        if str(b.get("HostPort") or "0") not in ("", "0")
    )
    if fixed:
        problems.append(f"it publishes fixed host ports ({', '.join(fixed)})")
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    if any((n or {}).get("IPAMConfig") for n in networks.values()):
        problems.append("it has a fixed IP address")
    number = container_number(attrs)
    if number is None:
        problems.append("it has no com.docker.compose.container-number label")
    elif not re.fullmatch(rf".*[-_]{number}", container_name(attrs)):
        problems.append("its name is fixed (container_name)")
    return problems


# --- container specs ----------------------------------------------------------------------

_CONFIG_KEYS = (
    "User", "Tty", "OpenStdin", "StdinOnce", "Env", "Cmd", "Entrypoint", "WorkingDir",
    "Labels", "StopSignal", "Healthcheck", "ExposedPorts", "Volumes", "Domainname",
)  # fmt: skip
_HOST_KEYS = (
    "Binds", "Mounts", "NetworkMode", "PortBindings", "PublishAllPorts", "RestartPolicy",
    "VolumesFrom", "CapAdd", "CapDrop", "Privileged", "SecurityOpt", "ReadonlyRootfs",
    "ExtraHosts", "Dns", "DnsOptions", "DnsSearch", "GroupAdd", "ShmSize", "Tmpfs", "Sysctls",
    "Init", "OomScoreAdj", "OomKillDisable", "PidsLimit", "CpuShares", "NanoCpus",
    "CpuQuota", "CpuPeriod", "CpusetCpus", "CpusetMems", "BlkioWeight", "MemoryReservation",
    "Memory", "MemorySwap", "CgroupParent",
)  # fmt: skip
# namespaces shared with the host or another container are configuration; "private",
# "shareable" and "" are defaults (podman reports "private" where Docker reports "")
_SHARED_NAMESPACE = re.compile(r"host|container:.+")


def create_body(
    attrs: dict[str, Any],
    *,
    labels: dict[str, str] | None = None,
    memory: int | None = None,
    memswap: int | None = None,
    same_identity: bool = True,
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The ``POST /containers/create`` body that makes this container again, and the
    further networks to connect it to (name, endpoint config) before it starts.

    Carried: the image by id (the same image even if its tag moved since), command,
    entrypoint, environment, labels, working dir, user, healthcheck, stop signal, mounts,
    network mode and networks with their aliases, published ports, restart policy, resource
    limits, capabilities, security options, ulimits, devices, DNS and log settings.
    ``same_identity``: a replacement (True) keeps the container's hostname and fixed IP
    addresses; an additional copy (False) gets its own.
    """
    config = attrs.get("Config") or {}
    host = attrs.get("HostConfig") or {}
    body: dict[str, Any] = {k: config[k] for k in _CONFIG_KEYS if config.get(k) not in (None, "")}
    body["Image"] = attrs.get("Image") or config.get("Image")
    if labels is not None:
        body["Labels"] = labels
    if config.get("StopTimeout"):  # podman reports 0 for "not set"
        body["StopTimeout"] = config["StopTimeout"]
    network_mode = host.get("NetworkMode") or ""
    hostname = config.get("Hostname")
    # Docker refuses a hostname with the host's or another container's network; a generated
    # hostname (the short id) is not configuration
    if (
        same_identity
        and hostname
        and not (attrs.get("Id") or "").startswith(hostname)
        and network_mode != "host"
        and not network_mode.startswith("container:")
    ):
        body["Hostname"] = hostname

    host_config = {k: host[k] for k in _HOST_KEYS if host.get(k) not in (None, "", [], {})}
    for key in ("IpcMode", "PidMode", "UTSMode", "UsernsMode"):
        if _SHARED_NAMESPACE.fullmatch(host.get(key) or ""):
            host_config[key] = host[key]
    if host.get("Ulimits"):
        # podman names them after the kernel (RLIMIT_NOFILE); Docker takes "nofile"
        host_config["Ulimits"] = [
            {**u, "Name": u["Name"].lower().removeprefix("rlimit_")} for u in host["Ulimits"]
        ]
    if host.get("Devices"):
        # podman reports no permissions where it applied Docker's default; its create then
        # refuses the empty mode ("invalid device mode")
        host_config["Devices"] = [
            {**d, "CgroupPermissions": d.get("CgroupPermissions") or "rwm"} for d in host["Devices"]
        ]
    log = host.get("LogConfig") or {}
    if log.get("Type"):
        host_config["LogConfig"] = {"Type": log["Type"], "Config": log.get("Config") or {}}
    if host.get("Runtime") not in (None, "", "oci"):  # podman's "oci": its default runtime
        host_config["Runtime"] = host["Runtime"]
    if same_identity:
        # anonymous volumes (an image's VOLUME) are not in Binds: without them the replacement
        # would start on empty ones, as `docker compose up` keeps them on a recreation
        covered = {b.split(":")[1] for b in host_config.get("Binds", []) if ":" in b}
        covered |= {m.get("Target") for m in host_config.get("Mounts", [])}
        extra = [
            f"{m['Name']}:{m['Destination']}" + ("" if m.get("RW", True) else ":ro")
            for m in attrs.get("Mounts") or []
            if m.get("Type") == "volume" and m.get("Name") and m.get("Destination") not in covered
        ]
        if extra:
            host_config["Binds"] = [*host_config.get("Binds", []), *extra]
    if memory is not None:
        host_config["Memory"] = memory
        host_config["MemorySwap"] = memswap if memswap is not None else 2 * memory
    body["HostConfig"] = host_config

    endpoints = []
    short_id = (attrs.get("Id") or "")[:12]
    for name, endpoint in ((attrs.get("NetworkSettings") or {}).get("Networks") or {}).items():
        endpoint = endpoint or {}
        config_ = {
            "Aliases": [a for a in endpoint.get("Aliases") or [] if not short_id.startswith(a)]
        }
        if same_identity and endpoint.get("IPAMConfig"):
            config_["IPAMConfig"] = endpoint["IPAMConfig"]
        endpoints.append((name, config_))
    # the create request takes one network (before API 1.44): the network mode's, else the
    # first; the others are connected before the container starts
    first = next(
        (e for e in endpoints if e[0] == network_mode), endpoints[0] if endpoints else None
    )
    if first and network_mode not in ("host", "none") and not network_mode.startswith("container:"):
        body["NetworkingConfig"] = {"EndpointsConfig": {first[0]: first[1]}}
        return body, [e for e in endpoints if e is not first]
    return body, []


# --- events -------------------------------------------------------------------------------

WATCHED_EVENTS = frozenset({"die", "oom", "kill", "restart", "start", "health_status"})


def workload_event(raw: dict[str, Any], since: datetime, until: datetime) -> WorkloadEvent | None:
    """A container event of the Engine's ``/events`` stream as a WorkloadEvent, or None when
    it is not one a runbook reads (die, oom, kill, restart, start, health_status) or lies
    outside ``since``..``until``."""
    if (raw.get("Type") or "container") != "container":
        return None
    action = raw.get("Action") or raw.get("status") or ""
    # Docker: "health_status: unhealthy"; "exec_start: sh -c ..."
    reason, _, rest = action.partition(":")
    reason = reason.strip()
    if reason not in WATCHED_EVENTS:
        return None
    if raw.get("timeNano"):
        at = datetime.fromtimestamp(raw["timeNano"] / 1e9, UTC)
    elif raw.get("time"):
        at = datetime.fromtimestamp(raw["time"], UTC)
    else:
        return None
    if not as_utc(since) <= at <= as_utc(until):
        return None
    attributes = (raw.get("Actor") or {}).get("Attributes") or {}
    if reason == "die":
        code = attributes.get("exitCode", attributes.get("containerExitCode"))
        message = f"exited with code {code}" if code is not None else "exited"
    elif reason == "kill":
        message = f"signal {attributes['signal']}" if attributes.get("signal") else ""
    elif reason == "health_status":
        message = rest.strip() or attributes.get("health_status", "")
    elif reason == "oom":
        message = "killed for exceeding its memory limit"
    else:
        message = ""
    return WorkloadEvent(at=at, reason=reason, message=message, instance=attributes.get("name"))
