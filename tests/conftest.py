"""Fixtures: a Prefect test server, throwaway PostgreSQL and Kafka servers on free ports."""

from __future__ import annotations

import contextlib
import os
import time

# before prefect is imported: its settings are read at import; telemetry has no network here
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
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


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One throwaway Prefect server (SQLite) for the whole session."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


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


def _latest_artifact(flow_run_id: object, kind: str) -> str:
    import httpx
    from prefect.settings import PREFECT_API_URL

    # raw API: prefect 3.8.8's client.read_artifacts sends null filters the server rejects
    resp = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}, "type": {"any_": [kind]}}},
        timeout=10,
    )
    resp.raise_for_status()
    artifacts = resp.json()
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
    read once every planned change has its outcome.
    """
    import time
    from datetime import UTC, datetime, timedelta

    from prefect.settings import PREFECT_API_URL

    from tests.gateway_proc import read_events

    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    deadline = time.monotonic() + timeout_s
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
        if rows and all(k in outcomes for k in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key, row in rows.items():
        status, detail = outcomes.get(key, ("planned", None))
        row["status"] = "applied" if status == "executed" else status
        row["after"] = detail if status == "executed" else None
    return list(rows.values())


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
