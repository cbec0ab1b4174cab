"""push-delivery-degraded against a real PostgreSQL token table, a real Prometheus scraping the
dispatcher's counter (set by the test exporter) and a local HTTP server serving the providers'
status JSON (the Statuspage format).

Each test has a token table of its own (awkward names: a capital and a space, so identifiers are
quoted for real) with 30 tokens marked invalid by a provider, 20 not seen for 400 days and 50
fresh ones; the runbook logs in as a role that may only read and delete in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blocks.postgres import PostgresDatabase
from blocks.prometheus import PrometheusServer
from flows.notifications.push_delivery_degraded import (
    RUNBOOK,
    PushDeliveryDegradedParams,
    PushDeliverySummary,
    push_delivery_degraded,
)
from runbooks.params import SafetyParams
from runbooks.report import Outcome
from tasks.prometheus import label_matcher
from tasks.provider_status import StatusPage
from tasks.push_tokens import TokenTable
from tasks.slo_decisions import WINDOW_PLACEHOLDER
from tests.approvals import Approver
from tests.conftest import read_incident_report, unique
from tests.pg_env import scratch_database
from tests.receivers import serve_get
from tests.servers import PostgresServer, free_port

pytestmark = pytest.mark.integration

SCHEMA = "push"
INVALID, NOT_SEEN, FRESH = 30, 20, 50
COUNTER = "notifications_sent_total"
# every test acts on a table of its own; budgets are not what these tests check
SAFETY = SafetyParams(budget_max_actions=1000, approval_poll_s=1)


@dataclass
class StatusServer:
    """Serves each provider's status JSON at /<provider>; the test sets what it says."""

    pages: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    _server: ThreadingHTTPServer | None = None

    def url(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.port}/{provider}"

    def start(self) -> StatusServer:
        def respond(path: str) -> tuple[int, str, bytes]:
            page = self.pages.get(path.strip("/"))
            return 200 if page is not None else 404, "application/json", json.dumps(page).encode()

        self._server = serve_get(self.port, respond)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def statuspage(indicator: str, description: str) -> dict[str, Any]:
    return {"status": {"indicator": indicator, "description": description}}


OPERATIONAL = statuspage("none", "All Systems Operational")


@pytest.fixture(scope="module")
def status_server() -> Iterator[StatusServer]:
    server = StatusServer().start()
    yield server
    server.stop()


@dataclass
class Env:
    server: PostgresServer
    db: str
    role: str
    password: str
    admin: psycopg.Connection

    def token_table(self) -> str:
        """A fresh token table, seeded; returns its name."""
        name = unique("Device Tokens")
        table = sql.Identifier(SCHEMA, name)
        self.admin.execute(
            sql.SQL(
                "CREATE TABLE {} (token text PRIMARY KEY, provider text NOT NULL,"
                " invalidated_at timestamptz, last_seen_at timestamptz NOT NULL)"
            ).format(table)
        )
        seed = sql.SQL(
            "INSERT INTO {} SELECT %s || n, CASE WHEN n %% 2 = 0 THEN 'fcm' ELSE 'apns' END,"
            " CASE WHEN %s THEN now() - interval '1 hour' END, now() - make_interval(days => %s)"
            " FROM generate_series(1, %s) AS n"
        ).format(table)
        self.admin.execute(seed, ("invalid-", True, 1, INVALID))
        self.admin.execute(seed, ("old-", False, 400, NOT_SEEN))
        self.admin.execute(seed, ("fresh-", False, 2, FRESH))
        self.admin.execute(
            sql.SQL("GRANT SELECT, DELETE ON {} TO {}").format(table, sql.Identifier(self.role))
        )
        return name

    def tokens(self, table: str) -> set[str]:
        rows = self.admin.execute(
            sql.SQL("SELECT token FROM {}").format(sql.Identifier(SCHEMA, table))
        ).fetchall()
        return {token for (token,) in rows}

    def block(self) -> str:
        name = unique("push-db")
        PostgresDatabase(
            host=self.server.host,
            port=self.server.port,
            dbname=self.db,
            user=self.role,
            password=self.password,
            connect_timeout_s=5,
            statement_timeout_s=5,
        ).save(name, overwrite=True)
        return name


