"""Alerts through two alert gateways into the team topology (issue #16, tests/team_topology.py).

Two ``python -m alert_gateway`` processes, each with a spool of its own (as behind a load
balancer): gateway-a forwards to API server A (with the services), gateway-b to API server B
(API only). The runbook is event-processing-stuck against a real PostgreSQL table (the fixtures of
tests/integration/test_event_processing_stuck.py), started by its deployment's trigger and run by
the topology's workers. A trigger on the table counts every reset it really did (PROCESSING ->
PENDING), row by row.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import pytest
from prefect.settings import PREFECT_API_URL
from psycopg import sql

from alert_gateway.events import delivery_id
from blocks.escalation import EscalationPolicy
from tests.conftest import read_incident_report
from tests.gateway_proc import read_events
from tests.integration.test_event_processing_stuck import SCHEMA, Env, env, seeded  # noqa: F401
from tests.integration.test_team_topology import (  # noqa: F401
    FINAL,
    api,
    deployment_runs,
    team,
    wait_state,
)
from tests.pg_env import wait_until
from tests.receivers import HttpReceiver
from tests.servers import free_port
from tests.team_topology import Proc, TeamTopology, wait_healthy

# the first test of a session also starts the topology (1.5 min on idle cores, 5 on busy ones)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DEPLOYMENT = "event-processing-stuck"
ALERTNAME = "EventsStuckInProcessing"
TOKEN = uuid.uuid4().hex
BUDGET = 3  # RESET_BUDGET of flows/event_store/event_processing_stuck.py: 3 resets per hour


@dataclass
class Gateway:
    proc: Proc
    url: str
    spool: Path

    def send(self, body: dict) -> httpx.Response:
        return httpx.post(
            f"{self.url}/alerts/alertmanager",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )

    def spooled(self) -> list[tuple[str, str, int]]:
        """(event id, state, delivery attempts) of every event in the gateway's spool."""
        with sqlite3.connect(f"file:{self.spool}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT id, state, attempts FROM events ORDER BY seq").fetchall()


@pytest.fixture(scope="module")
def gateways(team_topology: TeamTopology) -> Iterator[tuple[Gateway, Gateway]]:
    """gateway-a -> API server A, gateway-b -> API server B; spools of their own.

    Cooldown 0: the tests fire the same alert again within seconds (an hour of a leak that keeps
    coming back, compressed), which the default 300 s cooldown would hold back at each gateway;
    with 0 a re-sent copy is still one event id (fingerprint, status, startsAt)."""
    started = []
    for name, api_url in (("gateway-a", team_topology.api_a), ("gateway-b", team_topology.api_b)):
        proc, url = team_topology.start_gateway(name, api_url, TOKEN, cooldown_s="0")
        started.append(Gateway(proc, url, team_topology.home / f"{name}-spool.sqlite3"))
    yield started[0], started[1]
    for g in started:
        g.proc.stop()


@pytest.fixture
def oncall(team: TeamTopology) -> Iterator[HttpReceiver]:
    """The escalation policy runs started by alerts use (safety.escalation_block 'default'):
    a webhook to a receiver of this test. Removed afterwards: other tests have none."""
    with HttpReceiver() as receiver:
        doc_id = EscalationPolicy(webhook_url=f"{receiver.url}/escalations").save(
            "default", overwrite=True
        )
        try:
            yield receiver
        finally:
            httpx.delete(
                f"{PREFECT_API_URL.value()}/block_documents/{doc_id}", timeout=10
            ).raise_for_status()


