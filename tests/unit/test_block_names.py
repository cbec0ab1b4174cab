"""Block names from alert labels are taken literally (issue #9 defect 3): Prefect's block name
rule, checked on every `*_block` parameter of every runbook before a flow starts."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from deployments.catalog import load_catalog, load_flow
from runbooks.params import MAX_BLOCK_NAME_LENGTH, SafetyParams, block_name_problem

CHARSET = "a block name is one or more lowercase letters, numbers and dashes"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("default", None),
        ("orders-db", None),
        ("prod-kafka-2", None),
        ("9", None),
        ("x" * MAX_BLOCK_NAME_LENGTH, None),
        # walks the block API path to another block of the same type
        ("no-such/../default", CHARSET),
        # ... or of another type: a Secret
        ("../../../secret/block_documents/name/othersecret", CHARSET),
        ("..", CHARSET),
        ("Default", CHARSET),
        ("", CHARSET),
        ("%2e%2e%2f", CHARSET),
        ("%2fdefault", CHARSET),
        ("orders db", CHARSET),
        (" default", CHARSET),
        ("default\n", CHARSET),
        ("orders_db", CHARSET),
        ("db?x=1", CHARSET),
        ("db#frag", CHARSET),
        ("dеfault", CHARSET),  # Cyrillic е
        ("x" * (MAX_BLOCK_NAME_LENGTH + 1), f"longer than {MAX_BLOCK_NAME_LENGTH} characters"),
        ("x" * 100_000, f"longer than {MAX_BLOCK_NAME_LENGTH} characters"),
    ],
)
def test_block_name_problem(name: str, problem: str | None) -> None:
    assert block_name_problem(name) == problem


def _runbook_params() -> list[type[BaseModel]]:
    flows = [load_flow(spec) for spec in load_catalog()]
    return [typing.get_type_hints(f.fn)["params"] for f in flows]


def _block_fields(model: type[BaseModel]) -> list[str]:
    # `platform` names a block too, as <platform>/<block name> (tasks/workloads.py)
    return [name for name in model.model_fields if name.endswith("_block") or name == "platform"]


# runbooks that load no block, and why (their targets are URLs, checked as such)
NO_BLOCK = {
    "CircuitBreakerOpenParams": "reads the actuator URL the alert names (http(s), no credentials)",
}


@pytest.mark.parametrize("model", _runbook_params(), ids=lambda m: m.__name__)
def test_every_block_parameter_refuses_a_traversal_and_names_its_label(
    model: type[BaseModel],
) -> None:
    fields = _block_fields(model)
    assert bool(fields) != (model.__name__ in NO_BLOCK), (
        f"{model.__name__}: *_block parameters {fields}; listed as loading none: "
        f"{model.__name__ in NO_BLOCK}"
    )
    for field in fields:
        bad = "docker/no-such/../default" if field == "platform" else "no-such/../default"
        data: dict[str, Any] = {
            field: bad,
            "alert": {"alertname": "X", "labels": {"alertname": "X", "cluster": bad}},
            # the runbook's other required fields, valid: only the block name is wrong
            **{k: "web" for k in ("service", "group") if k in model.model_fields},
        }
        with pytest.raises(ValidationError) as caught:
            model.model_validate(data)
        [error] = caught.value.errors()
        assert error["loc"] == (field,)
        what = "not a platform block" if field == "platform" else "is not a block name"
        assert error["msg"] == (
            f"Value error, {field} {bad!r} (from alert label cluster)"
            + (": " if field == "platform" else " ")
            + f"{what}: {CHARSET}; no block was loaded"
        )
        # no `pattern` in the run form's schema: Prefect's server would refuse to create the
        # run (the alert's automation action fails, silently), instead of the run failing
        assert "pattern" not in str(model.model_json_schema()["properties"][field])


def test_a_name_typed_in_the_form_is_refused_without_a_label() -> None:
    with pytest.raises(ValidationError, match=r"escalation_block 'On Call' is not a block name"):
        SafetyParams(escalation_block="On Call")


@pytest.mark.parametrize(("given", "kept"), [("", None), (None, None), ("oncall", "oncall")])
def test_an_empty_optional_block_name_is_none(given: str | None, kept: str | None) -> None:
    assert SafetyParams(escalation_block=given).escalation_block == kept


def test_a_very_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(ValidationError) as caught:
        SafetyParams(escalation_block="a" * 5000)
    message = caught.value.errors()[0]["msg"]
    assert "(5000 characters)" in message and len(message) < 300