@pytest.fixture(scope="module")
def env(postgres: PostgresServer) -> Iterator[Env]:
    with scratch_database(postgres, "rbpush", ["rbpusher"], SCHEMA) as scratch:
        yield Env(postgres, scratch.db, scratch.roles[0], scratch.password, scratch.admin)


@pytest.fixture(scope="module")
def prometheus_block(prometheus) -> str:
    name = unique("prometheus")
    PrometheusServer(url=prometheus.url, timeout_s=5).save(name, overwrite=True)
    return name


def delivery_query(run: str) -> str:
    return (
        f"sum by (provider, result) (increase({COUNTER}{{{label_matcher('run', run)}}}[{WINDOW_PLACEHOLDER}]))"
    )


def set_sends(prometheus, run: str, per_second: dict[tuple[str, str], float]) -> None:
    """The dispatcher's counter grows at these rates; wait until Prometheus sees each."""
    for (provider, result), rate in per_second.items():
        prometheus.exporter.set_rate(COUNTER, {"run": run, "provider": provider, "result": result}, rate)
    query = delivery_query(run).replace(WINDOW_PLACEHOLDER, "5s")

    def seen(result: list[dict]) -> bool:
        got = {(r["metric"]["provider"], r["metric"]["result"]): float(r["value"][1]) for r in result}
        return set(got) == set(per_second) and all(
            abs(got[k] - 5 * rate) <= 0.1 * 5 * rate for k, rate in per_second.items()
        )

    prometheus.wait_for(query, seen)


def params(
    env: Env, table: str, prometheus_block: str, run: str, status: StatusServer, **overrides
) -> PushDeliveryDegradedParams:
    fields = {
        "prometheus_block": prometheus_block,
        "db_block": env.block(),
        "window": "5s",
        "delivery_query": delivery_query(run),
        "status_pages": [
            StatusPage(provider="fcm", url=status.url("fcm")),
            StatusPage(provider="apns", url=status.url("apns")),
        ],
        "status_timeout_s": 2,
        "tokens": TokenTable(schema_name=SCHEMA, table=table),
        "batch_size": 7,
        "verify_timeout_s": 10,
        "safety": SAFETY,
    }
    return PushDeliveryDegradedParams(**(fields | overrides))


STALE_TOKEN_ERRORS = {("fcm", "success"): 95.0, ("fcm", "UNREGISTERED"): 5.0, ("apns", "success"): 50.0}


@pytest.fixture
def stale_errors(prometheus, status_server: StatusServer) -> str:
    """FCM at 95%, its failures 'UNREGISTERED'; APNs fine; both status pages operational."""
    status_server.pages.update(fcm=OPERATIONAL, apns=OPERATIONAL)
    run = unique("push")
    set_sends(prometheus, run, STALE_TOKEN_ERRORS)
    return run


def test_stale_tokens_are_pruned_and_a_rerun_deletes_nothing_more(
    env: Env, prometheus_block: str, status_server: StatusServer, stale_errors: str
) -> None:
    table = env.token_table()
    fresh = {t for t in env.tokens(table) if t.startswith("fresh-")}
    p = params(env, table, prometheus_block, stale_errors, status_server)

    summary: PushDeliverySummary = push_delivery_degraded(p)

    assert summary.outcome is Outcome.RESOLVED, summary.report
    assert summary.decision.degraded == ["fcm"]
    assert summary.tokens.stale == INVALID + NOT_SEEN and summary.tokens.total == 100
    assert env.tokens(table) == fresh  # every stale token gone, every fresh one kept
    pruned = summary.pruned
    assert pruned.deleted == INVALID + NOT_SEEN
    assert max(pruned.batches) <= 7 and len(pruned.batches) == 8  # 50 in batches of 7
    assert summary.tokens_after.stale == 0
    assert "Deleted 50 stale token(s)" in summary.report

    again: PushDeliverySummary = push_delivery_degraded(p)
    assert again.outcome is Outcome.NO_ACTION_NEEDED, again.report
    assert again.pruned is None and env.tokens(table) == fresh
    assert "the dispatcher may not mark the tokens" in again.report


