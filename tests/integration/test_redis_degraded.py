"""redis-degraded against a real Redis: real clients, really killed; a real FLUSHDB.

Each crowd test opens connections of every kind the runbook meets: idle ones (the victims), one
blocked in BLPOP, one sending commands all the time, a subscriber, an excluded name (the test's
admin and an ops console) and the session's replica. The runbook logs in as a least-privileged
ACL user; the test lowers maxclients so the connections count as exhausted.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from blocks.redis import RedisServer
from flows.redis.redis_degraded import (
    RUNBOOK,
    RedisDegradedParams,
    RedisDegradedSummary,
    redis_degraded,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.approvals import Approver
from tests.conftest import read_actions_table, read_incident_report, read_run_logs, unique
from tests.pg_env import wait_until
from tests.redis_server import RedisTestServer
from tests.servers import free_port

pytestmark = pytest.mark.integration

DB = 5  # this module's database: keys in db0 must survive a flush of it
IDLE_S = 1.0
VICTIMS = 4
EXCLUDED = ["test-admin", "ops-console"]


def save_block(server: RedisTestServer, **overrides) -> str:
    name = unique("redis")
    fields = {
        "host": server.host,
        "port": server.port,
        "db": DB,
        "username": server.user,
        "password": server.password,
        "socket_connect_timeout_s": 2,
        "socket_timeout_s": 5,
    }
    RedisServer(**(fields | overrides)).save(name, overwrite=True)
    return name


def params(server: RedisTestServer, **overrides) -> RedisDegradedParams:
    fields = {
        "redis_block": save_block(server),
        "idle_threshold_s": IDLE_S,
        "exclude_names": EXCLUDED,
        "sample_window_s": 0.3,
        "ping_samples": 3,
        "verify_timeout_s": 10,
        # every test acts on the same server: budgets are not what these tests check
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return RedisDegradedParams(**(fields | overrides))


@dataclass
class Crowd:
    admin: redis.Redis
    ids: dict[str, int]  # name -> client id, for every connection but the idle victims
    victim_ids: set[int]
    victims: dict[int, redis.Redis]  # by client id
    busy_errors: list[BaseException] = field(default_factory=list)
    blpop_result: list = field(default_factory=list)

    def live_ids(self) -> set[int]:
        return {int(c["id"]) for c in self.admin.client_list()}


def _by_name(admin: redis.Redis) -> dict[str, list[dict]]:
    named: dict[str, list[dict]] = {}
    for c in admin.client_list():
        named.setdefault(c["name"], []).append(c)
    return named


@pytest.fixture
def crowd(redis_server: RedisTestServer) -> Iterator[Crowd]:
    server = redis_server
    admin = server.admin(DB, "test-admin")
    opened = [admin]
    stop = threading.Event()
    key = f"rb-queue-{uuid.uuid4().hex[:8]}"

    def open_(name: str, **kw) -> redis.Redis:
        client = server.admin(DB, name, **kw)
        opened.append(client)
        return client

    victims = [open_("victim-idle") for _ in range(VICTIMS)]
    open_("ops-console")
    blocked = open_("worker-blpop", socket_timeout=None)
    busy = open_("worker-busy")
    listener = open_("listener").pubsub()
    listener.subscribe("rb-news")
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    by_id = {v.client_id(): v for v in victims}
    c = Crowd(admin, {}, set(by_id), by_id)

    def block_forever() -> None:
        c.blpop_result.append(blocked.blpop([key], timeout=0))

    def keep_busy() -> None:
        try:
            while not stop.is_set():
                busy.incr(f"{key}-counter")
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - the test asserts there were none
            c.busy_errors.append(exc)

    threads = [threading.Thread(target=t, daemon=True) for t in (block_forever, keep_busy)]
    for t in threads:
        t.start()

    def settled() -> bool:
        named = _by_name(admin)
        idle = [
            int(x["idle"])
            for n in ("victim-idle", "ops-console", "listener")
            for x in named.get(n, [])
        ]
        blpop = named.get("worker-blpop", [{}])[0]
        return (
            len(idle) == VICTIMS + 2
            and min(idle) > IDLE_S
            and "b" in blpop.get("flags", "")
            and int(blpop["idle"]) > IDLE_S
        )

    assert wait_until(settled), _by_name(admin)
    named = _by_name(admin)
    c.ids = {n: int(v[0]["id"]) for n, v in named.items() if n != "victim-idle"}
    replicas = [x for x in admin.client_list() if "S" in x["flags"]]
    assert len(replicas) == 1
    c.ids["replica"] = int(replicas[0]["id"])
    yield c
    stop.set()
    server.reset()
    admin.lpush(key, "done")
    for t in threads:
        t.join(10)
    listener.close()
    for client in opened:
        client.close()


def exhaust(c: Crowd) -> float:
    """Lower maxclients so the crowd fills it; returns a clients threshold (percent) that the
    crowd plus the runbook's connection crosses and the crowd without its victims does not."""
    connected = int(c.admin.info("clients")["connected_clients"])
    maxclients = connected + VICTIMS
    c.admin.config_set("maxclients", maxclients)
    return round(100 * (connected - 1.5) / maxclients, 1)


