"""Runbook: Redis degraded (seed 002 scenario 4 "Redis connection issues": ping, info, client list;
FLUSHDB if needed; restart)."""


import redis
from prefect import flow
from pydantic import BaseModel, Field

from blocks.redis import RedisServer
from runbooks.errors import Escalation, VerificationFailed
from runbooks.handoff import hand_off
from runbooks.params import BlockName, OptionalPlatformRef, OptionalServiceName, RunbookParams
from runbooks.report import IncidentReport, Outcome, ends_as_reported, incident_report
from runbooks.safety import Budget, Target
from tasks.redis import (
    FlushResult,
    KillResult,
    flush_db,
    kill_idle_clients,
    list_clients,
    read_redis_health,
)
from tasks.redis_decisions import (
    ClientSurvey,
    Finding,
    HealthThresholds,
    KillCriteria,
    RedisDecision,
    RedisHealth,
    Symptom,
    classify_health,
    decide_redis_actions,
    flush_verdict,
    hit_ratio,
)

RUNBOOK = "redis-degraded"

# Killing idle clients again and again means an application leaks connections: a person looks.
KILL_BUDGET = Budget(max_actions=3, window_s=3600)
# A cache that needs flushing more than once an hour has a problem a flush does not fix.
FLUSH_BUDGET = Budget(max_actions=1, window_s=3600)

class RedisDegradedParams(RunbookParams):
    """Run form of the redis-degraded runbook."""

    redis_block: BlockName = Field(
        "default", description="Name of the saved 'Runbooks Redis Server' block."
    )
    idle_threshold_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Kill clients idle for longer than this many seconds when connections run "
        "out (never replicas, subscribers, MONITORs, blocked or MULTI clients, or its own).",
    )
    exclude_names: list[str] = Field(
        default_factory=list, description="Client names (CLIENT SETNAME) never killed."
    )
    exclude_users: list[str] = Field(
        default_factory=list, description="ACL users whose connections are never killed."
    )
    flush_db: bool = Field(
        False,
        description="Also FLUSHDB the block's database: every key in it is lost. Only when a "
        "person asks; it always needs approval with the database (e.g. db0) typed to confirm.",
    )
    memory_threshold_percent: float = Field(
        90.0, gt=0, le=100, description="used_memory over maxmemory counts as memory pressure."
    )
    clients_threshold_percent: float = Field(
        90.0, gt=0, le=100, description="connected_clients over maxclients counts as exhausted."
    )
    min_hit_ratio: float = Field(
        0.5, ge=0, le=1, description="A keyspace hit ratio below this counts as a symptom."
    )
    min_lookups: int = Field(
        100, ge=1, le=10**9, description="Judge the hit ratio only over this many lookups."
    )
    expected_replicas: int | None = Field(
        None, ge=0, le=100, description="A primary with fewer connected replicas is broken."
    )
    ping_samples: int = Field(5, ge=1, le=100, description="PINGs to time.")
    sample_window_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="Time between the two INFO readings (evictions, rejections, hits over it).",
    )
    verify_timeout_s: float = Field(
        30.0, gt=0, le=600, description="How long to wait for the symptom to clear."
    )
    platform: OptionalPlatformRef = Field(
        None,
        description="Where Redis runs (kubernetes/<block>, docker/<block>, supervisord/<block>): "
        "with `service`, an unreachable Redis is handed to service-not-responding.",
    )
    service: OptionalServiceName = Field(
        None, description="Redis's service (Deployment, Compose service, program) on `platform`."
    )


class RedisDegradedSummary(BaseModel):
    """What a redis-degraded run saw and did."""

    outcome: Outcome
    before: RedisHealth | None = Field(None, description="None: the server did not answer.")
    findings: list[Finding]
    clients: ClientSurvey | None = None
    decision: RedisDecision | None = None
    handed_off: str | None = Field(None, description="Link to the service-not-responding run.")
    killed: KillResult | None = None
    flushed: FlushResult | None = None
    after: RedisHealth | None = None
    report: str = Field(description="The incident report, as markdown.")


