"""The README's block table names real fields: every name it gives is a field of that block, and
it names every field a user must give and every secret (a newcomer copied `database` for the
PostgreSQL block, whose field is `dbname`)."""

from __future__ import annotations

import re

import pytest

from deployments.catalog import PROJECT_ROOT
from serving.block_command import block_classes

ROW = re.compile(r"^\| `(runbooks-[a-z-]+)` \| (.*) \|$", re.M)
README_ROWS = dict(ROW.findall((PROJECT_ROOT / "README.md").read_text()))
CLASSES = {cls.get_block_type_slug(): cls for cls in block_classes().values()}


def test_every_block_type_has_a_row() -> None:
    assert set(README_ROWS) == set(CLASSES)


@pytest.mark.parametrize("slug", sorted(CLASSES))
def test_block_row_names_real_fields(slug: str) -> None:
    cls = CLASSES[slug]
    named = set(re.findall(r"`([a-z_]+)`", README_ROWS[slug]))
    assert named <= set(cls.model_fields), f"not fields of {slug}: {named - set(cls.model_fields)}"
    secrets = set(cls.model_json_schema()["secret_fields"]) & set(cls.model_fields)
    required = {name for name, field in cls.model_fields.items() if field.is_required()}
    assert required | secrets <= named, f"{slug}: README omits {(required | secrets) - named}"
