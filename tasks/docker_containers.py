"""Changes to one container that the Engine API has no single call for: a memory limit where
``docker update`` is missing (a recreation), and another copy of a Compose service's container.

Used by tasks/docker_engine.py; what they are created with is ``create_body``'s decision
(tasks/docker_decisions.py).
"""

from __future__ import annotations

import uuid
from contextlib import suppress
from typing import Any

import requests
from docker import DockerClient
from docker.errors import APIError, DockerException, NotFound
from docker.models.containers import Container

from tasks.docker_decisions import ASIDE_MARK, create_body

# Docker refuses smaller memory limits ("Minimum memory limit allowed is 6MB")
MIN_MEMORY_LIMIT = 6 * 1024 * 1024


def engine_updates_in_place(client: DockerClient) -> bool:
    """Whether the engine serves ``POST /containers/{id}/update`` (``docker update``).

    Asked of a container that does not exist, so that nothing changes: an engine that has the
    endpoint answers "no such container"; podman before 5.1 has none (its router answers a
    bare 404). Its own libpod update is no way out: in podman 4 it changes the cgroup but
    neither the stored configuration nor inspect, and the next start reverts it.
    """
    probe = f"runbooks-update-probe-{uuid.uuid4().hex[:12]}"
    try:
        client.api.update_container(probe, mem_limit=MIN_MEMORY_LIMIT)
    except NotFound as exc:
        return "no such container" in str(exc.explanation or "").lower()
    except APIError as exc:
        if exc.status_code is not None and exc.status_code >= 500:
            raise
        return True  # e.g. 400: the endpoint is there and refused the request
    return True


def update_memory(container: Container, memory: int, memswap: int) -> Container:
    """``docker update --memory --memory-swap``, in place; the container as it is after."""
    policy = (container.attrs.get("HostConfig") or {}).get("RestartPolicy") or {}
    extra = {}
    if policy.get("Name") not in (None, "", "no"):
        # podman's compat update resets the restart policy to "no" when the request names
        # none (containers/podman#29790); Docker keeps it either way
        extra["restart_policy"] = policy
    container.update(mem_limit=memory, memswap_limit=memswap, **extra)
    container.reload()
    return container


def recreate(
    client: DockerClient, container: Container, memory: int, memswap: int, stop_timeout: int
) -> Container:
    """Replace ``container`` by one made from its configuration with another memory limit.

    For engines without ``docker update`` (podman 4), this is what ``docker compose up`` does
    after a compose file's limit changed. The old container is stopped and renamed aside (kept
    until its replacement is there: its logs, and the way back); the new one is created under
    the old name with the old one's image, command, environment, labels, mounts (anonymous
    volumes too), network mode and networks, ports, restart policy and other limits, and
    started if the old one was running. A failure puts the old container back as it was.
    """
    name = container.name
    was_running = (container.attrs.get("State") or {}).get("Running", False)
    body, more_networks = create_body(container.attrs, memory=memory, memswap=memswap)
    if was_running:
        container.stop(timeout=stop_timeout)
    container.rename(f"{name}{ASIDE_MARK}{container.id[:12]}")
    new = None
    try:
        created = client.api.create_container_from_config(body, name=name)
        new = client.containers.get(created["Id"])
        _connect(client, new, more_networks, same_identity=True)
        if was_running:
            new.start()
        new.reload()
    except BaseException as failure:
        with suppress(DockerException, requests.RequestException):
            if new is not None:
                new.remove(force=True)
        container.rename(name)
        if was_running:
            try:
                container.start()
            except (DockerException, requests.RequestException) as exc:
                # the replacement's failure is the news; this one usually has the same cause
                failure.add_note(f"{name} is back under its name but did not start: {exc}")
        raise
    container.remove(v=False)
    return new


def create_copy(
    client: DockerClient, template: Container, name: str, labels: dict[str, str]
) -> Container:
    """Create and start another container like ``template`` (its own hostname, addresses and
    anonymous volumes), as ``docker compose up --scale`` adds one."""
    body, more_networks = create_body(template.attrs, labels=labels, same_identity=False)
    created = client.api.create_container_from_config(body, name=name)
    new = client.containers.get(created["Id"])
    _connect(client, new, more_networks, same_identity=False)
    new.start()
    new.reload()
    return new


def _connect(
    client: DockerClient,
    container: Container,
    networks: list[tuple[str, dict[str, Any]]],
    *,
    same_identity: bool,
) -> None:
    for network, endpoint in networks:
        ipam = (endpoint.get("IPAMConfig") or {}) if same_identity else {}
        addresses = {
            key: value
            for key, value in (
                ("ipv4_address", ipam.get("IPv4Address")),
                ("ipv6_address", ipam.get("IPv6Address")),
            )
            if value
        }
        client.api.connect_container_to_network(
            container.id, network, aliases=endpoint.get("Aliases") or None, **addresses
        )