@flow(
    name=RUNBOOK,
    description="PING, INFO and CLIENT LIST a Redis server; kill long-idle clients when "
    "connections run out; FLUSHDB only when asked and approved; verify; escalate the rest.",
)
@ends_as_reported
def redis_degraded(params: RedisDegradedParams) -> RedisDegradedSummary:
    with incident_report(
        runbook=RUNBOOK, title="Redis Degraded", severity="P2", params=params
    ) as report:
        server = RedisServer.load(params.redis_block)
        where = f"{server.host}:{server.port}"
        thresholds = HealthThresholds(
            memory_percent=params.memory_threshold_percent,
            clients_percent=params.clients_threshold_percent,
            min_hit_ratio=params.min_hit_ratio,
            min_lookups=params.min_lookups,
            expected_replicas=params.expected_replicas,
        )
        criteria = KillCriteria(
            idle_for_s=params.idle_threshold_s,
            exclude_names=params.exclude_names,
            exclude_users=params.exclude_users,
        )
        before = _read_or_escalate(report, params, server, where)
        if isinstance(before, str):
            report.finish(
                Outcome.HANDED_OFF,
                f"Redis {where} does not answer; handed to service-not-responding, which restarts "
                f"{params.service} on {params.platform}: {before}",
            )
            return RedisDegradedSummary(
                outcome=report.outcome,
                findings=classify_health(None, thresholds),
                handed_off=before,
                report=report.to_markdown(),
            )
        findings = classify_health(before, thresholds)
        _check_health(report, before, findings, thresholds)
        clients = list_clients(server, criteria)
        report.evidence("clients", clients.evidence())
        report.check("idle clients", not clients.candidates, clients.describe())

        flush_ok, flush_why = flush_verdict(params.flush_db, before)
        if params.flush_db:
            report.step(
                f"FLUSHDB {'offered for approval' if flush_ok else 'not done'}: {flush_why}"
            )
        decision = decide_redis_actions(
            findings,
            killable=len(clients.candidates),
            left_alone=sum(clients.left_alone.values()),
            flush=flush_ok,
        )
        report.step(f"decision: {decision.reason}")
        if not (decision.kill_idle or decision.flush):
            if decision.escalate:
                _advise(report, findings, before)
                raise Escalation(f"Redis {where}: " + "; ".join(decision.escalate))
            report.finish(
                Outcome.NO_ACTION_NEEDED, f"Redis {where} is healthy: {before.describe()}."
            )
            return _summary(report, before, findings, clients, decision)

        # one lock and budget per server process: INFO's run_id, whatever name reached it
        with report.guard(Target("redis", where, before.run_id)) as guard:
            killed = flushed = None
            if decision.kill_idle:
                killed = guard.act(
                    "kill idle clients",
                    lambda dry_run: kill_idle_clients(
                        server, clients.candidates, criteria, dry_run
                    ),
                    budget=KILL_BUDGET,
                )
            if decision.flush:
                db = f"db{server.db}"
                flushed = guard.act(
                    "flush the database",
                    lambda dry_run: flush_db(server, dry_run),
                    budget=FLUSH_BUDGET,
                    approval=lambda plan: _flush_danger(plan, where),
                    confirm=lambda plan: [db] if plan.planned else [],
                )
            if params.dry_run:
                _advise(report, findings, before)
                if decision.escalate:
                    raise Escalation(f"Redis {where}: " + "; ".join(decision.escalate))
                report.finish(Outcome.PLANNED, f"Would {decision.reason} on Redis {where}.")
                return _summary(report, before, findings, clients, decision, killed, flushed)

            watched = _addressed(findings, decision)
            verified = guard.verify(
                "Redis answers"
                + (f", no {', no '.join(s.value for s in watched)}" if watched else ""),
                lambda: _probe(server),
                lambda h: (
                    h is not None
                    and not watched & {f.symptom for f in classify_health(h, thresholds)}
                ),
                timeout_s=params.verify_timeout_s,
                describe=lambda h: h.describe() if h else "no answer",
            )
            after = verified.last
            if after is not None:
                report.evidence("health after", after.model_dump(mode="json"))
                ratio, basis = hit_ratio(after, thresholds.min_lookups)
                report.step(
                    "after: "
                    + after.describe_clients()
                    + (f"; hit ratio {ratio:.0%} ({basis})" if ratio is not None else f"; {basis}")
                )
            _advise(report, findings, before, killed)
            done = _done(killed, flushed)
            if not verified.ok:
                raise VerificationFailed(
                    f"Redis {where}: {done}, but within {params.verify_timeout_s:g}s "
                    + (after.describe() if after else "it stopped answering")
                )
            if decision.escalate:
                raise Escalation(
                    f"Redis {where}: {done}; left for a person: " + "; ".join(decision.escalate)
                )
            report.finish(Outcome.RESOLVED, f"Redis {where}: {done}; {after.describe()}.")
            return _summary(report, before, findings, clients, decision, killed, flushed, after)


