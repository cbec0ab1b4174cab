"""Throwaway HTTP services for the health and circuit-breaker tests: a dependency the test stops
and starts on one port, the actuator service (tests/programs/actuator_service.py) guarding it
with a circuit breaker, and endpoints that answer like Go services or never answer at all."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.servers import free_port, wait_for_port

PROGRAM = Path(__file__).parent / "programs" / "actuator_service.py"


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def text_handler(status: int, body: str, content_type: str = "text/plain") -> type:
    class Handler(_Quiet):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


class _Silent(_Quiet):
    """Accepts the request and never answers (a hung service whose port is open)."""

    stop = threading.Event()

    def do_GET(self) -> None:  # noqa: N802
        self.stop.wait(60)


@dataclass
class HttpService:
    """A real HTTP server in a thread of the test; stop() and start() keep its port."""

    handler: type = field(default_factory=lambda: text_handler(200, "ok"))
    port: int = field(default_factory=free_port)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HttpService:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def silent_service() -> HttpService:
    return HttpService(handler=_Silent).start()


@dataclass
class ActuatorService:
    """tests/programs/actuator_service.py as a subprocess on a free port."""

    dependency_url: str
    wait_open_s: float = 5.0
    extra: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def actuator_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/actuator"

    def start(self) -> ActuatorService:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(PROGRAM),
                "--port",
                str(self.port),
                "--dependency-url",
                self.dependency_url,
                "--wait-open-s",
                str(self.wait_open_s),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 15)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def breaker(self, name: str = "inventory") -> dict:
        answer = httpx.get(f"{self.actuator_url}/circuitbreakers", timeout=5).json()
        return answer["circuitBreakers"][name]

    def wait_for_state(self, state: str, timeout_s: float = 15, name: str = "inventory") -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = self.breaker(name)
            if seen["state"] == state:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"breaker {name} not {state} after {timeout_s}s: {seen}")
