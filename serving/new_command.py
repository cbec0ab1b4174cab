"""`runbooks new`: scaffold a working runbook, wired in everywhere a runbook must be.

    runbooks new long-statements --system postgres
    runbooks new orders-queries-stuck --system postgres --alert OrdersQueriesStuck --family orders
    runbooks new sessions-cache-idle --system redis

writes the flow (flows/<family>/<name>.py: parameters, a check, a decision, one change through
the guard with plan/dry-run/verify, the report), its decision module and their tests (a data
table; the flow against the real server fixture), and adds the deployment to prefect.yaml, the
alert rule and its promtool case to examples/prometheus/, the alert to Alertmanager's route, a
trigger case to tests/integration/test_alert_triggers.py and rows to the README's tables. All of
it passes the tests before the author changes anything. Shared files only get text inserted at
fixed anchors (never re-dumped), and nothing is written unless every piece can be.
"""

from __future__ import annotations

import argparse
import keyword
import re
import string
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

HELP = "scaffold a new runbook (flow, tests, deployment, alert rule) that passes its tests"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "templates"

# kebab-case: lowercase words of letters and digits joined by single dashes, a letter first
NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
ALERT = re.compile(r"[A-Z][A-Za-z0-9]*")
FAMILY = re.compile(r"[a-z][a-z0-9_]*")
MAX_NAME = 60
MAX_ALERT = 80


@dataclass(frozen=True)
class System:
    """What a scaffold for one kind of system needs: its templates (serving/templates/<dir>),
    the deployment's first tags, the report's severity, the real server its integration test
    runs against and the labels of an alert for `runbooks simulate`."""

    templates: str
    tags: tuple[str, ...]
    severity: str
    server: str
    labels: str


SYSTEMS = {
    "postgres": System(
        "postgres",
        ("postgresql", "sev-p3"),
        "P3",
        "PostgreSQL",
        "database=orders-db datname=orders",
    ),
    "redis": System("redis", ("redis", "sev-p3"), "P3", "Redis", "redis=sessions-cache"),
}


class ScaffoldError(ValueError):
    """Bad input or a project that cannot take the runbook: nothing was written."""


class _Template(string.Template):
    # `$` and `{}` are everywhere in Python, YAML and Prometheus templates; `%%{x}` is nowhere
    delimiter = "%%"


@dataclass(frozen=True)
class Scaffold:
    name: str
    system: str
    alert: str
    family: str
    observe: bool

    @property
    def module(self) -> str:
        return self.name.replace("-", "_")

    @property
    def values(self) -> dict[str, str]:
        system = SYSTEMS[self.system]
        tags = [*system.tags, *(["observe"] if self.observe else [])]
        return {
            "name": self.name,
            "module": self.module,
            "cls": "".join(part.capitalize() for part in self.name.split("-")),
            "title": " ".join(part.capitalize() for part in self.name.split("-")),
            "alert": self.alert,
            "family": self.family,
            "severity": system.severity,
            "tags": ", ".join(tags),
        }

    def render(self, template: str) -> str:
        text = (TEMPLATES / SYSTEMS[self.system].templates / template).read_text()
        return _Template(text).substitute(self.values)

    @property
    def new_files(self) -> dict[str, str]:
        """Path (from the project root) -> template of every file the scaffold creates."""
        return {
            f"flows/{self.family}/{self.module}.py": "flow.py.tmpl",
            f"tasks/{self.module}_decisions.py": "decisions.py.tmpl",
            f"tests/unit/test_{self.module}_decisions.py": "test_decisions.py.tmpl",
            f"tests/integration/test_{self.module}.py": "test_integration.py.tmpl",
        }


