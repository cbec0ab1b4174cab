"""Served flow runs start as forks of a warm process (serving.warm_start), and still run."""

from __future__ import annotations

import multiprocessing.popen_forkserver
import os
from pathlib import Path

import prefect.flow_engine
import pytest
from prefect.flow_engine import run_flow_in_subprocess

from serving import warm_start
from tests.warm_probe import leave_mark


@pytest.fixture
def warm(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(prefect.flow_engine, "multiprocessing", prefect.flow_engine.multiprocessing)
    return warm_start.enable(["flows.postgres.db_connection_pool_exhausted", "tests.warm_probe"])


def test_flow_run_subprocess_is_a_fork_of_the_warm_server(warm, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    process = run_flow_in_subprocess(leave_mark, parameters={"path": str(mark)})
    assert isinstance(process._popen, multiprocessing.popen_forkserver.Popen)
    process.join(120)
    assert process.exitcode == 0
    pid, preloaded = mark.read_text().split()
    assert int(pid) not in (os.getpid(), 0)
    assert preloaded == "True", "the child had to import the flow modules itself"


def test_prefect_still_starts_flow_runs_with_a_context_it_gets_from_multiprocessing() -> None:
    # warm_start swaps prefect.flow_engine.multiprocessing; this breaks loudly if prefect
    # stops taking its process context from there
    import inspect

    source = inspect.getsource(prefect.flow_engine.run_flow_in_subprocess)
    assert 'multiprocessing.get_context("spawn")' in source
