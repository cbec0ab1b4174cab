"""What a served run's process receives for its flow and tasks (serving.warm_start): the objects
its module defines go by reference, so their code keeps its file; anything else goes by value."""

from __future__ import annotations

import copyreg
import inspect
import pickle

import cloudpickle
import pytest
from prefect import Flow, Task

from deployments.catalog import load_catalog, load_flow
from serving.warm_start import _by_reference_if_importable
from tasks.postgres import get_connection_usage

[SPEC] = [s for s in load_catalog() if s.name == "db-connection-pool-exhausted"]
RUNBOOK = load_flow(SPEC)

CASES = [
    # (what, object, same object after the trip, file of its code after the trip)
    ("a runbook's flow", RUNBOOK, True, "flows/postgres/db_connection_pool_exhausted.py"),
    ("a task", get_connection_usage, True, "tasks/postgres.py"),
    (
        "a flow copy its module does not hold",
        RUNBOOK.with_options(name="copy"),
        False,
        "<dynamic-code>",
    ),
    (
        "a task copy its module does not hold",
        get_connection_usage.with_options(name="c"),
        False,
        "<dynamic-code>",
    ),
]


@pytest.mark.parametrize(("what", "obj", "same", "code_file"), CASES, ids=[c[0] for c in CASES])
def test_pickled_for_a_run(monkeypatch, what, obj, same, code_file) -> None:
    for cls in (Flow, Task):
        monkeypatch.setitem(copyreg.dispatch_table, cls, _by_reference_if_importable)
    received = pickle.loads(cloudpickle.dumps(obj))
    assert (received is obj) is same
    # a runbook's function is wrapped (runbooks.report.ends_as_reported): its own code is inside
    assert inspect.unwrap(received.fn).__code__.co_filename.endswith(code_file)
    assert received.name == obj.name
