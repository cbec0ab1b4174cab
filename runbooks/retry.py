"""Task options for runbook work: never cached, retries only on transient errors.

Every task of this project reads or changes the live world, so a result must never be served from
Prefect's cache (with result persistence on, the default cache policy would answer a repeated
read in the same run, e.g. a verification poll, with the first answer). Retries are for
transient errors only, with exponential backoff and jitter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.cache_policies import NO_CACHE
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


def runbook_task_options(
    *transient: type[BaseException],
    retries: int = 3,
    backoff_seconds: float = 1.0,
    when: Callable[[BaseException], bool] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a runbook ``@task``: never cached; retries only ``transient`` errors.

    With no transient error types the task is not retried at all.

    Example:
        ``@task(**runbook_task_options(psycopg.OperationalError, when=is_transient))``
    """
    options: dict[str, Any] = {"cache_policy": NO_CACHE}
    if transient:
        options.update(
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=backoff_seconds),
            retry_jitter_factor=0.5,
            retry_condition_fn=retry_only_on(*transient, when=when),
        )
    return options
