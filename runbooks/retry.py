"""Retry policy for tasks: retry only transient errors, with exponential backoff and jitter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.tasks import exponential_backoff


def retry_only_on(
    *transient: type[BaseException],
    when: Callable[[BaseException], bool] | None = None,
) -> Callable[..., bool]:
    """Build a Prefect ``retry_condition_fn`` that retries only the given exception types.

    ``when`` narrows further (e.g. only Kafka errors flagged retriable). Prefect calls the
    condition only if it is a plain function, so this returns a closure, not a partial.
    """

    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except transient as exc:
            return when(exc) if when else True
        except BaseException:
            return False
        return False

    return should_retry


def transient_retries(
    *transient: type[BaseException],
    retries: int = 3,
    backoff_seconds: float = 1.0,
    when: Callable[[BaseException], bool] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``@task`` that retry transient errors only.

    Example:
        ``@task(**transient_retries(psycopg.OperationalError))``
    """
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_seconds),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_only_on(*transient, when=when),
    }
