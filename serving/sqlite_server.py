"""`prefect server start` for `runbooks up`: alert-triggered runs are created without a 2 s stall.

On SQLite, Prefect opens write transactions as ``BEGIN DEFERRED``: a transaction that reads
before it writes cannot take the write lock if another connection committed in between, and
fails at once with "database is locked" instead of waiting. Prefect answers 503 and its clients
retry after 2 s (then 4, 8...). Prefect already starts the transactions where this bit them
with ``BEGIN IMMEDIATE`` (flow and task run state changes, marking deployments ready: see the
comment in ``prefect.server.models.deployments.mark_deployments_ready``); creating a flow run
from a deployment, which is what an automation's run-deployment action does, is not one of
them yet. With the gateway, the runner and the runs' own logs and events all writing, about
one alert in three waited 2 s or more for its run (python -m bench trigger-latency).

This launcher starts Prefect's own server command with that endpoint
(``POST /api/deployments/{id}/create_flow_run``), and the ones that take and release a global
concurrency slot (the runbooks' per-target lock, same read-then-write pattern), opening their
transactions with ``BEGIN IMMEDIATE``: they wait for the write lock (SQLite's busy timeout)
instead of failing. Nothing else changes. Pinned to prefect 3.8.8;
tests/integration/test_sqlite_server.py fails if the pieces it relies on change.

    python -m serving.sqlite_server --host 127.0.0.1 --port 4200   (= prefect server start ...)
"""

from __future__ import annotations

import contextvars
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

IMMEDIATE_ROUTES = re.compile(
    # what an automation's run-deployment action (and `prefect deployment run`) calls
    r"/deployments/[0-9a-fA-F-]{36}/create_flow_run$"
    # taking and giving back a global concurrency slot: the runbooks' per-target lock
    # (runbooks/safety.py), on the way to a run's first action
    r"|/v2/concurrency_limits/(increment|decrement)(-with-lease)?$"
)

_immediate: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "runbooks_sqlite_immediate", default=False
)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class ImmediateWriteRoutes:
    """ASGI middleware: requests to `IMMEDIATE_ROUTES` begin their SQLite transactions IMMEDIATE."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") == "POST"
            and IMMEDIATE_ROUTES.search(scope.get("path", ""))
        ):
            token = _immediate.set(True)
            try:
                await self.app(scope, receive, send)
            finally:
                _immediate.reset(token)
            return
        await self.app(scope, receive, send)


def install() -> None:
    """Patch this process's Prefect server (before it starts): see the module docstring."""
    import prefect.server.api.server as server
    from prefect.server.database.configurations import AioSqliteConfiguration

    if getattr(AioSqliteConfiguration.begin_transaction, "_runbooks", False):
        return
    original_begin = AioSqliteConfiguration.begin_transaction

    @asynccontextmanager
    async def begin_transaction(
        self: AioSqliteConfiguration, session: Any, with_for_update: bool = False
    ) -> AsyncIterator[Any]:
        # with_for_update is what makes Prefect's SQLite configuration say BEGIN IMMEDIATE
        immediate = with_for_update or _immediate.get()
        async with original_begin(self, session, with_for_update=immediate) as transaction:
            yield transaction

    begin_transaction._runbooks = True  # type: ignore[attr-defined]
    AioSqliteConfiguration.begin_transaction = begin_transaction  # type: ignore[method-assign]

    original_create_app = server.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        # the served app and the in-process client of Prefect's automations share this app
        app = original_create_app(*args, **kwargs)
        if not getattr(app, "_runbooks_immediate_writes", False):
            app.add_middleware(ImmediateWriteRoutes)
            app._runbooks_immediate_writes = True
        return app

    server.create_app = create_app


def main(argv: list[str]) -> None:
    install()
    from prefect.cli import app

    sys.argv = ["prefect", "server", "start", *argv]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
