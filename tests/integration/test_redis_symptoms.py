"""redis-degraded on the symptoms no action of it fixes, made real on a Redis of this module's own
(a primary with the runbook's ACL user and a replica, tests/redis_server.py): keys evicted at
maxmemory, a low hit ratio, a replica whose link to its primary is down, a primary missing a
replica. Each run must see the symptom in INFO, change nothing (no key flushed, no client killed)
and escalate with the evidence and the follow-up that points at the cause.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from blocks.redis import RedisServer
from flows.redis.redis_degraded import RedisDegradedParams, redis_degraded
from runbooks.errors import Escalation
from runbooks.params import SafetyParams
from tests.conftest import read_incident_report, unique
from tests.redis_server import RUNBOOK_ACL, RedisTestServer, start_redis
from tests.servers import free_port, wait_for_port

pytestmark = pytest.mark.integration

DB = 3


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisTestServer]:
    """Not the session's Redis: these tests lower maxmemory and break replication."""
    server = start_redis()
    yield server
    server.stop()


def block(server: RedisTestServer, port: int | None = None) -> str:
    name = unique("redis")
    RedisServer(
        host=server.host,
        port=port or server.port,
        db=DB,
        username=server.user,
        password=server.password,
        socket_connect_timeout_s=2,
        socket_timeout_s=5,
    ).save(name, overwrite=True)
    return name


def run(block_name: str, **overrides):
    fields = {
        "redis_block": block_name,
        "sample_window_s": 1.0,
        "ping_samples": 2,
        "verify_timeout_s": 5,
        "safety": SafetyParams(budget_max_actions=1000, approval_poll_s=1),
    }
    return redis_degraded(params=RedisDegradedParams(**(fields | overrides)), return_state=True)


class Load(threading.Thread):
    """Runs ``step`` on its own connection until stopped; counts the steps."""

    def __init__(self, server: RedisTestServer, step) -> None:
        super().__init__(daemon=True)
        self.client = server.admin(DB, "load")
        self.step = step
        self.stopping = threading.Event()
        self.steps = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            self.step(self.client, self.steps)
            self.steps += 1

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(10)
        self.client.close()


def unchanged_clients(server: RedisTestServer) -> set[int]:
    with server.admin(name="check") as admin:
        return {int(c["id"]) for c in admin.client_list() if c["name"] != "check"}


def test_evicting_cache_is_escalated_with_its_evidence_and_nothing_flushed(
    own_redis: RedisTestServer,
) -> None:
    admin = own_redis.admin(DB)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.config_set("maxmemory", str(3 * 1024 * 1024))
    value = "v" * 10_000
    try:
        with Load(own_redis, lambda c, i: c.set(f"page:{i}", value)) as load:
            while int(admin.info("stats")["evicted_keys"]) == 0:  # full, and evicting
                time.sleep(0.1)
            before = unchanged_clients(own_redis)
            state = run(block(own_redis))
            assert before <= unchanged_clients(own_redis), "no client killed"
            assert load.steps > 0
        assert state.is_failed()
        with pytest.raises(Escalation, match=r"evicting keys: \d+ keys evicted in the last"):
            state.result()
        assert admin.dbsize() > 0, "nothing flushed"
        report = read_incident_report(state.state_details.flow_run_id)
        assert "Raise maxmemory or shorten key TTLs" in report
        assert "allkeys-lru" in report
    finally:
        admin.config_set("maxmemory", "0")
        admin.flushdb()
        admin.close()


def test_low_hit_ratio_is_escalated_and_a_flush_is_advised_against(
    own_redis: RedisTestServer,
) -> None:
    admin = own_redis.admin(DB)
    admin.set("hot", "1")
    try:
        # nine misses for every hit, all the time
        with Load(
            own_redis,
            lambda c, i: c.get("hot") if i % 10 == 0 else c.get(f"miss:{uuid.uuid4().hex}"),
        ):
            time.sleep(0.5)
            state = run(block(own_redis), min_lookups=50)
        assert state.is_failed()
        with pytest.raises(Escalation, match=r"low hit ratio: hit ratio \d+%"):
            state.result()
        assert admin.get("hot") == "1"
        report = read_incident_report(state.state_details.flow_run_id)
        assert "a FLUSHDB would make it worse" in report
    finally:
        admin.delete("hot")
        admin.config_resetstat()  # the misses would count "since start" in later runs
        admin.close()


def test_replica_with_its_link_down_and_a_primary_missing_it(own_redis: RedisTestServer) -> None:
    # a replica of a primary that is not there (nothing listens on that port)
    port = free_port()
    dead_primary = free_port()
    workdir = own_redis.home / f"orphan-{port}"
    workdir.mkdir()
    orphan = subprocess.Popen(
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--requirepass", own_redis.admin_password,
            "--replicaof", "127.0.0.1", str(dead_primary),
        ],
        stdout=(workdir / "log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, 15)
        with redis.Redis(
            host=own_redis.host, port=port, password=own_redis.admin_password
        ) as orphan_admin:
            orphan_admin.acl_setuser(
                own_redis.user,
                enabled=True,
                passwords=[f"+{own_redis.password}"],
                commands=RUNBOOK_ACL.split(),
            )
        state = run(block(own_redis, port=port))
        assert state.is_failed()
        with pytest.raises(Escalation, match="this replica's link to its master is down"):
            state.result()
        report = read_incident_report(state.state_details.flow_run_id)
        assert "re-link it" in report and "REPLICAOF" in report

        # the module's primary has one replica; two are expected
        state = run(block(own_redis), expected_replicas=2)
        assert state.is_failed()
        with pytest.raises(Escalation, match=r"1 replica\(s\) connected, 2 expected"):
            state.result()
        # and with the one it has, it is healthy
        state = run(block(own_redis), expected_replicas=1)
        assert state.is_completed(), state.message
    finally:
        orphan.terminate()
        orphan.wait(15)
