"""The service runbooks end to end on a real Docker-compatible engine (podman's API service):
a Compose service whose web server hangs is restarted and answers again (dry-run changes
nothing), a container killed by its real memory limit gets a bigger one after approval and runs
with it, rollback escalates: a Docker host keeps no revision history (issue #12)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import docker
import pytest

from blocks.docker_host import DockerHost
from flows.services.rollback_bad_deploy import RollbackBadDeployParams, rollback_bad_deploy
from flows.services.service_not_responding import (
    ServiceNotRespondingParams,
    Verdict,
    service_not_responding,
)
from flows.services.service_oom import OomAction, ServiceOomParams, service_oom
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tests.approvals import Approver
from tests.conftest import read_incident_report, unique
from tests.integration.test_workload_docker import (
    HOG,
    WEB,
    MiB,
    answers,
    compose_container,
    state,
    wait_for,
)
from tests.podman import PodmanService
from tests.servers import free_port

pytestmark = pytest.mark.integration

QUIET = SafetyParams(escalation_block=None)


@pytest.fixture
def engine(podman: PodmanService) -> Iterator[docker.DockerClient]:
    with contextlib.closing(podman.client()) as client:
        yield client


@pytest.fixture
def project() -> str:
    return unique("shop")


@pytest.fixture
def platform(podman: PodmanService, project: str) -> str:
    name = unique("docker")
    DockerHost(
        base_url=podman.base_url, compose_project=project, request_timeout_s=10, stop_timeout_s=3
    ).save(name, overwrite=True)
    return f"docker/{name}"


def test_hung_web_service_is_restarted_and_answers(
    podman: PodmanService, engine: docker.DockerClient, project: str, platform: str
) -> None:
    port = free_port()
    compose_container(engine, project, "web", WEB.format(port=port))
    name = f"{project}-web-1"
    assert wait_for(lambda: answers(port), bool)
    os.kill(podman.host_pid(name, "httpd"), signal.SIGSTOP)
    assert not answers(port)
    before = state(engine, name)["State"]
    params = ServiceNotRespondingParams(
        platform=platform, service="web", health_url=f"http://127.0.0.1:{port}/health",
        health_timeout_s=1, ready_timeout_s=20, poll_interval_s=0.3, log_lines=5, safety=QUIET,
    )  # fmt: skip

    dry = service_not_responding(params.model_copy(update={"dry_run": True}))
    assert dry.outcome is Outcome.PLANNED, dry.report
    assert state(engine, name)["State"]["StartedAt"] == before["StartedAt"], "dry-run: no restart"

    result = service_not_responding(params)
    assert result.outcome is Outcome.RESOLVED, result.report
    assert result.diagnosis is not None and result.diagnosis.verdict is Verdict.RESTART
    after = state(engine, name)["State"]
    assert after["StartedAt"] > before["StartedAt"] and after["Pid"] != before["Pid"]
    assert answers(port)
    assert f"last 5 log lines of {name}" in result.report


def test_oom_killed_container_runs_with_a_bigger_limit_after_approval(
    podman: PodmanService, engine: docker.DockerClient, project: str, platform: str
) -> None:
    hog = compose_container(
        engine, project, "consumer", HOG, start=False, mem_limit="32m", memswap_limit="32m"
    )
    podman.start_detecting_oom(hog.id)  # a real 32m limit, a real 40 MB allocation
    assert wait_for(lambda: state(engine, hog.name)["State"]["OOMKilled"], bool)
    approver = Approver("service-oom", {"approve": True, "approver": "alice", "reason": "batch grew"})
    approver.start()
    result = service_oom(
        ServiceOomParams(
            platform=platform, service="consumer", memory_factor=4, memory_cap="256Mi",
            verify_window_s=2, poll_interval_s=0.5, safety=QUIET,
        )  # fmt: skip
    )
    approver.join(10)
    assert approver.error is None and approver.paused_run is not None
    assert result.outcome is Outcome.RESOLVED, result.report
    assert result.plan is not None and result.plan.action is OomAction.RAISE_LIMIT
    assert result.plan.new_limit_bytes == 128 * MiB
    replaced = state(engine, hog.name)
    assert replaced["Id"] != hog.id, "podman 4.3 has no update: recreated with the new limit"
    assert replaced["HostConfig"]["Memory"] == 128 * MiB
    assert replaced["State"]["Running"] and not replaced["State"]["OOMKilled"]
    assert "recreate" in (approver.description or "")
    assert "start the stopped instances of consumer" in result.report
    assert "mem_limit: 128m" in result.report


def test_rollback_on_a_docker_host_escalates_no_revision_history(
    engine: docker.DockerClient, project: str, platform: str
) -> None:
    port = free_port()
    compose_container(engine, project, "web", WEB.format(port=port))
    name = f"{project}-web-1"
    started = state(engine, name)["State"]["StartedAt"]
    state_ = rollback_bad_deploy(
        RollbackBadDeployParams(
            platform=platform, service="web", health_url=f"http://127.0.0.1:{free_port()}/health",
            health_timeout_s=1, safety=QUIET,
        ),  # fmt: skip
        return_state=True,
    )
    assert state_.is_failed()
    report = read_incident_report(state_.state_details.flow_run_id)
    assert "keeps no revision history" in report
    assert state(engine, name)["State"]["StartedAt"] == started