def _read_or_escalate(
    report: IncidentReport, params: RedisDegradedParams, server: RedisServer, where: str
) -> RedisHealth | str:
    """PING + INFO; a server that does not answer, or refuses the block's login, is for a person,
    or, for a server that does not answer where it runs is known, for service-not-responding
    (returns the link to that run)."""
    try:
        return read_redis_health(server, params.ping_samples, params.sample_window_s)
    except redis.AuthenticationError as exc:
        report.check("PING", False, f"login refused: {exc}")
        report.follow_ups.append(
            f"Fix the username/password of the Redis block '{params.redis_block}' (or the ACL "
            "user on the server), then run again."
        )
        raise Escalation(
            f"Redis {where} refused the login of block '{params.redis_block}' ({exc}); "
            "nothing was checked or changed"
        ) from None
    except redis.ResponseError as exc:
        # e.g. NOPERM: the ACL user may not run INFO or CLIENT LIST
        report.follow_ups.append(
            "Grant the runbook's ACL user +ping +info +dbsize +client|list +client|id "
            "+client|kill (and +flushdb if flushes may be asked for)."
        )
        raise Escalation(f"Redis {where} refused a diagnostic command: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        report.check("PING", False, f"no answer: {reason}")
        full = "max number of clients reached" in str(exc)
        if full:
            report.follow_ups.append(
                "Redis refuses new connections at maxclients: find the client holding them "
                "(CLIENT LIST from an existing session) or raise maxclients."
            )
        elif params.platform and params.service:
            link = hand_off(
                "service-not-responding",
                params,
                {"platform": params.platform, "service": params.service},
            )
            report.step(f"handed to service-not-responding for {params.service}: {link}")
            return link
        else:
            report.follow_ups.append(
                f"Restart Redis at {where} if its process hangs (seed: docker-compose restart "
                "redis) after saving its log; a restart of a cache without persistence empties it."
            )
        raise Escalation(
            f"Redis {where} does not answer ({reason}): a person checks the server"
        ) from None


def _check_health(
    report: IncidentReport, health: RedisHealth, findings: list[Finding], t: HealthThresholds
) -> None:
    symptoms = {f.symptom for f in findings}
    report.evidence("health", health.model_dump(mode="json"))
    report.check(
        "PING",
        True,
        f"{health.ping_ms_median:g} ms median of {len(health.ping_ms)} (max {max(health.ping_ms):g} ms); "
        f"Redis {health.version}, up {health.uptime_s}s, {health.role}",
    )
    report.check(
        "memory",
        not symptoms & {Symptom.MEMORY_PRESSURE, Symptom.EVICTING},
        f"{health.describe_memory()}; {health.evicted_in_window} keys evicted in the last "
        f"{health.window_s:.1f}s ({health.evicted_keys} since start)",
    )
    report.check(
        "clients",
        not symptoms & {Symptom.CLIENTS_EXHAUSTED, Symptom.REJECTING},
        health.describe_clients(),
    )
    ratio, basis = hit_ratio(health, t.min_lookups)
    report.check(
        "hit ratio",
        Symptom.LOW_HIT_RATIO not in symptoms,
        f"{ratio:.0%} ({basis})" if ratio is not None else basis,
    )
    link = (
        f"replica, link to master {health.master_link_status}"
        if health.role == "slave"
        else f"primary with {health.connected_slaves} replica(s)"
    )
    report.check("replication", Symptom.REPLICATION_BROKEN not in symptoms, link)
    report.step("symptoms: " + "; ".join(f"{f.symptom.value}: {f.detail}" for f in findings))


def _addressed(findings: list[Finding], decision: RedisDecision) -> set[Symptom]:
    mine = set()
    if decision.kill_idle:
        mine |= {Symptom.CLIENTS_EXHAUSTED}
    if decision.flush:
        mine |= {Symptom.MEMORY_PRESSURE}
    return mine & {f.symptom for f in findings}


def _probe(server: RedisServer) -> RedisHealth | None:
    try:
        return read_redis_health(server, 2, 0.2)
    except (redis.ConnectionError, redis.TimeoutError):
        return None


def _flush_danger(plan: FlushResult, where: str) -> str | None:
    if not plan.planned:
        return None
    detail = plan.planned[0].detail
    return (
        f"FLUSHDB deletes all {detail['keys']} keys of db{plan.db} on {where} for good (the "
        f"server uses {detail['server_used_memory']} now); applications see a cold cache and "
        "their database takes the misses"
    )


def _done(killed: KillResult | None, flushed: FlushResult | None) -> str:
    parts = []
    if killed is not None:
        parts.append(
            f"killed {len(killed.killed)} idle client(s)"
            + (f" ({len(killed.spared)} active again, spared)" if killed.spared else "")
        )
    if flushed is not None:
        parts.append(f"flushed db{flushed.db} ({flushed.keys_before} keys)")
    return " and ".join(parts) or "nothing changed"


def _advise(
    report: IncidentReport,
    findings: list[Finding],
    health: RedisHealth,
    killed: KillResult | None = None,
) -> None:
    """Follow-ups that point at the cause, so the symptom does not come back."""
    symptoms = {f.symptom for f in findings}
    if killed is not None and killed.killed:
        report.follow_ups.append(
            "Find the application(s) that left connections idle (see 'clients' by host and name) "
            "and cap their pools' idle connections, or set Redis's `timeout` to close idle clients."
        )
    if Symptom.MEMORY_PRESSURE in symptoms or Symptom.EVICTING in symptoms:
        report.follow_ups.append(
            "Raise maxmemory or shorten key TTLs"
            + (
                "; with policy noeviction writes fail at the limit: consider allkeys-lru for a cache"
                if health.maxmemory_policy == "noeviction"
                else ""
            )
            + ". A FLUSHDB (flush_db=true, approved) only buys time."
        )
    if Symptom.LOW_HIT_RATIO in symptoms:
        report.follow_ups.append(
            "A low hit ratio is a caching problem (keys expire too soon, are evicted, or are never "
            "written): a FLUSHDB would make it worse."
        )
    if Symptom.REPLICATION_BROKEN in symptoms:
        report.follow_ups.append(
            "Check the replica's log and `INFO replication` on both sides; re-link it "
            "(REPLICAOF) once the primary is healthy."
        )


def _summary(
    report: IncidentReport,
    before: RedisHealth,
    findings: list[Finding],
    clients: ClientSurvey,
    decision: RedisDecision,
    killed: KillResult | None = None,
    flushed: FlushResult | None = None,
    after: RedisHealth | None = None,
) -> RedisDegradedSummary:
    return RedisDegradedSummary(
        outcome=report.outcome,
        before=before,
        findings=findings,
        clients=clients,
        decision=decision,
        killed=killed,
        flushed=flushed,
        after=after,
        report=report.to_markdown(),
    )
