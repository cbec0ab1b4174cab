"""A run's process rides out a restart of its API server instead of crashing (issue #16).

Prefect's HTTP clients retry a request that could not connect (`httpx.ConnectError`) only once
that client has connected before (prefect 3.8.8 client/base.py: "Only retry ConnectError after
we've successfully connected once", so that a wrong URL fails at once). Every `get_client()`
outside a run's client context is a new client, and the engine's own client is new in each run's
process. So a run whose process starts while its API server restarts (the worker took the run a
moment before the server died), or a step that opens a new client during the restart, failed at
its first request: the engine exited 1 and the worker marked the run CRASHED ("Flow run
infrastructure exited with non-zero status code 1"), the team topology's chaos test saw one.

In a run's process the API URL is not in doubt: the worker that started the process reached that
server moments before. There, a refused connection is a restart, and ``tolerate_api_restarts``
makes Prefect's clients treat it as Prefect treats it after a first success: retried with
Prefect's own backoff and jitter (`PREFECT_CLIENT_MAX_RETRIES`, default 5: 2, 4, 8, 16 and 32 s
with +/-20% jitter, so a server back within about 50 s is waited for; a later one fails the
request as before). Prefect has no setting for this, hence the patch of the clients' constructor;
pinned to 3.8.8, and tests/integration/test_api_restarts.py fails if the attribute or its meaning
changes. Applied only in the processes our worker forks for runs (serving.fast_worker), never in
the worker, the CLI or the server, where a wrong URL should still fail at once.
"""

from __future__ import annotations

import functools
from typing import Any


def tolerate_api_restarts() -> None:
    """From now on, in this process, Prefect's clients retry refused connections from their first
    request on (see the module docstring). Idempotent."""
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

    for cls in (PrefectHttpxAsyncClient, PrefectHttpxSyncClient):
        original = cls.__init__
        if getattr(original, "_runbooks", False):
            continue

        @functools.wraps(original)
        def init(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> None:
            __original(self, *args, **kwargs)
            self._has_connected = True  # what Prefect sets after the first answer

        init._runbooks = True  # type: ignore[attr-defined]
        cls.__init__ = init  # type: ignore[method-assign]