def assert_no_secret(server: RedisTestServer, flow_run_id, *texts: str) -> None:
    logs = json.dumps([log["message"] for log in read_run_logs(flow_run_id)])
    everything = [logs, read_incident_report(flow_run_id), *texts]
    for secret in (server.password, server.admin_password):
        assert not any(secret in text for text in everything)


def test_kills_long_idle_clients_only(redis_server: RedisTestServer, crowd: Crowd) -> None:
    threshold = exhaust(crowd)
    p = params(redis_server, clients_threshold_percent=threshold)

    state = redis_degraded(params=p, return_state=True)

    assert state.is_completed(), state.message
    summary: RedisDegradedSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert [f.symptom.value for f in summary.findings] == ["clients exhausted"]
    assert set(summary.killed.killed) == crowd.victim_ids
    assert summary.killed.own_id not in crowd.victim_ids
    live = crowd.live_ids()
    assert not live & crowd.victim_ids
    # blocked, busy, subscribed, excluded and replica connections are the same ones as before
    assert set(crowd.ids.values()) <= live, (crowd.ids, live)
    left = summary.clients.left_alone
    assert left["a replica (replication link)"] == 1
    assert left["blocked in a command (BLPOP, XREAD BLOCK...: waiting for data, not idle)"] == 1
    assert left["a subscriber (waits for messages: idle by design)"] == 1
    assert left["excluded name"] == 2
    assert summary.after.clients_percent < threshold
    assert crowd.busy_errors == []
    rows = read_actions_table(state.state_details.flow_run_id)
    assert len(rows) == VICTIMS
    for row in rows:
        assert row["status"] == "applied" and "victim-idle" in row["target"]
        assert row["before"]["idle_s"] > IDLE_S and row["after"] == {"present": False}
    report = summary.report
    assert "clients exhausted" in report and "killed 4 idle client(s)" in report
    assert "named victim-idle (4)" in report
    assert_no_secret(redis_server, state.state_details.flow_run_id, json.dumps(rows))


def test_dry_run_kills_nothing(redis_server: RedisTestServer, crowd: Crowd) -> None:
    threshold = exhaust(crowd)
    before = crowd.live_ids()
    p = params(redis_server, clients_threshold_percent=threshold, dry_run=True)

    state = redis_degraded(params=p, return_state=True)

    assert state.is_completed(), state.message
    summary: RedisDegradedSummary = state.result()
    assert summary.outcome is Outcome.PLANNED
    assert {c.id for c in summary.clients.candidates} == crowd.victim_ids
    assert len(summary.killed.planned) == VICTIMS and summary.killed.applied == []
    assert before <= crowd.live_ids()


