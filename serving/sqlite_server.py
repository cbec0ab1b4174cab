"""`prefect server start` for `runbooks up`: one SQLite writer at a time, each waiting its turn.

SQLite has one write lock per database. Prefect opens most of its write transactions
(``session_context(begin_transaction=True)``) as ``BEGIN DEFERRED``: such a transaction reads
first and asks for the write lock at its first write; if another connection committed after its
read, SQLite cannot let it write (its snapshot is stale) and fails it at once with "database is
locked", busy timeout or not. Prefect answers 503 and its clients retry after 2 s, 4 s, 8 s...;
its own services (the one that marks runs Late, the event persister) log a traceback and try
again at their next loop. Prefect starts a few transactions ``BEGIN IMMEDIATE`` for this reason
(flow and task run state changes: see ``mark_deployments_ready``); the rest stay deferred.

That was harmless with one alert at a time. Restarting `runbooks up` with 50 alerts queued in the
gateway (issue #9 defect 6) made it the common case: the automations creating 50 runs, the runner
starting them, each run's state changes, logs and events, and the Late-runs service all wrote at
once; 98-832 "database is locked" tracebacks per restart, runs marked Late and retried, and the
last of 50 runs finished minutes late (`python -m bench restart-backlog`, README).

This launcher starts Prefect's own server command with every transaction that Prefect opens
through ``begin_transaction`` (1) begun ``IMMEDIATE``, so it holds the write lock from its first
statement and can never be refused after reading, and (2) taken in turn within the server
process (an ``asyncio.Lock`` per event loop), so the waiting happens in the event loop, holding
no pooled connection and no worker thread, instead of inside SQLite's busy handler. Statements
outside such transactions (Prefect's autocommit writes, other processes) still meet SQLite's
busy timeout as before. A transaction opened inside one this task already holds neither waits
for its turn nor is forced IMMEDIATE (it would wait for the outer one); nor does a task the
holder started and awaits (``asyncio.gather`` inside a transaction). Prefect keeps the BEGIN mode
in a context variable, which a task started inside a transaction inherits: such a task's plain
reads no longer begin IMMEDIATE (they held SQLite's write lock outside the turn for as long as
their session lived). A thread logs the loop thread's stack when the event loop is blocked for
``LOOP_BLOCKED_S``.

That thread named the 60 s stall of issue #9 (the API silent for 60 s, then "database is locked"):
a statement that fails (a racing create of a target lock's concurrency limit ends in
IntegrityError) leaves its sqlite3 cursor open, because SQLAlchemy's aiosqlite adapter closes the
cursor only after a statement succeeds; the exception's traceback keeps it alive until Python's
garbage collector frees it, on whatever thread allocates at that moment: the event loop's. Freeing
a cursor that still holds its statement resets the statement, which needs the connection's SQLite
mutex; if that pooled connection is meanwhile waiting in SQLite's busy handler (inside
``sqlite3_step``, holding the mutex) for a write lock that a transaction on this same event loop
holds, the loop thread waits for the busy handler, the loop cannot run the holder's COMMIT, and
both wait until SQLite's 60 s busy timeout fails the statement. (3) Every aiosqlite cursor whose
operation fails is therefore closed at once, on its connection's own thread, before the error
propagates: a cursor freed later holds no statement and touches no mutex.

Nothing else changes; pinned to prefect 3.8.8 and aiosqlite 0.22.1, and
tests/integration/test_sqlite_server.py and test_sqlite_turns.py fail if the pieces it relies on
change.

    python -m serving.sqlite_server --host 127.0.0.1 --port 4200   (= prefect server start ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

# The task that opened the outermost transaction of this context: a transaction nested in one the
# running task holds must not wait for the turn. A task, not a flag: a context variable is copied
# into every task started inside a transaction, and such a task is not inside it.
_owner: contextvars.ContextVar[asyncio.Task | None] = contextvars.ContextVar(
    "runbooks_sqlite_write_turn_owner", default=None
)
# The event loop not running a callback for this long is logged with the loop thread's stack:
# the 60 s stall of issue #9 blocked the whole loop (every timer fired late at once), not a turn.
LOOP_BLOCKED_S = 10.0
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _turn() -> asyncio.Lock:
    """The write turn of the running event loop (the server may run services on other loops)."""
    loop = asyncio.get_running_loop()
    lock = _turns.get(loop)
    if lock is None:
        lock = _turns[loop] = asyncio.Lock()
    return lock


# Who holds each loop's turn and since when: a watchdog names a holder that keeps it too long
_holders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[asyncio.Task, float]] = (
    weakref.WeakKeyDictionary()
)
# The watchdog task of each loop
_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = (
    weakref.WeakKeyDictionary()
)
HELD_TOO_LONG_S = 10.0
logger = logging.getLogger("runbooks.sqlite_server")


async def _watch_turns(loop: asyncio.AbstractEventLoop) -> None:
    """Log (once per holding) a task that has held the write turn for over HELD_TOO_LONG_S."""
    reported: asyncio.Task | None = None
    while True:
        await asyncio.sleep(HELD_TOO_LONG_S / 2)
        held = _holders.get(loop)
        if held is None or held[0] is reported:
            continue
        task, since = held
        if loop.time() - since > HELD_TOO_LONG_S:
            reported = task
            logger.warning(
                "SQLite write turn held for %.0fs by %s, awaiting in:\n%s",
                loop.time() - since, task.get_name(), "\n".join(coroutine_stack(task.get_coro())),
            )


def coroutine_stack(coro: Any) -> list[str]:
    """Where a suspended coroutine waits, outermost first, following what each one awaits
    (``Task.print_stack`` shows only the outermost frame of a task that awaits a future)."""
    lines: list[str] = []
    seen: set[int] = set()
    while coro is not None and id(coro) not in seen and len(lines) < 200:
        seen.add(id(coro))
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(
            coro, "ag_frame", None
        )
        if frame is None:  # not a coroutine: a future (or its iterator) or another awaitable
            lines.append(f"  awaiting {coro!r}"[:500])
            return lines
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return lines


def _turn_acquired() -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        _holders[loop] = (task, loop.time())
    if loop not in _watchers:
        _watchers[loop] = loop.create_task(_watch_turns(loop))
        watch_loop(loop)


def _inherited() -> bool:
    """Whether this context's transaction belongs to another task (this one was started in it)."""
    owner = _owner.get()
    return owner is not None and owner is not asyncio.current_task()


