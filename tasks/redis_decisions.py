"""Redis runbook decisions: pure functions over what INFO and CLIENT LIST said (no I/O).

The redis-degraded runbook reads the server (tasks/redis.py), classifies what it sees here, and
acts only on what these functions allow: killing long-idle clients when connections run out, and
flushing the database only when a person asked for it.
"""

from __future__ import annotations

from collections import Counter
from enum import StrEnum
from statistics import median
from typing import Any

from pydantic import BaseModel, Field, computed_field

# --- health ----------------------------------------------------------------------------------


class RedisHealth(BaseModel):
    """What PING, INFO and DBSIZE said, with counters also measured over a short window."""

    address: str = Field(description="host:port as the block names it.")
    run_id: str = Field(description="INFO server run_id: changes when the server restarts.")
    version: str
    uptime_s: int
    role: str = Field(description="master or slave (a replica).")
    ping_ms: list[float] = Field(description="Round trips of PING, in milliseconds.")
    used_memory: int
    used_memory_human: str
    maxmemory: int = Field(description="0: no limit (Redis grows until the host runs out).")
    maxmemory_policy: str
    evicted_keys: int = Field(description="Since the server started.")
    rejected_connections: int = Field(description="Refused for maxclients, since the start.")
    keyspace_hits: int
    keyspace_misses: int
    connected_clients: int
    blocked_clients: int
    maxclients: int | None = Field(description="None when INFO does not say (Redis < 7).")
    connected_slaves: int = 0
    master_link_status: str | None = Field(None, description="A replica's link: up or down.")
    keys_by_db: dict[str, int] = Field(default_factory=dict)
    db: int = Field(description="The block's database number.")
    dbsize: int = Field(description="Keys in the block's database.")
    window_s: float = Field(description="Time between the two INFO readings.")
    evicted_in_window: int = 0
    rejected_in_window: int = 0
    hits_in_window: int = 0
    misses_in_window: int = 0

    @computed_field
    @property
    def ping_ms_median(self) -> float:
        return round(median(self.ping_ms), 2) if self.ping_ms else 0.0

    @computed_field
    @property
    def memory_percent(self) -> float | None:
        if not self.maxmemory:
            return None
        return round(100.0 * self.used_memory / self.maxmemory, 1)

    @computed_field
    @property
    def clients_percent(self) -> float | None:
        if not self.maxclients:
            return None
        return round(100.0 * self.connected_clients / self.maxclients, 1)

    def describe_memory(self) -> str:
        if self.memory_percent is None:
            return f"{self.used_memory_human} used, no maxmemory set ({self.maxmemory_policy})"
        return (
            f"{self.used_memory_human} used of maxmemory {_human_bytes(self.maxmemory)} "
            f"({self.memory_percent:g}%), policy {self.maxmemory_policy}"
        )

    def describe_clients(self) -> str:
        limit = (
            f" of maxclients {self.maxclients} ({self.clients_percent:g}%)"
            if (self.maxclients)
            else ""
        )
        return (
            f"{self.connected_clients} clients connected{limit}, {self.blocked_clients} blocked, "
            f"{self.rejected_connections} connections rejected since start "
            f"({self.rejected_in_window} in the last {self.window_s:.1f}s)"
        )

    def describe(self) -> str:
        return (
            f"PING {self.ping_ms_median:g} ms; {self.describe_clients()}; {self.describe_memory()}; "
            f"db{self.db}: {self.dbsize} keys"
        )


def _human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:g}{unit}"
        n = round(n / 1024, 2)  # type: ignore[assignment]
    return f"{n:g}T"


