"""The layout the catalog grows in: the toolkit (runbooks/) stands alone and without import
cycles, and every deployment's flow lives in flows/<family>/<deployment name>.py."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from prefect import Flow

from deployments.catalog import PROJECT_ROOT, RunbookSpec, load_catalog, load_flow

TOOLKIT = PROJECT_ROOT / "runbooks"
TOOLKIT_MODULES = sorted(f"runbooks.{p.stem}" for p in TOOLKIT.glob("*.py"))


def imported_modules(source: str) -> set[str]:
    """Every module a source imports, at top level or inside functions; not under TYPE_CHECKING.

    `from runbooks import x` counts as importing `runbooks.x`.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules among ``sources`` it imports."""
    return {name: imported_modules(src) & (set(sources) - {name}) for name, src in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            if cycle := walk(nxt, [*path, node]):
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := walk(start, []):
            return cycle
    return None


def toolkit_sources() -> dict[str, str]:
    return {f"runbooks.{p.stem}": p.read_text() for p in TOOLKIT.glob("*.py")}


# --- the scan itself, so the layout tests below can fail -------------------------------------


@pytest.mark.parametrize(
    ("sources", "cycle"),
    [
        # report and safety importing each other, one of them inside a function (the old shape)
        (
            {
                "runbooks.report": "def f():\n    from runbooks.safety import guard\n",
                "runbooks.safety": "from runbooks.report import escape_cell\n",
            },
            ["runbooks.report", "runbooks.safety", "runbooks.report"],
        ),
        # `from runbooks import x` is an import of runbooks.x
        (
            {
                "runbooks.a": "from runbooks import b\n",
                "runbooks.b": "import runbooks.a\n",
            },
            ["runbooks.a", "runbooks.b", "runbooks.a"],
        ),
        # a type-only import is no cycle at run time
        (
            {
                "runbooks.report": "import runbooks.safety\n",
                "runbooks.safety": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from runbooks.report import IncidentReport\n"
                ),
            },
            None,
        ),
        # three modules round
        (
            {
                "runbooks.a": "import runbooks.b\n",
                "runbooks.b": "class C:\n    def m(self):\n        import runbooks.c\n",
                "runbooks.c": "from runbooks.a import x\n",
            },
            ["runbooks.a", "runbooks.b", "runbooks.c", "runbooks.a"],
        ),
        ({"runbooks.a": "import runbooks.b\n", "runbooks.b": "import prefect\n"}, None),
    ],
)
def test_find_cycle(sources: dict[str, str], cycle: list[str] | None) -> None:
    assert find_cycle(import_graph(sources)) == cycle


# --- the toolkit -------------------------------------------------------------------------------


@pytest.mark.parametrize("module", TOOLKIT_MODULES)
def test_every_toolkit_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_toolkit_does_not_import_serving() -> None:
    offenders = {
        name: sorted(m for m in imported_modules(src) if m.split(".")[0] == "serving")
        for name, src in toolkit_sources().items()
    }
    assert not {k: v for k, v in offenders.items() if v}, "runbooks/ must not depend on serving/"


def test_toolkit_imports_have_no_cycle() -> None:
    graph = import_graph(toolkit_sources())
    assert "runbooks.safety" in graph["runbooks.report"], "the scan sees report's imports"
    assert find_cycle(graph) is None


# --- flows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", load_catalog(), ids=lambda s: s.name)
def test_entrypoint_is_named_for_its_deployment(spec: RunbookSpec) -> None:
    path, _, func = spec.entrypoint.partition(":")
    parts = Path(path).parts
    assert len(parts) == 3 and parts[0] == "flows", f"{path}: expected flows/<family>/<file>.py"
    assert parts[2] == f"{spec.name.replace('-', '_')}.py"
    assert (PROJECT_ROOT / path).is_file()
    assert (PROJECT_ROOT / "flows" / parts[1] / "__init__.py").is_file()
    flow = load_flow(spec)
    assert isinstance(flow, Flow), f"{spec.entrypoint} is not a flow"
    assert flow.name == spec.name
