"""PromQL given as runbook parameters: a query template with a ``$window`` placeholder, and the
window, a Prometheus duration. The window is checked before it is put into the query, so a
parameter (or an alert label) can only ever be a duration there."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

WINDOW_PLACEHOLDER = "$window"
_DURATION = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|y))+")


def _duration(value: str) -> str:
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{value[:40]!r} is not a Prometheus duration (e.g. 30s, 5m, 1h30m)")
    return value


def _query(value: str) -> str:
    if not value.strip():
        raise ValueError("a query is needed")
    return value


PromDuration = Annotated[str, AfterValidator(_duration)]
"""A Prometheus range duration such as ``5m``: the only thing put into a query template."""

PromQuery = Annotated[str, AfterValidator(_query)]
"""A PromQL expression; ``$window`` in it is replaced by the run's window."""


def fill_window(query: str, window: str) -> str:
    """``query`` with every ``$window`` replaced by ``window`` (a checked duration)."""
    return query.replace(WINDOW_PLACEHOLDER, _duration(window))
