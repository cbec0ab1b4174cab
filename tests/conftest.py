"""Fixtures: a Prefect test server, throwaway PostgreSQL and Kafka servers on free ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

# before prefect is imported: its settings are read at import; telemetry has no network here
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from prefect.settings import get_current_settings
from prefect.testing.utilities import prefect_test_harness

from blocks.kafka import KafkaCluster
from tests.moto_server import MotoServer
from tests.podman import PodmanService, start_podman
from tests.receivers import HttpReceiver
from tests.redis_server import RedisTestServer, start_redis
from tests.servers import (
    KafkaBroker,
    PostgresServer,
    ZooKeeperEnsemble,
    start_kafka,
    start_postgres,
    start_zookeeper,
)
from tests.supervisor_server import SupervisorServer, start_supervisord

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# `make test` runs the suite on two pytest processes (pytest-xdist, `--dist loadgroup`). Each
# process starts the session's servers it needs, so tests sharing a heavy server (JVMs, a whole
# Prefect topology) form one group that runs on one process and the server starts once; other
# tests are grouped by module (module-scoped fixtures start once too). Groups are handed out in
# this order: the longest first, so the two processes finish close together.
HEAVY_GROUPS = {
    "team_topology": "team",
    "flink_cluster": "flink",
    "spark_cluster": "spark",
    "zookeeper_ensemble": "zookeeper",
    "podman": "podman",
}
FIRST = ["team", "flink", "spark", "zookeeper", "podman"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (its worker hook registers later)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def group(item: pytest.Item) -> str:
        for fixture, name in HEAVY_GROUPS.items():
            if fixture in item.fixturenames:
                return name
        return item.nodeid.split("::", 1)[0]

    groups = {item.nodeid: group(item) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = groups[item.nodeid]
        if name in FIRST:
            return (0, FIRST.index(name))
        return (1 if "/integration/" in name else 2, 0)

    items.sort(key=rank)  # stable: collection order within a rank


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: `-p no:xdist` runs without it
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Refuse to run when pytest-xdist ignored the groups (every test has one, see above): it
    applies them by renaming each item's nodeid (`<id>@<group>`), which pytest 9.2 no longer lets
    it do (pyproject.toml pins below that). Ungrouped, both processes start every heavy server at
    once and the suite runs twice as loaded: the failure would show as timeouts far from here."""
    if node.config.getoption("dist", default=None) != "loadgroup":
        return
    ignored = [i for i in ids if "@" not in i.rsplit("]", 1)[-1]]
    if ignored:
        pytest.exit(
            f"pytest-xdist ignored the test groups ({len(ignored)} tests without one, e.g. "
            f"{ignored[0]}) under pytest {pytest.__version__}: tests sharing a heavy server "
            "would start it on every process; install the versions pyproject.toml pins",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of the item
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a heavy session server as soon as the next test does not need it: its group ran
    (the items are ordered so its tests are contiguous), and JVMs or a whole Prefect topology left
    idle would load the machine for the rest of the session. A later test that asks for it again
    gets a fresh one (pytest re-runs a finished fixture)."""
    for fixture in HEAVY_GROUPS:
        if fixture not in item.fixturenames:
            continue
        if nextitem is not None and fixture in nextitem.fixturenames:
            continue
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(fixture, ()):
            fixturedef.finish(request=item._request)  # type: ignore[arg-type]


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One throwaway Prefect server (SQLite) for the whole session, with the write turns that
    `runbooks up`'s server has (serving/sqlite_server.py): Prefect's stock server fails a
    deferred transaction that meets another writer with "database is locked" at once; on CI
    that answered a Slack approval with 503 and dropped a task run's record mid-test."""
    from prefect.server.api.server import SubprocessASGIServer

    stock = SubprocessASGIServer._run_uvicorn_command

    def run_ours(self: SubprocessASGIServer) -> subprocess.Popen[Any]:
        # Prefect's command (prefect 3.8.8, server/api/server.py), with our factory
        return subprocess.Popen(
            args=[
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(PROJECT_ROOT),
                "--factory",
                "serving.sqlite_server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
        )

    SubprocessASGIServer._run_uvicorn_command = run_ours  # type: ignore[method-assign]
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        SubprocessASGIServer._run_uvicorn_command = stock  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A broker shared by tests that only create their own uniquely named topics."""
    broker = start_kafka()
    yield broker
    broker.stop()


@pytest.fixture
def own_kafka_broker() -> Iterator[KafkaBroker]:
    """A broker of the test's own, for tests that pause or kill it."""
    broker = start_kafka()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def zookeeper_ensemble() -> Iterator[ZooKeeperEnsemble]:
    """A three-server ZooKeeper ensemble (Debian's zookeeper, one JVM per server)."""
    ensemble = start_zookeeper(3)
    yield ensemble
    ensemble.stop()


@pytest.fixture
def zookeeper(zookeeper_ensemble: ZooKeeperEnsemble) -> Iterator[ZooKeeperEnsemble]:
    """The session's ensemble, whole: servers a test killed are started again after it."""
    zookeeper_ensemble.wait_until_serving()
    yield zookeeper_ensemble
    zookeeper_ensemble.restore()


@pytest.fixture(scope="session")
def supervisord(kafka_broker: KafkaBroker) -> Iterator[SupervisorServer]:
    """A supervisord running the test programs (tests/supervisor_server.py); its consumer group
    reads from the session's broker, so the broker's address is in its configuration."""
    server = start_supervisord(kafka_broker.bootstrap)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def podman() -> Iterator[PodmanService]:
    """A Docker-compatible engine (podman's API service) with storage of its own; its
    containers are removed and its directory deleted at the end."""
    service = start_podman()
    yield service
    service.stop()


@pytest.fixture
def kafka_cluster(kafka_broker: KafkaBroker) -> KafkaCluster:
    return KafkaCluster(bootstrap_servers=kafka_broker.bootstrap, request_timeout_s=5)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_topic(bootstrap: str, name: str, partitions: int = 3) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result(15)
    return name


@contextlib.contextmanager
def slow_consumer_group(bootstrap: str, group: str, *, commits: bool = True) -> Iterator[str]:
    """A new topic (2 partitions) and a live member of ``group`` that commits every record it
    reads, one every 0.3 s, while a producer writes 5 a second: behind, every partition moving,
    lag growing. Yields the topic once the member committed. With ``commits=False`` the member
    commits its first record only (the broker then knows the group's partitions) and keeps
    reading without committing: the lag only grows."""
    import threading

    from confluent_kafka import Consumer, Producer

    topic = unique("clicks")
    create_topic(bootstrap, topic, partitions=2)
    stop = threading.Event()
    member = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # tansu holds a JoinGroup for the rebalance timeout (max.poll.interval.ms)
            "max.poll.interval.ms": 6000,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    member.subscribe([topic])
    committed = threading.Event()

    def produce() -> None:
        producer = Producer({"bootstrap.servers": bootstrap})
        while not stop.is_set():
            for p in (0, 1):
                producer.produce(topic, b"x", partition=p)
            producer.flush(5)
            time.sleep(0.4)

    def consume() -> None:
        while not stop.is_set():
            record = member.poll(0.2)
            if record is not None and not record.error():
                if commits or not committed.is_set():
                    member.commit(record, asynchronous=False)
                committed.set()
                time.sleep(0.3)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    try:
        assert committed.wait(30), f"the member of {group} never committed"
        time.sleep(1)
        yield topic
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        member.close()


def produce_one_per_batch(bootstrap: str, topic: str, values: list[bytes], partition: int | None = None) -> None:
    """Produce each value as its own batch.

    tansu 0.6 reports a partition's high watermark as its last batch's base offset + 1, so
    multi-record batches make the log end look shorter than it is (the records are all there).
    Tests that measure offsets or lag produce one record per batch.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for value in values:
        if partition is None:
            producer.produce(topic, value=value)
        else:
            producer.produce(topic, value=value, partition=partition)
        assert producer.flush(10) == 0


def _artifacts(flow_run_id: object, kind: str) -> list[dict[str, Any]]:
    """A flow run's artifacts of one type (every version), from the API."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    # raw API: prefect 3.8.8's client.read_artifacts sends null filters the server rejects
    resp = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}, "type": {"any_": [kind]}}},
        timeout=10,
    )
    resp.raise_for_status()
    return resp.json()


