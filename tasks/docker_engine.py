"""Services on Docker/Compose hosts: the Docker Engine API's WorkloadBackend (issue #12).

A service is the containers labelled ``com.docker.compose.service=<name>`` (in the block's
Compose project, when it names one), or else the one container named ``<name>``. The
decisions (which containers, what a state means, what a restart or scale touches, what a
recreated container is made of) are pure functions in tasks/docker_decisions.py.

Every request has the block's timeout (restarts and stops add its stop timeout); retries
happen on connection errors and 5xx answers only (``is_transient_docker_error``, registered in
``tasks.workloads.TRANSIENT_CHECKS``).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import requests
import urllib3
from docker import DockerClient
from docker.errors import APIError, NotFound
from docker.models.containers import Container
from docker.utils import version_lt

from blocks.docker_host import DockerHost
from runbooks.results import Change, ChangeSet
from tasks.docker_containers import (
    MIN_MEMORY_LIMIT,
    create_copy,
    engine_updates_in_place,
    recreate,
    update_memory,
)
from tasks.docker_decisions import (
    ASIDE_MARK,
    NUMBER_LABEL,
    PROJECT_LABEL,
    SERVICE_LABEL,
    as_utc,
    choose_service_containers,
    clone_name,
    compose_limit_note,
    container_number,
    format_memory_size,
    instance_from_inspect,
    memory_limit_problem,
    memswap_for,
    parse_engine_time,
    plan_scale,
    restart_targets,
    scale_blockers,
    service_memory_limit,
    workload_event,
)
from tasks.workloads import (
    TRANSIENT_CHECKS,
    Capability,
    Instance,
    Revision,
    Unsupported,
    WorkloadEvent,
    WorkloadRef,
    WorkloadStatus,
)


class ServiceNotFound(LookupError):
    """No container on the host is the service: nothing to change."""


class RecreationInterrupted(RuntimeError):
    """A container set aside by an interrupted recreation is still there: a person decides."""


def is_transient_docker_error(exc: BaseException) -> bool:
    """The engine answered 5xx, or could not be reached (refused, reset, timed out); never a
    4xx, which a retry cannot change."""
    if isinstance(exc, APIError):
        return exc.status_code is not None and exc.status_code >= 500
    seen: set[int] = set()
    cause: BaseException | None = exc
    # the SDK wraps what the connection raised (e.g. "Error while fetching server API version")
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, requests.exceptions.SSLError | ssl.SSLError):
            return False  # a certificate the engine or the client refuses: configuration
        if isinstance(
            cause,
            requests.ConnectionError
            | requests.Timeout
            | urllib3.exceptions.HTTPError
            | ConnectionError
            | TimeoutError,
        ):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


if is_transient_docker_error not in TRANSIENT_CHECKS:
    TRANSIENT_CHECKS.append(is_transient_docker_error)


def _target(container: Container) -> str:
    return f"{container.name} ({container.id[:12]})"


def _labels(container: Container) -> dict[str, str]:
    return (container.attrs.get("Config") or {}).get("Labels") or {}


def _when(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


class DockerBackend:
    """What runbooks ask of a service, done through one host's Docker Engine API."""

    platform = "docker"

    def __init__(self, block: DockerHost) -> None:
        self.block = block

    # --- reading ------------------------------------------------------------------------

    @contextmanager
    def _client(self) -> Iterator[DockerClient]:
        # one client per call: the SDK's session is not safe to share between the threads
        # Prefect runs tasks in, and a unix socket connection costs nothing
        client = self.block.get_client()
        try:
            yield client
        finally:
            client.close()

    def _service(self, client: DockerClient, ref: WorkloadRef) -> list[Container]:
        project = self.block.compose_project
        labels = [f"{SERVICE_LABEL}={ref.name}"]
        if project:
            labels.append(f"{PROJECT_LABEL}={project}")
        found = {
            c.id: c
            for c in client.containers.list(
                all=True, filters={"label": labels}, ignore_removed=True
            )
        }
        chosen = choose_service_containers([c.attrs for c in found.values()], [], ref.name, project)
        if not chosen:
            # the name filter is a regular expression match ("web" finds "web-2"): the choice
            # keeps the exact name only
            named = client.containers.list(
                all=True, filters={"name": ref.name}, ignore_removed=True
            )
            found = {c.id: c for c in named}
            chosen = choose_service_containers([], [c.attrs for c in named], ref.name, project)
        return [found[a["Id"]] for a in chosen]

    def _memory_stats(self, client: DockerClient, container: Container) -> dict | None:
        """One stats sample of a running container, or None where the engine gives none."""
        if (container.attrs.get("State") or {}).get("Status") != "running":
            return None
        # one-shot: Docker otherwise waits for a second CPU sample (1-2 s) before answering
        one_shot = None if version_lt(client.api.api_version, "1.41") else True
        try:
            return client.api.stats(container.id, stream=False, one_shot=one_shot)
        except (APIError, ValueError) as exc:
            # a container that stopped meanwhile, or an engine without stats (podman answers
            # an empty body for a stopped one); the usage is then unknown, the status still is
            if isinstance(exc, APIError) and is_transient_docker_error(exc):
                raise
            return None

    def status(self, ref: WorkloadRef) -> WorkloadStatus:
        with self._client() as client:
            containers = self._service(client, ref)
            instances = [
                instance_from_inspect(c.attrs, self._memory_stats(client, c)) for c in containers
            ]
        capabilities = [Capability.MEMORY_LIMIT] if containers else []
        if containers and self._scalable(containers) is None:
            capabilities.insert(0, Capability.SCALE)
        created = [parse_engine_time(c.attrs.get("Created")) for c in containers]
        return WorkloadStatus(
            platform=self.platform,
            service=ref.name,
            exists=bool(containers),
            instances=instances,
            # Compose keeps no desired count at run time: the containers it made (stopped ones
            # too) are the replicas asked for
            desired_replicas=len(containers) or None,
            memory_limit_bytes=service_memory_limit(instances),
            # a `docker compose up` that changed the service recreated its containers
            rolled_out_at=max((c for c in created if c), default=None),
            capabilities=capabilities,
        )

    def history(self, ref: WorkloadRef) -> list[Revision]:
        return []

    def events(self, ref: WorkloadRef, *, since: datetime) -> list[WorkloadEvent]:
        """die, oom, kill, restart, start and health_status events of the service's containers
        between ``since`` and now, oldest first."""
        since = as_utc(since)
        with self._client() as client:
            containers = self._service(client, ref)
            if containers and SERVICE_LABEL in _labels(containers[0]):
                filters = {"label": [f"{SERVICE_LABEL}={ref.name}"]}
                if self.block.compose_project:
                    filters["label"].append(f"{PROJECT_LABEL}={self.block.compose_project}")
            else:
                filters = {"container": [ref.name]}
            now = datetime.now(UTC)
            # `until` one second ahead: podman closes the stream at `until` measured on its own
            # clock and sends nothing when it has passed already (Docker answers the past at
            # once); events after `now` are dropped below
            params = {
                "since": int(since.timestamp()),
                "until": int(now.timestamp()) + 1,
                "filters": json.dumps(filters),
            }
            # the SDK's events() has no timeout at all: the stream is read here, each read
            # bounded by the block's timeout and the whole by a deadline
            url = f"{client.api.base_url}/v{client.api.api_version}/events"
            deadline = time.monotonic() + self.block.request_timeout_s + 2
            response = client.api.get(
                url, params=params, stream=True, timeout=self.block.request_timeout_s
            )
            try:
                if response.status_code >= 400:
                    raise APIError(f"events: {response.text[:200]}", response=response)
                found = []
                for line in response.iter_lines():
                    if line.strip():
                        event = workload_event(json.loads(line), since, now)
                        if event:
                            found.append(event)
                    if time.monotonic() > deadline:
                        break
            finally:
                response.close()
        return sorted(found, key=lambda e: e.at or since)

    def logs(self, ref: WorkloadRef, *, lines: int) -> dict[str, str]:
        if lines < 1:
            raise ValueError("lines must be at least 1")
        with self._client() as client:
            return {
                c.name: c.logs(stdout=True, stderr=True, tail=lines).decode("utf-8", "replace")
                for c in self._service(client, ref)
            }

    # --- changing -----------------------------------------------------------------------

    def _existing(self, client: DockerClient, ref: WorkloadRef) -> list[Container]:
        """The service's containers, for a change: there must be some, and no recreation of
        one of them may have been cut short."""
        containers = self._service(client, ref)
        self._refuse_after_interrupted_recreation(client, ref, containers)
        if not containers:
            project = self.block.compose_project
            where = f" in Compose project {project}" if project else ""
            raise ServiceNotFound(
                f"no container is service {ref.name!r}{where} (label {SERVICE_LABEL}) or is "
                f"named {ref.name!r} on {self.block.base_url}"
            )
        return containers

    def restart(self, ref: WorkloadRef, *, since: datetime, dry_run: bool) -> ChangeSet:
        """Restart (``docker restart -t stop_timeout``) each container not started after
        ``since``, one after the other; applied once the engine shows a new start."""
        with self._client() as client:
            containers = {c.id[:12]: c for c in self._existing(client, ref)}
            before = [instance_from_inspect(c.attrs) for c in containers.values()]
            due, fresh = restart_targets(before, since)
            result = ChangeSet(
                dry_run=dry_run,
                planned=[self._restart_change(containers[i.id], i) for i in due],
                notes=[
                    f"{i.name} started at {_when(i.started_at)}, after {_when(as_utc(since))}: "
                    "restarted already, left alone"
                    for i in fresh
                ],
            )
            if dry_run:
                return result
            for instance in due:
                container = containers[instance.id]
                container.restart(timeout=self.block.stop_timeout_s)
                container.reload()
                after = instance_from_inspect(container.attrs)
                if after.started_at and (
                    instance.started_at is None or after.started_at > instance.started_at
                ):
                    result.applied.append(self._restart_change(container, after, instance))
                else:
                    result.notes.append(
                        f"{instance.name}: the engine shows no new start after the restart "
                        f"(started at {_when(after.started_at)}, {after.state})"
                    )
        return result

    @staticmethod
    def _restart_change(
        container: Container, now: Instance, before: Instance | None = None
    ) -> Change:
        detail: dict[str, Any] = {
            "state": now.state,
            "started_at": _when(now.started_at),
            "pid": now.pid,
        }
        if before is not None:
            detail |= {"previous_started_at": _when(before.started_at), "previous_pid": before.pid}
        return Change(action="restart_container", target=_target(container), detail=detail)

    def set_autoscaler_min(self, ref: WorkloadRef, minimum: int, *, dry_run: bool) -> ChangeSet:
        raise Unsupported(
            "Docker has no autoscaler: scale the Compose service instead (docker/<block> "
            "services can be scaled to a fixed number of containers)"
        )

    def rollback(self, ref: WorkloadRef, *, to_revision: int, dry_run: bool) -> ChangeSet:
        raise Unsupported(
            "Docker keeps no revision history of a service: a previous version runs again only "
            "by deploying its image and compose file again (docker compose up with the old tag)"
        )

    # --- memory limit -------------------------------------------------------------------

    def set_memory_limit(self, ref: WorkloadRef, limit_bytes: int, *, dry_run: bool) -> ChangeSet:
        """Give every container of the service ``limit_bytes`` of memory (swap kept as it was).

        In place (``docker update``) where the engine can; otherwise each container is
        recreated with the new limit, stopped first (tasks/docker_containers.py). Either way the
        compose file must get the same limit: the note says so.
        """
        if limit_bytes < MIN_MEMORY_LIMIT:
            raise ValueError(f"a memory limit below {format_memory_size(MIN_MEMORY_LIMIT)}")
        with self._client() as client:
            containers = self._existing(client, ref)
            in_place = engine_updates_in_place(client)
            result = ChangeSet(dry_run=dry_run)
            changes = []
            for container in containers:
                host = container.attrs.get("HostConfig") or {}
                old = host.get("Memory") or 0
                if old == limit_bytes:
                    continue
                problem = memory_limit_problem(host, limit_bytes)
                if problem:
                    raise ValueError(f"cannot set the memory limit of {container.name}: {problem}")
                memswap = memswap_for(old, host.get("MemorySwap") or 0, limit_bytes)
                detail: dict[str, Any] = {
                    "from_bytes": old or None,
                    "to_bytes": limit_bytes,
                    "memory_swap_bytes": memswap,
                    "method": "update" if in_place else "recreate",
                }
                if not in_place:
                    detail["effect"] = (
                        "the container is stopped and recreated with the same name and "
                        "configuration (new id, its process restarts)"
                    )
                change = Change(action="set_memory_limit", target=_target(container), detail=detail)
                changes.append((container, change, memswap))
                result.planned.append(change)
            if result.planned:
                labels = _labels(containers[0])
                result.notes.append(
                    compose_limit_note(ref.name, labels.get(PROJECT_LABEL), limit_bytes)
                    if SERVICE_LABEL in labels
                    else f"follow-up: whatever creates container {ref.name} (docker run, a "
                    f"unit file) must pass --memory {format_memory_size(limit_bytes)} too, or "
                    "the next recreation reverts the limit"
                )
            if dry_run:
                return result
            for container, change, memswap in changes:
                if in_place:
                    done = update_memory(container, limit_bytes, memswap)
                else:
                    done = recreate(
                        client, container, limit_bytes, memswap, self.block.stop_timeout_s
                    )
                host = done.attrs.get("HostConfig") or {}
                if host.get("Memory") == limit_bytes:
                    detail = change.detail | {"id": done.id[:12], "state": done.status}
                    result.applied.append(change.model_copy(update={"detail": detail}))
                else:
                    result.notes.append(
                        f"{change.target}: the engine shows a memory limit of "
                        f"{host.get('Memory')} after the change"
                    )
        return result

    def _refuse_after_interrupted_recreation(
        self, client: DockerClient, ref: WorkloadRef, containers: list[Container]
    ) -> None:
        """Stop when a recreation of one of the service's containers was cut short (its process
        was killed between setting the old container aside and removing it): which of the two
        should run is for a person to decide, not for a retry."""
        names = {c.name for c in containers} | {ref.name}
        project = self.block.compose_project
        left = [
            c
            for c in client.containers.list(all=True, filters={"name": ASIDE_MARK})
            if c.name.partition(ASIDE_MARK)[0] in names
            or (
                _labels(c).get(SERVICE_LABEL) == ref.name
                and project in (None, _labels(c).get(PROJECT_LABEL))
            )
        ]
        if left:
            raise RecreationInterrupted(
                "an earlier recreation was interrupted: "
                + "; ".join(
                    f"{c.name} ({c.status}) is the old {c.name.partition(ASIDE_MARK)[0]}: remove "
                    "it if its replacement runs well, or remove the replacement and rename it back"
                    for c in left
                )
            )

    # --- scale --------------------------------------------------------------------------

    @staticmethod
    def _template(containers: list[Container]) -> Container:
        # the newest container carries the service's current configuration
        return max(containers, key=lambda c: c.attrs.get("Created") or "")

    def _scalable(self, containers: list[Container]) -> str | None:
        """Why the service cannot get more containers, or None when it can."""
        if SERVICE_LABEL not in _labels(containers[0]):
            return (
                f"container {containers[0].name} is not part of a Compose service (no "
                f"{SERVICE_LABEL} label): there is no service definition to add copies of"
            )
        blockers = scale_blockers(self._template(containers).attrs)
        if blockers:
            return (
                f"a second container of {containers[0].name}'s service cannot run beside it: "
                + "; ".join(blockers)
            )
        return None

    def scale(self, ref: WorkloadRef, replicas: int, *, dry_run: bool) -> ChangeSet:
        """Run ``replicas`` containers of a Compose service, as ``docker compose up --scale``:
        stopped containers are started, missing ones created from the newest container's
        configuration with the next container numbers, the highest numbers removed."""
        if replicas < 1:
            # the containers are this backend's only definition of the service: with none
            # left there is nothing to scale up from again (`docker compose stop` keeps them)
            raise Unsupported(
                f"cannot scale {ref.name} to {replicas}: it would remove every container of "
                "the service; stop it with docker compose stop instead"
            )
        with self._client() as client:
            containers = self._existing(client, ref)
            by_name = {c.name: c for c in containers}
            plan = plan_scale(
                [(container_number(c.attrs), c.name, c.status == "running") for c in containers],
                replicas,
            )
            if plan.create or SERVICE_LABEL not in _labels(containers[0]):
                problem = self._scalable(containers)
                if problem:
                    raise Unsupported(f"cannot scale {ref.name}: {problem}")
            template = self._template(containers)
            labels = _labels(template)
            names = {
                n: clone_name(
                    template.name,
                    container_number(template.attrs),
                    n,
                    ref.name,
                    labels.get(PROJECT_LABEL),
                )
                for n in plan.create
            }
            result = ChangeSet(
                dry_run=dry_run,
                planned=[
                    *(
                        Change(action="start_container", target=_target(by_name[n]))
                        for n in plan.start
                    ),
                    *(
                        Change(
                            action="create_container",
                            target=names[n],
                            detail={"container_number": n, "from": _target(template)},
                        )
                        for n in plan.create
                    ),
                    *(
                        Change(action="remove_container", target=_target(by_name[n]))
                        for n in plan.remove
                    ),
                ],
            )
            if (
                plan.create
                and (template.attrs.get("HostConfig") or {}).get("NetworkMode") == "host"
            ):
                result.notes.append(
                    "the service uses the host's network: its copies share the host's ports, so a "
                    "service listening on a fixed port cannot run twice"
                )
            if dry_run:
                return result
            for change in result.planned:
                done = self._apply_scale_change(client, change, by_name, template, names)
                if done is not None:
                    result.applied.append(
                        change.model_copy(update={"detail": change.detail | done})
                    )
                else:
                    result.notes.append(f"{change.describe()}: not confirmed by the engine")
        return result

    def _apply_scale_change(
        self,
        client: DockerClient,
        change: Change,
        by_name: dict[str, Container],
        template: Container,
        names: dict[int, str],
    ) -> dict[str, Any] | None:
        if change.action == "start_container":
            container = by_name[change.target.rsplit(" (", 1)[0]]
            container.start()
            container.reload()
            return {"state": container.status} if container.status == "running" else None
        if change.action == "remove_container":
            container = by_name[change.target.rsplit(" (", 1)[0]]
            container.stop(timeout=self.block.stop_timeout_s)
            container.remove(v=False)
            try:
                client.containers.get(container.id)
            except NotFound:
                return {"removed": True}
            return None
        number = change.detail["container_number"]
        labels = {**_labels(template), NUMBER_LABEL: str(number)}
        new = create_copy(client, template, names[number], labels)
        return {"id": new.id[:12], "state": new.status} if new.status == "running" else None
