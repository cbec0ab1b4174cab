"""A real Prometheus Alertmanager (Debian `prometheus-alertmanager`) on a free port, for tests.

It runs the example configuration (examples/alertmanager.yml) with the gateway receiver pointed at
the test's gateway and timings cut from minutes to fractions of a second. Tests put alerts in through
its v2 API, as Prometheus does, and Alertmanager sends its real webhook notifications.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deployments.catalog import PROJECT_ROOT
from tests.servers import free_port

EXAMPLE_CONFIG = PROJECT_ROOT / "examples" / "alertmanager.yml"
GATEWAY_RECEIVER = "runbooks-gateway"
HTTP_TIMEOUT_S = 10.0


def gateway_config(webhook_url: str, token_file: Path, base: Path = EXAMPLE_CONFIG) -> dict[str, Any]:
    """The example configuration, notifying `webhook_url` with the bearer token in `token_file`.

    Every route waits 200 ms before a group's first notification and 1 s between the next ones
    (instead of seconds and minutes), so a test sees firing and resolved notifications quickly.
    """
    config = yaml.safe_load(base.read_text())
    receiver = next(r for r in config["receivers"] if r["name"] == GATEWAY_RECEIVER)
    (webhook,) = receiver["webhook_configs"]
    webhook["url"] = webhook_url
    webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="200ms", group_interval="1s")
    return config


def firing(labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An alert as Prometheus posts it: started now, no end (Alertmanager applies resolve_timeout)."""
    return {
        "labels": labels,
        "annotations": annotations or {},
        "startsAt": _rfc3339(datetime.now(UTC)),
        "generatorURL": "http://prometheus.test:9090/graph",
    }


def resolved(alert: dict[str, Any]) -> dict[str, Any]:
    """The same alert, ended now: Alertmanager marks it resolved and notifies.

    The end must be after the start (Alertmanager answers 400 otherwise), also when the alert
    is resolved within moments of firing.
    """
    started = datetime.fromisoformat(alert["startsAt"])
    while (now := datetime.now(UTC)) <= started:
        time.sleep((started - now).total_seconds() + 0.01)
    return {**alert, "endsAt": _rfc3339(now)}


@dataclass
class Alertmanager:
    """A running Alertmanager process and its v2 API."""

    port: int
    workdir: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        resp = httpx.post(f"{self.url}/api/v2/alerts", json=alerts, timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()

    def alerts(self) -> list[dict[str, Any]]:
        """The firing alerts Alertmanager holds (the API leaves resolved ones out), with fingerprints."""
        resp = httpx.get(f"{self.url}/api/v2/alerts", timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        return resp.json()

    def fingerprint(self, labels: dict[str, str]) -> str:
        """Alertmanager's fingerprint of the alert with exactly these labels."""
        found = [a["fingerprint"] for a in self.alerts() if a["labels"] == labels]
        assert len(found) == 1, f"Alertmanager holds {len(found)} alerts with labels {labels}"
        return found[0]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of one of Alertmanager's own metrics whose labels include `labels`."""
        return scrape_metric(f"{self.url}/metrics", name, **labels)

    def log(self) -> str:
        return (self.workdir / "alertmanager.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_alertmanager(config: dict[str, Any], startup_timeout_s: float = 30.0) -> Alertmanager:
    """Start Alertmanager with `config` on a free 127.0.0.1 port; return once it reports ready.

    No gossip (empty cluster address): a lone instance notifies at once instead of waiting for peers.
    """
    binary = shutil.which("prometheus-alertmanager")
    if binary is None:
        raise RuntimeError("prometheus-alertmanager not found: run `make test` (installs it)")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="runbooks-alertmanager-"))
    config_file = workdir / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    with (workdir / "alertmanager.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
             "--log.level=debug"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = Alertmanager(port=port, workdir=workdir, proc=proc)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            message = server.log()
            server.stop()
            raise RuntimeError(f"alertmanager exited with {proc.returncode}:\n{message}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                return server
        time.sleep(0.05)
    server.stop()
    raise TimeoutError(f"alertmanager not ready on port {port} after {startup_timeout_s}s")


@contextlib.contextmanager
def running_alertmanager(config: dict[str, Any]) -> Iterator[Alertmanager]:
    server = start_alertmanager(config)
    try:
        yield server
    finally:
        server.stop()


def scrape_metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` (a counter's `_total` included) whose labels include `labels`."""
    resp = httpx.get(url, timeout=HTTP_TIMEOUT_S)
    resp.raise_for_status()
    return sum(
        sample.value
        for family in text_string_to_metric_families(resp.text)
        for sample in family.samples
        if sample.name in (name, f"{name}_total") and labels.items() <= sample.labels.items()
    )


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
