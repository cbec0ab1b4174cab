"""A small service guarding its dependency with a Resilience4j-like circuit breaker, serving the
Spring Boot actuator endpoints the circuit-breaker-open runbook reads.

``python actuator_service.py --port P --dependency-url URL [--breaker NAME] [--idle-breaker NAME]
[--failure-rate-threshold 50] [--window 10] [--min-calls 5] [--wait-open-s 2]
[--half-open-calls 3] [--call-interval-s 0.2] [--call-timeout-s 0.5] [--forced-open]``

A worker thread calls ``--dependency-url`` every ``--call-interval-s`` through the breaker (the
service's own traffic). The breaker is Resilience4j's state machine with a count-based sliding
window: CLOSED opens when at least ``--min-calls`` calls are buffered and the failure rate reaches
the threshold; OPEN refuses calls (NOT_PERMITTED) and moves to HALF_OPEN after ``--wait-open-s``
(automaticTransitionFromOpenToHalfOpenEnabled); HALF_OPEN lets ``--half-open-calls`` trial calls
through and closes when their failure rate is under the threshold, else opens again.

- ``GET /actuator/circuitbreakers``: ``{"circuitBreakers": {name: {failureRate: "100.0%", ...,
  state}}}``, Resilience4j's CircuitBreakerDetails.
- ``GET /actuator/circuitbreakerevents[/NAME]``: ``{"circuitBreakerEvents": [...]}``, its
  CircuitBreakerEventDTO (creationTime as Java's ZonedDateTime prints it), the newest
  ``--events-buffer`` events per breaker.
- ``GET /actuator/health``: Spring Boot's composite health: ``dependency`` (DOWN with the error
  while the dependency does not answer) and Resilience4j's ``circuitBreakers`` indicator
  (CIRCUIT_OPEN / CIRCUIT_HALF_OPEN); 503 when DOWN.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def java_time() -> str:
    """ZonedDateTime.now(ZoneId.of("Etc/UTC")).toString(): nanoseconds, Z, the zone id."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}123Z[Etc/UTC]"


class Breaker:
    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.threshold = args.failure_rate_threshold
        self.window = args.window
        self.min_calls = args.min_calls
        self.wait_open_s = args.wait_open_s
        self.half_open_calls = args.half_open_calls
        self.state = "CLOSED"
        self.outcomes: deque[bool] = deque(maxlen=self.window)  # True: failed
        self.needed = self.min_calls  # calls buffered before a failure rate is computed
        self.not_permitted = 0
        self.opened_at = 0.0
        self.trials = 0
        self.events: deque[dict] = deque(maxlen=args.events_buffer)
        self.lock = threading.Lock()

    def _event(self, type_: str, **fields: object) -> None:
        self.events.append(
            {
                "circuitBreakerName": self.name,
                "type": type_,
                "creationTime": java_time(),
                "errorMessage": fields.get("errorMessage"),
                "durationInMs": fields.get("durationInMs"),
                "stateTransition": fields.get("stateTransition"),
            }
        )

    def _to(self, state: str) -> None:
        self._event("STATE_TRANSITION", stateTransition=f"{self.state}_TO_{state}")
        self.state = state
        if state == "OPEN":
            self.opened_at = time.monotonic()  # keeps the window that opened it (its metrics)
        else:
            size = self.half_open_calls if state == "HALF_OPEN" else self.window
            self.outcomes = deque(maxlen=size)
            self.needed = self.half_open_calls if state == "HALF_OPEN" else self.min_calls
            self.trials = 0
            self.not_permitted = 0 if state == "CLOSED" else self.not_permitted

    def failure_rate(self) -> float:
        if len(self.outcomes) < self.needed:
            return -1.0
        return round(100.0 * sum(self.outcomes) / len(self.outcomes), 1)

    def acquire(self) -> bool:
        with self.lock:
            if self.state == "OPEN" and time.monotonic() - self.opened_at >= self.wait_open_s:
                self._to("HALF_OPEN")
            if self.state in ("OPEN", "FORCED_OPEN") or (
                self.state == "HALF_OPEN" and self.trials >= self.half_open_calls
            ):
                self.not_permitted += 1
                self._event("NOT_PERMITTED")
                return False
            if self.state == "HALF_OPEN":
                self.trials += 1
            return True

    def record(self, failed: bool, duration_ms: int, error: str | None) -> None:
        with self.lock:
            self.outcomes.append(failed)
            if failed:
                self._event("ERROR", errorMessage=error, durationInMs=duration_ms)
            else:
                self._event("SUCCESS", durationInMs=duration_ms)
            rate = self.failure_rate()
            if rate < 0:
                return
            if self.state == "CLOSED" and rate >= self.threshold:
                self._to("OPEN")
            elif self.state == "HALF_OPEN":
                self._to("OPEN" if rate >= self.threshold else "CLOSED")

    def details(self) -> dict:
        with self.lock:
            if self.state == "OPEN" and time.monotonic() - self.opened_at >= self.wait_open_s:
                self._to("HALF_OPEN")  # automatic transition: a timer, not the next call
            return {
                "failureRate": f"{self.failure_rate()}%",
                "slowCallRate": "0.0%" if len(self.outcomes) >= self.needed else "-1.0%",
                "failureRateThreshold": f"{float(self.threshold)}%",
                "slowCallRateThreshold": "100.0%",
                "bufferedCalls": len(self.outcomes),
                "failedCalls": sum(self.outcomes),
                "slowCalls": 0,
                "slowFailedCalls": 0,
                "notPermittedCalls": self.not_permitted,
                "state": self.state,
            }