def test_healthy_server_is_left_alone(redis_server: RedisTestServer, crowd: Crowd) -> None:
    before = crowd.live_ids()
    state = redis_degraded(params=params(redis_server), return_state=True)

    assert state.is_completed(), state.message
    summary: RedisDegradedSummary = state.result()
    assert summary.outcome is Outcome.NO_ACTION_NEEDED
    assert summary.killed is None and summary.flushed is None
    # idle clients are there, but nothing is short of connections: none is killed
    assert {c.id for c in summary.clients.candidates} == crowd.victim_ids
    assert before <= crowd.live_ids()


@pytest.fixture
def keys(redis_server: RedisTestServer) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """50 keys in the module's database and 3 in db0, which no flush of DB may touch."""
    mine, other = redis_server.admin(DB), redis_server.admin(0)
    mine.flushdb()
    mine.mset({f"cache:{i}": "x" * 100 for i in range(50)})
    prefix = f"keep-{uuid.uuid4().hex[:8]}"
    other.mset({f"{prefix}:{i}": "v" for i in range(3)})
    yield mine, other
    other.delete(*(f"{prefix}:{i}" for i in range(3)))
    mine.close()
    other.close()


FLUSH_ANSWERS = [
    ({"approve": False, "approver": "bob", "reason": "the cache is fine"}, "rejected by bob"),
    (
        {"approve": True, "approver": "bob", "reason": "stale", "confirm": "db0"},
        f"without typing db{DB}",
    ),
    ({"approve": True, "approver": "alice", "reason": "stale prices", "confirm": f"db{DB}"}, None),
]


@pytest.mark.parametrize(("answer", "refusal"), FLUSH_ANSWERS)
def test_flush_needs_approval_with_the_db_typed(
    redis_server: RedisTestServer, keys, answer: dict, refusal: str | None
) -> None:
    mine, other = keys
    other_keys = other.dbsize()
    approver = Approver(RUNBOOK, answer)
    approver.start()

    state = redis_degraded(params=params(redis_server, flush_db=True), return_state=True)

    approver.join(10)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert f"FLUSHDB deletes all 50 keys of db{DB}" in approver.description
    assert f"db{DB}" in approver.description
    assert other.dbsize() == other_keys
    if refusal:
        assert state.is_failed()
        assert refusal in state.message
        assert mine.dbsize() == 50
        return
    assert state.is_completed(), state.message
    summary: RedisDegradedSummary = state.result()
    assert summary.outcome is Outcome.RESOLVED
    assert summary.flushed.keys_before == 50 and summary.flushed.keys_after == 0
    assert mine.dbsize() == 0
    assert "approved by alice" in summary.report
    assert_no_secret(redis_server, state.state_details.flow_run_id)


def test_flush_is_never_done_unasked(redis_server: RedisTestServer, keys) -> None:
    mine, _ = keys
    with redis_server.admin() as admin:
        used = int(admin.info("memory")["used_memory"])
        # 97% full, over a 50% threshold whatever other connections come and go meanwhile
        admin.config_set("maxmemory", int(used / 0.97))
        try:
            p = params(redis_server, memory_threshold_percent=50)
            state = redis_degraded(params=p, return_state=True)
        finally:
            admin.config_set("maxmemory", 0)
    # memory pressure is for a person: no flush without flush_db
    assert state.is_failed()
    assert "memory pressure" in state.message and "writes are refused" in state.message
    assert mine.dbsize() == 50
    report = read_incident_report(state.state_details.flow_run_id)
    assert "| memory | FAILING |" in report
    assert "Raise maxmemory or shorten key TTLs" in report


