"""The run form (each runbook's parameter schema, as Prefect generates it for the UI) lists
dry_run, then the runbook's own parameters, then the alert context and safety settings."""

from __future__ import annotations

import typing

import pytest
from prefect.utilities.callables import parameter_schema

from deployments.catalog import load_catalog, load_flow
from runbooks.params import RunbookParams, form_order

# fields in declaration order (pydantic: base class first) -> run form order
FORM_ORDER_CASES = [
    (
        ["dry_run", "alert", "safety", "db_block", "idle_threshold_s"],
        ["dry_run", "db_block", "idle_threshold_s", "alert", "safety"],
    ),
    (["dry_run", "alert", "safety"], ["dry_run", "alert", "safety"]),
    (["b", "safety", "a", "dry_run"], ["dry_run", "b", "a", "safety"]),
    (["own"], ["own"]),
]


@pytest.mark.parametrize(("declared", "expected"), FORM_ORDER_CASES)
def test_form_order(declared: list[str], expected: list[str]) -> None:
    assert form_order(declared) == expected


SPECS = load_catalog()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_run_form_lists_the_runbooks_own_parameters_before_alert_and_safety(spec) -> None:
    flow = load_flow(spec)
    schema = parameter_schema(flow).model_dump_for_openapi()
    model_name = schema["properties"]["params"]["$ref"].rsplit("/", 1)[1]
    properties = schema["definitions"][model_name]["properties"]
    params_model = typing.get_type_hints(flow.fn)["params"]
    own = [name for name in params_model.model_fields if name not in RunbookParams.model_fields]
    assert own, f"{spec.name} has parameters of its own"

    assert list(properties) == ["dry_run", *own, "alert", "safety"]
    # the UI sorts by `position`, which survives a server that does not keep key order (JSONB)
    assert [prop["position"] for prop in properties.values()] == list(range(len(properties)))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_run_form_field_has_a_label(spec) -> None:
    """The UI labels a field by its title; one without (pydantic gives none to a field whose
    schema is a reference, e.g. `alert`) shows as "Field"."""
    schema = parameter_schema(load_flow(spec)).model_dump_for_openapi()
    for model, definition in schema["definitions"].items():
        for name, prop in (definition.get("properties") or {}).items():
            assert prop.get("title"), f"{model}.{name} has no title"


SCHEDULED = [(spec, i, schedule) for spec in SPECS for i, schedule in enumerate(spec.schedules, 1)]


@pytest.mark.parametrize(
    ("spec", "index", "schedule"), SCHEDULED, ids=[f"{s.name}-{i}" for s, i, _ in SCHEDULED]
)
def test_every_scheduled_run_has_valid_parameters(spec, index, schedule) -> None:
    """A schedule's parameters replace the deployment's (per top-level key, as Prefect merges
    them): the merged set must validate, or the run fails at 3 a.m. instead of in CI."""
    merged = {**(spec.parameters or {}), **(schedule.get("parameters") or {})}
    params_model = typing.get_type_hints(load_flow(spec).fn)["params"]
    params_model.model_validate(merged.get("params", {}))


def test_a_schedule_with_a_bad_parameter_is_caught() -> None:
    (spec,) = [s for s in SPECS if s.name == "slo-report"]
    params_model = typing.get_type_hints(load_flow(spec).fn)["params"]
    with pytest.raises(ValueError, match="window"):
        params_model.model_validate({"window": "a week"})