@dataclass
class Store:
    """A table of its own (its own lock and budget) whose resets a trigger counts."""

    env: Env
    table: str
    block: str
    stuck: list[int]

    def resets(self) -> Counter:
        """How many times each row was really reset from PROCESSING to PENDING."""
        rows = self.env.admin.execute(
            "SELECT event_id FROM ops.resets WHERE tbl = %s", (self.table,)
        ).fetchall()
        return Counter(r[0] for r in rows)

    def stick_again(self) -> None:
        """The consumer took the events again and died: stuck for hours once more."""
        self.env.admin.execute(
            sql.SQL(
                "UPDATE {} SET state = 'PROCESSING', touched_at = now() - interval '3 hours'"
                " WHERE event_id = ANY(%s)"
            ).format(sql.Identifier(SCHEMA, self.table)),
            (self.stuck,),
        )

    def states(self) -> set[str]:
        rows = self.env.admin.execute(
            sql.SQL("SELECT DISTINCT state FROM {} WHERE event_id = ANY(%s)").format(
                sql.Identifier(SCHEMA, self.table)
            ),
            (self.stuck,),
        ).fetchall()
        return {r[0] for r in rows}


@pytest.fixture
def store(team: TeamTopology, env: Env, seeded: psycopg.Connection) -> Store:  # noqa: F811
    """A fresh copy of the seeded table, its Event Store block saved on the topology's server."""
    table = env.copy_table()
    admin = env.admin
    admin.execute(
        "CREATE TABLE IF NOT EXISTS ops.resets (tbl text NOT NULL, event_id bigint NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    admin.execute(
        "CREATE OR REPLACE FUNCTION ops.count_reset() RETURNS trigger LANGUAGE plpgsql"
        " SECURITY DEFINER AS $$ BEGIN"
        " IF OLD.state = 'PROCESSING' AND NEW.state = 'PENDING' THEN"
        "  INSERT INTO ops.resets (tbl, event_id) VALUES (TG_TABLE_NAME, OLD.event_id);"
        " END IF; RETURN NEW; END $$"
    )
    admin.execute(
        sql.SQL(
            "CREATE TRIGGER count_reset AFTER UPDATE ON {} FOR EACH ROW"
            " EXECUTE FUNCTION ops.count_reset()"
        ).format(sql.Identifier(SCHEMA, table))
    )
    stuck = [
        r[0]
        for r in admin.execute(
            sql.SQL(
                "SELECT event_id FROM {} WHERE state = 'PROCESSING'"
                " AND touched_at < now() - interval '1 hour' ORDER BY event_id"
            ).format(sql.Identifier(SCHEMA, table))
        ).fetchall()
    ]
    assert len(stuck) > 10
    return Store(env, table, env.block(table=table), stuck)


def alert_body(fingerprint: str, labels: dict[str, str], starts_at: str) -> dict:
    """An Alertmanager v4 webhook with one firing alert, as Alertmanager sends (and re-sends) it."""
    labels = {"alertname": ALERTNAME, "severity": "warning", **labels}
    return {
        "version": "4",
        "groupKey": f"{{}}:{{alertname={ALERTNAME!r}}}",
        "status": "firing",
        "receiver": "runbooks",
        "groupLabels": {"alertname": ALERTNAME},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": "events stuck in PROCESSING"},
                "startsAt": starts_at,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": fingerprint,
            }
        ],
    }


def alert_runs(fingerprint: str) -> list[dict]:
    """Every run of the deployment an alert with this fingerprint started."""
    return [
        r
        for r in deployment_runs(DEPLOYMENT)
        if ((r["parameters"].get("params") or {}).get("alert") or {}).get("fingerprint")
        == fingerprint
    ]


def same_instant(run: dict, starts_at: str) -> bool:
    """Whether the run was started by the alert firing that started at ``starts_at``."""
    started = run["parameters"]["params"]["alert"]["starts_at"]
    return datetime.fromisoformat(started) == datetime.fromisoformat(starts_at)


def state_types(run_id: str) -> list[str]:
    """The run's state history, oldest first."""
    states = api(f"/flow_run_states/?flow_run_id={run_id}")
    return [s["type"] for s in sorted(states, key=lambda s: s["timestamp"])]


