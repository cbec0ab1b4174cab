"""redis-degraded's decisions: which clients may be killed, what the readings mean, what to do."""

from __future__ import annotations

import ssl

import pytest
import redis

from blocks.redis import RedisServer, is_transient
from tasks.redis_decisions import (
    IDLE_TOO_BRIEFLY,
    Finding,
    HealthThresholds,
    KillCriteria,
    RedisClient,
    RedisHealth,
    Symptom,
    classify_clients,
    classify_health,
    decide_redis_actions,
    flush_verdict,
    health_from_info,
    hit_ratio,
    parse_client,
    skip_reason,
    still_killable,
)

OWN = 99
CRITERIA = KillCriteria(idle_for_s=300, exclude_names=["ops-console"], exclude_users=["batch"])


def client(**kw) -> RedisClient:
    fields = {
        "id": 7,
        "addr": "10.0.0.5:51000",
        "name": "api",
        "user": "default",
        "age_s": 3600,
        "idle_s": 900,
        "flags": "N",
        "db": 0,
        "cmd": "get",
    }
    return RedisClient(**(fields | kw))


# client -> why it is never killed (None: it may be)
SKIP_CASES = [
    (client(), None),
    (client(id=OWN), "the runbook's own connection"),
    (client(flags="S", cmd="psync"), "a replica (replication link)"),
    (client(flags="M"), "the link to this replica's master"),
    (client(flags="O", cmd="monitor"), "a MONITOR session (a person watching)"),
    (client(flags="P", cmd="subscribe"), "a subscriber (waits for messages: idle by design)"),
    (client(subscriptions=2), "a subscriber (waits for messages: idle by design)"),
    (client(cmd="psubscribe"), "a subscriber (waits for messages: idle by design)"),
    (
        client(flags="b", cmd="blpop"),
        "blocked in a command (BLPOP, XREAD BLOCK...: waiting for data, not idle)",
    ),
    (client(flags="x", multi=2), "inside MULTI (its queued transaction would be lost)"),
    (client(multi=0), "inside MULTI (its queued transaction would be lost)"),
    (client(flags="t"), "a client-side caching (tracking) connection"),
    (client(name="ops-console"), "excluded name"),
    (client(user="batch"), "excluded user"),
    (client(idle_s=300), IDLE_TOO_BRIEFLY),
    (client(idle_s=301), None),
    (client(name=""), None),  # an unnamed client is not excluded by an empty name
]


@pytest.mark.parametrize(("c", "reason"), SKIP_CASES)
def test_skip_reason(c: RedisClient, reason: str | None) -> None:
    assert skip_reason(c, CRITERIA, OWN) == reason


# listed -> at kill time -> verdict
RECHECK_CASES = [
    (client(idle_s=900), client(idle_s=905), "kill"),
    (client(idle_s=900), None, "gone"),
    (client(idle_s=900), client(idle_s=0), "spared"),  # ran a command
    (client(idle_s=900), client(idle_s=400), "spared"),  # ran one and went idle again
    (client(idle_s=900), client(idle_s=905, flags="b", cmd="blpop"), "spared"),
    (client(idle_s=900), client(idle_s=905, flags="P", cmd="subscribe"), "spared"),
    # a slow re-check (under load): idle again longer than when listed, but its last command
    # is later than the listing showed
    (client(idle_s=301, read_at=100.0), client(idle_s=303, read_at=105.0), "spared"),
    (client(idle_s=301, read_at=100.0), client(idle_s=305, read_at=105.5), "spared"),
    # idle all along: the estimate of its last command moves by less than a second
    (client(idle_s=301, read_at=100.9), client(idle_s=306, read_at=106.0), "kill"),
    (client(idle_s=301, read_at=100.0), client(idle_s=306, read_at=105.9), "kill"),
]


@pytest.mark.parametrize(("listed", "now", "verdict"), RECHECK_CASES)
def test_still_killable(listed: RedisClient, now: RedisClient | None, verdict: str) -> None:
    assert still_killable(listed, now, CRITERIA, OWN) == verdict


def test_parse_client_list_entry() -> None:
    entry = {
        "id": "12",
        "addr": "10.1.2.3:40000",
        "name": "",
        "age": "70",
        "idle": "65",
        "flags": "P",
        "db": "2",
        "sub": "1",
        "psub": "2",
        "ssub": "0",
        "multi": "-1",
        "cmd": "subscribe",
        "user": "app",
        "qbuf": "0",
    }
    c = parse_client(entry)
    assert (c.id, c.host, c.age_s, c.idle_s, c.db, c.subscriptions, c.multi) == (
        12,
        "10.1.2.3",
        70,
        65,
        2,
        3,
        -1,
    )
    assert parse_client({"id": "1", "addr": "::1:6000"}).host == "::1"


