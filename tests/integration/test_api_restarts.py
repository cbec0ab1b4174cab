"""serving/api_restarts.py against Prefect's real clients and server: a new client's first request
to an API server that is down waits for it to come back (with the patch) or fails at once
(without: Prefect 3.8.8's own behavior, which this pins). The server "comes back" as a forwarder
to the session's Prefect server that starts listening on its port once the client is retrying.
The whole path (a run's process started while its API server restarts) is
tests/integration/test_fast_worker.py::test_run_started_while_its_api_server_restarts_completes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from prefect.settings import PREFECT_API_URL

from tests.servers import free_port
from tests.team_topology import PROJECT_ROOT
from tests.tls_proxy import copy_stream

pytestmark = pytest.mark.integration

# a new client (sync or async), its first request: read the server's hello
PROGRAM = """
import asyncio, logging, sys, time
from prefect.client.orchestration import get_client
retries = logging.getLogger("prefect.client")  # where Prefect's client logs each retry
retries.addHandler(logging.StreamHandler(sys.stdout))
retries.setLevel(logging.DEBUG)
if sys.argv[1] == "tolerant":
    from serving.api_restarts import tolerate_api_restarts
    tolerate_api_restarts()
started = time.monotonic()
if sys.argv[2] == "sync":
    with get_client(sync_client=True) as client:
        client.hello().raise_for_status()
else:
    async def main():
        async with get_client() as client:
            (await client.hello()).raise_for_status()
    asyncio.run(main())
print(f"answered after {time.monotonic() - started:.1f}s")
"""
RETRY = "Another attempt will be made"  # Prefect's client, at each retry it waits for


class LateForwarder:
    """Listens on ``port`` only once ``open()`` is called, then forwards each connection to the
    session's Prefect server: an API server restarting (connections refused, then served)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self._server: socket.socket | None = None

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                upstream = socket.create_connection(self.upstream, timeout=10)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=copy_stream, args=(a, b), daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
def late() -> Iterator[LateForwarder]:
    api = urlsplit(PREFECT_API_URL.value())
    forwarder = LateForwarder((api.hostname or "127.0.0.1", api.port or 80))
    yield forwarder
    forwarder.close()


def _client(late: LateForwarder, mode: str, kind: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PROGRAM, mode, kind],
        cwd=PROJECT_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(PROJECT_ROOT),
            "PREFECT_API_URL": f"http://127.0.0.1:{late.port}/api",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_first_request_waits_for_a_restarting_server(late: LateForwarder, kind: str) -> None:
    """The server comes back once the client has met a refused connection and is waiting to
    retry it."""
    proc = _client(late, "tolerant", kind)
    assert proc.stdout is not None
    seen = ""
    while RETRY not in seen and (line := proc.stdout.readline()):
        seen += line
    assert RETRY in seen, f"gave up while the server was down: {seen}{proc.communicate()}"
    late.open()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "answered after" in out, out


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_without_it_the_first_refused_connection_fails_at_once(
    late: LateForwarder, kind: str
) -> None:
    """Prefect's behavior the patch changes (if Prefect starts retrying by itself, this fails
    and the patch can go)."""
    out, err = _client(late, "plain", kind).communicate(timeout=60)
    assert "ConnectError" in err, (out, err[-3000:])
    assert RETRY not in out, out


def test_a_server_that_stays_down_still_fails_the_request(late: LateForwarder) -> None:
    """Bounded by Prefect's retries (here 1: one 2 s backoff), then the error as before."""
    proc = _client(late, "tolerant", "sync", PREFECT_CLIENT_MAX_RETRIES="1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "ConnectError" in err, (out, err[-3000:])
    assert out.count(RETRY) == 1, out
