"""`runbooks new` refuses what it cannot scaffold safely (a bad or taken name, an unknown system,
an alert name that would break the Alertmanager regex) with exit code 2 and nothing written, and
inserts into the shared files only at their anchors."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from deployments.catalog import PROJECT_ROOT
from serving import new_command
from serving.new_command import (
    ScaffoldError,
    add_deployment,
    add_route,
    add_table_row,
    add_trigger_case,
    validate,
)

SHARED = [
    "prefect.yaml",
    "README.md",
    "examples/README.md",
    "examples/alertmanager.yml",
    "examples/prometheus/alerts.yml",
    "examples/prometheus/alerts_test.yml",
    "tests/integration/test_alert_triggers.py",
]

# name, system, alert, family -> what the error says
REFUSED = [
    ("", "postgres", None, None, "kebab-case"),
    ("Probe-thing", "postgres", None, None, "kebab-case"),
    ("probe_thing", "postgres", None, None, "kebab-case"),
    ("-probe", "postgres", None, None, "kebab-case"),
    ("probe-", "postgres", None, None, "kebab-case"),
    ("probe--thing", "postgres", None, None, "kebab-case"),
    ("1probe", "postgres", None, None, "kebab-case"),
    ("probe thing", "postgres", None, None, "kebab-case"),
    ("../probe", "postgres", None, None, "kebab-case"),
    ("flows/probe", "postgres", None, None, "kebab-case"),
    ("probe.py", "postgres", None, None, "kebab-case"),
    ("probe\nthing", "postgres", None, None, "kebab-case"),
    ('probe"""', "postgres", None, None, "kebab-case"),
    ("a" * 61, "postgres", None, None, "at most 60"),
    ("import", "postgres", None, None, "Python keyword"),
    ("db-connection-pool-exhausted", "postgres", None, None, "already has a deployment"),
    ("redis-degraded", "postgres", None, None, "already has a deployment"),
    ("unit-probe", "kafka", None, None, "supported are postgres, redis"),
    ("unit-probe", "../postgres", None, None, "supported are postgres, redis"),
    ("unit-probe", "Redis", None, None, "supported are postgres, redis"),
    ("unit-probe", "", None, None, "supported are postgres, redis"),
    ("unit-probe", "postgres", "probeThing", None, "CamelCase"),
    ("unit-probe", "postgres", "Probe-Thing", None, "CamelCase"),
    ("unit-probe", "postgres", 'Probe|KafkaBrokerDown"', None, "CamelCase"),
    ("unit-probe", "postgres", "Probe.*", None, "CamelCase"),
    ("unit-probe", "postgres", "PostgresTooManyConnections", None, "already starts"),
    ("unit-probe", "postgres", None, "../flows", "lowercase package name"),
    ("unit-probe", "postgres", None, "Postgres", "lowercase package name"),
    ("unit-probe", "postgres", None, "a/b", "lowercase package name"),
    ("unit-probe", "postgres", None, "class", "lowercase package name"),
]


@pytest.mark.parametrize(("name", "system", "alert", "family", "error"), REFUSED)
def test_refused(name: str, system: str, alert: str | None, family: str | None, error: str) -> None:
    with pytest.raises(ScaffoldError, match=error.replace(".", r"\.").replace("|", r"\|")):
        validate(name, system, alert, family)


# name, alert, family -> (alert, family, module) the scaffold uses
ACCEPTED = [
    ("probe-thing", None, None, ("ProbeThing", "postgres", "probe_thing")),
    ("orders-queries-stuck", "OrdersSlow", "orders", ("OrdersSlow", "orders", "orders_queries_stuck")),
    ("pg2-long-statements", None, None, ("Pg2LongStatements", "postgres", "pg2_long_statements")),
    ("probe", None, "postgres", ("Probe", "postgres", "probe")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "alert", "family", "expected"), ACCEPTED)
def test_accepted(
    name: str, alert: str | None, family: str | None, expected: tuple[str, str, str]
) -> None:
    scaffold = validate(name, "postgres", alert, family)
    assert (scaffold.alert, scaffold.family, scaffold.module) == expected


