"""Start served flow runs from a warm fork server instead of a fresh interpreter.

Prefect's runner starts each served flow run with ``multiprocessing.get_context("spawn")``: a
new interpreter that imports prefect and the flow's modules (about 3 s here) before the first
task. An alert-triggered runbook should act in about a second, so ``runbooks up`` swaps that
context for a ``forkserver`` whose server process has already imported prefect and every flow
module: each run is a fork of it (milliseconds), still a separate process, as Prefect intends.
The fork server is a fresh single-threaded interpreter, so forking it is safe.

Pinned to prefect 3.8.8's ``prefect.flow_engine.run_flow_in_subprocess``;
tests/integration/test_warm_start.py fails if that changes.
"""

from __future__ import annotations

import multiprocessing
import types
from collections.abc import Iterable

# What a flow run imports lazily on its first use; preloaded so no child pays for it.
ENGINE_MODULES = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.client.orchestration",
    "prefect.events.clients",
    "prefect.events.worker",
    "prefect.logging.handlers",
    "prefect.results",
    "prefect.concurrency.sync",
    "prefect.concurrency.v1.sync",
    "prefect.runner.runner",
    "prefect.blocks.core",
)


def enable(preload_modules: Iterable[str]) -> multiprocessing.context.BaseContext:
    """Make Prefect's flow-run subprocesses fork from a server that preloaded these modules."""
    import prefect.flow_engine

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*ENGINE_MODULES, *preload_modules])
    prefect.flow_engine.multiprocessing = types.SimpleNamespace(  # type: ignore[attr-defined]
        get_context=lambda method=None: ctx,
        context=multiprocessing.context,
    )
    return ctx
