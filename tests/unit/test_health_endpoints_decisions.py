"""Reading health endpoints' answers by style: plain, Spring Boot actuator, Go."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tasks.health_endpoints_decisions import (
    HealthEndpoint,
    HealthStyle,
    actuator_components,
    judge_health,
)
from tasks.http_probe import HealthProbe

URL = "http://orders:8082/actuator/health"


def probe(status: int | None, body: object = None, error: str | None = None) -> HealthProbe:
    text = body if isinstance(body, str) or body is None else json.dumps(body)
    ok = status is not None and 200 <= status < 300
    return HealthProbe(
        url=URL,
        ok=ok,
        status=status,
        latency_ms=12.0 if status else None,
        error=error if error else (None if ok or status is None else f"HTTP {status}"),
        body=text,
    )


SPRING_DOWN = {
    "status": "DOWN",
    "components": {
        "db": {
            "status": "DOWN",
            "details": {
                "database": "PostgreSQL",
                "error": "org.postgresql.util.PSQLException: Connection to db:5432 refused",
            },
        },
        "diskSpace": {"status": "UP", "details": {"total": 10, "free": 5}},
        "ping": {"status": "UP"},
    },
}
SPRING_NESTED = {
    "status": "DOWN",
    "components": {
        "db": {
            "status": "DOWN",
            "components": {
                "primary": {"status": "UP", "details": {"database": "PostgreSQL"}},
                "replica": {"status": "DOWN", "details": {"error": "timeout"}},
            },
        },
        "circuitBreakers": {
            "status": "UP",
            "details": {
                "inventory": {"status": "CIRCUIT_OPEN", "details": {"state": "OPEN"}},
                "pricing": {"status": "UP", "details": {"state": "CLOSED"}},
            },
        },
    },
}
# Spring Boot 2.0/2.1: components under "details"
SPRING_21 = {
    "status": "OUT_OF_SERVICE",
    "details": {
        "kafka": {"status": "OUT_OF_SERVICE", "details": {"reason": "draining"}},
        "diskSpace": {"status": "UP", "details": {"total": 10, "free": 5}},
    },
}


@pytest.mark.parametrize(
    ("style", "answer", "up", "status", "down", "degraded", "detail"),
    [
        # plain: the status code decides, the body is not read
        ("plain", probe(200), True, "HTTP 200", [], [], None),
        ("plain", probe(204), True, "HTTP 204", [], [], None),
        ("plain", probe(503), False, "HTTP 503", [], [], None),
        ("plain", probe(302), False, "HTTP 302", [], [], None),
        ("plain", probe(None, error="ConnectError: refused"), False, "no answer", [], [], None),
        # actuator: the JSON status decides; DOWN components named with their error
        ("actuator", probe(200, {"status": "UP"}), True, "UP", [], [], None),
        (
            "actuator",
            probe(503, SPRING_DOWN),
            False,
            "DOWN",
            ["db"],
            [],
            "db: org.postgresql.util.PSQLException: Connection to db:5432 refused",
        ),
        (
            "actuator",
            probe(503, SPRING_NESTED),
            False,
            "DOWN",
            ["db/replica"],
            ["circuitBreakers/inventory CIRCUIT_OPEN"],
            "db/replica: timeout",
        ),
        (
            "actuator",
            probe(503, SPRING_21),
            False,
            "OUT_OF_SERVICE",
            ["kafka"],
            [],
            "kafka: draining",
        ),
        # a custom status mapping answering 200 with DOWN: the JSON is believed
        ("actuator", probe(200, {"status": "DOWN"}), False, "DOWN", [], [], None),
        # UNKNOWN is no failure (Spring answers 200 for it)
        ("actuator", probe(200, {"status": "UNKNOWN"}), True, "UNKNOWN", [], [], None),
        # not actuator JSON: the status code decides, the body is shown
        (
            "actuator",
            probe(200, "<html>Whitelabel Error Page</html>"),
            True,
            "HTTP 200 (not actuator health JSON)",
            [],
            [],
            "<html>Whitelabel Error Page</html>",
        ),
        ("actuator", probe(None, error="ReadTimeout"), False, "no answer", [], [], None),
        # go: 2xx is up; the body (or its JSON status) is shown
        ("go", probe(200, "ok\n"), True, "ok", [], [], None),
        ("go", probe(200, {"status": "pass", "checks": {}}), True, "pass", [], [], None),
        (
            "go",
            probe(500, "redis: connection refused"),
            False,
            "redis: connection refused",
            [],
            [],
            None,
        ),
        ("go", probe(200, ""), True, "HTTP 200", [], [], None),
        ("go", probe(200, "x" * 500), True, "x" * 119 + "…", [], [], None),
    ],
)
def test_judge_health(style, answer, up, status, down, degraded, detail) -> None:
    endpoint = HealthEndpoint(service="orders", url=URL, style=style)
    health = judge_health(endpoint, answer)
    assert (health.up, health.status) == (up, status)
    assert health.down_components == down
    assert health.degraded_components == degraded
    assert health.detail == detail
    assert health.http_status == answer.status
    assert health.style is HealthStyle(style)


@pytest.mark.parametrize(
    ("document", "leaves"),
    [
        ({"status": "UP"}, []),
        ({"status": "UP", "components": {"ping": {"status": "UP"}}}, [("ping", "UP", None)]),
        # a leaf's own details hold no status: they are data, not components
        (
            {"status": "UP", "components": {"db": {"status": "UP", "details": {"x": {"y": 1}}}}},
            [("db", "UP", None)],
        ),
        (
            SPRING_NESTED,
            [
                ("db/primary", "UP", None),
                ("db/replica", "DOWN", "timeout"),
                ("circuitBreakers/inventory", "CIRCUIT_OPEN", None),
                ("circuitBreakers/pricing", "UP", None),
            ],
        ),
    ],
)
def test_actuator_components(document, leaves) -> None:
    assert actuator_components(document) == leaves


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"service": "orders", "url": "file:///etc/passwd"}, r"not an http\(s\) URL"),
        ({"service": "orders", "url": "http://u:pw@orders/health"}, "credentials"),
        ({"service": "../etc", "url": "http://orders/health"}, "not a service name"),
        ({"service": "orders", "url": "http://orders/health", "style": "grpc"}, "style"),
        ({"service": "orders", "url": "http://orders/health", "timeout_s": 0}, "timeout_s"),
    ],
)
def test_endpoint_refuses_bad_values(fields, problem) -> None:
    with pytest.raises(ValidationError, match=problem):
        HealthEndpoint(**fields)


def test_describe_reads_like_a_sentence() -> None:
    health = judge_health(
        HealthEndpoint(service="orders", url=URL, style="actuator"), probe(503, SPRING_DOWN)
    )
    assert health.describe() == (
        "orders down (DOWN, HTTP 503, 12 ms); components down: db; "
        "db: org.postgresql.util.PSQLException: Connection to db:5432 refused"
    )
    gone = judge_health(
        HealthEndpoint(service="web", url=URL), probe(None, error="ConnectError: x")
    )
    assert gone.describe() == "web down (no answer: ConnectError: x)"