def test_twenty_identical_alerts_over_two_gateways(
    team: TeamTopology,  # noqa: F811
    gateways: tuple[Gateway, Gateway],
    store: Store,
    oncall: HttpReceiver,
) -> None:
    """The same alert for one event store fires five times (the consumer keeps dying: the events
    are stuck again each time); Alertmanager sends each firing four times, two copies to each
    gateway, at once: 20 alerts. Each firing is one event (the copies share its id: the spools
    keep one per gateway, Prefect one across them) and one run; the runs spend the budget of 3
    resets, each stuck row is reset exactly 3 times, the 4th run escalates and the 5th does not
    page again: exactly one escalation."""
    fingerprint = uuid.uuid4().hex[:16]
    labels = {"event_store": store.block, "service": "matches"}
    runs: list[dict] = []
    for firing in range(5):
        if firing:
            store.stick_again()
        starts_at = datetime.now(UTC).isoformat()
        body = alert_body(fingerprint, labels, starts_at)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(Gateway.send, [*gateways, *gateways], [body] * 4))
        assert [r.status_code for r in replies] == [202] * 4, [r.text for r in replies]
        event_ids = {eid for r in replies for eid in r.json()["event_ids"]}
        assert len(event_ids) == 1  # gateways that share nothing name the copies alike
        # per gateway: one copy spooled, the other a duplicate of it
        assert sorted(r.json()["accepted"] for r in replies) == [0, 0, 1, 1]

        def this_firing(starts_at: str = starts_at) -> list[dict]:
            return [r for r in alert_runs(fingerprint) if same_instant(r, starts_at)]

        assert wait_until(this_firing, timeout_s=60), f"firing {firing + 1} started no run"
        (run,) = this_firing()
        runs.append(wait_state(run["id"], FINAL, timeout_s=90))

    # one run per firing, not one per copy or per gateway (checked once the last run is over)
    for run in runs:
        starts_at = run["parameters"]["params"]["alert"]["starts_at"]
        copies = [r for r in alert_runs(fingerprint) if same_instant(r, starts_at)]
        assert len(copies) == 1, f"{len(copies)} runs for one firing"
    acted, refused = runs[:BUDGET], runs[BUDGET:]
    assert [r["state_type"] for r in acted] == ["COMPLETED"] * BUDGET, [
        r["state"]["message"] for r in acted
    ]
    assert [r["state_type"] for r in refused] == ["FAILED"] * 2
    assert all(f"budget of {BUDGET} per 1h spent" in r["state"]["message"] for r in refused)
    assert "not notifying again" not in refused[0]["state"]["message"]
    assert "already escalated, not notifying again" in refused[1]["state"]["message"]
    # the world: every stuck row reset once per allowed run, none by the refused ones
    assert store.resets() == Counter({row: BUDGET for row in store.stuck})
    assert store.states() == {"PROCESSING"}
    assert "remediation budget spent" in read_incident_report(refused[1]["id"])
    # exactly one escalation: the budget's, from the 4th run (the 5th's is over: no more)
    assert len(oncall.requests) == 1, [r.json() for r in oncall.requests]
    note = oncall.requests[0].json()
    assert note["kind"] == "budget_spent" and note["flow_run_id"] == refused[0]["id"]
    assert note["runbook"] == DEPLOYMENT
    # every copy accepted by a gateway reached Prefect
    for gateway in gateways:
        assert {state for _, state, _ in gateway.spooled()} == {"delivered"}


ALERTS = 10
KILL_AFTER = 3  # alerts accepted before API server A dies
DOWN_S = 6  # alerts keep arriving this long with A dead, then it starts again


def dedupe_key(event_id: str) -> str:
    """The Redis key by which Prefect's event publisher records an event id as seen: its cache
    (``PREFECT_MESSAGING_CACHE=prefect_redis.messaging``: ``Cache``, its default topic) sets it
    with ``SET NX`` before the event is appended to the stream (prefect-redis ``without_duplicates``)."""
    import inspect

    from prefect_redis.messaging import Cache, _deduplication_key

    topic = inspect.signature(Cache.__init__).parameters["topic"].default
    return _deduplication_key(topic, event_id)


