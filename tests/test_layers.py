"""The package's import graph: its layers (``LAYERS``, which docs/architecture.md's Layout table
shows), no
cycles between modules, and the pipeline on top.

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
import inspect
import re
from pathlib import Path

CAI = Path(__file__).resolve().parents[1] / "cai"

ENTRY_POINTS = {
    "cai.cli",
    "cai.cli.classify",
    "cai.cli.constitution",
    "cai.cli.eval",
    "cai.cli.judge",
    "cai.cli.review",
    "cai.cli.serve",
    "cai.cli.train",
}
"""Modules outside cai.pipeline that may import it: the ``cai`` command."""


LAYERS: list[set[str]] = [
    {
        "cai",
        "cai.stats",
        "cai.layout",
        "cai.exit_codes",
        "cai.progress",
        "cai.jsonl",
        "cai.resources",
        "cai.keys",
        "cai.config",
    },
    {"cai.store", "cai.stage_files", "cai.merge", "cai.record_loop", "cai.models"},
    {"cai.engine"},
    {
        "cai.constitution",
        "cai.constitution_convert",
        "cai.prompts",
        "cai.data",
        "cai.sources",
        "cai.pairs",
        "cai.export",
        "cai.critique",
    },
    {"cai.judge"},
    {"cai.rewards", "cai.classify"},
    {"cai.train"},
    {"cai.eval", "cai.serve", "cai.review"},
    {"cai.report"},
    {"cai.pipeline"},
    {"cai.cli"},
]
"""The layers, from the bottom: a module imports only from its own layer or below. An entry
names a module, or a package and every module in it; the root ``cai`` names only itself (its
``__init__`` holds the version), or it would cover everything."""


def covers(entry: str, module: str) -> bool:
    return module == entry or (entry != "cai" and module.startswith(entry + "."))


def layers_of(module: str, layers: list[set[str]]) -> list[int]:
    """The indices of the layers with an entry that covers ``module`` (one, in a good table)."""
    return [i for i, layer in enumerate(layers) if any(covers(e, module) for e in layer)]


def upward_imports(graph: dict[str, set[str]], layers: list[set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) of every edge from a layer to one above it."""
    return sorted(
        (module, imported)
        for module, imports in graph.items()
        for imported in imports
        if layers_of(imported, layers) > layers_of(module, layers)
    )


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


def test_every_module_is_in_exactly_one_layer():
    placed = {m: layers_of(m, LAYERS) for m in import_graph()}
    assert {m: where for m, where in placed.items() if len(where) != 1} == {}


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(import_graph(), LAYERS) == []


def test_the_checker_sees_an_upward_import():
    graph = {"p.low": {"p.high.x"}, "p.high.x": {"p.low"}, "p.high": set(), "p.mid": {"p.low"}}
    layers = [{"p.low"}, {"p.mid"}, {"p.high"}]
    assert upward_imports(graph, layers) == [("p.low", "p.high.x")]
    assert layers_of("p.high.x", layers) == [2]
    assert layers_of("p.highway", layers) == []  # a prefix covers a package, not a longer name
    assert layers_of("cai.judge", [{"cai"}, {"cai.judge"}]) == [1]


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
        for m in (
            "generate",
            "critique_revise",
            "sample",
            "judge",
            "training",
            "evaluation",
            "classifier_data",
        )
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


def _layout_vocabulary() -> tuple[str, ...]:
    """Every name ``cai.layout`` gives a run's files and folders, read from the module itself.

    Its string constants (and tuples of them), and each path component ``RunLayout`` produces
    for a sample run, with sample arguments (a component that holds one, such as a stage's or a
    round's, is the caller's word, not the layout's). A member whose parameters are not among the
    samples fails here, so that a new one is added rather than skipped.
    """
    from cai import layout

    names = set()
    for attr, value in vars(layout).items():
        if attr.isupper() and isinstance(value, str):
            names.add(value)
        elif attr.isupper() and isinstance(value, tuple):
            names |= {v for v in value if isinstance(v, str)}
    root = Path("/SAMPLE-RUN")
    run = layout.RunLayout(root)
    samples = {"stage": "SAMPLE", "name": "SAMPLE", "r": 7, "round": 7, "shard": (7, 9)}
    produced = []
    for attr, member in vars(layout.RunLayout).items():
        if attr.startswith("_") or attr in {"root", "relative", "is_lock"}:
            continue  # the root itself; relative() and is_lock() take a path and name nothing
        if isinstance(member, property):
            produced.append(getattr(run, attr))
            continue
        params = list(inspect.signature(member).parameters.values())[1:]
        assert {p.name for p in params} <= samples.keys(), f"RunLayout.{attr}: {params}"
        required = [samples[p.name] for p in params if p.default is inspect.Parameter.empty]
        produced.append(getattr(run, attr)(*required))  # optional ones left out: plain names
        produced.append(getattr(run, attr)(*(samples[p.name] for p in params)))
    for value in produced:
        for path in value.values() if isinstance(value, dict) else [value]:
            parts = path.relative_to(root).parts
            names |= {p for p in parts if not any(str(s) in p for s in ("SAMPLE", 7, 9))}
    return tuple(sorted(names))


LAYOUT_NAMES = _layout_vocabulary()
"""Names of a run directory's files and folders that ``cai.layout`` owns."""

DISTINCTIVE = re.compile(r"[.<>*]")
"""A layout name with a dot, angle bracket or star (``report.md``, ``.lock``, ``<run>``,
``*.jsonl``) is a file name, placeholder or glob wherever it appears in a string. A plain word
(``sft``, ``eval``, ``models``, ``report``, ``rounds``, ``stages``, ``revision_pairs``) is also a
stage's, a model's, a command's, an export's or a record field's name, so it counts only where it
is a path component: an operand of ``/`` (``run_dir / "report"``), or between slashes in a string
(``f"{run}/rounds/{r}"``); matching plain words anywhere would flag every ``"sft"`` stage.

Prose is left out: a string with whitespace in it (a help text, an error message, a stage's
description) names files for a person to read, as a docstring does, and a path built by hand has
no spaces."""

