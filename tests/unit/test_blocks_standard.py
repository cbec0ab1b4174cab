"""Every Block class meets the same standard: documented fields, secrets as SecretStr, stable slug."""

from __future__ import annotations

import re

import pytest
from prefect.blocks.core import Block

import blocks

BLOCK_CLASSES = [
    getattr(blocks, name)
    for name in blocks.__all__
    if isinstance(getattr(blocks, name), type) and issubclass(getattr(blocks, name), Block)
]
SECRET_NAME = re.compile(r"password|token|secret|api_key|kubeconfig", re.I)


def _annotation_text(field) -> str:
    return repr(field.annotation)


def test_every_block_is_exported() -> None:
    assert len(BLOCK_CLASSES) == len(blocks.__all__)


@pytest.mark.parametrize("cls", BLOCK_CLASSES, ids=lambda c: c.__name__)
def test_block_meets_the_standard(cls: type[Block]) -> None:
    assert cls.__doc__ and cls.__doc__.strip(), "a block explains itself"
    assert cls.get_block_type_slug().startswith("runbooks-")
    assert cls._description, "shown in the UI's block catalogue"
    for name, field in cls.model_fields.items():
        assert field.description, f"{cls.__name__}.{name} has no description"
        if SECRET_NAME.search(name):
            assert "SecretStr" in _annotation_text(field) or "Block" in _annotation_text(field), (
                f"{cls.__name__}.{name} looks secret but is not a SecretStr"
            )
