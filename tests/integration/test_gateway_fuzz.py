"""Property-based fuzzing of both webhook endpoints on the real server: no input ever gets a 5xx,
every answer is the documented JSON, and whatever the gateway accepts, Prefect accepts too."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from alert_gateway import GatewaySettings
from tests.gateway_proc import AUTH, TOKEN, metric, serving

ENDPOINTS = ["/alerts/alertmanager", "/alerts/grafana"]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # hermetic: no example database written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a valid value, sometimes any JSON value."""
    return st.one_of(valid, valid, valid, json_values)


string_maps = st.dictionaries(st.text(max_size=30), st.text(max_size=80), max_size=8)
valid_timestamps = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.sampled_from(
        ["0001-01-01T00:00:00Z", "2026-11-22T03:00:00.123456789Z", "2021-10-12T09:51:03+02:00"]
    ),
)
timestamps = valid_timestamps | st.text(max_size=30)
fingerprints = st.one_of(
    st.text("0123456789abcdef", min_size=16, max_size=16), st.text(max_size=20)
)
alerts = st.fixed_dictionaries(
    {
        "status": mostly(st.sampled_from(["firing", "resolved"])),
        "labels": mostly(string_maps),
        "startsAt": mostly(timestamps),
    },
    optional={
        "annotations": mostly(string_maps),
        "endsAt": mostly(timestamps),
        "generatorURL": mostly(st.text(max_size=50)),
        "fingerprint": mostly(fingerprints),
        "values": json_values,
    },
)
notifications = st.fixed_dictionaries(
    {"alerts": mostly(st.lists(alerts, max_size=6))},
    optional={
        "version": mostly(st.sampled_from(["4", "1"])),
        "status": mostly(st.sampled_from(["firing", "resolved"])),
        "receiver": mostly(st.text(max_size=30)),
        "groupKey": mostly(st.text(max_size=60)),
        "groupLabels": mostly(string_maps),
        "commonLabels": mostly(string_maps),
        "commonAnnotations": mostly(string_maps),
        "externalURL": mostly(st.text(max_size=30)),
        "truncatedAlerts": mostly(st.integers(min_value=0)),
        "orgId": json_values,
    },
)
# printable ASCII without edge whitespace: what an HTTP client can send at all
# valid in every field, adversarial in content: any unicode (NUL included), Prefect's own label
# names, empty strings, long values
label_names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["prefect.resource.id", "prefect.resource.name", "alertname"]),
)
valid_alerts = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["firing", "resolved"]),
        "labels": st.dictionaries(label_names, st.text(max_size=200), min_size=1, max_size=12),
        "startsAt": valid_timestamps,
    },
    optional={
        "annotations": st.dictionaries(st.text(max_size=40), st.text(max_size=3000), max_size=5),
        "endsAt": st.just("0001-01-01T00:00:00Z"),
        "fingerprint": st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True),
        "generatorURL": st.text(max_size=100),
    },
)
valid_notifications = st.fixed_dictionaries(
    {"version": st.just("4"), "alerts": st.lists(valid_alerts, min_size=1, max_size=8)},
    optional={"groupKey": st.text(max_size=100), "receiver": st.text(max_size=40)},
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(
    str.strip
)
content_types = st.one_of(
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "application/xml"]
    ),
    header_text,
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    spool: Path = tmp_path_factory.mktemp("fuzz") / "spool.sqlite3"
    settings_ = GatewaySettings(
        token=SecretStr(TOKEN), spool_path=spool, prefect_api_url=PREFECT_API_URL.value()
    )
    with serving(settings_) as url:
        yield url
        # everything accepted during fuzzing was also accepted by Prefect: nothing set aside
        deadline = time.monotonic() + 30
        while (
            httpx.get(f"{url}/healthz", timeout=5).json()["spool_depth"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert httpx.get(f"{url}/healthz", timeout=5).json()["spool_depth"] == 0
        assert metric(url, 'runbooks_gateway_forward_failures_total{reason="rejected"}') == 0


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def check_reply(reply: httpx.Response) -> None:
    event(f"HTTP {reply.status_code}")  # the mix of outcomes, shown by --hypothesis-show-statistics
    assert reply.status_code < 500, reply.text[:500]
    body = reply.json()
    if reply.status_code == 202:
        assert body["accepted"] + body["deduplicated"] == len(body["event_ids"])
    else:
        assert reply.status_code in (400, 401, 413, 415, 422), reply.text[:500]
        assert isinstance(body["error"], str) and body["error"]


def post_json(client: httpx.Client, url: str, notification: dict) -> httpx.Response:
    return client.post(
        url,
        content=json.dumps(notification),
        headers={**AUTH, "Content-Type": "application/json"},
    )


@pytest.mark.parametrize("path", ENDPOINTS)
@FUZZ
@given(notification=valid_notifications)
def test_valid_payloads_with_any_content_are_accepted(
    gateway: str, client: httpx.Client, path: str, notification: dict
) -> None:
    reply = post_json(client, f"{gateway}{path}", notification)
    check_reply(reply)
    assert reply.status_code == 202, reply.text[:500]


@pytest.mark.parametrize("path", ENDPOINTS)
@FUZZ
@given(notification=notifications)
def test_schema_shaped_payloads_never_5xx(
    gateway: str, client: httpx.Client, path: str, notification: dict
) -> None:
    reply = post_json(client, f"{gateway}{path}", notification)
    check_reply(reply)


@pytest.mark.parametrize("path", ENDPOINTS)
@FUZZ
@given(
    body=st.one_of(st.binary(max_size=3000), json_values.map(lambda v: json.dumps(v).encode())),
    content_type=content_types,
)
def test_arbitrary_bodies_never_5xx(
    gateway: str, client: httpx.Client, path: str, body: bytes, content_type: str
) -> None:
    reply = client.post(
        f"{gateway}{path}", content=body, headers={**AUTH, "Content-Type": content_type}
    )
    check_reply(reply)


@pytest.mark.parametrize("path", ENDPOINTS)
@FUZZ
@given(authorization=header_text)
def test_arbitrary_authorization_is_401(
    gateway: str, client: httpx.Client, path: str, authorization: str
) -> None:
    body = json.dumps({"version": "4", "alerts": []})
    reply = client.post(
        f"{gateway}{path}",
        content=body,
        headers={"Authorization": authorization, "Content-Type": "application/json"},
    )
    check_reply(reply)
    if authorization.strip() != f"Bearer {TOKEN}":
        assert reply.status_code == 401
