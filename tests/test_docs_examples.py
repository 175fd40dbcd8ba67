"""The docs' runnable examples: every code block that README.md or a page under docs/ marks
runnable runs here, so an example that no longer works fails the suite with its page and line.

A block is runnable when the line directly above its opening fence is ``<!-- runnable -->``
(an HTML comment: neither GitHub nor the docs site shows it). A page's runnable blocks run in
order, in a fresh folder holding copies of ``constitutions/``, ``pipelines/``, ``prompts/`` and
``data/``:

- ``python``: executed as ``__main__``, compiled with the page as its file name and the page's
  line numbers, so a traceback points into the page. ``create_engine`` for the default model
  (``smollm2-135m``, backend auto or hf) returns the tests' shared real model (``hf_engine`` in
  conftest.py), loaded once and never closed by a block; a page whose Python names that model
  is marked ``slow``. Keep such blocks to a pair or two.
- ``bash``: ``bash -e -o pipefail`` with this interpreter as ``python`` and ``cai`` first on the
  ``PATH``, and a timeout: for cheap commands (``--dry-run``, ``cai constitution check``).
- ``yaml``: its first line names a file (``# mine.yaml``), which the block is written to for
  the blocks after it; it must parse (``yaml.safe_load``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
LANGUAGES = ("python", "bash", "yaml")
DEFAULT_MODEL = "smollm2-135m"
COPIED = ("constitutions", "pipelines", "prompts", "data")
"""Folders a page's working folder gets a copy of, so that blocks may read and edit them."""
BASH_TIMEOUT = 180
"""Seconds a bash block may take: a dry run or a check takes a few."""


class DocsError(Exception):
    """A page marks a block runnable that cannot be run (no fence under the marker, no
    closing fence, a language this test does not run, a yaml block naming no file)."""


@dataclass(frozen=True)
class Block:
    page: str
    """The page, relative to the repository: ``docs/concepts/judge.md``."""
    line: int
    """The page's line number of the block's first line of code."""
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def runnable_blocks(text: str, page: str) -> list[Block]:
    """The blocks of a page's text that carry the marker, in page order. A marker inside a code
    block is text, not a marker."""
    lines = text.splitlines()
    blocks: list[Block] = []
    fence: str | None = None  # the open fence while inside a code block
    for n, line in enumerate(lines):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                fence = None
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[: len(stripped) - len(stripped.lstrip(stripped[0]))]
            continue
        if stripped != MARKER:
            continue
        opening = lines[n + 1].strip() if n + 1 < len(lines) else ""
        if not opening.startswith(("```", "~~~")):
            raise DocsError(f"{page}:{n + 1}: {MARKER} must be the line directly above a fence")
        mark = opening[: len(opening) - len(opening.lstrip(opening[0]))]
        language = opening[len(mark) :].strip().split(" ")[0]
        if language not in LANGUAGES:
            raise DocsError(
                f"{page}:{n + 2}: a runnable block must be one of {', '.join(LANGUAGES)}, "
                f"not {language or 'unlabelled'!r}"
            )
        end = next(
            (
                i
                for i in range(n + 2, len(lines))
                if lines[i].strip().startswith(mark) and not lines[i].strip().strip(mark[0])
            ),
            None,
        )
        if end is None:
            raise DocsError(f"{page}:{n + 2}: the runnable block has no closing fence")
        code = "\n".join(lines[n + 2 : end]) + "\n"
        blocks.append(Block(page, n + 3, language, code))
    return blocks


def doc_pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def page_blocks() -> dict[str, list[Block] | DocsError]:
    """Each page's runnable blocks (or the error that keeps them from running), for the pages
    that have any."""
    found: dict[str, list[Block] | DocsError] = {}
    for path in doc_pages():
        page = str(path.relative_to(ROOT))
        try:
            blocks = runnable_blocks(path.read_text(encoding="utf-8"), page)
        except DocsError as e:
            found[page] = e
            continue
        if blocks:
            found[page] = blocks
    return found


PAGES = page_blocks()


def uses_the_model(blocks: list[Block] | DocsError) -> bool:
    return isinstance(blocks, list) and any(
        b.language == "python" and DEFAULT_MODEL in b.code for b in blocks
    )


def _file_of(block: Block) -> str:
    """The file a yaml block names on its first line (``# mine.yaml``)."""
    first = block.code.splitlines()[0] if block.code.strip() else ""
    name = first.removeprefix("#").strip() if first.startswith("#") else ""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or " " in name:
        raise DocsError(
            f"{block.where}: a runnable yaml block's first line must name its file, such as "
            f"'# mine.yaml' (a relative path), got {first!r}"
        )
    return name


def _bin_folder(folder: Path) -> Path:
    """``python`` and ``cai`` for bash blocks: this interpreter, this checkout's cai."""
    folder.mkdir()
    python = shlex.quote(sys.executable)  # a script, not a link: a venv knows itself by its path
    for name, command in (("python", python), ("cai", f"{python} -m cai.cli")):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        script.chmod(0o755)
    return folder


def run_python(block: Block) -> None:
    """Execute a python block as ``__main__``; a failure names the page and line."""
    source = "\n" * (block.line - 1) + block.code  # the page's line numbers in tracebacks
    try:
        code = compile(source, block.page, "exec")
    except SyntaxError as e:
        pytest.fail(f"{block.page}:{e.lineno}: the python block does not compile: {e.msg}")
    module = types.ModuleType("__main__")
    module.__file__ = str(ROOT / block.page)
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = module  # dataclasses and pickling look their module up here
    try:
        exec(code, module.__dict__)
    except Exception as e:
        pytest.fail(
            f"{block.where}: the python block raised {type(e).__name__}: {e}\n"
            + "".join(traceback.format_exception(e)[-6:])
        )
    finally:
        sys.modules["__main__"] = saved


