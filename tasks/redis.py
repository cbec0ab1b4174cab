"""Redis tasks: PING, INFO and CLIENT LIST read into models; killing idle clients; FLUSHDB."""

from __future__ import annotations

import time

import redis
from prefect import get_run_logger, task
from pydantic import Field

from blocks.redis import RedisServer, is_transient
from runbooks.results import Change, ChangeSet
from runbooks.retry import runbook_task_options
from tasks.redis_decisions import (
    ClientSurvey,
    KillCriteria,
    RedisClient,
    RedisHealth,
    classify_clients,
    health_from_info,
    parse_client,
    still_killable,
)

# the block's client already retries a dropped connection; this retries the whole task
redis_retries = runbook_task_options(
    redis.ConnectionError, redis.TimeoutError, retries=2, when=is_transient
)


def _address(server: RedisServer) -> str:
    return f"{server.host}:{server.port}"


@task(**redis_retries)
def read_redis_health(
    server: RedisServer, ping_samples: int = 5, window_s: float = 2.0
) -> RedisHealth:
    """PING a few times over ``window_s``, with INFO before and after (counters over the window)."""
    with server.client() as client:
        first = client.info()
        first_at = time.monotonic()
        pings: list[float] = []
        for i in range(ping_samples):
            if i:
                time.sleep(window_s / max(ping_samples - 1, 1))
            started = time.perf_counter()
            client.ping()
            pings.append(round((time.perf_counter() - started) * 1000, 3))
        last = client.info()
        window = time.monotonic() - first_at
        dbsize = client.dbsize()
    health = health_from_info(
        first,
        last,
        address=_address(server),
        ping_ms=pings,
        db=server.db,
        dbsize=dbsize,
        window_s=round(window, 2),
    )
    get_run_logger().info("redis %s: %s", health.address, health.describe())
    return health


def _clients(client: redis.Redis) -> tuple[list[RedisClient], int]:
    own_id = client.client_id()
    entries = client.client_list()
    read_at = time.time()
    return [parse_client(entry).model_copy(update={"read_at": read_at}) for entry in entries], own_id


@task(**redis_retries)
def list_clients(server: RedisServer, criteria: KillCriteria) -> ClientSurvey:
    """CLIENT LIST, sorted by what killing idle connections could free (never its own)."""
    with server.client() as client:
        clients, own_id = _clients(client)
    survey = classify_clients(clients, criteria, own_id)
    get_run_logger().info("%d clients: %s", survey.total, survey.describe())
    return survey


class KillResult(ChangeSet):
    """Outcome per candidate of killing idle clients."""

    own_id: int | None = Field(None, description="The runbook connection's id; never a target.")
    killed: list[int] = Field(default_factory=list, description="CLIENT KILL ID succeeded.")
    spared: list[int] = Field(
        default_factory=list, description="Ran a command since listed, or no longer qualifies."
    )
    gone: list[int] = Field(default_factory=list, description="Already disconnected.")


def _kill_change(c: RedisClient) -> Change:
    return Change(
        action="client_kill",
        target=c.label(),
        detail={"idle_s": c.idle_s, "age_s": c.age_s, "flags": c.flags, "db": c.db, "cmd": c.cmd},
    )


@task(**redis_retries)
def kill_idle_clients(
    server: RedisServer, candidates: list[RedisClient], criteria: KillCriteria, dry_run: bool
) -> KillResult:
    """CLIENT KILL ID each candidate that is, on a fresh CLIENT LIST, still in its idle spell.

    Idempotent: a client already gone is reported as gone, so a retry or re-run never fails
    on one. Redis has no "kill if still idle" (CLIENT is not allowed in scripts): a client that
    sends a command in the milliseconds between the re-read and the kill is still killed.
    """
    planned = [_kill_change(c) for c in candidates]
    if dry_run or not candidates:
        return KillResult(dry_run=dry_run, planned=planned)
    result = KillResult(dry_run=False, planned=planned)
    with server.client() as client:
        clients, own_id = _clients(client)
        result.own_id = own_id
        now = {c.id: c for c in clients}
        for listed in candidates:
            verdict = still_killable(listed, now.get(listed.id), criteria, own_id)
            if verdict == "kill":
                # 0 killed: it disconnected since the re-read
                verdict = "kill" if client.client_kill_filter(_id=listed.id) else "gone"
            if verdict == "kill":
                result.killed.append(listed.id)
            elif verdict == "spared":
                result.spared.append(listed.id)
                result.notes.append(f"{listed.label()} spared: active again at the re-check")
            else:
                result.gone.append(listed.id)
                result.notes.append(f"{listed.label()} already gone")
        if result.killed:
            after = {c.id for c in _clients(client)[0]}
            for listed, change in zip(candidates, planned, strict=True):
                if listed.id in result.killed:
                    detail = {"present": listed.id in after}
                    result.applied.append(change.model_copy(update={"detail": detail}))
    return result


class FlushResult(ChangeSet):
    """What FLUSHDB removed, or would remove."""

    db: int
    keys_before: int = 0
    keys_after: int | None = None


@task(**redis_retries)
def flush_db(server: RedisServer, dry_run: bool) -> FlushResult:
    """FLUSHDB on the block's database; the plan shows the keys and memory that would be lost.

    Idempotent: an empty database plans nothing, so a re-run after a flush changes nothing.
    """
    with server.client() as client:
        keys = client.dbsize()
        memory = client.info("memory")
        result = FlushResult(dry_run=dry_run, db=server.db, keys_before=keys)
        if keys:
            result.planned.append(
                Change(
                    action="flushdb",
                    target=f"db{server.db} on {_address(server)}",
                    detail={
                        "keys": keys,
                        "server_used_memory": memory.get("used_memory_human"),
                        "server_used_memory_bytes": memory.get("used_memory"),
                    },
                )
            )
        if dry_run or not keys:
            return result
        client.flushdb()
        result.keys_after = client.dbsize()
        memory = client.info("memory")
    result.applied.append(
        result.planned[0].model_copy(
            update={
                "detail": {
                    "keys": result.keys_after,
                    "server_used_memory": memory.get("used_memory_human"),
                    "server_used_memory_bytes": memory.get("used_memory"),
                }
            }
        )
    )
    return result