def loss_evidence(
    team: TeamTopology,  # noqa: F811
    gateways: tuple[Gateway, ...],
    event_id: str,
) -> dict[str, object]:
    """What is known of an accepted alert that started no run, for each id its delivery attempts
    went under (alert_gateway.events.delivery_id): the gateways' spool rows, and whether Prefect's
    event publisher (prefect-redis, ``deduplicate_by="id"``) set the id's deduplication key,
    appended it to the events stream, and whether Prefect's event store has it. A key without a
    stream entry is Prefect's loss window (an API server killed between the two); the gateway's
    next attempt goes under a new id for that reason (test_a_retry_after_prefects_loss_window)."""
    import redis
    from prefect_redis.messaging import _stream_key

    client = redis.Redis(port=team.redis_port, socket_timeout=10)
    spool = {
        g.proc.name: [row for row in g.spooled() if row[0] == event_id] for g in gateways
    }
    attempts = max((row[2] for rows in spool.values() for row in rows), default=0) + 1
    stream = client.xrange(_stream_key("events"))
    ids = {}
    for n in range(1, attempts + 1):
        sent = delivery_id(event_id, n)
        ids[sent] = {
            "attempt": n,
            "dedupe_key": client.exists(dedupe_key(sent)) == 1,
            "in_stream": any(sent.encode() in f.get(b"attributes", b"") for _, f in stream),
            "in_event_store": bool(read_events(team.api_b, {"id": {"id": [sent]}})),
        }
    return {"spool": spool, "ids": ids}