def _latest_artifact(flow_run_id: object, kind: str) -> str:
    artifacts = _artifacts(flow_run_id, kind)
    assert artifacts, f"no {kind} artifact"
    assert len({r["key"] for r in artifacts}) == 1, f"one {kind} artifact per run, under one key"
    return max(artifacts, key=lambda r: r["created"])["data"]


def read_incident_report(flow_run_id: object) -> str:
    """The latest markdown incident report a flow run published (a run waiting for approval
    publishes an interim version first: same key, newer version)."""
    return _latest_artifact(flow_run_id, "markdown")


def read_actions_table(flow_run_id: object, timeout_s: float = 20) -> list[dict[str, Any]]:
    """Each change a run planned, with its before and after state, from its audit trail.

    The ``runbook.action.*`` events carry every change's detail (the table artifact only
    summarizes them for people): "before" is the detail the plan recorded, "after" what the
    system showed once the change was applied. Events are stored asynchronously: the rows are
    read once the events of every change the run's table artifact lists are in (with their
    outcomes, except a dry-run's plan); at ``timeout_s``, whatever came.
    """
    import time
    from datetime import UTC, datetime, timedelta

    from prefect.settings import PREFECT_API_URL

    from tests.gateway_proc import read_events

    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    deadline = time.monotonic() + timeout_s
    # how many changes the run's table artifact counts (written through the API before the run
    # ended, not as events), and how many of them have an outcome (all but a dry-run's): the
    # events of every one are awaited, not only of those that came first
    table = _changes_in_table(flow_run_id)
    # no table (yet): every planned change that came has its outcome
    want_rows, want_outcomes = table if table is not None else (1, None)
    while True:
        events = read_events(
            PREFECT_API_URL.value(),
            {
                "occurred": {"since": since},
                "event": {"prefix": ["runbook.action."]},
                "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            },
        )
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        outcomes: dict[tuple[str, str], tuple[str, Any]] = {}
        for event in sorted(events, key=lambda e: e["occurred"]):
            status = event["event"].removeprefix("runbook.action.")
            action = event["payload"]["action"]
            for change in event["payload"]["changes"]:
                key = (action, change["target"])
                if status == "planned":
                    rows[key] = {"action": action, "target": change["target"],
                                 "before": change["detail"], "after": None, "status": "planned"}
                else:
                    outcomes[key] = (status, change["detail"])
        done = sum(k in outcomes for k in rows)
        if want_outcomes is None:
            complete = bool(rows) and done == len(rows)
        else:
            complete = len(rows) >= want_rows and done >= want_outcomes
        if complete:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key, row in rows.items():
        status, detail = outcomes.get(key, ("planned", None))
        row["status"] = "applied" if status == "executed" else status
        row["after"] = detail if status == "executed" else None
    return list(rows.values())


def _changes_in_table(flow_run_id: object) -> tuple[int, int] | None:
    """How many changes (targets) a run's latest actions table artifact lists, and how many of
    them were carried out or refused (not a dry-run's plan); None without a table."""
    import json

    if not (artifacts := _artifacts(flow_run_id, "table")):
        return None
    data = max(artifacts, key=lambda r: r["created"])["data"]
    table = json.loads(data) if isinstance(data, str) else data
    planned_only = [row for row in table if row["status"].startswith("planned (dry-run)")]
    total = sum(int(row["n"]) for row in table)
    return total, total - sum(int(row["n"]) for row in planned_only)


def read_flow_run(flow_run_id: object) -> dict:
    """A flow run as the API (and the UI) shows it: name, tags, state."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    resp = httpx.get(f"{PREFECT_API_URL.value()}/flow_runs/{flow_run_id}", timeout=10)
    resp.raise_for_status()
    return resp.json()


def read_run_logs(flow_run_id: object, timeout_s: float = 20) -> list[dict]:
    """A finished flow run's logs from the API, once its last line ("Finished in state") is in:
    the run's log handler ships them in batches."""
    import time

    import httpx
    from prefect.settings import PREFECT_API_URL

    deadline = time.monotonic() + timeout_s
    while True:
        resp = httpx.post(
            f"{PREFECT_API_URL.value()}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "TIMESTAMP_ASC"},
            timeout=10,
        )
        resp.raise_for_status()
        logs = resp.json()
        if any(log["message"].startswith("Finished in state") for log in logs):
            return logs
        assert time.monotonic() < deadline, f"the run's last log line never arrived: {logs}"
        time.sleep(0.3)


@pytest.fixture(scope="session")
def deployment_ids(prefect_server: None) -> dict[str, str]:
    """Every deployment of prefect.yaml applied (not served) to the test server, by name."""
    import time

    from deployments.catalog import load_catalog, to_runner_deployments

    specs = load_catalog()
    ids = {spec.name: str(d.apply()) for spec, d in zip(specs, to_runner_deployments(specs), strict=True)}
    # automations are loaded by the server's trigger service shortly after creation
    time.sleep(2)
    return ids


def runs_of(deployment_id: str) -> list[dict]:
    """Flow runs of a deployment, from the test server's API."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    resp = httpx.post(
        f"{PREFECT_API_URL.value()}/flow_runs/filter",
        json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}},
        timeout=10,
    )
    resp.raise_for_status()
    return resp.json()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """A moto server (AWS stand-in: SNS, SQS) for the session."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def slack() -> Iterator[HttpReceiver]:
    """A local HTTP receiver standing in for Slack's incoming webhook."""
    with HttpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisTestServer]:
    """A Redis primary (password, the runbook's ACL user) and a replica for the session."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[Any]:
    """A throwaway MariaDB 10.11; each test module makes its own database and users."""
    from tests.mariadb_server import start_mariadb

    server = start_mariadb()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def flink_cluster() -> Iterator[Any]:
    """A real Flink 2.3 session cluster (tests/flink_cluster.py): one JobManager, one
    TaskManager with 4 slots, checkpoints every 2 s retained on cancellation, restart strategy
    none. Tests run jobs of their own names and cancel them afterwards (``cancel_all``)."""
    from tests.flink_cluster import start_flink

    cluster = start_flink()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def prometheus() -> Iterator[Any]:
    """A real Prometheus scraping a test exporter every second (tests/prometheus_server.py); tests
    set series with labels of their own."""
    from tests.prometheus_server import start_prometheus

    server = start_prometheus()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spark_cluster() -> Iterator[Any]:
    """A real Spark standalone master (REST submission on) and one small worker for the session
    (tests/spark_cluster.py); tests submit their own uniquely named applications."""
    from tests.spark_cluster import start_spark

    cluster = start_spark()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def team_topology() -> Iterator[Any]:
    """A team's Prefect topology (tests/team_topology.py): PostgreSQL, Redis, two API servers
    (one with services, one without), `runbooks deploy` applied, two stock process workers."""
    from tests.team_topology import start_team_topology

    topology = start_team_topology()
    yield topology
    topology.stop()