def _int(section: dict[str, Any], key: str, default: int = 0) -> int:
    value = section.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def health_from_info(
    first: dict[str, Any],
    last: dict[str, Any],
    *,
    address: str,
    ping_ms: list[float],
    db: int,
    dbsize: int,
    window_s: float,
) -> RedisHealth:
    """Build the health model from two INFO readings (redis-py's parsed ``INFO`` dicts)."""

    def delta(key: str) -> int:
        return max(_int(last, key) - _int(first, key), 0)

    maxclients = last.get("maxclients")
    return RedisHealth(
        address=address,
        run_id=str(last.get("run_id", "")),
        version=str(last.get("redis_version", "")),
        uptime_s=_int(last, "uptime_in_seconds"),
        role=str(last.get("role", "master")),
        ping_ms=ping_ms,
        used_memory=_int(last, "used_memory"),
        used_memory_human=str(last.get("used_memory_human", "")),
        maxmemory=_int(last, "maxmemory"),
        maxmemory_policy=str(last.get("maxmemory_policy", "")),
        evicted_keys=_int(last, "evicted_keys"),
        rejected_connections=_int(last, "rejected_connections"),
        keyspace_hits=_int(last, "keyspace_hits"),
        keyspace_misses=_int(last, "keyspace_misses"),
        connected_clients=_int(last, "connected_clients"),
        blocked_clients=_int(last, "blocked_clients"),
        maxclients=int(maxclients) if maxclients is not None else None,
        connected_slaves=_int(last, "connected_slaves"),
        master_link_status=last.get("master_link_status"),
        keys_by_db={
            k: _int(v, "keys")
            for k, v in last.items()
            if k.startswith("db") and isinstance(v, dict)
        },
        db=db,
        dbsize=dbsize,
        window_s=window_s,
        evicted_in_window=delta("evicted_keys"),
        rejected_in_window=delta("rejected_connections"),
        hits_in_window=delta("keyspace_hits"),
        misses_in_window=delta("keyspace_misses"),
    )


class HealthThresholds(BaseModel):
    """When a reading counts as a symptom."""

    memory_percent: float = Field(90.0, gt=0, le=100, description="used_memory / maxmemory.")
    clients_percent: float = Field(90.0, gt=0, le=100, description="connected / maxclients.")
    min_hit_ratio: float = Field(0.5, ge=0, le=1, description="keyspace hits / lookups.")
    min_lookups: int = Field(
        100, ge=1, description="Judge the hit ratio only over at least this many lookups."
    )
    expected_replicas: int | None = Field(
        None, ge=0, description="A primary with fewer connected replicas has broken replication."
    )


def hit_ratio(health: RedisHealth, min_lookups: int) -> tuple[float | None, str]:
    """Hits per lookup over the window when it saw enough lookups, else since the start."""
    window = health.hits_in_window + health.misses_in_window
    if window >= min_lookups:
        return health.hits_in_window / window, f"last {health.window_s:.1f}s, {window} lookups"
    total = health.keyspace_hits + health.keyspace_misses
    if total >= min_lookups:
        return health.keyspace_hits / total, f"since start, {total} lookups"
    return None, f"too few lookups to judge ({total} since start)"


class Symptom(StrEnum):
    HEALTHY = "healthy"
    UNREACHABLE = "unreachable"
    MEMORY_PRESSURE = "memory pressure"
    EVICTING = "evicting keys"
    CLIENTS_EXHAUSTED = "clients exhausted"
    REJECTING = "rejecting connections"
    LOW_HIT_RATIO = "low hit ratio"
    REPLICATION_BROKEN = "replication broken"


class Finding(BaseModel):
    symptom: Symptom
    detail: str


