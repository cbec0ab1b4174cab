"""Core runbooks run by their deployments on the team topology's workers (issue #16).

db-connection-pool-exhausted and event-processing-stuck already run there
(tests/integration/test_team_topology.py, test_team_gateways.py); this adds kafka-cluster-down,
with the scenario, blocks and fake Kubernetes API of tests/integration/test_kafka_cluster_down.py
and the session's real Kafka broker (tansu). The run is created from the deployment on the
topology's API server B and executed by a worker in a process of its own: the blocks, the
fake API and the broker are reached from there, not from the test's interpreter.
"""

from __future__ import annotations

import uuid

import pytest
from prefect import get_client

from tests.conftest import create_topic, read_incident_report, unique
from tests.fakes.kubernetes_api import FakeKubernetesApi
from tests.integration import test_team_topology as topo
from tests.integration.test_kafka_cluster_down import (  # noqa: F401 - api: a fixture
    NS,
    PODS,
    add_broker_pods,
    api,
    broker_id,
    params,
    save_blocks,
)
from tests.integration.test_team_topology import team  # noqa: F401 - a fixture
from tests.servers import KafkaBroker
from tests.team_topology import TeamTopology

pytestmark = pytest.mark.integration


def run_deployment(name: str, parameters: dict, queue: str) -> str:
    """A run of the named deployment, in one worker's own queue; its id."""
    (found,) = topo.api("/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            uuid.UUID(found["id"]), parameters=parameters, work_queue_name=queue
        )
    return str(run.id)


def test_kafka_cluster_down_on_a_worker(
    team: TeamTopology,  # noqa: F811
    kafka_broker: KafkaBroker,
    api: FakeKubernetesApi,  # noqa: F811
) -> None:
    """One broker pod crash-looping: the run on worker-2 deletes it once (uid precondition), the
    pod comes back Ready, the real broker's ISR is checked, the run completes."""
    create_topic(kafka_broker.bootstrap, unique("orders"), partitions=3)
    first = broker_id(kafka_broker)
    add_broker_pods(api, first, first + 1, count=2)
    crashing = f"kafka-{first + 1}"
    old_uid = api.pod(NS, crashing).uid
    blocks = save_blocks(kafka_broker, api)

    run_id = run_deployment(
        "kafka-cluster-down", {"params": params(blocks).model_dump(mode="json")}, "w2"
    )
    done = topo.wait_state(run_id, topo.FINAL, timeout_s=120)

    assert done["state_type"] == "COMPLETED", done["state"]["message"]
    assert topo.worker_of(done) == "worker-2"
    (delete,) = api.calls_of("DELETE")
    assert delete.path == f"{PODS}/{crashing}" and delete.body["preconditions"] == {"uid": old_uid}
    recreated = api.pod(NS, crashing)
    assert recreated.uid != old_uid and recreated.ready
    report = read_incident_report(run_id)
    assert f"cluster {kafka_broker.cluster_id}, controller {first}" in report
    assert "| ISR caught up | OK |" in report
    assert f"delete_pod | 1 | {NS}/{crashing} | applied |" in report
