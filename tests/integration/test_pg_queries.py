"""tasks/pg_queries.py against a real PostgreSQL: long statements listed per database, cancelled
once (a repeat finds them gone), a superuser's never cancelled by the least-privileged role, and a
session's newer statement never cancelled for its older one."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from blocks.postgres import PostgresDatabase
from tasks.pg_queries import cancel_queries, list_long_queries
from tests.pg_env import Env, env, wait_until  # noqa: F401 - env: a fixture

pytestmark = pytest.mark.integration

RUNNING_FOR_S = 0.5


class Sleeper:
    """`SELECT pg_sleep(seconds)` on its own session, in a thread."""

    def __init__(self, conn: psycopg.Connection, seconds: float = 60) -> None:
        self.conn = conn
        self.pid = conn.info.backend_pid
        self.errors: list[psycopg.Error] = []
        self.thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self.thread.start()

    def _run(self, seconds: float) -> None:
        try:
            self.conn.execute("SELECT pg_sleep(%s)", (seconds,))
        except psycopg.Error as exc:
            self.errors.append(exc)


@pytest.fixture
def sleepers(env: Env) -> Iterator[list[Sleeper]]:
    started: list[Sleeper] = []
    yield started
    for sleeper in started:
        env.admin.execute("SELECT pg_terminate_backend(%s)", (sleeper.pid,))
        sleeper.thread.join(timeout=10)
        sleeper.conn.close()


def block(env: Env) -> PostgresDatabase:
    return PostgresDatabase.load(env.block())


def long_pids(db: PostgresDatabase, env: Env) -> set[int]:
    return {q.pid for q in list_long_queries(db, env.db, RUNNING_FOR_S)}


def test_cancelled_once_then_gone(env: Env, sleepers: list[Sleeper]) -> None:
    db = block(env)
    sleeper = Sleeper(env.connect(env.app_role, "slow-report"))
    sleepers.append(sleeper)
    assert wait_until(lambda: sleeper.pid in long_pids(db, env))
    listed = list_long_queries(db, env.db, RUNNING_FOR_S)
    assert [q.pid for q in listed] == [sleeper.pid]
    assert list_long_queries(db, "postgres", RUNNING_FOR_S) == [], "another database"

    planned = cancel_queries(db, listed, dry_run=True)
    assert [c.action for c in planned.planned] == ["cancel_query"] and planned.applied == []
    assert sleeper.thread.is_alive()

    done = cancel_queries(db, listed, dry_run=False)
    assert done.cancelled == [sleeper.pid] and len(done.applied) == 1
    sleeper.thread.join(timeout=10)
    assert [type(e) for e in sleeper.errors] == [psycopg.errors.QueryCanceled]

    again = cancel_queries(db, listed, dry_run=False)
    assert again.cancelled == [] and again.gone == [sleeper.pid] and again.applied == []


def test_a_newer_statement_of_the_session_is_not_cancelled(
    env: Env, sleepers: list[Sleeper]
) -> None:
    db = block(env)
    conn = env.connect(env.app_role, "slow-report")
    first = Sleeper(conn, seconds=RUNNING_FOR_S * 3)
    sleepers.append(first)
    assert wait_until(lambda: first.pid in long_pids(db, env))
    listed = list_long_queries(db, env.db, RUNNING_FOR_S)
    first.thread.join(timeout=10)
    second = Sleeper(conn)  # same session, same pid, a new statement
    sleepers.append(second)
    assert wait_until(lambda: second.pid in long_pids(db, env))

    result = cancel_queries(db, listed, dry_run=False)

    assert result.cancelled == [] and result.gone == [first.pid]
    assert second.thread.is_alive() and second.errors == []


def test_a_superusers_statement_is_not_the_runbooks_to_cancel(
    env: Env, sleepers: list[Sleeper]
) -> None:
    db = block(env)
    sleeper = Sleeper(env.connect(env.server.user, "dba-console"))
    sleepers.append(sleeper)
    assert wait_until(lambda: sleeper.pid in long_pids(db, env))
    listed = list_long_queries(db, env.db, RUNNING_FOR_S)
    assert [q.signalable for q in listed] == [False]

    result = cancel_queries(db, listed, dry_run=False)

    assert result.not_allowed == [sleeper.pid] and result.applied == []
    assert sleeper.thread.is_alive() and sleeper.errors == []