def classify_health(health: RedisHealth | None, thresholds: HealthThresholds) -> list[Finding]:
    """Every symptom the reading shows; [HEALTHY] when none. ``None``: the server did not answer."""
    if health is None:
        return [Finding(symptom=Symptom.UNREACHABLE, detail="the server did not answer")]
    found: list[Finding] = []
    if health.memory_percent is not None and health.memory_percent >= thresholds.memory_percent:
        effect = (
            "writes are refused with OOM errors (policy noeviction)"
            if health.maxmemory_policy == "noeviction"
            else f"keys are evicted ({health.maxmemory_policy})"
        )
        found.append(
            Finding(symptom=Symptom.MEMORY_PRESSURE, detail=f"{health.describe_memory()}: {effect}")
        )
    if health.evicted_in_window:
        found.append(
            Finding(
                symptom=Symptom.EVICTING,
                detail=f"{health.evicted_in_window} keys evicted in the last "
                f"{health.window_s:.1f}s ({health.evicted_keys} since start)",
            )
        )
    if health.clients_percent is not None and health.clients_percent >= thresholds.clients_percent:
        found.append(Finding(symptom=Symptom.CLIENTS_EXHAUSTED, detail=health.describe_clients()))
    if health.rejected_in_window:
        found.append(
            Finding(
                symptom=Symptom.REJECTING,
                detail=f"{health.rejected_in_window} connections rejected (maxclients) in the "
                f"last {health.window_s:.1f}s",
            )
        )
    ratio, basis = hit_ratio(health, thresholds.min_lookups)
    if ratio is not None and ratio < thresholds.min_hit_ratio:
        found.append(
            Finding(
                symptom=Symptom.LOW_HIT_RATIO,
                detail=f"hit ratio {ratio:.0%} ({basis}), below {thresholds.min_hit_ratio:.0%}",
            )
        )
    if health.role == "slave" and health.master_link_status != "up":
        found.append(
            Finding(
                symptom=Symptom.REPLICATION_BROKEN,
                detail=f"this replica's link to its master is {health.master_link_status or 'unknown'}",
            )
        )
    if (
        health.role == "master"
        and thresholds.expected_replicas is not None
        and health.connected_slaves < thresholds.expected_replicas
    ):
        found.append(
            Finding(
                symptom=Symptom.REPLICATION_BROKEN,
                detail=f"{health.connected_slaves} replica(s) connected, "
                f"{thresholds.expected_replicas} expected",
            )
        )
    return found or [Finding(symptom=Symptom.HEALTHY, detail=health.describe())]


# --- clients ---------------------------------------------------------------------------------


class RedisClient(BaseModel):
    """One connection from CLIENT LIST (its last command's name only, never its arguments)."""

    id: int
    addr: str
    name: str = ""
    user: str = ""
    age_s: int = Field(description="Seconds since it connected.")
    idle_s: int = Field(description="Seconds since its last command started.")
    flags: str = "N"
    db: int = 0
    cmd: str = ""
    subscriptions: int = Field(0, description="Channels + patterns + shard channels.")
    multi: int = Field(-1, description="Commands queued in MULTI; -1 outside a transaction.")
    read_at: float = Field(
        0.0, description="When this CLIENT LIST was read (unix seconds, the runbook's clock)."
    )

    @property
    def host(self) -> str:
        return self.addr.rsplit(":", 1)[0]

    def label(self) -> str:
        return f"id={self.id} {self.addr} ({self.name or '-'})"


def parse_client(entry: dict[str, Any]) -> RedisClient:
    """A CLIENT LIST entry as redis-py parses it (every value a string)."""
    subs = sum(_int(entry, k) for k in ("sub", "psub", "ssub"))
    return RedisClient(
        id=_int(entry, "id"),
        addr=str(entry.get("addr", "")),
        name=str(entry.get("name", "")),
        user=str(entry.get("user", "")),
        age_s=_int(entry, "age"),
        idle_s=_int(entry, "idle"),
        flags=str(entry.get("flags", "N")),
        db=_int(entry, "db"),
        cmd=str(entry.get("cmd", "")),
        subscriptions=subs,
        multi=_int(entry, "multi", -1),
    )


class KillCriteria(BaseModel):
    """Which clients count as idle connections that may be killed."""

    idle_for_s: float = Field(gt=0, description="Idle for longer than this many seconds.")
    exclude_names: list[str] = Field(default_factory=list, description="Never these names.")
    exclude_users: list[str] = Field(default_factory=list, description="Never these ACL users.")


IDLE_TOO_BRIEFLY = "idle too briefly"
_SUBSCRIBE = {"subscribe", "psubscribe", "ssubscribe"}