def test_survey_groups_by_host_and_name_and_leaves_own_out() -> None:
    clients = [
        client(id=1, addr="10.0.0.5:1", idle_s=1000),
        client(id=2, addr="10.0.0.5:2", idle_s=400),
        client(id=3, addr="10.0.0.6:1", name="worker", idle_s=10),
        client(id=4, addr="10.0.0.7:1", flags="S", cmd="psync"),
        client(id=OWN, addr="10.0.0.9:1", name="runbooks"),
    ]
    survey = classify_clients(clients, CRITERIA, OWN)
    assert [c.id for c in survey.candidates] == [1, 2]
    assert survey.recently_idle == 1 and survey.total == 4
    assert survey.left_alone == {"a replica (replication link)": 1}
    assert survey.by_host["10.0.0.5"]["count"] == 2
    assert survey.by_name == {
        "api": {"count": 3, "idle_s": {"youngest": 400, "median": 900, "oldest": 1000}},
        "worker": {"count": 1, "idle_s": {"youngest": 10, "median": 10, "oldest": 10}},
    }
    assert survey.describe().startswith(
        "2 idle for 400-1000s (median 700s), from 10.0.0.5 (2), named api (2), over the 300s "
        "threshold; 1 active in the last 300s; 1 left alone (a replica (replication link): 1)"
    )


INFO = {
    "run_id": "abc",
    "redis_version": "7.0.15",
    "uptime_in_seconds": 100,
    "role": "master",
    "used_memory": 50,
    "used_memory_human": "50B",
    "maxmemory": 100,
    "maxmemory_policy": "allkeys-lru",
    "evicted_keys": 0,
    "rejected_connections": 0,
    "keyspace_hits": 0,
    "keyspace_misses": 0,
    "connected_clients": 10,
    "blocked_clients": 0,
    "maxclients": 100,
    "connected_slaves": 1,
    "db0": {"keys": 5, "expires": 0},
}


def health(first: dict | None = None, **last) -> RedisHealth:
    return health_from_info(
        INFO | (first or {}),
        INFO | last,
        address="r:6379",
        ping_ms=[0.2, 0.4, 0.3],
        db=0,
        dbsize=5,
        window_s=2,
    )


T = HealthThresholds(memory_percent=90, clients_percent=90, min_hit_ratio=0.5, min_lookups=100)

# reading -> symptoms
HEALTH_CASES = [
    (health(), [Symptom.HEALTHY]),
    (health(used_memory=95), [Symptom.MEMORY_PRESSURE]),
    (health(used_memory=95, maxmemory=0), [Symptom.HEALTHY]),  # no limit: nothing to compare
    (health(evicted_keys=3), [Symptom.EVICTING]),
    (health({"evicted_keys": 3}, evicted_keys=3), [Symptom.HEALTHY]),  # old evictions only
    (health(connected_clients=90), [Symptom.CLIENTS_EXHAUSTED]),
    (health(connected_clients=89), [Symptom.HEALTHY]),
    (health(maxclients=None, connected_clients=5000), [Symptom.HEALTHY]),
    (health(rejected_connections=1), [Symptom.REJECTING]),
    (health(keyspace_hits=10, keyspace_misses=190), [Symptom.LOW_HIT_RATIO]),
    (health(keyspace_hits=10, keyspace_misses=50), [Symptom.HEALTHY]),  # too few lookups
    # the window saw enough lookups: it decides, not the history since start
    (
        health(
            {"keyspace_hits": 0, "keyspace_misses": 10_000},
            keyspace_hits=190,
            keyspace_misses=10_010,
        ),
        [Symptom.HEALTHY],
    ),
    (health(role="slave", master_link_status="down"), [Symptom.REPLICATION_BROKEN]),
    (health(role="slave", master_link_status="up"), [Symptom.HEALTHY]),
    (
        health(used_memory=99, connected_clients=95, rejected_connections=4),
        [Symptom.MEMORY_PRESSURE, Symptom.CLIENTS_EXHAUSTED, Symptom.REJECTING],
    ),
    (None, [Symptom.UNREACHABLE]),
]


@pytest.mark.parametrize(("reading", "symptoms"), HEALTH_CASES)
def test_classify_health(reading: RedisHealth | None, symptoms: list[Symptom]) -> None:
    assert [f.symptom for f in classify_health(reading, T)] == symptoms


