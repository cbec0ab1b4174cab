"""`runbooks simulate --plan` dry-runs each runbook an alert would start, against the live system;
`runbooks fire` sends a real test alert through a running gateway into Prefect."""

from __future__ import annotations

import time

import pytest
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from alert_gateway import GatewaySettings
from serving.cli import main
from tests.gateway_proc import TOKEN, serving, wait_for_events
from tests.integration.test_safety import Sessions
from tests.pg_env import Env, env  # noqa: F401 - env: a fixture

pytestmark = pytest.mark.integration


def test_simulate_plan_dry_runs_the_matching_runbook_and_changes_nothing(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions = Sessions(env)
    try:
        victims = sessions.idle(3)
        time.sleep(1.5)
        block = env.block()
        code = main([
            "simulate", "--plan", "--labels", "alertname=PostgresConnectionPoolExhausted",
            f"database={block}",
        ])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        assert "db-connection-pool-exhausted: parameters valid" in out
        assert "db-connection-pool-exhausted: dry run COMPLETED" in out
        assert sessions.pids(victims) <= env.live_pids(), "a dry run terminates nothing"
    finally:
        sessions.close()


def test_fire_sends_a_real_alert_through_the_gateway(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = GatewaySettings(
        token=SecretStr(TOKEN),
        spool_path=tmp_path / "spool.sqlite3",
        prefect_api_url=PREFECT_API_URL.value(),
    )
    with serving(settings) as gateway:
        monkeypatch.setenv("RUNBOOKS_GATEWAY_TOKEN", TOKEN)
        code = main(["fire", "--gateway", gateway, "--labels", "alertname=FireDrill", "team=sre"])
        out = capsys.readouterr().out
        assert code == 0 and out.startswith("HTTP 202"), out
        event_id = out.split('"event_ids":["')[1].split('"')[0]
        (event,) = wait_for_events(PREFECT_API_URL.value(), [event_id])
        assert event["event"] == "alert.firing"
        assert event["resource"]["alertname"] == "FireDrill" and event["resource"]["team"] == "sre"

        monkeypatch.setenv("RUNBOOKS_GATEWAY_TOKEN", "wrong")
        assert main(["fire", "--gateway", gateway, "--labels", "alertname=FireDrill"]) == 1
        assert "HTTP 401" in capsys.readouterr().out