def skip_reason(client: RedisClient, criteria: KillCriteria, own_id: int | None) -> str | None:
    """Why a client must not be killed, or None when it is a long-idle ordinary connection.

    Redis's ``idle`` is the time since the client's last command *started*: a client blocked
    in BLPOP, a subscriber waiting for messages and a MONITOR look idle while they do their job.
    """
    if client.id == own_id:
        return "the runbook's own connection"
    if "S" in client.flags:
        return "a replica (replication link)"
    if "M" in client.flags:
        return "the link to this replica's master"
    if "O" in client.flags:
        return "a MONITOR session (a person watching)"
    if "P" in client.flags or client.subscriptions or client.cmd in _SUBSCRIBE:
        return "a subscriber (waits for messages: idle by design)"
    if "b" in client.flags:
        return "blocked in a command (BLPOP, XREAD BLOCK...: waiting for data, not idle)"
    if "x" in client.flags or client.multi >= 0:
        return "inside MULTI (its queued transaction would be lost)"
    if "t" in client.flags:
        return "a client-side caching (tracking) connection"
    if client.name and client.name in criteria.exclude_names:
        return "excluded name"
    if client.user and client.user in criteria.exclude_users:
        return "excluded user"
    if client.idle_s <= criteria.idle_for_s:
        return IDLE_TOO_BRIEFLY
    return None


def still_killable(
    listed: RedisClient, now: RedisClient | None, criteria: KillCriteria, own_id: int | None
) -> str:
    """At the moment of killing: 'kill', 'gone' or 'spared' (it ran a command since, or changed).

    Client ids never repeat while a server runs, so the same id is the same connection. It ran a
    command in between when its idle time is shorter than when listed, or, however long ago the
    listing was, when its last command is later than the listing showed: (read time - idle) moved
    by a whole second or more. Redis counts idle in whole seconds, so for a client idle all along
    that estimate moves by less than one second; a command two seconds or more after its last one
    always moves it by at least one.
    """
    if now is None:
        return "gone"
    if skip_reason(now, criteria, own_id) is not None or now.idle_s < listed.idle_s:
        return "spared"
    if listed.read_at and now.read_at:
        moved = (now.read_at - now.idle_s) - (listed.read_at - listed.idle_s)
        if moved >= 1.0:
            return "spared"
    return "kill"


def _ages(clients: list[RedisClient]) -> dict[str, float]:
    ages = sorted(c.idle_s for c in clients)
    return {"youngest": ages[0], "median": median(ages), "oldest": ages[-1]}


def group_clients(clients: list[RedisClient], key: str) -> dict[str, dict[str, Any]]:
    """Clients per host or per name: how many, and how long they have been idle."""
    groups: dict[str, list[RedisClient]] = {}
    for client in clients:
        value = client.host if key == "host" else (client.name or "-")
        groups.setdefault(value, []).append(client)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {k: {"count": len(v), "idle_s": _ages(v)} for k, v in ordered}


def describe_clients(clients: list[RedisClient], what: str) -> str:
    """E.g. '4 idle for 12-30s (median 20s), from 10.0.0.5 (3), 10.0.0.6 (1), named api (4)'."""
    ages = _ages(clients)
    low, high = ages["youngest"], ages["oldest"]
    span = f"{low:g}s" if low == high else f"{low:g}-{high:g}s (median {ages['median']:g}s)"
    hosts = ", ".join(f"{h} ({g['count']})" for h, g in group_clients(clients, "host").items())
    names = ", ".join(f"{n} ({g['count']})" for n, g in group_clients(clients, "name").items())
    return f"{len(clients)} {what} {span}, from {hosts}, named {names}"


class ClientSurvey(BaseModel):
    """Client connections by what killing idle ones could free; the runbook's own left out."""

    idle_for_s: float
    total: int = 0
    candidates: list[RedisClient] = Field(default_factory=list, description="Oldest idle first.")
    recently_idle: int = Field(0, description="Idle, but for the threshold or less.")
    left_alone: dict[str, int] = Field(default_factory=dict, description="Per protecting reason.")
    by_host: dict[str, dict[str, Any]] = Field(default_factory=dict)
    by_name: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def describe(self) -> str:
        parts = [
            describe_clients(self.candidates, "idle for")
            + f", over the {self.idle_for_s:g}s threshold"
            if self.candidates
            else f"no client idle over {self.idle_for_s:g}s that the runbook may kill"
        ]
        if self.recently_idle:
            parts.append(f"{self.recently_idle} active in the last {self.idle_for_s:g}s")
        if self.left_alone:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.left_alone.items())
            parts.append(f"{sum(self.left_alone.values())} left alone ({reasons})")
        return "; ".join(parts)

    def evidence(self) -> dict[str, Any]:
        return {
            "clients": self.total,
            "idle_threshold_s": self.idle_for_s,
            "idle_over_threshold": {
                "count": len(self.candidates),
                "by_host": group_clients(self.candidates, "host") if self.candidates else {},
                "by_name": group_clients(self.candidates, "name") if self.candidates else {},
            },
            "active_recently": self.recently_idle,
            "left_alone": self.left_alone,
            "all_by_host": self.by_host,
            "all_by_name": self.by_name,
        }