def test_api_server_killed_while_alerts_arrive(
    team: TeamTopology,  # noqa: F811
    gateways: tuple[Gateway, Gateway],
    store: Store,
) -> None:
    """Ten different alerts for one event store, alternately to gateway-a (-> A) and gateway-b
    (-> B); API server A (the one with the triggers service) SIGKILLed after the third. While A
    is down gateway-a's spool keeps its alerts and retries; B takes gateway-b's into Redis, where
    the triggers service finds them once A is back. Every alert a gateway accepted (202) ends as
    a run, each run started once (one RUNNING state, one process launched by one worker: the
    worker logs), and the store is reset once.

    An alert whose event A's triggers evaluated just before the SIGKILL can become two runs:
    Prefect's triggers consumer (prefect 3.8.8 server/events/triggers.py) records an event as
    seen only after evaluating it, and Redis redelivers the unacknowledged message after the
    restart, so the automation fires again: the same automation and action, a new invocation (1
    of 5 runs of this test alone, issue #16). The second run must stop before acting, COMPLETED
    "duplicate alert" naming the first (runbooks/alert_claims.py; its deterministic test is
    tests/integration/test_alert_claims.py). So can an alert whose failed delivery attempt A
    had in fact published (the answer lost with A): the gateway's retry goes under a new event
    id (test_a_retry_after_prefects_loss_window), the same automation fires for it, and that run
    stops the same way, the alert claimed by its own id. Any other doubling fails: a second automation, a run
    without an invocation key, two runs that both acted, a run started twice, a change applied
    twice. An accepted alert without a run fails, with what Prefect and the gateways know of it
    (``loss_evidence``: Prefect's own loss window, an API server killed between recording an event
    id as seen and publishing it, is what a retry under a new id gets past)."""
    gateway_a, gateway_b = gateways
    labels = {"event_store": store.block, "service": "matches"}
    fingerprints = [uuid.uuid4().hex[:16] for _ in range(ALERTS)]
    accepted: list[str] = []
    event_ids: dict[str, str] = {}
    a = team.procs["api-a"]
    killed = threading.Event()
    try:
        for i, fingerprint in enumerate(fingerprints):
            if i == KILL_AFTER:
                a.kill()
                killed.set()
                killed_at = time.monotonic()
            gateway = gateway_a if i % 2 == 0 else gateway_b
            reply = gateway.send(alert_body(fingerprint, labels, datetime.now(UTC).isoformat()))
            assert reply.status_code == 202, reply.text
            assert reply.json()["accepted"] == 1
            accepted.append(fingerprint)
            (event_ids[fingerprint],) = reply.json()["event_ids"]
            time.sleep(DOWN_S / (ALERTS - KILL_AFTER) if killed.is_set() else 0.3)
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - killed_at)))
        # gateway-a could not deliver what it accepted while A was down: it is in its spool
        pending = [e for e in gateway_a.spooled() if e[1] == "pending"]
        assert pending, f"gateway-a holds nothing for the dead A: {gateway_a.spooled()}"
    finally:
        if not a.alive:
            a.start()
            wait_healthy(team.api_a, a)

    def all_started() -> bool:
        return all(alert_runs(f) for f in accepted)

    if not wait_until(all_started, timeout_s=120):
        missing = {f: event_ids[f] for f in accepted if not alert_runs(f)}
        evidence = {f: loss_evidence(team, gateways, e) for f, e in missing.items()}
        raise AssertionError(f"accepted alerts that never started a run: {evidence}")
    runs = {f: alert_runs(f) for f in accepted}
    for run in (r for rs in runs.values() for r in rs):
        wait_state(run["id"], FINAL, timeout_s=90)
    for f, rs in runs.items():
        if len(rs) == 1:
            continue
        # the redelivery (see the docstring): one automation and action, new invocations, and
        # every run but one stopped as a duplicate before acting
        keys = [r["idempotency_key"] or "" for r in rs]
        sources = {k.rsplit(", invocation ", 1)[0] for k in keys}
        assert len(sources) == 1 and all(", invocation " in k for k in keys), (
            f"alert {f} has {len(rs)} runs not explained by one automation firing again "
            f"(A killed after {KILL_AFTER}): {[(r['name'], r['created'], k) for r, k in zip(rs, keys, strict=True)]}"
        )
        messages = [wait_state(r["id"], FINAL, timeout_s=90)["state"]["message"] or "" for r in rs]
        duplicates = [m for m in messages if "Stopped without acting: alert event" in m]
        assert len(duplicates) == len(rs) - 1, (f, messages)
    launches = team.procs["worker-1"].tail(10**7) + team.procs["worker-2"].tail(10**7)
    for f, run in ((f, r) for f, rs in runs.items() for r in rs):
        done = wait_state(run["id"], FINAL, timeout_s=90)
        assert done["state_type"] == "COMPLETED", done["state"]["message"]
        # started once: one RUNNING, one process launched by one worker
        history = state_types(run["id"])
        assert history.count("RUNNING") == 1 and done["run_count"] == 1, (f, history)
        launched = f"Flow run '{done['name']}' submitted to infrastructure"
        assert launches.count(launched) == 1, (f, history, launches.count(launched))
    # the retried deliveries got through: every spooled event delivered, some after failures
    spooled_a = gateway_a.spooled()
    assert {state for _, state, _ in spooled_a} == {"delivered"}
    assert max(attempts for _, _, attempts in spooled_a) > 1
    # one run reset the stuck rows; the others found nothing stuck (or waited for its lock)
    assert store.resets() == Counter({row: 1 for row in store.stuck})
    # both workers back on their servers for the tests after this one
    team.wait_worker_online("worker-1")


