"""What prefect.yaml shows a person in the UI: deployment descriptions say the symptom and what the
runbook does (no references to documents users do not have), and each trigger's automation is
named for the alerts it matches."""

from __future__ import annotations

import pytest
import yaml

from deployments.catalog import PREFECT_YAML, load_catalog, trigger_name_problem

SPECS = load_catalog()

# deployment, trigger -> problem (None: the name says what starts the runbook)
TRIGGER_NAME_CASES = [
    ("db", {"name": "db on alert A, B", "match": {"alertname": ["A", "B"]}}, None),
    ("db", {"name": "db on alert A", "match": {"alertname": "A"}}, None),
    ("db", {"name": "db nightly", "match": {"prefect.resource.id": "x.*"}}, None),
    (
        "db",
        {"match": {"alertname": ["A", "B"]}},
        "no name; name it for what it matches, e.g. 'db on alert A, B'",
    ),
    ("db", {"name": "", "match": {}}, "no name; name it for what it matches, e.g. 'db'"),
    (
        "db",
        {"name": "db on alert A", "match": {"alertname": ["A", "B"]}},
        "its name 'db on alert A' does not mention B",
    ),
    (
        "db",
        {"name": "db__trigger_1", "match": {"alertname": "A"}},
        "its name 'db__trigger_1' does not mention A",
    ),
    (
        "db",
        {"name": "other on alert A", "match": {"alertname": "A"}},
        "its name 'other on alert A' does not mention db",
    ),
]


@pytest.mark.parametrize(("deployment", "trigger", "problem"), TRIGGER_NAME_CASES)
def test_trigger_name_problem(deployment: str, trigger: dict, problem: str | None) -> None:
    assert trigger_name_problem(deployment, trigger) == problem


def test_an_unnamed_trigger_is_refused(tmp_path) -> None:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    flink = next(d for d in document["deployments"] if d["name"] == "flink-job-crashed")
    del flink["triggers"][0]["name"]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match="flink-job-crashed, trigger 1: no name"):
        load_catalog(tmp_path / "prefect.yaml")


def test_two_triggers_of_one_deployment_may_not_share_a_name(tmp_path) -> None:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    flink = next(d for d in document["deployments"] if d["name"] == "flink-job-crashed")
    flink["triggers"].append(dict(flink["triggers"][0]))
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match="flink-job-crashed, trigger 2: the name .* already used"):
        load_catalog(tmp_path / "prefect.yaml")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_descriptions_describe_the_symptom_not_a_document(spec) -> None:
    texts = [spec.description or ""] + [f"{t.name} {t.description}" for t in spec.trigger_objects()]
    assert spec.description and len(spec.description) > 60, "symptom and what the runbook does"
    for text in texts:
        assert "seed" not in text.lower(), text