def run_bash(block: Block, cwd: Path, path: Path) -> None:
    """Run a bash block in ``cwd``; a non-zero exit or a timeout names the page and line."""
    env = {
        **os.environ,
        "PATH": f"{path}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.code],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=BASH_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the bash block took more than {BASH_TIMEOUT} s")
    if done.returncode != 0:
        pytest.fail(
            f"{block.where}: the bash block exited {done.returncode}\n"
            f"--- stdout\n{done.stdout[-2000:]}--- stderr\n{done.stderr[-3000:]}"
        )


def write_yaml(block: Block, cwd: Path) -> None:
    """Write a yaml block to the file its first line names, once it parses."""
    name = _file_of(block)
    try:
        yaml.safe_load(block.code)
    except yaml.YAMLError as e:
        pytest.fail(f"{block.where}: the yaml block does not parse: {e}")
    target = cwd / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(block.code, encoding="utf-8")


def run_page(blocks: list[Block], cwd: Path) -> None:
    """A page's runnable blocks, in order, in ``cwd``."""
    path = _bin_folder(cwd / ".bin")
    for folder in COPIED:
        shutil.copytree(ROOT / folder, cwd / folder, symlinks=False)
    for block in blocks:
        if block.language == "python":
            run_python(block)
        elif block.language == "bash":
            run_bash(block, cwd, path)
        else:
            write_yaml(block, cwd)


@pytest.fixture
def shared_model(request, monkeypatch):
    """``create_engine`` for the default model gives the session's real model, which a block's
    ``with`` or ``close()`` leaves open; any other engine is built as usual."""
    import cai.engine
    import cai.judge.judge  # the judge holds its own name for create_engine

    original = cai.engine.create_engine

    def create_engine(backend="auto", model=None, **options):
        if model in (None, DEFAULT_MODEL) and backend in ("auto", "hf") and not options:
            engine = request.getfixturevalue("hf_engine")
            monkeypatch.setattr(engine, "close", lambda: None)
            return engine
        return original(backend, model, **options)

    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "") or "").startswith("cai") and (
            getattr(module, "create_engine", None) is original
        ):
            monkeypatch.setattr(module, "create_engine", create_engine)


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if uses_the_model(b) else [])
        for p, b in PAGES.items()
    ],
)
def test_the_runnable_blocks_of_a_page_run(page, tmp_path, monkeypatch, shared_model):
    blocks = PAGES[page]
    if isinstance(blocks, DocsError):
        pytest.fail(str(blocks))
    monkeypatch.chdir(tmp_path)
    run_page(blocks, tmp_path)


def test_the_docs_mark_their_main_examples_runnable():
    """The examples this suite promises to run stay marked: a marker lost in an edit fails."""
    assert not [str(e) for e in PAGES.values() if isinstance(e, DocsError)]

    def code(page: str, language: str) -> str:
        blocks = PAGES.get(page, [])
        return "\n".join(b.code for b in blocks if b.language == language)

    assert code("docs/guides/write-a-stage.md", "python").startswith("# cai/pipeline/summarize.py")
    assert "judge.compare(" in code("docs/concepts/judge.md", "python")
    assert "Judge(" in code("README.md", "python")
    assert "JudgeReward(" in code("docs/guides/rewards.md", "python")
    assert "cai constitution check mine.yaml" in code("docs/guides/constitution.md", "bash")
    assert code("docs/guides/constitution.md", "yaml").startswith("# mine.yaml")
    assert "--dry-run" in code("docs/guides/sl-cai.md", "bash")
    assert "--dry-run" in code("docs/getting-started.md", "bash")


def test_a_marker_must_sit_on_a_fence_of_a_language_that_runs():
    good = f"text\n{MARKER}\n```python\nx = 1\n```\n\n```bash\n{MARKER}\n```\n"
    [block] = runnable_blocks(good, "p.md")  # the marker inside a code block is text
    assert (block.language, block.line, block.code) == ("python", 4, "x = 1\n")
    with pytest.raises(DocsError, match=r"^p\.md:2: .* directly above a fence"):
        runnable_blocks(f"text\n{MARKER}\n\n```python\nx = 1\n```\n", "p.md")
    with pytest.raises(DocsError, match=r"^p\.md:3: .* not 'json'"):
        runnable_blocks(f"text\n{MARKER}\n```json\n{{}}\n```\n", "p.md")
    with pytest.raises(DocsError, match=r"^p\.md:2: .* no closing fence"):
        runnable_blocks(f"{MARKER}\n```bash\ntrue\n", "p.md")
    with pytest.raises(DocsError, match=r"^p\.md:1: .* must name its file"):
        _file_of(Block("p.md", 1, "yaml", "a: 1\n"))


def test_a_failing_block_fails_with_its_page_and_line(tmp_path):
    page = f"# Page\n\n{MARKER}\n```python\nx = 1\nraise ValueError('broken example')\n```\n"
    [block] = runnable_blocks(page, "docs/x.md")
    with pytest.raises(pytest.fail.Exception, match=r"docs/x\.md:5: .*ValueError: broken example"):
        run_python(block)
    try:
        run_python(block)
    except pytest.fail.Exception as e:
        assert 'File "docs/x.md", line 6' in str(e)  # the raising line, as the page numbers it

    bash = f"{MARKER}\n```bash\necho fine\nfalse\n```\n"
    [block] = runnable_blocks(bash, "docs/y.md")
    with pytest.raises(pytest.fail.Exception, match=r"docs/y\.md:3: the bash block exited 1"):
        run_bash(block, tmp_path, _bin_folder(tmp_path / "bin"))