def _nested() -> bool:
    """Whether a transaction opened now is inside one that holds the turn: opened by this very
    task, or by the task that started this one and holds the turn now (e.g. ``asyncio.gather``
    inside a transaction: the holder awaits this task, which must not wait for the holder)."""
    owner = _owner.get()
    if owner is None:
        return False
    if owner is asyncio.current_task():
        return True
    held = _holders.get(asyncio.get_running_loop())
    return held is not None and held[0] is owner


def watch_loop(loop: asyncio.AbstractEventLoop, blocked_s: float = LOOP_BLOCKED_S) -> None:
    """From a thread of its own, log the loop thread's stack whenever the loop has not run a
    callback for ``blocked_s``: a synchronous call blocking the server (once per blocking)."""
    import sys
    import threading
    import time
    import traceback

    loop_thread = threading.get_ident()
    beat = [time.monotonic()]

    def tick() -> None:
        beat[0] = time.monotonic()

    def watch() -> None:
        reported = 0.0
        while not loop.is_closed():
            try:
                loop.call_soon_threadsafe(tick)
            except RuntimeError:  # closed meanwhile
                return
            time.sleep(min(1.0, blocked_s / 4))
            since = beat[0]
            if time.monotonic() - since > blocked_s and since != reported:
                reported = since
                frame = sys._current_frames().get(loop_thread)
                logger.warning(
                    "event loop blocked for %.0fs, its thread in:\n%s",
                    time.monotonic() - since,
                    "".join(traceback.format_stack(frame)) if frame else "(gone)",
                )

    threading.Thread(target=watch, name="runbooks-loop-watch", daemon=True).start()


def close_failed_cursors() -> None:
    """(3) of the module docstring: an aiosqlite cursor whose operation fails (or is cancelled) is
    closed on its connection's thread before the error propagates. Idempotent."""
    import aiosqlite

    original = aiosqlite.Cursor._execute
    if getattr(original, "_runbooks", False):
        return

    async def _execute(self: aiosqlite.Cursor, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, fn, *args, **kwargs)
        except BaseException:
            if fn != self._cursor.close:
                # queued behind the failed call on the connection's thread; a close that fails
                # too leaves things as they were
                with contextlib.suppress(Exception):
                    await original(self, self._cursor.close)
            raise

    _execute._runbooks = True  # type: ignore[attr-defined]
    aiosqlite.Cursor._execute = _execute  # type: ignore[method-assign]


def install() -> None:
    """Patch this process's Prefect server (before it starts): see the module docstring."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    close_failed_cursors()
    if getattr(AioSqliteConfiguration.begin_transaction, "_runbooks", False):
        return
    original_begin = AioSqliteConfiguration.begin_transaction
    original_begin_stmt = AioSqliteConfiguration.begin_sqlite_stmt

    @asynccontextmanager
    async def begin_transaction(
        self: AioSqliteConfiguration, session: Any, with_for_update: bool = False
    ) -> AsyncIterator[Any]:
        # with_for_update is what makes Prefect's SQLite configuration say BEGIN IMMEDIATE
        if _nested():
            # nested in a transaction this task holds (on another connection): as Prefect asks,
            # since IMMEDIATE here would wait on SQLite's lock for the outer transaction
            async with original_begin(self, session, with_for_update) as transaction:
                yield transaction
            return
        async with _turn():
            token = _owner.set(asyncio.current_task())
            _turn_acquired()
            try:
                async with original_begin(self, session, with_for_update=True) as transaction:
                    yield transaction
            finally:
                _owner.reset(token)
                _holders.pop(asyncio.get_running_loop(), None)

    def begin_sqlite_stmt(self: AioSqliteConfiguration, conn: Any) -> None:
        # Prefect keeps the BEGIN mode in a context variable, which every task started inside a
        # transaction inherits: such a task's plain reads would begin IMMEDIATE, outside the
        # turn, and hold SQLite's write lock as long as their session lives. Its own
        # transactions set the mode again (begin_transaction above), so here it is dropped.
        if _inherited():
            return
        original_begin_stmt(self, conn)

    begin_transaction._runbooks = True  # type: ignore[attr-defined]
    AioSqliteConfiguration.begin_transaction = begin_transaction  # type: ignore[method-assign]
    AioSqliteConfiguration.begin_sqlite_stmt = begin_sqlite_stmt  # type: ignore[method-assign]


def create_app() -> Any:
    """Prefect's server app with this module's patch, for ``uvicorn --factory`` (the tests'
    session server runs it so; tests/conftest.py)."""
    install()
    from prefect.server.api.server import create_app as prefect_create_app

    return prefect_create_app()


def main(argv: list[str]) -> None:
    from serving.lifetime import stacks_on_sigusr1

    stacks_on_sigusr1()
    install()
    from prefect.cli import app

    sys.argv = ["prefect", "server", "start", *argv]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
