"""Bounded polling with a deadline: used to verify a fix (ISR caught up, job RUNNING...)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class PollOutcome(Generic[T]):
    ok: bool
    last: T | None
    attempts: int
    elapsed_s: float


def poll_until(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout_s: float,
    interval_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> PollOutcome[T]:
    """Call ``probe`` until ``done(value)`` or the deadline passes; never loops forever."""
    start = time.monotonic()
    attempts = 0
    last: T | None = None
    while True:
        attempts += 1
        last = probe()
        elapsed = time.monotonic() - start
        if done(last):
            return PollOutcome(True, last, attempts, elapsed)
        if elapsed + interval_s > timeout_s:
            return PollOutcome(False, last, attempts, elapsed)
        sleep(interval_s)
