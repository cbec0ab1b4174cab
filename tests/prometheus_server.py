"""A real Prometheus (Debian `prometheus`) on a free port, scraping a test exporter every second.

The exporter serves series the test sets, with values that move the way real ones do: a counter
grows at the rate the test gives it, a histogram's buckets grow at per-bucket rates, so `rate()`,
`increase()` and `histogram_quantile()` over a window of a few seconds give known answers once
Prometheus has scraped twice. Tests share the session's server and keep apart by giving their
series labels of their own (``unique``).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.receivers import serve_get
from tests.servers import free_port

SCRAPE_INTERVAL_S = 1


def _labels_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Counter:
    per_second: float
    base: float
    since: float

    def value(self, now: float) -> float:
        return self.base + self.per_second * (now - self.since)


@dataclass
class MetricsExporter:
    """An exporter whose series the test sets; served at ``url`` in the text exposition format."""

    port: int = field(default_factory=free_port)
    _gauges: dict[Key, float] = field(default_factory=dict)
    _counters: dict[Key, _Counter] = field(default_factory=dict)
    _histograms: dict[Key, dict[float, _Counter]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def _key(name: str, labels: dict[str, str]) -> Key:
        return name, tuple(sorted(labels.items()))

    def set_gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        with self._lock:
            self._gauges[self._key(name, labels)] = value

    def set_rate(self, name: str, labels: dict[str, str], per_second: float) -> None:
        """Counter ``name`` (ending in _total) grows by ``per_second`` from now on, continuing
        from where it is (a counter never goes down)."""
        now = time.time()
        with self._lock:
            key = self._key(name, labels)
            old = self._counters.get(key)
            self._counters[key] = _Counter(per_second, old.value(now) if old else 0.0, now)

    def set_histogram(
        self, name: str, labels: dict[str, str], per_second_by_bucket: dict[float, float]
    ) -> None:
        """Histogram ``name`` observes, every second, ``n`` values in each bucket ``(prev, le]``
        for ``le: n`` (``math.inf`` for above the last bound). The cumulative buckets, _count and
        _sum (each observation counted at its bucket's upper bound) are served."""
        now = time.time()
        with self._lock:
            key = self._key(name, labels)
            old = self._histograms.get(key, {})
            self._histograms[key] = {
                le: _Counter(rate, old[le].value(now) if le in old else 0.0, now)
                for le, rate in per_second_by_bucket.items()
            } | {le: _Counter(0.0, c.value(now), now) for le, c in old.items() if le not in per_second_by_bucket}

    def set_latency(self, name: str, labels: dict[str, str], seconds: float, per_second: float = 50) -> None:
        """A latency histogram whose every observation falls in the bucket ending at
        ``seconds``: its p99 by histogram_quantile is just under ``seconds`` (0.99 of the way
        from the previous bound, 0.8 x seconds)."""
        self.set_histogram(name, labels, {0.8 * seconds: 0.0, seconds: per_second, math.inf: 0.0})

    def remove(self, name: str, labels: dict[str, str]) -> None:
        with self._lock:
            key = self._key(name, labels)
            self._gauges.pop(key, None)
            self._counters.pop(key, None)
            self._histograms.pop(key, None)

    def render(self) -> str:
        now = time.time()
        lines: list[str] = []
        with self._lock:
            for (name, labels), value in sorted(self._gauges.items()):
                lines.append(f"{name}{_labels_text(dict(labels))} {value!r}")
            for (name, labels), counter in sorted(self._counters.items()):
                lines.append(f"{name}{_labels_text(dict(labels))} {counter.value(now)!r}")
            for (name, labels), buckets in sorted(self._histograms.items()):
                cumulative = 0.0
                total = 0.0
                for le in sorted(buckets):
                    observed = buckets[le].value(now)
                    cumulative += observed
                    if math.isfinite(le):
                        total += observed * le
                    bound = "+Inf" if math.isinf(le) else repr(le)
                    lines.append(
                        f"{name}_bucket{_labels_text(dict(labels) | {'le': bound})} {cumulative!r}"
                    )
                if math.inf not in buckets:
                    lines.append(f"{name}_bucket{_labels_text(dict(labels) | {'le': '+Inf'})} {cumulative!r}")
                lines.append(f"{name}_count{_labels_text(dict(labels))} {cumulative!r}")
                lines.append(f"{name}_sum{_labels_text(dict(labels))} {total!r}")
        return "\n".join(lines) + "\n"

    def start(self) -> MetricsExporter:
        self._server = serve_get(
            self.port, lambda path: (200, "text/plain; version=0.0.4", self.render().encode())
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class PrometheusTestServer:
    port: int
    workdir: Path
    proc: subprocess.Popen
    exporter: MetricsExporter

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def wait_for(
        self,
        expr: str,
        until: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``until(result)``; the result. For a test's setup: the series it
        set must be in Prometheus (scraped, enough samples for its window) before a run reads."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if until(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr!r} still {result} after {timeout_s}s")

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.exporter.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_prometheus(startup_timeout_s: float = 60.0) -> PrometheusTestServer:
    """Prometheus on a free 127.0.0.1 port scraping a fresh exporter every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus not found: run `make test` (installs it)")
    exporter = MetricsExporter().start()
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="runbooks-prometheus-"))
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "test-exporter", "honor_labels": True,
             "static_configs": [{"targets": [exporter.target]}]}
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (workdir / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = PrometheusTestServer(port=port, workdir=workdir, proc=proc, exporter=exporter)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            message = server.log()
            server.stop()
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{message[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"prometheus not ready on port {port} after {startup_timeout_s}s")


@contextlib.contextmanager
def running_prometheus() -> Iterator[PrometheusTestServer]:
    server = start_prometheus()
    try:
        yield server
    finally:
        server.stop()
