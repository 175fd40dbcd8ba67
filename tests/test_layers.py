"""The package's import graph: no cycles between modules, and the pipeline on top.

Parsed, not imported: every ``import`` and ``from ... import`` in ``cai/`` is an edge, at module
level, in a function or under ``if TYPE_CHECKING:`` (stages see the run through
``cai.pipeline.stage.StageContext``, so even their annotations need nothing above them). Only the
command-line entry points and the pipeline's own modules may import ``cai.pipeline``, and a stage
module (one that ``cai/pipeline/stages.py`` lists) imports no other stage module: what stages share
lives below them (``cai.pipeline.stage``, ``cai.pipeline.policy``, ``cai.layout``), and what one
stage leaves for another reaches it through the context.
"""

from __future__ import annotations

import ast
from pathlib import Path

CAI = Path(__file__).resolve().parents[1] / "cai"

ENTRY_POINTS = {
    "cai.cli",
    "cai.cli.constitution",
    "cai.cli.eval",
    "cai.cli.judge",
    "cai.cli.serve",
    "cai.cli.train",
}
"""Modules outside cai.pipeline that may import it: the ``cai`` command."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CAI.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the cai modules it imports."""
    paths = {_module_name(p): p for p in CAI.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), package)
        graph[name] = {m for m in imported if m in paths and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_only_entry_points_import_the_pipeline():
    outside = {
        module: sorted(m for m in imported if m == "cai.pipeline" or m.startswith("cai.pipeline."))
        for module, imported in import_graph().items()
        if not module.startswith("cai.pipeline") and module not in ENTRY_POINTS
    }
    assert {m: i for m, i in outside.items() if i} == {}


def stage_modules() -> set[str]:
    """The modules ``cai/pipeline/stages.py`` takes its stages from."""
    tree = ast.parse((CAI / "pipeline" / "stages.py").read_text(encoding="utf-8"))
    modules = import_graph()
    return {m for m in _imports(tree, "cai.pipeline") if m in modules and m != "cai.pipeline"}


def stage_imports(graph: dict[str, set[str]], stages: set[str]) -> dict[str, list[str]]:
    """Stage module → the other stage modules it imports (none, in a layered pipeline)."""
    return {m: sorted(graph[m] & stages) for m in sorted(stages) if graph[m] & stages}


def test_no_stage_module_imports_another():
    stages = stage_modules()
    assert stages == {
        f"cai.pipeline.{m}"
        for m in ("generate", "critique_revise", "sample", "judge", "training", "evaluation")
    }
    assert stage_imports(import_graph(), stages) == {}


def test_the_checker_sees_a_stage_importing_another():
    graph = {"s.a": {"s.b", "s.stage"}, "s.b": {"s.stage"}, "s.stage": set()}
    assert stage_imports(graph, {"s.a", "s.b"}) == {"s.a": ["s.b"]}
    assert stage_imports(graph, {"s.b"}) == {}


def test_the_checker_sees_a_cycle_and_a_function_level_import(tmp_path):
    tree = ast.parse("def f():\n    from cai import b\nif TYPE_CHECKING:\n    import cai.c\n")
    assert {"cai.b", "cai.c"} <= _imports(tree, "cai")
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


LAYOUT_NAMES = (
    "manifest.json",
    "cai_train.json",
    "cai_pipeline.json",
    "data.jsonl",
    "results.json",
    "report.html",
    "report.md",
    "grpo_prompts",
)
"""Names of a run directory's files and folders that ``cai.layout`` owns."""


def layout_strings(source: str) -> list[str]:
    """The string constants of ``source`` (docstrings aside) that spell a layout name."""
    tree = ast.parse(source)
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and any(name in node.value for name in LAYOUT_NAMES)
    ]


def test_the_run_layout_is_spelt_only_by_its_owner():
    found = {
        _module_name(path): layout_strings(path.read_text(encoding="utf-8"))
        for path in CAI.rglob("*.py")
        if path != CAI / "layout.py"
    }
    assert {m: names for m, names in found.items() if names} == {}
    assert layout_strings('"""data.jsonl"""\nx = f"{run}/data.jsonl"\n') == ["/data.jsonl"]
