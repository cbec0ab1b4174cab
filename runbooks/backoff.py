"""Exponential backoff with jitter, for every retry loop the project writes itself.

(Prefect tasks get theirs from ``runbooks.retry.runbook_task_options``.) No imports: the alert
gateway uses it without loading Prefect.
"""


def backoff_delay(failures: int, initial_s: float, max_s: float, rand: float) -> float:
    """Wait after the ``failures``-th consecutive failure: exponential, capped, jittered.

    The ceiling doubles from ``initial_s`` up to ``max_s``; ``rand`` in [0, 1) picks a delay
    between half the ceiling and the ceiling, so clients restarted together do not retry in step.
    """
    ceiling = min(max_s, initial_s * 2 ** min(failures - 1, 32))
    return ceiling * (0.5 + 0.5 * rand)
