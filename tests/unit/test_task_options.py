"""Every runbook task is never cached and retries only transient errors."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

import tasks
from runbooks.retry import retry_only_on, runbook_task_options

ALL_TASKS = [
    (f"{mod.name}.{name}", obj)
    for mod in pkgutil.iter_modules(tasks.__path__)
    for name, obj in vars(importlib.import_module(f"tasks.{mod.name}")).items()
    if isinstance(obj, Task) and obj.fn.__module__ == f"tasks.{mod.name}"
]


def test_tasks_are_found() -> None:
    assert len(ALL_TASKS) >= 15


@pytest.mark.parametrize("name,task", ALL_TASKS, ids=[n for n, _ in ALL_TASKS])
def test_task_is_never_answered_from_a_cache(name: str, task: Task) -> None:
    assert task.cache_policy is NO_CACHE, name


@pytest.mark.parametrize("name,task", ALL_TASKS, ids=[n for n, _ in ALL_TASKS])
def test_retried_task_has_a_transient_only_condition(name: str, task: Task) -> None:
    if task.retries:
        assert task.retry_condition_fn is not None, f"{name} retries every error"
        assert task.retry_jitter_factor, f"{name} retries without jitter"


class Transient(Exception):
    pass


class Permanent(Exception):
    pass


@pytest.mark.parametrize(
    "exc,when,expected",
    [
        (Transient("timeout"), None, True),
        (Permanent("bad password"), None, False),
        (ValueError("bug"), None, False),
        (Transient("retriable"), lambda e: "retriable" in str(e), True),
        (Transient("fatal"), lambda e: "retriable" in str(e), False),
    ],
)
def test_retry_only_on(exc: Exception, when, expected: bool) -> None:
    condition = retry_only_on(Transient, when=when)
    assert condition(None, None, Failed(data=exc)) is expected


def test_completed_state_is_not_retried() -> None:
    assert retry_only_on(Transient)(None, None, Completed(data=1)) is False


def test_options_without_transient_errors_do_not_retry() -> None:
    assert runbook_task_options() == {"cache_policy": NO_CACHE}
    opts = runbook_task_options(Transient, retries=5)
    assert opts["retries"] == 5 and opts["cache_policy"] is NO_CACHE
    assert opts["retry_delay_seconds"](5) == [1.0, 2.0, 4.0, 8.0, 16.0]