def _project_copy(tmp_path: Path) -> Path:
    for path in SHARED:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / path, tmp_path / path)
    (tmp_path / "flows" / "postgres").mkdir(parents=True)
    (tmp_path / "flows" / "postgres" / "__init__.py").write_text("")
    return tmp_path


def _args(name: str, **options: object) -> argparse.Namespace:
    defaults = {"system": "postgres", "alert": None, "family": None, "dry_run_only": False}
    return argparse.Namespace(name=name, **(defaults | options))


def _snapshot(root: Path) -> dict[str, str]:
    """Every file of the copy but the formatter's cache."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and ".ruff_cache" not in p.parts)
    return {str(p.relative_to(root)): p.read_text() for p in files}


def test_an_existing_file_is_refused_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    root = _project_copy(tmp_path)
    (root / "tests" / "unit").mkdir(parents=True)
    (root / "tests" / "unit" / "test_probe_thing_decisions.py").write_text("# the author's\n")
    before = _snapshot(root)

    assert new_command.main(_args("probe-thing"), root) == 2

    assert _snapshot(root) == before
    err = capsys.readouterr().err
    assert "tests/unit/test_probe_thing_decisions.py exists already" in err
    assert "nothing was written" in err


def test_a_second_run_of_the_same_name_is_refused(tmp_path: Path, capsys) -> None:
    root = _project_copy(tmp_path)
    assert new_command.main(_args("probe-thing", dry_run_only=True), root) == 0
    written = _snapshot(root)
    assert "tags: [postgresql, sev-p3, observe]" in written["prefect.yaml"]
    assert "flows/postgres/probe_thing.py" in written

    assert new_command.main(_args("probe-thing"), root) == 2

    assert _snapshot(root) == written
    assert "prefect.yaml already has a deployment of that name" in capsys.readouterr().err


def test_shared_files_only_grow_at_their_anchors(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    before = _snapshot(root)
    assert new_command.main(_args("probe-thing", alert="ProbeAlert"), root) == 0
    after = _snapshot(root)
    for path in SHARED:
        old, new = before[path].splitlines(), after[path].splitlines()
        if path == "examples/alertmanager.yml":
            # one line changed: the route's regex got the alert at its end
            changed = [(o, n) for o, n in zip(old, new, strict=True) if o != n]
            assert [n for _, n in changed] == [changed[0][0][:-1] + '|ProbeAlert"']
            continue
        # every old line is still there, in order: lines were only inserted
        remaining = iter(new)
        assert all(line in remaining for line in old), path
        assert len(new) > len(old), path


# --- anchors missing: refused, not guessed ------------------------------------------------------

BROKEN_ANCHORS = [
    (lambda: add_deployment("deployments:\n  - name: a\nother: 1\n", "x"), "last top-level"),
    (lambda: add_deployment("deployments: []", "x"), "newline"),
    (lambda: add_route("routes: []\n", "A"), "found 0"),
    (lambda: add_route('- alertname =~ "A"\n- alertname =~ "B"\n', "C"), "found 2"),
    (lambda: add_trigger_case("CASES = {}\n", "x"), "CASES does not end"),
    (lambda: add_table_row("# README\n", "| Runbook |", "| x |\n", "README.md"), "found 0"),
]


@pytest.mark.parametrize(("insert", "error"), BROKEN_ANCHORS)
def test_a_missing_anchor_is_refused(insert, error: str) -> None:
    with pytest.raises(ScaffoldError, match=error):
        insert()


def test_table_row_goes_after_the_tables_last_row() -> None:
    text = "intro\n| A | B |\n|---|---|\n| 1 | 2 |\n\n| A | C |\n| 3 | 4 |\n"
    assert add_table_row(text, "| A | B |", "| 5 | 6 |\n", "t") == (
        "intro\n| A | B |\n|---|---|\n| 1 | 2 |\n| 5 | 6 |\n\n| A | C |\n| 3 | 4 |\n"
    )


def test_a_checkout_without_a_shared_file_is_refused(tmp_path: Path, capsys) -> None:
    root = _project_copy(tmp_path)
    (root / "tests" / "integration" / "test_alert_triggers.py").unlink()
    before = _snapshot(root)

    assert new_command.main(_args("probe-thing"), root) == 2

    assert _snapshot(root) == before
    assert "cannot read" in capsys.readouterr().err
