"""Start served flow runs from a warm fork server instead of a fresh interpreter.

Prefect's runner starts each served flow run with ``multiprocessing.get_context("spawn")``: a
new interpreter that imports prefect and the flow's modules (about 3 s here) before the first
task. An alert-triggered runbook should act in about a second, so ``runbooks up`` swaps that
context for a ``forkserver`` whose server process has already imported prefect and every flow
module: each run is a fork of it (milliseconds), still a separate process, as Prefect intends.
The fork server is a fresh single-threaded interpreter, so forking it is safe. It and every run
forked from it die with `runbooks up` (serving.lifetime).

Prefect hands the flow to the child with cloudpickle, which copies a function by value unless the
module attribute of its name is that very function; for a decorated `@flow`/`@task` that
attribute is the Flow/Task, so the function's code went by value, renamed `<dynamic-code>`, and
every traceback of a served run pointed there instead of the runbook's file. `enable` makes a
Flow/Task that is its module's attribute travel by reference: the child uses the one its fork
server imported from the real file.

Pinned to prefect 3.8.8's ``prefect.flow_engine.run_flow_in_subprocess``;
tests/integration/test_warm_start.py fails if that changes.
"""

from __future__ import annotations

import copyreg
import importlib
import multiprocessing
import multiprocessing.forkserver
import pickle
import sys
import types
from collections.abc import Iterable
from typing import Any

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
    from prefect import Flow, Task

    for cls in (Flow, Task):
        copyreg.pickle(cls, _by_reference_if_importable)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["serving.fork_server_preload", *ENGINE_MODULES, *preload_modules])
    # started now, from this (the main) thread: the fork server's parent-death signal fires when
    # the thread that started it ends, and a run's first fork then skips the imports
    multiprocessing.forkserver.ensure_running()
    prefect.flow_engine.multiprocessing = types.SimpleNamespace(  # type: ignore[attr-defined]
        get_context=lambda method=None: ctx,
        context=multiprocessing.context,
    )
    return ctx


def _by_reference_if_importable(obj: Any) -> tuple[Any, ...]:
    """Pickle a Flow/Task as `module.name` when that is where it lives, else as before."""
    fn = obj.fn
    module = sys.modules.get(fn.__module__)
    if getattr(module, fn.__qualname__, None) is obj:
        return _module_attribute, (fn.__module__, fn.__qualname__)
    return obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def _module_attribute(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)
