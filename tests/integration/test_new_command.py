"""`runbooks new` end to end: in a copy of this checkout, scaffold a PostgreSQL runbook, then run
exactly what CI would run on it, unchanged: the consistency tests that tie prefect.yaml, the
examples, the run form and the layout together, the generated decision test, the generated
integration test against a real PostgreSQL, its alert trigger against a real Prefect server,
promtool and amtool on the examples, and ruff on the generated code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.catalog import PROJECT_ROOT

pytestmark = pytest.mark.integration

NAME = "probe-thing"
GENERATED = [
    "flows/postgres/probe_thing.py",
    "tasks/probe_thing_decisions.py",
    "tests/unit/test_probe_thing_decisions.py",
    "tests/integration/test_probe_thing.py",
]
CONSISTENCY_TESTS = [
    "tests/unit/test_catalog.py",
    "tests/unit/test_example_rules.py",
    "tests/unit/test_layout.py",
    "tests/unit/test_run_form.py",
    "tests/integration/test_alert_triggers.py::test_every_deployment_has_a_case",
    "tests/integration/test_alert_triggers.py::test_every_trigger_has_a_case",
    f"tests/integration/test_alert_triggers.py::test_alert_starts_its_runbook_with_labels[{NAME}]",
]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """This checkout's files as they are now (tracked and new, not ignored ones), and its .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    copy = tmp_path / "checkout"
    for path in filter(None, listed.split("\0")):
        source = PROJECT_ROOT / path
        if source.is_file() and not source.is_symlink():
            (copy / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / path)
    (copy / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    return copy


def run(copy: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # the copy's own modules, Prefect settings and test servers: nothing of this test run's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PYTEST_"))}
    return subprocess.run(
        [*argv], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_scaffolded_runbook_passes_every_test_unchanged(checkout: Path) -> None:
    python = sys.executable
    new = run(checkout, python, "-m", "serving.cli", "new", NAME, "--system", "postgres")
    assert new.returncode == 0, new.stdout + new.stderr
    for path in GENERATED:
        assert (checkout / path).is_file(), path
        assert f"created {path}" in new.stdout
    assert "added to prefect.yaml" in new.stdout
    assert "Next:" in new.stdout
    assert "from __future__" not in (checkout / GENERATED[0]).read_text()

    for check in (["check"], ["format", "--check"]):
        ruff = run(checkout, python, "-m", "ruff", *check, *GENERATED)
        assert ruff.returncode == 0, ruff.stdout + ruff.stderr

    for tool in (
        ["promtool", "check", "rules", "examples/prometheus/alerts.yml"],
        ["promtool", "test", "rules", "examples/prometheus/alerts_test.yml"],
        ["amtool", "check-config", "examples/alertmanager.yml"],
    ):
        binary = shutil.which(tool[0])
        assert binary, f"{tool[0]} not installed: run `make test`"
        result = run(checkout, binary, *tool[1:], timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr

    tests = run(
        checkout,
        python,
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        *CONSISTENCY_TESTS,
        *GENERATED[2:],
        timeout=600,
    )
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-2000:]
    passed = [line.split(" ")[0] for line in tests.stdout.splitlines() if " PASSED" in line]
    assert not [line for line in tests.stdout.splitlines() if " SKIPPED" in line]
    # every case of the generated tests ran, the integration ones against the real server
    assert len([t for t in passed if t.startswith(GENERATED[2])]) == 12
    assert len([t for t in passed if t.startswith(GENERATED[3])]) == 6
    assert CONSISTENCY_TESTS[-1] in passed
    assert any(
        t.startswith("tests/unit/test_example_rules.py::") and "ProbeThing" in t for t in passed
    )

    again = run(checkout, python, "-m", "serving.cli", "new", NAME, "--system", "postgres")
    assert again.returncode == 2
    assert "already has a deployment" in again.stderr