def test_wrong_password_is_a_clear_error_without_the_password(
    redis_server: RedisTestServer,
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    p = params(redis_server, redis_block=save_block(redis_server, password=wrong))

    state = redis_degraded(params=p, return_state=True)

    assert state.is_failed()
    assert "refused the login of block" in state.message
    assert "invalid username-password pair" in state.message
    assert wrong not in state.message
    run = state.state_details.flow_run_id
    assert wrong not in read_incident_report(run)
    assert all(wrong not in log["message"] for log in read_run_logs(run))
    assert_no_secret(redis_server, run, state.message)


def test_unreachable_server_is_escalated(redis_server: RedisTestServer) -> None:
    p = params(redis_server, redis_block=save_block(redis_server, port=free_port()))

    state = redis_degraded(params=p, return_state=True)

    assert state.is_failed()
    assert "does not answer" in state.message and "Connection refused" in state.message
    report = read_incident_report(state.state_details.flow_run_id)
    assert "Restart Redis at" in report


def test_block_client_uses_the_block_settings(redis_server: RedisTestServer) -> None:
    block = RedisServer.load(save_block(redis_server, client_name="rb-check"))
    with block.client() as client, redis_server.admin(DB) as admin:
        own = client.client_id()
        seen = {int(c["id"]): c for c in admin.client_list()}[own]
        assert (seen["name"], seen["db"], seen["user"]) == ("rb-check", str(DB), redis_server.user)
        # the least-privileged user: what the runbook never needs, it may not do
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("k", "v")


def test_unreachable_server_is_handed_to_service_not_responding(
    redis_server: RedisTestServer, deployment_ids: dict[str, str]
) -> None:
    from flows.services.service_not_responding import ServiceNotRespondingParams
    from tests.conftest import runs_of

    before = {r["id"] for r in runs_of(deployment_ids["service-not-responding"])}
    p = params(
        redis_server,
        redis_block=save_block(redis_server, port=free_port()),
        platform="docker/cache-host",
        service="redis",
    )

    state = redis_degraded(params=p, return_state=True)

    assert state.is_completed(), state.message
    summary: RedisDegradedSummary = state.result()
    assert summary.outcome is Outcome.HANDED_OFF
    new = [r for r in runs_of(deployment_ids["service-not-responding"]) if r["id"] not in before]
    assert len(new) == 1
    handed = new[0]["parameters"]["params"]
    assert (handed["platform"], handed["service"], handed["dry_run"]) == (
        "docker/cache-host",
        "redis",
        False,
    )
    ServiceNotRespondingParams.model_validate(handed)  # the run it starts accepts them
    assert new[0]["id"] in summary.report and "handed to service-not-responding" in summary.report


def test_kill_rechecks_each_client_at_the_last_moment(
    redis_server: RedisTestServer, crowd: Crowd
) -> None:
    """Clients that ran a command or left between listing and killing are left alone; a re-run
    kills nothing twice and fails on nothing."""
    from prefect import flow

    from tasks.redis import kill_idle_clients, list_clients
    from tasks.redis_decisions import KillCriteria

    server = RedisServer.load(save_block(redis_server))
    criteria = KillCriteria(idle_for_s=IDLE_S, exclude_names=EXCLUDED)

    @flow
    def find():
        return list_clients(server, criteria).candidates

    candidates = find()
    assert {c.id for c in candidates} == crowd.victim_ids
    by_id = {int(c["id"]): c for c in crowd.admin.client_list()}
    turns_busy, leaves, *stay_idle = sorted(crowd.victim_ids)
    assert all(by_id[i]["name"] == "victim-idle" for i in (turns_busy, leaves))
    # after listing: one victim runs a command, one disconnects
    crowd.victims[turns_busy].ping()
    crowd.admin.client_kill_filter(_id=leaves)

    @flow
    def kill():
        return kill_idle_clients(server, candidates, criteria, dry_run=False)

    result = kill()
    assert sorted(result.killed) == stay_idle
    assert result.spared == [turns_busy] and result.gone == [leaves]
    live = crowd.live_ids()
    assert turns_busy in live and not live & {leaves, *stay_idle}

    # a slow re-run (a loaded machine): the busy client has been idle longer than when it was
    # listed again, but its last command is after the listing, so it is still spared
    time.sleep(IDLE_S + 1.5)
    again = kill()
    assert again.applied == [] and again.killed == []
    assert set(again.gone) == {leaves, *stay_idle} and again.spared == [turns_busy]
