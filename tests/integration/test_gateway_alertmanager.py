"""Real Alertmanager -> alert gateway -> Prefect: alerts put into Alertmanager start the matching
runbook with parameters from their labels, their resolution reaches Prefect, alerts without a
runbook never leave Alertmanager, and a wrong token starts nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from flows.edge_gateway.stadium_network_flap import StadiumNetworkFlapParams
from flows.kafka.kafka_cluster_down import KafkaClusterDownParams
from flows.postgres.db_connection_pool_exhausted import ConnectionPoolParams
from runbooks.waiting import poll_until
from tests.alertmanager import (
    Alertmanager,
    firing,
    gateway_config,
    resolved,
    running_alertmanager,
)
from tests.conftest import runs_of, unique
from tests.gateway_proc import TOKEN, GatewayProcess, metric

pytestmark = pytest.mark.integration

# automation -> flow run takes about a second; generous for a loaded 2-core machine
RUN_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m alert_gateway` on a free port, forwarding to the session's Prefect server."""
    process = GatewayProcess(
        spool_path=tmp_path_factory.mktemp("gateway") / "spool.sqlite3",
        prefect_api_url=PREFECT_API_URL.value(),
    )
    process.start()
    try:
        yield process.url
    finally:
        process.kill()


@pytest.fixture(scope="module")
def alertmanager(gateway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    """examples/alertmanager.yml, notifying the test gateway with the right token."""
    token_file = tmp_path_factory.mktemp("alertmanager") / "gateway.token"
    token_file.write_text(TOKEN + "\n")
    with running_alertmanager(gateway_config(f"{gateway}/alerts/alertmanager", token_file)) as am:
        yield am


def test_alerts_start_their_runbooks_and_resolution_reaches_prefect(
    alertmanager: Alertmanager, gateway: str, deployment_ids: dict[str, str]
) -> None:
    tag = unique("am")  # fresh fingerprints: the session's Prefect server outlives this test
    pool = {
        "alertname": "PostgresTooManyConnections",
        "database": "orders-db",
        "severity": "warning",
        "test": tag,
    }
    broker = {
        "alertname": "KafkaBrokerDown",
        "kafka_cluster": "prod-kafka",
        "namespace": "streaming",
        "severity": "critical",
        "test": tag,
    }
    no_runbook = {"alertname": "DiskAlmostFull", "severity": "warning", "test": tag}
    received_before = metric(gateway, "runbooks_gateway_alerts_received")

    pool_alert = firing(pool, {"summary": "orders-db uses 83% of max_connections"})
    broker_alert = firing(broker)
    alertmanager.post_alerts([pool_alert, broker_alert, firing(no_runbook)])

    pool_run = _wait_for_run(deployment_ids["db-connection-pool-exhausted"], alertmanager, pool)
    params = ConnectionPoolParams.model_validate(pool_run["parameters"]["params"])
    assert params.db_block == "orders-db"
    assert params.alert.severity == "warning"
    assert params.dry_run is False
    assert_alert_context(params, alertmanager, pool_alert)

    broker_run = _wait_for_run(deployment_ids["kafka-cluster-down"], alertmanager, broker)
    params = KafkaClusterDownParams.model_validate(broker_run["parameters"]["params"])
    assert (params.kafka_block, params.namespace) == ("prod-kafka", "streaming")
    assert_alert_context(params, alertmanager, broker_alert)

    # the alert without a runbook went to the root `null` receiver, not to the gateway
    assert metric(gateway, "runbooks_gateway_alerts_received") - received_before == 2

    resource_id = f"alert.{alertmanager.fingerprint(pool)}"
    pool_resolved = resolved(pool_alert)
    alertmanager.post_alerts([pool_resolved])
    arrived = poll_until(
        lambda: _prefect_events("alert.resolved", resource_id),
        bool,
        timeout_s=RUN_TIMEOUT_S,
        interval_s=0.3,
    )
    assert arrived.ok, f"no alert.resolved event for {resource_id} reached Prefect"
    (event,) = arrived.last
    assert event["resource"]["alertname"] == "PostgresTooManyConnections"
    assert event["resource"]["database"] == "orders-db"
    assert event["payload"]["annotations"] == pool_alert["annotations"]
    ends_at = datetime.fromisoformat(event["payload"]["endsAt"])
    assert ends_at == datetime.fromisoformat(pool_resolved["endsAt"])
    # the resolution is evidence for the runbook, not a second incident
    assert len(_runs_for(deployment_ids["db-connection-pool-exhausted"], resource_id)) == 1


def test_wrong_token_starts_nothing_until_the_token_file_is_fixed(
    gateway: str, deployment_ids: dict[str, str], tmp_path: Path
) -> None:
    token_file = tmp_path / "gateway.token"
    token_file.write_text("not-the-gateway-token\n")
    labels = {
        "alertname": "GatewayWalBacklog",
        "gateway": "wembley-gw-1",
        "severity": "warning",
        "test": unique("am"),
    }
    rejected_before = metric(gateway, "runbooks_gateway_requests_rejected", reason="unauthorized")

    with running_alertmanager(gateway_config(f"{gateway}/alerts/alertmanager", token_file)) as am:
        alert = firing(labels)
        am.post_alerts([alert])
        # Alertmanager retries every group_interval (1 s): by the second refusal, an alert the
        # gateway had let through would have started its run already
        rejected = poll_until(
            lambda: metric(gateway, "runbooks_gateway_requests_rejected", reason="unauthorized"),
            lambda n: n >= rejected_before + 2,
            timeout_s=15,
            interval_s=0.2,
        )
        assert rejected.ok, f"the gateway did not reject Alertmanager's notifications:\n{am.log()}"
        assert am.metric("alertmanager_notifications_failed", integration="webhook") >= 1

        resource_id = f"alert.{am.fingerprint(labels)}"
        deployment = deployment_ids["stadium-network-flap"]
        assert _prefect_events("alert.firing", resource_id) == []
        assert _runs_for(deployment, resource_id) == []

        # Alertmanager rereads the token file for each attempt: no reload, and the alert is not lost
        token_file.write_text(TOKEN + "\n")
        run = _wait_for_run(deployment, am, labels)
        params = StadiumNetworkFlapParams.model_validate(run["parameters"]["params"])
        assert params.gateway_block == "wembley-gw-1"
        assert_alert_context(params, am, alert)


def assert_alert_context(params: Any, am: Alertmanager, posted: dict[str, Any]) -> None:
    """The run's `alert` parameter describes the alert as posted, with Alertmanager's fingerprint."""
    labels = posted["labels"]
    alert = params.alert
    assert alert.alertname == labels["alertname"]
    assert alert.fingerprint == am.fingerprint(labels)
    assert alert.status == "firing"
    assert alert.severity == labels["severity"]
    assert labels.items() <= alert.labels.items()
    # Alertmanager's API shows milliseconds; its webhook passes the time as Prometheus sent it
    assert datetime.fromisoformat(alert.starts_at) == datetime.fromisoformat(posted["startsAt"])


def _wait_for_run(deployment_id: str, am: Alertmanager, labels: dict[str, str]) -> dict[str, Any]:
    resource_id = f"alert.{am.fingerprint(labels)}"
    found = poll_until(
        lambda: _runs_for(deployment_id, resource_id), bool, timeout_s=RUN_TIMEOUT_S, interval_s=0.3
    )
    assert found.ok, f"no run for {labels['alertname']} ({resource_id}):\n{am.log()[-3000:]}"
    (run,) = found.last
    assert run["created_by"]["type"] == "AUTOMATION"
    return run


def _runs_for(deployment_id: str, resource_id: str) -> list[dict[str, Any]]:
    """Runs of the deployment started by the alert with this resource id."""
    fingerprint = resource_id.removeprefix("alert.")
    return [
        r
        for r in runs_of(deployment_id)
        if ((r["parameters"].get("params") or {}).get("alert") or {}).get("fingerprint")
        == fingerprint
    ]


def _prefect_events(name: str, resource_id: str) -> list[dict[str, Any]]:
    resp = httpx.post(
        f"{PREFECT_API_URL.value()}/events/filter",
        json={
            "filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}},
            "limit": 50,
        },
        timeout=10,
    )
    resp.raise_for_status()
    return resp.json()["events"]