class DyingBalancer:
    """A load balancer in front of API server A whose backend dies during the first delivery of
    events, answering 502 as a balancer does; later requests go through to A unchanged.

    ``mode`` says how far A got before it died, as prefect-redis's event publisher (prefect
    3.8.8, ``deduplicate_by="id"``) does it: ``"seen"``: it had set each event id's deduplication
    key (``SET NX``, kept 5 minutes) but not appended the event to its stream (done here with
    the publisher's own key, what the dead server leaves behind); ``"published"``: it had
    published the events (the request went through) and died before answering."""

    def __init__(self, upstream_api: str, redis_port: int, mode: str):
        self.upstream_api = upstream_api
        self.redis_port = redis_port
        self.mode = mode
        self.sent_ids: list[list[str]] = []  # the event ids of each POST /events, in order
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def __enter__(self) -> DyingBalancer:
        balancer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, reply = balancer.handle(self.path, dict(self.headers), body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        assert path.startswith("/api/events"), path  # the gateway posts nothing else
        first = not self.sent_ids
        self.sent_ids.append([e["id"] for e in json.loads(body)])
        if first and self.mode == "seen":
            import redis

            client = redis.Redis(port=self.redis_port, socket_timeout=10)
            for event_id in self.sent_ids[0]:
                client.set(dedupe_key(event_id), "1", nx=True, ex=300)
            return 502, b'{"detail": "upstream died"}'
        forward = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")}
        answer = httpx.post(
            self.upstream_api + path[len("/api"):], content=body, headers=forward, timeout=30
        )
        if first and self.mode == "published":
            return 502, b'{"detail": "upstream died before answering"}'
        return answer.status_code, answer.content


@pytest.mark.parametrize("mode", ["seen", "published"])
def test_a_retry_after_prefects_loss_window_starts_the_run_once(
    team: TeamTopology,  # noqa: F811
    store: Store,
    mode: str,
) -> None:
    """An API server that dies while it takes an alert's event leaves the gateway's attempt
    failed (502 from the balancer) and the event either only *seen* (its deduplication key set,
    never published: a retry under the same id is dropped as a duplicate with a 200, and the
    alert is lost: what the chaos test above met 1 run in 5 before) or *published* (the answer
    lost). The gateway's retry goes under a new id naming the alert's own: the alert starts its
    run in both cases, and when Prefect has it twice the second run stops before acting. The
    world: the stuck rows reset exactly once."""
    fingerprint = uuid.uuid4().hex[:16]
    with DyingBalancer(team.api_a, team.redis_port, mode) as balancer:
        proc, url = team.start_gateway(
            f"gateway-lb-{mode}", balancer.api, TOKEN, cooldown_s="0"
        )
        gateway = Gateway(proc, url, team.home / f"gateway-lb-{mode}-spool.sqlite3")
        try:
            labels = {"event_store": store.block, "service": "matches"}
            reply = gateway.send(alert_body(fingerprint, labels, datetime.now(UTC).isoformat()))
            assert reply.status_code == 202, reply.text
            (alert_id,) = reply.json()["event_ids"]
            assert wait_until(lambda: alert_runs(fingerprint), timeout_s=90), (
                f"the alert started no run: {loss_evidence(team, (gateway,), alert_id)}"
            )
            if mode == "published":  # Prefect has it twice: both runs must be over
                assert wait_until(lambda: len(alert_runs(fingerprint)) == 2, timeout_s=60)
            runs = [wait_state(r["id"], FINAL, timeout_s=120) for r in alert_runs(fingerprint)]
        finally:
            proc.stop()
    # attempt 1 under the alert's id, failed; attempt 2 under its own id, delivered
    assert balancer.sent_ids == [[alert_id], [delivery_id(alert_id, 2)]]
    if mode == "published":  # the key "seen" sets is the one Prefect's publisher really sets
        import redis

        assert redis.Redis(port=team.redis_port, socket_timeout=10).exists(dedupe_key(alert_id))
    assert gateway.spooled() == [(alert_id, "delivered", 2)]
    assert all(r["state_type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    messages = [r["state"]["message"] or "" for r in runs]
    duplicates = [m for m in messages if "Stopped without acting: alert event" in m]
    assert len(runs) == (1 if mode == "seen" else 2) and len(duplicates) == len(runs) - 1, messages
    # both runs claimed the alert by its own id, whatever event started them
    assert {r["parameters"]["params"]["alert"]["event_id"] for r in runs} == {alert_id}
    assert store.resets() == Counter({row: 1 for row in store.stuck})