def classify_clients(
    clients: list[RedisClient], criteria: KillCriteria, own_id: int | None
) -> ClientSurvey:
    """Sort connections into killable (idle long), recently active, and protected."""
    others = [c for c in clients if c.id != own_id]
    survey = ClientSurvey(
        idle_for_s=criteria.idle_for_s,
        total=len(others),
        by_host=group_clients(others, "host") if others else {},
        by_name=group_clients(others, "name") if others else {},
    )
    left_alone: Counter[str] = Counter()
    for client in others:
        reason = skip_reason(client, criteria, own_id)
        if reason is None:
            survey.candidates.append(client)
        elif reason == IDLE_TOO_BRIEFLY:
            survey.recently_idle += 1
        else:
            left_alone[reason] += 1
    survey.candidates.sort(key=lambda c: -c.idle_s)
    survey.left_alone = dict(left_alone.most_common())
    return survey


# --- what to do ------------------------------------------------------------------------------


def flush_verdict(requested: bool, health: RedisHealth | None) -> tuple[bool, str]:
    """Whether FLUSHDB is a candidate at all: only when a person asked, and only where it can work."""
    if not requested:
        return False, "not asked for (flush_db is off): the runbook never flushes on its own"
    if health is None:
        return False, "the server does not answer"
    if health.role != "master":
        return False, f"db{health.db} is on a replica (read-only): flush it on its master"
    if health.dbsize == 0:
        return False, f"db{health.db} is already empty"
    return True, (
        f"asked for by the operator: db{health.db} holds {health.dbsize} keys "
        f"({health.used_memory_human} used by the whole server)"
    )


# symptoms each action addresses; anything else found is left to a person
_KILL_ADDRESSES = {Symptom.CLIENTS_EXHAUSTED, Symptom.REJECTING}
_FLUSH_ADDRESSES = {Symptom.MEMORY_PRESSURE, Symptom.EVICTING}


class RedisDecision(BaseModel):
    kill_idle: bool = False
    flush: bool = False
    escalate: list[str] = Field(
        default_factory=list, description="What no action of the runbook fixes: for a person."
    )
    reason: str


def decide_redis_actions(
    findings: list[Finding], *, killable: int, left_alone: int, flush: bool
) -> RedisDecision:
    """Kill long-idle clients when connections run out; flush only when asked (``flush``);
    everything else, and what the actions cannot fix, goes to a person with the evidence."""
    symptoms = {f.symptom for f in findings}
    if Symptom.UNREACHABLE in symptoms:
        return RedisDecision(
            escalate=["the server does not answer PING: a restart or the host is for a person"],
            reason="unreachable",
        )
    crowded = bool(symptoms & _KILL_ADDRESSES)
    kill = crowded and killable > 0
    addressed = (_KILL_ADDRESSES if kill else set()) | (_FLUSH_ADDRESSES if flush else set())
    escalate = []
    if crowded and not kill:
        escalate.append(
            f"no idle client the runbook may kill ({left_alone} protected, the rest active): "
            "raise maxclients or find the application that opens so many connections"
            if left_alone
            else "no idle client to kill: active clients alone fill maxclients; raise maxclients "
            "or find the application that opens so many connections"
        )
    escalate += [
        f"{f.symptom.value}: {f.detail}"
        for f in findings
        if f.symptom not in addressed | _KILL_ADDRESSES | {Symptom.HEALTHY}
    ]
    actions = [a for a, on in (("kill idle clients", kill), ("flush the database", flush)) if on]
    if actions:
        reason = " and ".join(actions)
    elif escalate:
        reason = "nothing the runbook may do fixes this"
    else:
        reason = "healthy"
    return RedisDecision(kill_idle=kill, flush=flush, escalate=escalate, reason=reason)
