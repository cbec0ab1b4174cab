"""The write turn of serving/sqlite_server.py on a real SQLite file, in this process: Prefect's own
SQLite configuration (engine, sessions, BEGIN listener) with the patch installed.

A raw sqlite3 connection with no busy timeout tells whether any connection of Prefect's holds the
database's write lock: its `BEGIN IMMEDIATE` then fails at once with "database is locked".
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving import sqlite_server


def _write_lock_free(path: Path) -> bool:
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        probe.close()


async def _config(path: Path):
    from prefect.server.database.configurations import AioSqliteConfiguration

    sqlite_server.install()
    config = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{path}")
    return config, await config.engine()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "turns.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x int)")
    return path


def test_a_task_started_inside_a_transaction_reads_without_the_write_lock(db: Path) -> None:
    async def main() -> bool:
        config, engine = await _config(db)
        read_open = asyncio.Event()
        checked = asyncio.Event()

        async def reader() -> None:
            # started inside the transaction below, so it inherits its context; it runs after
            session = await config.session(engine)
            async with session:
                await session.execute(sa.text("SELECT count(*) FROM t"))
                read_open.set()
                await checked.wait()

        session = await config.session(engine)
        async with session, config.begin_transaction(session):
            await session.execute(sa.text("INSERT INTO t VALUES (1)"))
            task = asyncio.create_task(reader())
        await read_open.wait()
        free = await asyncio.to_thread(_write_lock_free, db)
        checked.set()
        await task
        await engine.dispose()
        return free

    # Prefect's own BEGIN listener would say BEGIN IMMEDIATE for that read (the mode is a context
    # variable the task inherited) and hold the write lock while the read session stays open
    assert asyncio.run(main()), "a plain read holds SQLite's write lock"


def test_a_task_the_holder_awaits_does_not_wait_for_the_turn(db: Path) -> None:
    async def main() -> tuple[int, float]:
        config, engine = await _config(db)

        async def child() -> int:
            session = await config.session(engine)
            async with session, config.begin_transaction(session):
                return (await session.execute(sa.text("SELECT count(*) FROM t"))).scalar_one()

        started = time.monotonic()
        session = await config.session(engine)
        async with session, config.begin_transaction(session):
            await session.execute(sa.text("SELECT 1"))
            # asyncio.gather inside a transaction: the holder awaits a task of its own
            [count] = await asyncio.wait_for(asyncio.gather(child()), 30)
        await engine.dispose()
        return count, time.monotonic() - started

    count, took = asyncio.run(main())
    assert count == 0 and took < 1.0


def test_a_blocked_event_loop_is_logged_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        sqlite_server.watch_loop(asyncio.get_running_loop(), blocked_s=0.5)
        await asyncio.sleep(0.3)
        time.sleep(2)  # a synchronous call on the loop's thread: the whole server waits
        await asyncio.sleep(0.3)

    with caplog.at_level(logging.WARNING, logger="runbooks.sqlite_server"):
        asyncio.run(main())
    [line] = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert "in main" in line and "time.sleep(2)" in line


def test_transactions_of_one_task_take_turns_with_another(db: Path) -> None:
    async def main() -> list[str]:
        config, engine = await _config(db)
        order: list[str] = []

        async def writer(name: str) -> None:
            session = await config.session(engine)
            async with session, config.begin_transaction(session):
                order.append(f"{name} in")
                await session.execute(sa.text("INSERT INTO t VALUES (1)"))
                await asyncio.sleep(0.2)
                order.append(f"{name} out")

        await asyncio.gather(writer("a"), writer("b"))
        await engine.dispose()
        return order

    assert asyncio.run(main()) == ["a in", "a out", "b in", "b out"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


BUSY_S = 5  # SQLite's busy timeout in the test below (the server's is 60 s)


def test_a_failed_statement_cannot_stall_the_event_loop(db: Path) -> None:
    """Issue #9's 60 s stall, in its own shape, with aiosqlite as SQLAlchemy's adapter uses it
    (a cursor per statement): a statement fails on connection C1 (UNIQUE) and its error, with the
    cursor in its traceback, outlives it; a transaction of this loop (C2) holds the write lock;
    C1's `BEGIN IMMEDIATE` waits for it in SQLite's busy handler; the garbage collector then frees
    the failed cursor on the loop's thread. Before the fix, freeing it reset its statement, which
    waited for C1's mutex, held by the busy handler: the loop stopped, C2 could not commit, and
    C1 failed after the busy timeout with "database is locked". Now the failed cursor was closed
    on C1's thread when it failed: the loop runs on, C2 commits, C1 gets the lock."""
    import gc

    import aiosqlite

    async def main() -> None:
        sqlite_server.close_failed_cursors()
        c1 = await aiosqlite.connect(db, isolation_level=None, timeout=BUSY_S)
        c2 = await aiosqlite.connect(db, isolation_level=None, timeout=BUSY_S)
        try:
            await c1.execute("CREATE TABLE u (x int PRIMARY KEY)")
            await c1.execute("INSERT INTO u VALUES (1)")
            failed: list[BaseException] = []
            cursor = await c1.cursor()
            try:
                await cursor.execute("INSERT INTO u VALUES (1)")
            except sqlite3.IntegrityError as exc:
                failed.append(exc)  # as a traceback keeps its frames (and the cursor) alive
            del cursor
            # the session rolls back on C1 after the error: C1's thread holds the cursor no more
            await c1.rollback()
            await c2.execute("BEGIN IMMEDIATE")

            async def holder() -> None:
                await asyncio.sleep(0.5)
                await c2.execute("COMMIT")

            committed = asyncio.create_task(holder())
            waiting = asyncio.create_task(c1.execute("BEGIN IMMEDIATE"))
            await asyncio.sleep(0.2)  # C1's thread is in SQLite's busy handler now
            failed.clear()  # the last reference to the failed cursor goes, on the loop's thread
            gc.collect()
            await committed
            await waiting  # "database is locked" after BUSY_S before the fix
            await c1.execute("ROLLBACK")
        finally:
            await c1.close()
            await c2.close()

    asyncio.run(main())