def test_dry_run_deletes_nothing(
    env: Env, prometheus_block: str, status_server: StatusServer, stale_errors: str
) -> None:
    table = env.token_table()
    before = env.tokens(table)
    p = params(env, table, prometheus_block, stale_errors, status_server, dry_run=True)

    summary: PushDeliverySummary = push_delivery_degraded(p)

    assert summary.outcome is Outcome.PLANNED, summary.report
    assert env.tokens(table) == before
    (change,) = summary.pruned.planned
    assert change.detail["rows"] == INVALID + NOT_SEEN and not summary.pruned.applied
    assert "Would delete 50 stale token(s)" in summary.report


APPROVAL_ANSWERS = [
    ({"approve": False, "approver": "bob", "reason": "check the app first"}, "rejected by bob"),
    ({"approve": True, "approver": "alice", "reason": "uninstalled apps"}, None),
]


@pytest.mark.parametrize(("answer", "refusal"), APPROVAL_ANSWERS)
def test_more_than_approve_over_waits_for_approval(
    env: Env,
    prometheus_block: str,
    status_server: StatusServer,
    stale_errors: str,
    answer: dict,
    refusal: str | None,
) -> None:
    table = env.token_table()
    before = env.tokens(table)
    approver = Approver(RUNBOOK, answer)
    approver.start()
    p = params(env, table, prometheus_block, stale_errors, status_server, approve_over=10)

    state = push_delivery_degraded(params=p, return_state=True)

    approver.join(10)
    assert approver.error is None and approver.paused_run == state.state_details.flow_run_id
    assert "deletes 50 device tokens" in approver.description
    if refusal:
        assert state.is_failed() and refusal in state.message
        assert env.tokens(table) == before
        return
    assert state.is_completed(), state.message
    summary: PushDeliverySummary = state.result()
    assert summary.outcome is Outcome.RESOLVED and "approved by alice" in summary.report
    assert env.tokens(table) == {t for t in before if t.startswith("fresh-")}


def test_prometheus_down_escalates(env: Env, status_server: StatusServer) -> None:
    block = unique("prometheus-down")
    PrometheusServer(url=f"http://127.0.0.1:{free_port()}", timeout_s=2).save(block, overwrite=True)
    table = env.token_table()
    state = push_delivery_degraded(
        params=params(env, table, block, unique("push"), status_server), return_state=True
    )
    assert state.is_failed()
    assert "does not answer" in state.message and "delivery per provider cannot be read" in state.message
    assert len(env.tokens(table)) == 100


def test_provider_5xx_escalates_naming_the_provider(
    env: Env, prometheus, prometheus_block: str, status_server: StatusServer
) -> None:
    status_server.pages["apns"] = statuspage("major", "APNs partial outage")
    run = unique("push")
    set_sends(
        prometheus,
        run,
        {("fcm", "success"): 50.0, ("apns", "success"): 40.0, ("apns", "InternalServerError"): 10.0},
    )
    table = env.token_table()
    before = env.tokens(table)
    p = params(
        env,
        table,
        prometheus_block,
        run,
        status_server,
        max_stale_share=0.9,  # half the table is stale: not enough to prune without the errors
        status_pages=[
            # an unreachable status page is unknown, not a failure
            StatusPage(provider="fcm", url=f"http://127.0.0.1:{free_port()}/status.json"),
            StatusPage(provider="apns", url=status_server.url("apns")),
        ],
    )

    state = push_delivery_degraded(params=p, return_state=True)

    assert state.is_failed()
    assert "provider apns is failing" in state.message
    assert "APNs partial outage" in state.message and "cannot fix" in state.message
    assert "fcm" not in state.message.split("provider apns")[0]
    assert env.tokens(table) == before  # no 'unregistered' errors: nothing pruned
    report = read_incident_report(state.state_details.flow_run_id)
    assert "ESCALATED" in report
    assert "| fcm status page | OK | unknown: unreachable" in report
    assert "| apns status page | FAILING | degraded" in report