def test_expected_replicas() -> None:
    t = T.model_copy(update={"expected_replicas": 2})
    assert [f.symptom for f in classify_health(health(), t)] == [Symptom.REPLICATION_BROKEN]


def test_hit_ratio_basis() -> None:
    ratio, basis = hit_ratio(health(keyspace_hits=150, keyspace_misses=50), 100)
    assert ratio == 0.75 and basis == "last 2.0s, 200 lookups"
    assert hit_ratio(health(), 100) == (None, "too few lookups to judge (0 since start)")


# asked, reading -> candidate?
FLUSH_CASES = [
    (False, health(), False, "not asked for"),
    (True, None, False, "does not answer"),
    (True, health(role="slave"), False, "on a replica"),
    (True, health().model_copy(update={"dbsize": 0}), False, "already empty"),
    (True, health(), True, "asked for by the operator: db0 holds 5 keys"),
]


@pytest.mark.parametrize(("asked", "reading", "candidate", "why"), FLUSH_CASES)
def test_flush_is_only_a_candidate_when_asked(
    asked: bool, reading: RedisHealth | None, candidate: bool, why: str
) -> None:
    ok, reason = flush_verdict(asked, reading)
    assert ok is candidate and why in reason


def f(symptom: Symptom) -> Finding:
    return Finding(symptom=symptom, detail="d")


# findings, killable, left alone, flush -> kill?, flush?, escalation texts (substrings)
DECIDE_CASES = [
    ([f(Symptom.HEALTHY)], 5, 0, False, False, False, []),
    ([f(Symptom.CLIENTS_EXHAUSTED)], 5, 0, False, True, False, []),
    ([f(Symptom.REJECTING)], 2, 0, False, True, False, []),
    ([f(Symptom.CLIENTS_EXHAUSTED)], 0, 3, False, False, False, ["3 protected"]),
    ([f(Symptom.CLIENTS_EXHAUSTED)], 0, 0, False, False, False, ["active clients alone"]),
    # idle clients on a healthy server are not killed
    ([f(Symptom.HEALTHY)], 9, 0, False, False, False, []),
    ([f(Symptom.MEMORY_PRESSURE)], 5, 0, False, False, False, ["memory pressure"]),
    ([f(Symptom.MEMORY_PRESSURE)], 5, 0, True, False, True, []),
    ([f(Symptom.HEALTHY)], 0, 0, True, False, True, []),
    ([f(Symptom.LOW_HIT_RATIO)], 0, 0, True, False, True, ["low hit ratio"]),
    (
        [f(Symptom.CLIENTS_EXHAUSTED), f(Symptom.REPLICATION_BROKEN)],
        1,
        0,
        False,
        True,
        False,
        ["replication broken"],
    ),
    ([f(Symptom.UNREACHABLE)], 0, 0, False, False, False, ["does not answer PING"]),
]


@pytest.mark.parametrize(
    ("findings", "killable", "left_alone", "flush", "kill", "flushes", "escalate"), DECIDE_CASES
)
def test_decide(findings, killable, left_alone, flush, kill, flushes, escalate) -> None:
    d = decide_redis_actions(findings, killable=killable, left_alone=left_alone, flush=flush)
    assert (d.kill_idle, d.flush) == (kill, flushes)
    assert len(d.escalate) == len(escalate)
    for text, said in zip(escalate, d.escalate, strict=True):
        assert text in said


def _cert_failure() -> redis.ConnectionError:
    """What redis-py raises for a certificate that does not verify: a ConnectionError raised
    while handling the ssl error (redis/connection.py)."""
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed")
        except OSError as exc:
            raise redis.ConnectionError(f"Error 1 connecting: {exc}")  # noqa: B904 - as redis-py
    except redis.ConnectionError as error:
        return error


# error -> whether another try may help (the block's client and the tasks retry only these)
TRANSIENT_CASES = [
    (redis.ConnectionError("Error 111 connecting"), True),
    (redis.TimeoutError("Timeout reading from socket"), True),
    (redis.BusyLoadingError("Redis is loading the dataset in memory"), True),
    (redis.AuthenticationError("invalid username-password pair"), False),
    (redis.ResponseError("NOPERM this user has no permissions"), False),
    (ValueError("x"), False),
    (_cert_failure(), False),  # the server's certificate does not verify: it would again
]


@pytest.mark.parametrize(("error", "transient"), TRANSIENT_CASES)
def test_only_transient_errors_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient
    client = RedisServer(host="localhost", retries=2).client()
    retry = client.get_retry()
    calls = []

    def fail() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        retry.call_with_retry(fail, lambda _: None)
    assert len(calls) == (3 if transient and isinstance(error, redis.RedisError) else 1)
