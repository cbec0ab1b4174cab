"""`runbooks new` end to end: in a copy of this checkout, scaffold a PostgreSQL and a Redis
runbook, then run exactly what CI would run on them, unchanged: the consistency tests that tie
prefect.yaml, the examples, the run form and the layout together, the generated decision tests,
the generated integration tests against a real PostgreSQL and a real Redis, their alert triggers
against a real Prefect server, promtool and amtool on the examples, and ruff on the generated
code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.catalog import PROJECT_ROOT

pytestmark = pytest.mark.integration

# name, system -> generated files, and how many cases each generated test has
SCAFFOLDS = {
    ("probe-thing", "postgres"): {
        "flows/postgres/probe_thing.py": 0,
        "tasks/probe_thing_decisions.py": 0,
        "tests/unit/test_probe_thing_decisions.py": 12,
        "tests/integration/test_probe_thing.py": 6,
    },
    ("probe-cache", "redis"): {
        "flows/redis/probe_cache.py": 0,
        "tasks/probe_cache_decisions.py": 0,
        "tests/unit/test_probe_cache_decisions.py": 11,
        "tests/integration/test_probe_cache.py": 6,
    },
}
GENERATED = {path: cases for files in SCAFFOLDS.values() for path, cases in files.items()}
TRIGGERS = "tests/integration/test_alert_triggers.py"
CONSISTENCY_TESTS = [
    "tests/unit/test_catalog.py",
    "tests/unit/test_example_rules.py",
    "tests/unit/test_layout.py",
    "tests/unit/test_run_form.py",
    f"{TRIGGERS}::test_every_deployment_has_a_case",
    f"{TRIGGERS}::test_every_trigger_has_a_case",
    *(f"{TRIGGERS}::test_alert_starts_its_runbook_with_labels[{name}]" for name, _ in SCAFFOLDS),
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


def test_scaffolded_runbooks_pass_every_test_unchanged(checkout: Path) -> None:
    python = sys.executable
    for name, system in SCAFFOLDS:
        new = run(checkout, python, "-m", "serving.cli", "new", name, "--system", system)
        assert new.returncode == 0, new.stdout + new.stderr
        for path in SCAFFOLDS[name, system]:
            assert (checkout / path).is_file(), path
            assert f"created {path}" in new.stdout
        assert "added to prefect.yaml" in new.stdout
        assert "Next:" in new.stdout
    for path in GENERATED:
        assert "from __future__" not in (checkout / path).read_text(), path

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

    tested = [path for path, cases in GENERATED.items() if cases]
    tests = run(
        checkout,
        python,
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        *CONSISTENCY_TESTS,
        *tested,
        timeout=600,
    )
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-2000:]
    passed = [line.split(" ")[0] for line in tests.stdout.splitlines() if " PASSED" in line]
    assert not [line for line in tests.stdout.splitlines() if " SKIPPED" in line]
    # every case of the generated tests ran, the integration ones against the real servers
    for path in tested:
        assert len([t for t in passed if t.startswith(f"{path}::")]) == GENERATED[path], path
    assert set(CONSISTENCY_TESTS[4:]) <= set(passed)
    for alert in ("ProbeThing", "ProbeCache"):
        assert f"tests/unit/test_example_rules.py::test_rule_is_complete[{alert}]" in passed

    for name, system in SCAFFOLDS:
        again = run(checkout, python, "-m", "serving.cli", "new", name, "--system", system)
        assert again.returncode == 2
        assert "already has a deployment" in again.stderr