def default_alert(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def validate(
    name: str, system: str, alert: str | None, family: str | None, root: Path = PROJECT_ROOT
) -> Scaffold:
    """The scaffold to write, or ScaffoldError saying what is wrong (before anything is read
    into a template, so no name can put code or a path into a file)."""
    if not NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise ScaffoldError(
            f"name {name!r}: expected a kebab-case deployment name (lowercase letters and digits "
            f"in words joined by single dashes, a letter first, at most {MAX_NAME} characters), "
            "e.g. orders-queries-stuck"
        )
    if system not in SYSTEMS:
        raise ScaffoldError(f"system {system!r}: supported are {', '.join(sorted(SYSTEMS))}")
    module = name.replace("-", "_")
    if keyword.iskeyword(module):
        raise ScaffoldError(f"name {name!r}: {module!r} is a Python keyword, not a module name")
    alert = default_alert(name) if alert is None else alert
    if not ALERT.fullmatch(alert) or len(alert) > MAX_ALERT:
        raise ScaffoldError(
            f"alert {alert!r}: expected a Prometheus alert name in CamelCase (letters and digits, "
            f"an uppercase letter first, at most {MAX_ALERT} characters)"
        )
    family = system if family is None else family
    if not FAMILY.fullmatch(family) or keyword.iskeyword(family):
        raise ScaffoldError(
            f"family {family!r}: expected a lowercase package name (letters, digits, '_'), "
            "e.g. postgres"
        )

    from deployments.catalog import load_catalog

    catalog = load_catalog(root / "prefect.yaml")
    if name in {spec.name for spec in catalog}:
        raise ScaffoldError(f"name {name!r}: prefect.yaml already has a deployment of that name")
    for spec in catalog:
        for trigger in spec.triggers:
            names = trigger["match"].get("alertname", [])
            if alert in ([names] if isinstance(names, str) else names):
                raise ScaffoldError(
                    f"alert {alert!r}: already starts {spec.name} (prefect.yaml); name another "
                    "with --alert"
                )
    rules = (root / "examples" / "prometheus" / "alerts.yml").read_text()
    if re.search(rf"^\s*- alert: {alert}\s*$", rules, re.M):
        raise ScaffoldError(f"alert {alert!r}: examples/prometheus/alerts.yml already has it")
    scaffold = Scaffold(name, system, alert, family, observe=False)
    for path in scaffold.new_files:
        if (root / path).exists():
            raise ScaffoldError(f"name {name!r}: {path} exists already")
    return scaffold


# --- insertion at anchors ----------------------------------------------------------------------


def _append(text: str, addition: str, where: str) -> str:
    if not text.endswith("\n"):
        raise ScaffoldError(f"{where} does not end with a newline; fix it by hand first")
    return text + addition


def add_deployment(text: str, entry: str) -> str:
    """Deployments are the last section of prefect.yaml: the entry goes after the last one."""
    tops = re.findall(r"^([A-Za-z_][\w-]*):", text, re.M)
    if not tops or tops[-1] != "deployments":
        raise ScaffoldError("prefect.yaml: `deployments:` is not its last top-level key")
    return _append(text, entry, "prefect.yaml")


def add_rule_group(text: str, group: str) -> str:
    """Rule groups are the one top-level list of alerts.yml: a new group goes at its end."""
    if re.findall(r"^([A-Za-z_][\w-]*):", text, re.M) != ["groups"]:
        raise ScaffoldError("examples/prometheus/alerts.yml: expected `groups:` as its only key")
    return _append(text, group, "examples/prometheus/alerts.yml")


def add_rule_test(text: str, case: str) -> str:
    tops = re.findall(r"^([A-Za-z_][\w-]*):", text, re.M)
    if not tops or tops[-1] != "tests":
        raise ScaffoldError("examples/prometheus/alerts_test.yml: `tests:` is not its last key")
    return _append(text, case, "examples/prometheus/alerts_test.yml")


def add_route(text: str, alert: str) -> str:
    """The runbooks-gateway route's one `alertname =~ "A|B|..."` matcher gets `|alert`."""
    matchers = list(re.finditer(r'^(\s*- alertname =~ "[^"\n]+)"', text, re.M))
    if len(matchers) != 1:
        raise ScaffoldError(
            'examples/alertmanager.yml: expected one `- alertname =~ "..."` matcher (the '
            f"runbooks-gateway route), found {len(matchers)}"
        )
    end = matchers[0].end(1)
    return text[:end] + f"|{alert}" + text[end:]


CASES_END = "}\n\n\ndef test_every_deployment_has_a_case() -> None:\n"


def add_trigger_case(text: str, case: str) -> str:
    """The entry goes last in CASES, just before the dict's closing brace."""
    if text.count(CASES_END) != 1:
        raise ScaffoldError(
            "tests/integration/test_alert_triggers.py: CASES does not end right before "
            "test_every_deployment_has_a_case"
        )
    at = text.index(CASES_END)
    return text[:at] + case + text[at:]


def add_table_row(text: str, header: str, row: str, where: str) -> str:
    """``row`` after the last row of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    if len(starts) != 1:
        raise ScaffoldError(f"{where}: expected one table starting {header!r}, found {len(starts)}")
    end = starts[0]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:end] + [row] + lines[end:])


# --- writing -----------------------------------------------------------------------------------


def plan(scaffold: Scaffold, root: Path = PROJECT_ROOT) -> dict[Path, str]:
    """Every file the scaffold writes, with its whole new content; raises before any is written."""
    files = {
        root / path: scaffold.render(template) for path, template in scaffold.new_files.items()
    }
    family_init = root / "flows" / scaffold.family / "__init__.py"
    if not family_init.exists():
        files[family_init] = ""

    def read(path: str) -> str:
        return (root / path).read_text()

    shared = {
        "prefect.yaml": add_deployment(
            read("prefect.yaml"), scaffold.render("deployment.yaml.tmpl")
        ),
        "examples/prometheus/alerts.yml": add_rule_group(
            read("examples/prometheus/alerts.yml"), scaffold.render("rule.yaml.tmpl")
        ),
        "examples/prometheus/alerts_test.yml": add_rule_test(
            read("examples/prometheus/alerts_test.yml"), scaffold.render("rule_test.yaml.tmpl")
        ),
        "examples/alertmanager.yml": add_route(read("examples/alertmanager.yml"), scaffold.alert),
        "tests/integration/test_alert_triggers.py": add_trigger_case(
            read("tests/integration/test_alert_triggers.py"),
            scaffold.render("trigger_case.py.tmpl"),
        ),
    }
    readme = add_table_row(
        read("README.md"),
        "| Runbook (deployment) | Seed | Trigger | What it does |",
        scaffold.render("readme_runbook_row.md.tmpl"),
        "README.md",
    )
    shared["README.md"] = add_table_row(
        readme,
        "| Runbook | Locked target | Budget | Needs approval when |",
        scaffold.render("readme_safety_row.md.tmpl"),
        "README.md",
    )
    shared["examples/README.md"] = add_table_row(
        read("examples/README.md"),
        "| Alerts | Runbook | Labels (block type) |",
        scaffold.render("examples_readme_row.md.tmpl"),
        "examples/README.md",
    )
    files.update({root / path: text for path, text in shared.items()})
    return files


def write(files: dict[Path, str], code: list[Path], root: Path = PROJECT_ROOT) -> None:
    """Write every file, then sort the new ``code``'s imports and lay it out with the project's
    linter and formatter (a name decides where its imports sort and how long lines get; the
    code itself is the template's)."""
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for tool in (["check", "--fix", "--select", "I"], ["format"]):
        subprocess.run(
            [sys.executable, "-m", "ruff", *tool, "--quiet", *map(str, code)],
            cwd=root,
            capture_output=True,
            timeout=60,
            check=False,
        )


NEXT_STEPS = """
Next:
  1. Run its tests (the integration test starts a real {server} and a Prefect test server):
       .venv/bin/python -m pytest -q {unit} {integration}
  2. Make it yours: the decision in {decisions} (and its data table in {unit}),
     the check and the change in {flow}; keep the tests passing.
  3. Before it fires for real:
       .venv/bin/runbooks simulate --labels alertname={alert} {labels}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="deployment name, kebab-case (e.g. orders-queries-stuck)")
    parser.add_argument(
        "--system", required=True, help=f"the system it acts on: {', '.join(sorted(SYSTEMS))}"
    )
    parser.add_argument(
        "--alert", default=None, help="the alert that starts it (default: the name in CamelCase)"
    )
    parser.add_argument(
        "--family", default=None, help="the flows/ package it goes in (default: the system)"
    )
    parser.add_argument(
        "--dry-run-only",
        action="store_true",
        help="tag the deployment `observe`: every run plans and reports, changes nothing",
    )


def main(args: argparse.Namespace, root: Path = PROJECT_ROOT) -> int:
    try:
        scaffold = validate(args.name, args.system, args.alert, args.family, root)
        scaffold = replace(scaffold, observe=args.dry_run_only)
        files = plan(scaffold, root)
    except ScaffoldError as exc:
        print(f"runbooks new: {exc}; nothing was written", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"runbooks new: cannot read {exc.filename}: {exc.strerror} (run it in a checkout "
            "of the project); nothing was written",
            file=sys.stderr,
        )
        return 2
    created = [path for path in files if not path.exists()]
    write(files, [path for path in created if path.suffix == ".py"], root)
    print(f"scaffolded runbook {scaffold.name} (alert {scaffold.alert}, system {scaffold.system}):")
    for path in files:
        print(f"  {'created' if path in created else 'added to'} {path.relative_to(root)}")
    paths = {template: path for path, template in scaffold.new_files.items()}
    print(
        NEXT_STEPS.format(
            unit=paths["test_decisions.py.tmpl"],
            integration=paths["test_integration.py.tmpl"],
            decisions=paths["decisions.py.tmpl"],
            flow=paths["flow.py.tmpl"],
            alert=scaffold.alert,
            server=SYSTEMS[scaffold.system].server,
            labels=SYSTEMS[scaffold.system].labels,
        )
    )
    return 0
