"""Memory sizes as operators write them ("512Mi", "2Gi", "1.5G", "268435456")."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

# Kubernetes' binary and decimal suffixes (resource.Quantity), Docker's k/m/g (binary)
_UNITS = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "b": 1,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
MIB = 1024**2


def parse_memory(text: str | int) -> int:
    """Bytes of a memory size: ``"512Mi"`` -> 536870912; a bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"memory size {text} is negative")
        return text
    match = _QUANTITY.fullmatch(str(text))
    unit = match.group(2) if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{str(text)[:40]!r} is not a memory size (e.g. 512Mi, 2Gi, 1G or a number of bytes)"
        )
    return math.ceil(float(match.group(1)) * _UNITS[unit])


def format_memory(size: int | None) -> str:
    """``536870912`` -> ``"512Mi"``; whole binary units when exact, else one decimal."""
    if size is None:
        return "unlimited"
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        scale = _UNITS[unit]
        if size >= scale:
            value = size / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{size}B"


def _parse(value: Any) -> Any:
    return parse_memory(value) if isinstance(value, str | int) else value


MemorySize = Annotated[
    int,
    BeforeValidator(_parse),
    PlainSerializer(format_memory, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "description": "A memory size: 512Mi, 2Gi, 1G or bytes."}),
]
"""A memory size in bytes that forms and prefect.yaml write as ``512Mi`` or ``2Gi``."""