def call_dependency(url: str, timeout_s: float) -> str | None:
    """None when the dependency answered 2xx, else the error as Java's Throwable.toString()."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - test URL
            response.read()
        return None
    except urllib.error.HTTPError as exc:
        return f"org.springframework.web.client.HttpServerErrorException: {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError) or "refused" in str(reason):
            return "java.net.ConnectException: Connection refused"
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return "java.net.SocketTimeoutException: Read timed out"
        return f"java.io.IOException: {reason}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dependency-url", required=True)
    parser.add_argument("--breaker", default="inventory")
    parser.add_argument("--idle-breaker", action="append", default=[])
    parser.add_argument("--failure-rate-threshold", type=float, default=50.0)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--min-calls", type=int, default=5)
    parser.add_argument("--wait-open-s", type=float, default=2.0)
    parser.add_argument("--half-open-calls", type=int, default=3)
    parser.add_argument("--call-interval-s", type=float, default=0.2)
    parser.add_argument("--call-timeout-s", type=float, default=0.5)
    parser.add_argument("--events-buffer", type=int, default=100)
    parser.add_argument(
        "--forced-open", action="store_true", help="start FORCED_OPEN (as an operator left it)"
    )
    args = parser.parse_args()

    guarded = Breaker(args.breaker, args)
    if args.forced_open:
        guarded._to("FORCED_OPEN")
    breakers = {b.name: b for b in [guarded, *(Breaker(n, args) for n in args.idle_breaker)]}
    last_error: list[str | None] = [None]

    def traffic() -> None:
        while True:
            if guarded.acquire():
                started = time.monotonic()
                error = call_dependency(args.dependency_url, args.call_timeout_s)
                last_error[0] = error
                guarded.record(error is not None, int((time.monotonic() - started) * 1000), error)
            time.sleep(args.call_interval_s)

    def health() -> tuple[int, dict]:
        error = call_dependency(args.dependency_url, args.call_timeout_s)
        dependency = {"status": "UP", "details": {"url": args.dependency_url}}
        if error:
            dependency = {"status": "DOWN", "details": {"url": args.dependency_url, "error": error}}
        cb_details = {}
        for name, b in breakers.items():
            d = b.details()
            status = {"OPEN": "CIRCUIT_OPEN", "HALF_OPEN": "CIRCUIT_HALF_OPEN"}.get(
                d["state"], "UP"
            )
            cb_details[name] = {"status": status, "details": d}
        status = "DOWN" if error else "UP"
        return (503 if status == "DOWN" else 200), {
            "status": status,
            "components": {
                "circuitBreakers": {"status": "UP", "details": cb_details},
                "dependency": dependency,
                "diskSpace": {"status": "UP", "details": {"total": 1, "free": 1}},
                "ping": {"status": "UP"},
            },
        }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urlsplit(self.path).path.rstrip("/")
            if path == "/actuator/circuitbreakers":
                self._json(200, {"circuitBreakers": {n: b.details() for n, b in breakers.items()}})
            elif path == "/actuator/circuitbreakerevents":
                events = [e for b in breakers.values() for e in list(b.events)]
                events.sort(key=lambda e: e["creationTime"])
                self._json(200, {"circuitBreakerEvents": events})
            elif path.startswith("/actuator/circuitbreakerevents/"):
                name = unquote(path.rsplit("/", 1)[1])
                b = breakers.get(name)
                self._json(200, {"circuitBreakerEvents": list(b.events) if b else []})
            elif path == "/actuator/health":
                self._json(*health())
            else:
                self._json(404, {"status": 404, "error": "Not Found", "path": path})

        def _json(self, status: int, document: dict) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.spring-boot.actuator.v3+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    threading.Thread(target=traffic, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"actuator service on 127.0.0.1:{args.port} pid={os.getpid()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
