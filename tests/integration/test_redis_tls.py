"""redis-degraded over TLS to a real redis-server listening only on --tls-port (certificates of a
test CA, tests/tls_proxy.py): with the block's CA the run reads the server; without it (the
system's CAs) or without TLS the connection fails with a clear reason and nothing is done."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from blocks.redis import RedisServer
from flows.redis.redis_degraded import RedisDegradedParams, redis_degraded
from runbooks.errors import Escalation
from runbooks.report import Outcome
from tests.conftest import read_run_logs, unique
from tests.servers import free_port, wait_for_port
from tests.tls_proxy import TestPki, write_test_pki

pytestmark = pytest.mark.integration

PASSWORD = "tls-test-password"


@dataclass
class TlsRedis:
    port: int
    pki: TestPki


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    home: Path = tmp_path_factory.mktemp("redis-tls")
    pki = write_test_pki(home)
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(home),
        ],
        stdout=(home / "log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, 15)
        yield TlsRedis(port, pki)
    finally:
        proc.terminate()
        proc.wait(15)


def run(server: TlsRedis, **block_fields):
    name = unique("redis-tls")
    fields = {
        "host": "127.0.0.1",
        "port": server.port,
        "password": PASSWORD,
        "socket_connect_timeout_s": 2,
        "socket_timeout_s": 3,
        "retries": 0,
    }
    RedisServer(**(fields | block_fields)).save(name, overwrite=True)
    params = RedisDegradedParams(redis_block=name, sample_window_s=0.2, ping_samples=2)
    return redis_degraded(params=params, return_state=True)


def test_tls_with_the_servers_ca_reads_it(tls_redis: TlsRedis) -> None:
    state = run(tls_redis, tls=True, tls_ca_file=str(tls_redis.pki.ca))
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.outcome is Outcome.NO_ACTION_NEEDED
    assert summary.before is not None and summary.before.connected_clients >= 1


@pytest.mark.parametrize(
    ("block_fields", "reason"),
    [
        ({"tls": True}, "certificate verify failed"),  # the system's CAs do not know the test CA
        ({"tls": False}, "Connection"),  # plain text to a TLS port
    ],
)
def test_tls_mismatch_is_a_clear_failure(tls_redis: TlsRedis, block_fields, reason) -> None:
    state = run(tls_redis, **block_fields)
    assert state.is_failed()
    with pytest.raises(Escalation, match="does not answer") as failure:
        state.result()
    assert reason in str(failure.value)
    assert PASSWORD not in str(failure.value)
    if block_fields["tls"]:  # a certificate that does not verify would only fail again
        logs = [log["message"] for log in read_run_logs(state.state_details.flow_run_id)]
        assert not [m for m in logs if "Retry" in m], logs
    # and the server is fine: a client with the CA still gets in
    with redis.Redis(
        host="127.0.0.1",
        port=tls_redis.port, password=PASSWORD, ssl=True, ssl_ca_certs=str(tls_redis.pki.ca)
    ) as client:
        assert client.ping()