OTHER_ROOTS = {
    ("cai.models", "models"): "the model cache's folder (cache_dir() / 'models'), not a run's",
    ("cai.models", ".lock"): "a download's lock file in the model cache",
    ("cai.cli.eval", "runs/eval"): "cai eval's default output folder, which is not in a run",
}
"""(module, string) → why that string names something outside any run directory."""


def layout_strings(source: str) -> list[str]:
    """The string constants of ``source`` (docstrings aside) that spell a layout name."""
    tree = ast.parse(source)
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    path_operands = {
        id(side)
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
        for side in (node.left, node.right)
    }
    distinctive = [n for n in LAYOUT_NAMES if DISTINCTIVE.search(n)]
    plain = {n for n in LAYOUT_NAMES if not DISTINCTIVE.search(n)}

    def spells(node: ast.Constant) -> bool:
        text = node.value
        if any(c.isspace() for c in text):
            return False
        if any(name in text for name in distinctive):
            return True
        if id(node) in path_operands:
            return bool(plain & set(text.split("/")))
        return "/" in text and bool(plain & set(text.split("/")))

    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and spells(node)
    ]


def test_the_layout_vocabulary_is_read_from_the_layout():
    assert {"manifest.json", "data.jsonl", "report.md", "grpo_prompts", ".lock"} <= set(
        LAYOUT_NAMES
    )
    assert {"sft", "rounds", "models", "report", "eval", "stages"} <= set(LAYOUT_NAMES)
    assert not [n for n in LAYOUT_NAMES if "SAMPLE" in n or "7" in n]


def test_the_run_layout_is_spelt_only_by_its_owner():
    found = {
        _module_name(path): layout_strings(path.read_text(encoding="utf-8"))
        for path in CAI.rglob("*.py")
        if path != CAI / "layout.py"
    }
    spelt = {(m, name) for m, names in found.items() for name in names}
    assert sorted(spelt - OTHER_ROOTS.keys()) == []
    assert sorted(OTHER_ROOTS.keys() - spelt) == []  # an exception no longer needed goes


def test_the_layout_checker_sees_names_and_path_words_only():
    source = (
        '"""data.jsonl"""\n'
        'x = f"{run}/data.jsonl"\n'
        'y = run_dir / "report"\n'
        'z = f"{run}/rounds/{r}"\n'
        'stage = "sft"\n'
        'cmd = {"report": 1}\n'
        'help = "writes <run>/report.md"\n'
    )
    assert layout_strings(source) == ["/data.jsonl", "report", "/rounds/"]


def docstring_modules(source: str) -> set[str]:
    """The ``name.py`` files a module's docstring names."""
    return set(re.findall(r"\b\w+\.py\b", ast.get_docstring(ast.parse(source)) or ""))


def test_the_pipeline_docstring_names_its_modules():
    named = docstring_modules((CAI / "pipeline" / "__init__.py").read_text(encoding="utf-8"))
    present = {p.name for p in (CAI / "pipeline").glob("*.py")} - {"__init__.py"}
    assert sorted(named - present) == []  # named, but no such module
    assert sorted(present - named) == []  # a module the docstring leaves out
    assert docstring_modules('"""a.py, b.py: c.pyc"""\nx = "d.py"\n') == {"a.py", "b.py"}


ROOT = CAI.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layout_layers(page: str) -> list[set[str]]:
    """The module names of each row's first cell in a page's ``## Layout`` table, top row
    first: ``stats.py`` is ``cai.stats``, ``engine/`` the package ``cai.engine``, ``__init__.py``
    the root ``cai``."""
    section = page.split("\n## Layout\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    layers = []
    for row in rows:
        paths = re.findall(r"`([^`]+)`", row.split("|")[1])
        names = set()
        for path in paths:
            parts = path.removesuffix("/").removesuffix(".py").split("/")
            names.add(".".join(["cai", *parts]) if parts != ["__init__"] else "cai")
        layers.append(names)
    return layers


def test_the_architecture_layout_table_is_the_layer_table():
    assert layout_layers(ARCHITECTURE.read_text(encoding="utf-8")) == LAYERS
    table = (
        "x\n## Layout\n\n| a | b |\n|---|---|\n| `__init__.py`, `a.py` | `b.py` |\n| `p/` | c |\n"
    )
    assert layout_layers(table + "## Next\n| `q.py` | d |\n") == [{"cai", "cai.a"}, {"cai.p"}]


def doc_pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def doc_imports(pages: list[Path]) -> list[tuple[str, str]]:
    """Every ``from cai... import ...`` line in the pages' Python blocks, with the page it is
    on (relative to the repository), once per line."""
    found: dict[str, str] = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            for line in block.splitlines():
                if re.match(r"\s*from cai(\.\w+)* import ", line):
                    found.setdefault(line.strip(), str(page.relative_to(ROOT)))
    return sorted((line, page) for line, page in found.items())


def test_the_imports_the_docs_show_work():
    pages = doc_pages()
    assert ROOT / "docs" / "concepts" / "judge.md" in pages
    lines = doc_imports(pages)
    assert any(line.startswith("from cai.judge import Judge") for line, _ in lines)
    assert any(page == "README.md" for _, page in lines)  # the README's blocks are read too
    for line, page in lines:
        exec(compile(line, page, "exec"), {})  # an ImportError names the page and the line
