"""Authentication and bad input against the real server: every refusal is a 4xx with a JSON body
that says what is wrong, counted by reason; nothing crashes and later valid alerts still pass;
the token never shows up in logs, metrics, the spool or events."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from alert_gateway import GatewaySettings, create_app
from alert_gateway.auth import GatewayConfigError
from tests.conftest import unique
from tests.gateway_proc import (
    AUTH,
    PROJECT_ROOT,
    TOKEN,
    GatewayProcess,
    alert,
    alert_ids,
    alertmanager_notification,
    metric,
    post_alerts,
    serving,
    wait_for_events,
)

MIB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


def settings_for(tmp_path: Path, **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "token": SecretStr(TOKEN),
        "spool_path": tmp_path / "spool.sqlite3",
        "prefect_api_url": PREFECT_API_URL.value(),
    }
    return GatewaySettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(settings_for(tmp_path_factory.mktemp("gw"))) as url:
        yield url


def valid_body() -> bytes:
    return json.dumps(alertmanager_notification(alert("BadInputNeighbour"))).encode()


# Authorization header sent -> 401
BAD_AUTH = [
    None,
    b"",
    TOKEN.encode(),
    f"Basic {TOKEN}".encode(),
    b"Bearer",
    f"Bearer {TOKEN[:-1]}".encode(),
    f"Bearer {TOKEN}x".encode(),
    f"Bearer {TOKEN.upper()}".encode(),
    f"Bearer {TOKEN} {TOKEN}".encode(),
    "Bearer \u00e9\u00e8".encode(),
    b"Bearer \xff\xfe",
]


@pytest.mark.parametrize("authorization", BAD_AUTH)
def test_wrong_or_missing_token_is_401(gateway: str, authorization: bytes | None) -> None:
    headers: dict[str, str | bytes] = dict(JSON)
    if authorization is not None:
        headers["Authorization"] = authorization
    for path in ("/alerts/alertmanager", "/alerts/grafana"):
        reply = httpx.post(f"{gateway}{path}", content=valid_body(), headers=headers, timeout=10)
        assert reply.status_code == 401
        assert reply.json() == {"error": "missing or wrong bearer token", "detail": None}
        assert reply.headers["www-authenticate"] == "Bearer"


def _deep(depth: int) -> bytes:
    return b'{"version":"4","alerts":' + b"[" * depth + b"]" * depth + b"}"


def _streamed(size: int) -> Iterator[bytes]:
    """A body sent chunked, without Content-Length: the limit must hold while reading."""
    chunk = b" " * 65536
    for _ in range(size // len(chunk) + 1):
        yield chunk


_valid = alertmanager_notification(alert("BadInput"))
# 800 kB alertname: within the body limit, but its event carries it twice (label and name)
_huge_label = {
    "version": "4",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "X" * 800_000},
            "startsAt": "2026-11-22T03:00:00Z",
        }
    ],
}

# (name, body, content type, status, reason label, words the error must contain)
BAD_INPUT = [
    (
        "truncated JSON",
        b'{"version": "4", "alerts": [',
        "application/json",
        400,
        "bad_json",
        "not valid JSON",
    ),
    ("empty body", b"", "application/json", 400, "bad_json", "not valid JSON"),
    (
        "not JSON at all",
        b"alertname=KafkaBrokerDown",
        "application/json",
        400,
        "bad_json",
        "not valid JSON",
    ),
    (
        "invalid UTF-8",
        b'{"version":"4","receiver":"\xff\xfe"}',
        "application/json",
        400,
        "bad_json",
        "not valid JSON",
    ),
    (
        "lone surrogate",
        b'{"version":"4","receiver":"\\ud800"}',
        "application/json",
        400,
        "bad_json",
        "not valid JSON",
    ),
    ("nesting bomb", _deep(100_000), "application/json", 400, "bad_json", "recursion"),
    (
        "NaN",
        b'{"version":"4","truncatedAlerts":NaN}',
        "application/json",
        422,
        "schema",
        "truncatedAlerts",
    ),
    ("a list", b"[]", "application/json", 422, "schema", "body"),
    ("a string", b'"alert"', "application/json", 422, "schema", "body"),
    (
        "no alerts",
        json.dumps({"version": "4"}).encode(),
        "application/json",
        422,
        "schema",
        "alerts",
    ),
    (
        "wrong version",
        json.dumps({**_valid, "version": "3"}).encode(),
        "application/json",
        422,
        "schema",
        "version",
    ),
    (
        "alert without startsAt",
        json.dumps({**_valid, "alerts": [{"status": "firing", "labels": {"a": "b"}}]}).encode(),
        "application/json",
        422,
        "schema",
        "alerts.0.startsAt",
    ),
    (
        "numeric label",
        json.dumps(
            {**_valid, "alerts": [{**_valid["alerts"][0], "labels": {"port": 9092}}]}
        ).encode(),
        "application/json",
        422,
        "schema",
        "alerts.0.labels.port",
    ),
    (
        "unknown status",
        json.dumps({**_valid, "alerts": [{**_valid["alerts"][0], "status": "pending"}]}).encode(),
        "application/json",
        422,
        "schema",
        "alerts.0.status",
    ),
    (
        "text/plain",
        json.dumps(_valid).encode(),
        "text/plain",
        415,
        "content_type",
        "application/json",
    ),
    (
        "form",
        json.dumps(_valid).encode(),
        "application/x-www-form-urlencoded",
        415,
        "content_type",
        "application/json",
    ),
    ("no content type", json.dumps(_valid).encode(), None, 415, "content_type", "application/json"),
    (
        "latin-1 JSON",
        json.dumps(_valid).encode(),
        "application/json; charset=latin-1",
        415,
        "content_type",
        "UTF-8",
    ),
    ("over 1 MiB", b" " * (MIB + 1), "application/json", 413, "too_large", "larger than 1048576"),
    (
        "over 1 MiB, streamed",
        _streamed(2 * MIB),
        "application/json",
        413,
        "too_large",
        "larger than 1048576",
    ),
    (
        "event too large for Prefect",
        json.dumps(_huge_label).encode(),
        "application/json",
        413,
        "too_large",
        "alerts[0]",
    ),
]
# JSON with a charset, vendor +json types and exactly 1 MiB are fine
GOOD_VARIANTS = [
    ("application/json; charset=utf-8", b""),
    ("application/json;charset=UTF-8", b""),
    ("application/vnd.alertmanager+json", b""),
    ("application/json", b" " * (MIB - len(valid_body()))),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason", "words"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_is_a_4xx_saying_what_is_wrong(
    gateway: str,
    body: bytes | Iterator[bytes],
    content_type: str | None,
    status: int,
    reason: str,
    words: str,
) -> None:
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    before = metric(gateway, "runbooks_gateway_requests_rejected", reason=reason)
    reply = httpx.post(f"{gateway}/alerts/alertmanager", content=body, headers=headers, timeout=30)
    assert reply.status_code == status, reply.text[:500]
    error = reply.json()
    assert set(error) == {"error", "detail"}
    assert words in error["error"] or words in json.dumps(error["detail"]), error
    assert metric(gateway, "runbooks_gateway_requests_rejected", reason=reason) == before + 1
    # the gateway is unharmed: the next valid alert goes through
    assert post_alerts(gateway, json.loads(valid_body())).status_code == 202


def test_schema_errors_list_every_invalid_field(gateway: str) -> None:
    bad = {"version": "4", "alerts": [{"status": "up", "labels": {"a": 1}}]}
    reply = httpx.post(f"{gateway}/alerts/alertmanager", json=bad, headers=AUTH, timeout=10)
    assert reply.status_code == 422
    fields = {d["field"] for d in reply.json()["detail"]}
    assert fields == {"alerts.0.status", "alerts.0.labels.a", "alerts.0.startsAt"}
    assert reply.json()["error"].startswith("not a valid alertmanager payload: alerts.0.")


@pytest.mark.parametrize(("content_type", "padding"), GOOD_VARIANTS)
def test_valid_variants_are_accepted(gateway: str, content_type: str, padding: bytes) -> None:
    body = valid_body() + padding
    assert len(body) <= MIB
    reply = httpx.post(
        f"{gateway}/alerts/alertmanager",
        content=body,
        headers={**AUTH, "Content-Type": content_type},
        timeout=10,
    )
    assert reply.status_code == 202, reply.text


def test_unknown_routes_and_methods_answer_json(gateway: str) -> None:
    assert httpx.get(f"{gateway}/alerts/alertmanager", timeout=5).json() == {
        "error": "Method Not Allowed",
        "detail": None,
    }
    missing = httpx.post(f"{gateway}/alerts/nagios", headers=AUTH, timeout=5)
    assert missing.status_code == 404 and missing.json()["error"] == "Not Found"


def test_alerts_accepted_between_bad_requests_all_reach_prefect(gateway: str) -> None:
    ids = []
    for bad in (b"{", b"[]", b" " * (MIB + 10)):
        httpx.post(f"{gateway}/alerts/grafana", content=bad, headers={**AUTH, **JSON}, timeout=10)
        ids += post_alerts(gateway, json.loads(valid_body())).json()["event_ids"]
    assert alert_ids(wait_for_events(PREFECT_API_URL.value(), ids)) == sorted(ids)


def test_insecure_mode_needs_no_token(tmp_path: Path) -> None:
    with serving(settings_for(tmp_path, token=None, insecure=True)) as url:
        reply = httpx.post(
            f"{url}/alerts/alertmanager", content=valid_body(), headers=JSON, timeout=10
        )
        assert reply.status_code == 202


def test_cli_insecure_flag_accepts_unauthenticated_alerts(tmp_path: Path) -> None:
    gateway = GatewayProcess(
        spool_path=tmp_path / "spool.sqlite3", prefect_api_url=PREFECT_API_URL.value(), token=None
    )
    try:
        gateway.start()
        reply = httpx.post(
            f"{gateway.url}/alerts/alertmanager", content=valid_body(), headers=JSON, timeout=10
        )
        assert reply.status_code == 202
    finally:
        gateway.kill()
    assert "WITHOUT authentication" in gateway.log()


def test_no_token_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="--insecure"):
        create_app(settings_for(tmp_path, token=None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNBOOKS_GATEWAY_")}
    env["RUNBOOKS_GATEWAY_SPOOL_PATH"] = str(tmp_path / "cli.sqlite3")
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    done = subprocess.run(
        [sys.executable, "-m", "alert_gateway", "--port", "1"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "RUNBOOKS_GATEWAY_TOKEN" in done.stderr and "--insecure" in done.stderr
    assert not (tmp_path / "cli.sqlite3").exists()


def test_token_from_a_prefect_secret_block(tmp_path: Path) -> None:
    name = unique("gateway-token")
    Secret(value="token-from-block-91c2").save(name, overwrite=True)
    with serving(settings_for(tmp_path, token=None, token_secret_block=name)) as url:
        body = valid_body()
        good = {"Authorization": "Bearer token-from-block-91c2", **JSON}
        assert (
            httpx.post(
                f"{url}/alerts/alertmanager", content=body, headers=good, timeout=10
            ).status_code
            == 202
        )
        bad = {"Authorization": f"Bearer {TOKEN}", **JSON}
        assert (
            httpx.post(
                f"{url}/alerts/alertmanager", content=body, headers=bad, timeout=10
            ).status_code
            == 401
        )
    with pytest.raises(GatewayConfigError, match="not found"):
        create_app(settings_for(tmp_path, token=None, token_secret_block=unique("missing")))


def test_token_never_appears_in_logs_metrics_spool_or_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(settings_for(tmp_path)) as url:
        ids = post_alerts(url, json.loads(valid_body())).json()["event_ids"]
        httpx.post(f"{url}/alerts/alertmanager", content=b"{", headers={**AUTH, **JSON}, timeout=10)
        httpx.post(
            f"{url}/alerts/alertmanager",
            content=valid_body(),
            headers={"Authorization": f"Bearer {TOKEN}x", **JSON},
            timeout=10,
        )
        metrics_text = httpx.get(f"{url}/metrics", timeout=5).text
        events = wait_for_events(PREFECT_API_URL.value(), ids)
    assert len(events) == 1
    spool_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("spool.sqlite3*"))
    for where, text in (
        ("logs", caplog.text),
        ("metrics", metrics_text),
        ("events", json.dumps(events)),
    ):
        assert TOKEN not in text, where
    assert TOKEN.encode() not in spool_bytes
