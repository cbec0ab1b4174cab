"""Text helpers for what runs show in the UI: markdown table cells, artifact keys, short summaries."""

import json
import os
import re
from numbers import Real
from typing import Any

ELLIPSIS = "…"
_UNSPLITTABLE = re.compile(r"[\s()\[\]{}]")


def artifact_key(text: str) -> str:
    """Only lowercase letters, digits and dashes (artifact keys, pause keys)."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def escape_cell(text: str) -> str:
    """Text safe inside a markdown table cell: no pipe, no line break."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def cut(text: str, max_chars: int | None) -> str:
    """One line of at most ``max_chars`` characters; a cut shows as a trailing ellipsis."""
    line = " ".join(str(text).split())
    if max_chars is None or len(line) <= max_chars:
        return line
    return line[: max(max_chars - 1, 0)].rstrip() + ELLIPSIS


def _shared_prefix(items: list[str]) -> str:
    # ends just after a separator: 'pid=101', 'pid=102' share 'pid=', not 'pid=10'
    prefix = os.path.commonprefix(items)
    while prefix and prefix[-1].isalnum():
        prefix = prefix[:-1]
    return prefix


def _shared_suffix(items: list[str], room: int) -> str:
    suffix = os.path.commonprefix([i[::-1] for i in items])[::-1][-room:] if room else ""
    while suffix and suffix[0].isalnum():
        suffix = suffix[1:]
    return suffix


def compact_list(items: list[str], max_chars: int | None = None) -> str:
    """Items with their shared prefix and suffix written once, e.g. ``orders pid={101, 102} (app)``.

    Beyond ``max_chars`` the list ends with ``… +N more``. Twenty-five terminated sessions are
    one short line this way, where the full labels side by side would run off the screen.
    """
    if len(set(items)) <= 1:
        return cut(items[0], max_chars) if items else ""
    prefix = _shared_prefix(items)
    suffix = _shared_suffix(items, min(len(i) for i in items) - len(prefix))
    middles = [i[len(prefix) : len(i) - len(suffix)] for i in items]
    head, tail = prefix + "{", "}" + suffix
    if not (prefix or suffix) or any(_UNSPLITTABLE.search(m) for m in middles):
        # braces around "1..9 (9" would misread: only single words are factored out
        middles, head, tail = list(items), "", ""

    def first(k: int) -> str:
        more = f", {ELLIPSIS} +{len(middles) - k} more" if k < len(middles) else ""
        return head + ", ".join(middles[:k]) + more + tail

    if max_chars is None:
        return first(len(middles))
    best = first(1)
    for k in range(2, len(middles) + 1):
        text = first(k)
        if len(text) > max_chars:
            break
        best = text
    return cut(best, max_chars)


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def summarize_values(values: list[Any], max_chars: int | None = None) -> str:
    """One short line for the before (or after) state of a group of targets.

    Keys whose value is the same everywhere read ``key=value``; numbers that differ read as a
    range, ``idle_s=17.2-19.0``; other differing values as ``key=(3 values)``. A single
    target's state reads the same way, so a wide JSON object never reaches a table cell.
    """
    present = [v for v in values if v is not None and v != {}]
    if not present:
        return ""
    if not all(isinstance(v, dict) for v in present):
        distinct = {_value(v) for v in present}
        return cut(distinct.pop() if len(distinct) == 1 else f"({len(distinct)} values)", max_chars)
    keys = list(dict.fromkeys(k for v in present for k in v))
    parts = []
    for key in keys:
        seen = [v.get(key) for v in present]
        distinct = {_value(s) for s in seen}
        if len(distinct) == 1:
            parts.append(f"{key}={distinct.pop()}")
        elif all(_number(s) for s in seen):
            parts.append(f"{key}={min(seen):g}-{max(seen):g}")
        else:
            parts.append(f"{key}=({len(distinct)} values)")
    return cut(", ".join(parts), max_chars)
