"""Text helpers for what runs show in the UI: markdown table cells and artifact keys."""

import re


def artifact_key(text: str) -> str:
    """Only lowercase letters, digits and dashes (artifact keys, pause keys)."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def escape_cell(text: str) -> str:
    """Text safe inside a markdown table cell: no pipe, no line break."""
    return str(text).replace("|", "\\|").replace("\n", " ")
