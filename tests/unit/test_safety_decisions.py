"""The guard rails' pure decisions: budget windows, escalating once, names Prefect accepts, scrubbing."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from runbooks.approvals import confirmation_missing
from runbooks.audit import scrub
from runbooks.params import SafetyParams
from runbooks.results import Change, ChangeSet
from runbooks.safety import (
    Budget,
    BudgetLedger,
    Target,
    approval_request,
    budget_variable,
    check_budget,
    effective_budget,
    record_execution,
)

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
HOUR = Budget(max_actions=3, window_s=3600)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("executed", "escalated", "now", "allowed", "used", "free_at", "notify"),
    [
        ([], None, 0, True, 0, None, False),
        ([0, 1], None, 2, True, 2, None, False),
        # the third in the hour is the last allowed; the fourth is refused until the first ages out
        ([0, 1, 2], None, 3, False, 3, 60, True),
        # sliding window: at 60 min the first execution has left the window
        ([0, 1, 2], None, 60.01, True, 2, None, False),
        # refused again after escalating: no second escalation
        ([0, 1, 2], 3, 10, False, 3, 60, False),
        # a new execution after the last escalation makes a new spent budget worth reporting
        ([30, 50, 70], 40, 75, False, 3, 90, True),
        # executions older than the window don't count at all
        ([-500, -300, 0], None, 1, True, 1, None, False),
    ],
)
def test_check_budget(executed, escalated, now, allowed, used, free_at, notify) -> None:
    ledger = BudgetLedger(
        target="postgres db:5432",
        action="terminate idle connections",
        executed=[at(m) for m in executed],
        escalated_at=at(escalated) if escalated is not None else None,
    )
    verdict = check_budget(ledger, HOUR, at(now))
    assert verdict.allowed is allowed
    assert verdict.used == used
    assert verdict.next_free_at == (at(free_at) if free_at is not None else None)
    assert verdict.notify is notify


def test_record_execution_drops_entries_outside_the_window() -> None:
    ledger = BudgetLedger(target="t", action="a", executed=[at(-120), at(-30)])
    after = record_execution(ledger, HOUR, at(0))
    assert after.executed == [at(-30), at(0)]
    assert ledger.executed == [at(-120), at(-30)]  # the input is not mutated


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, (3, 3600)),
        ({"budget_max_actions": 1}, (1, 3600)),
        ({"budget_window_s": 60}, (3, 60)),
        ({"budget_max_actions": 10, "budget_window_s": 86400}, (10, 86400)),
    ],
)
def test_effective_budget(overrides, expected) -> None:
    b = effective_budget(HOUR, SafetyParams(**overrides))
    assert (b.max_actions, b.window_s) == expected
    assert effective_budget(None, SafetyParams(**overrides)) is None


@pytest.mark.parametrize(
    ("budget", "text"),
    [
        (Budget(max_actions=3, window_s=3600), "3 per 1h"),
        (Budget(max_actions=1, window_s=86400), "1 per 1d"),
        (Budget(max_actions=5, window_s=600), "5 per 10min"),
        (Budget(max_actions=2, window_s=90), "2 per 90s"),
    ],
)
def test_budget_describe(budget, text) -> None:
    assert budget.describe() == text


@pytest.mark.parametrize(
    "target",
    [
        Target("postgres", "10.0.0.5:5432"),
        Target("kafka-broker", "prod/kafka-2"),
        Target("flink-job", "http://flink:8081/enrichment job"),
        Target("event-store", "db.example.com:5432/events/Orders%20&<x>"),
        Target("k8s-pod", "ns/" + "x" * 300),
    ],
)
def test_names_are_valid_for_prefect(target: Target) -> None:
    # concurrency limit names: no / % & < >; variable names: [a-z0-9_-], <= 255 chars
    assert not set("/%&<>") & set(target.lock_name)
    assert re.fullmatch(r"[a-z0-9_-]{1,255}", budget_variable(target, "restart pod"))
    assert target.resource_id == f"runbook.target.{target.kind}.{target.name}"


def test_names_are_distinct_per_target_and_action() -> None:
    a, b = Target("postgres", "db-a:5432"), Target("postgres", "db_a:5432")
    assert a.lock_name != b.lock_name  # same readable slug, different targets
    assert budget_variable(a, "restart") != budget_variable(a, "terminate")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # one PostgreSQL server (its system_identifier) reached by two host names
        (
            Target("postgres", "127.0.0.1:5432", "7313046425316312345"),
            Target("postgres", "localhost:5432", "7313046425316312345"),
        ),
        (
            Target("kafka-cluster", "127.0.0.1:9092", "cluster-id abc"),
            Target("kafka-cluster", "localhost:9092,kafka-1:9092", "cluster-id abc"),
        ),
    ],
)
def test_one_identity_one_lock_budget_and_resource(a: Target, b: Target) -> None:
    assert a.lock_name == b.lock_name
    assert budget_variable(a, "restart") == budget_variable(b, "restart")
    assert a.resource_id == b.resource_id
    assert a.label != b.label  # the report still says which address the block used


def test_same_name_other_identity_is_another_target() -> None:
    # two servers behind one address over time (a failover to a new cluster) are not one target
    a, b = Target("postgres", "db:5432", "1"), Target("postgres", "db:5432", "2")
    assert a.lock_name != b.lock_name


def test_scrub_masks_secrets_at_any_depth() -> None:
    data = {
        "host": "db",
        "password": "hunter2",
        "nested": {"api_key": "k", "token": "t", "items": [{"secret": "s", "pid": 1}]},
        "conn": SecretStr("postgres://u:p@h"),
        "private_key_path": "/etc/key",
    }
    out = scrub(data)
    assert out["host"] == "db" and out["nested"]["items"][0]["pid"] == 1
    flat = repr(out)
    for secret in ("hunter2", "'k'", "'t'", "'s'", "postgres://u:p@h", "/etc/key"):
        assert secret not in flat


def test_approval_request_shows_the_plan() -> None:
    plan = ChangeSet(
        dry_run=True,
        planned=[
            Change(action="terminate_backend", target="orders pid=1 (app/x|y)"),
            Change(action="terminate_backend", target="orders pid=2 (app/-)"),
        ],
    )
    text = approval_request(
        "terminate idle connections", Target("postgres", "db:5432"), "rolls back work", plan
    )
    assert "postgres db:5432" in text and "rolls back work" in text
    assert "| terminate_backend | orders pid=1 (app/x\\|y) |" in text
    assert "orders pid=2" in text


@pytest.mark.parametrize(
    ("typed", "wanted", "missing"),
    [
        ("orders", ["orders"], []),
        ("  orders ", ["orders"], []),
        ("payments, orders", ["orders", "payments"], []),
        ("orders payments,,", ["orders", "payments"], []),
        ("", ["orders"], ["orders"]),
        ("order", ["orders"], ["orders"]),  # a prefix is not the name
        ("ORDERS", ["orders"], ["orders"]),  # topic names are case-sensitive
        ("orders", ["orders", "payments"], ["payments"]),
        ("anything", [], []),
    ],
)
def test_confirmation_missing(typed: str, wanted: list[str], missing: list[str]) -> None:
    assert confirmation_missing(typed, wanted) == missing


def test_approval_request_asks_to_type_what_is_lost() -> None:
    plan = ChangeSet(dry_run=True, planned=[Change(action="recreate", target="orders")])
    target = Target("kafka-topics", "b:9092")
    assert "confirm field" not in approval_request("recreate", target, "loses records", plan)
    text = approval_request("recreate", target, "loses records", plan, ["orders"])
    assert "also type `orders` in the confirm field" in text
