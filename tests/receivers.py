"""A real HTTP receiver on a free port that records what it is sent (webhooks, Slack stand-in).

Responses can be scripted: ``HttpReceiver(statuses=[500, 200])`` answers the first request with
500, every later one with 200.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prefect.blocks.notifications import CustomWebhookNotificationBlock

from tests.servers import free_port


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float = field(default_factory=time.time)  # when it arrived (epoch seconds)

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class HttpReceiver:
    """Threaded HTTP server recording every request; use as a context manager or start()/stop()."""

    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    port: int = field(default_factory=free_port)
    requests: list[ReceivedRequest] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HttpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    status = (
                        receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
                    )
                    receiver.requests.append(
                        ReceivedRequest(
                            method=self.command,
                            path=self.path,
                            headers={k.lower(): v for k, v in self.headers.items()},
                            body=body,
                            status=status,
                        )
                    )
                reply = b"ok" if status < 400 else b"error"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_POST = do_PUT = do_GET = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[ReceivedRequest]:
        """The first ``count`` requests, waiting for them to arrive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests[:count])
            time.sleep(0.02)
        raise TimeoutError(f"{len(self.requests)} of {count} requests arrived in {timeout_s}s")

    def __enter__(self) -> HttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def save_slack_standin(receiver: HttpReceiver) -> str:
    """A Custom Webhook block posting Slack's incoming-webhook payload to the receiver."""
    name = f"slack-standin-{uuid.uuid4().hex[:8]}"
    CustomWebhookNotificationBlock(
        name="oncall",
        url=f"{receiver.url}/services/T000/B000/XXXX",
        json_data={"text": "*{{subject}}*\n{{body}}"},
        timeout=5,
    ).save(name)
    return f"custom-webhook/{name}"


def serve_get(port: int, respond: Any) -> ThreadingHTTPServer:
    """A threaded HTTP server on 127.0.0.1:``port`` answering each GET with
    ``respond(path) -> (status, content type, body bytes)``; stop it with shutdown() and
    server_close()."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            status, content_type, body = respond(self.path)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
