"""The stage contract: a stage declared in one place runs in a recipe, plans, resumes, is validated
and runs once per online round, without a line changed anywhere else.

The stage is the docs' own example (docs/guides/write-a-stage.md): this test reads the page's python
block that starts with ``# cai/pipeline/summarize.py`` and runs it as a module, so the two are one
copy.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from fakes import PairEngine
from test_pipeline import write_prompts

from cai.config import ConfigError
from cai.pipeline.online import schedule
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.pipeline.stages import STAGES
from cai.store import RunStore

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "write-a-stage.md"


def docs_stage() -> types.ModuleType:
    """docs/guides/write-a-stage.md's example stage module, executed."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    [source] = [b for b in blocks if b.startswith("# cai/pipeline/summarize.py")]
    module = types.ModuleType("docs_summarize")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, "docs/guides/write-a-stage.md (summarize)", "exec"), module.__dict__)
    return module


summarize = docs_stage()
STAGE = summarize.STAGE
# "Then add summarize.STAGE after sample.STAGE in STAGES".
WITH_STAGE = [*STAGES[: STAGES.index(next(s for s in STAGES if s.name == "sample")) + 1], STAGE]
WITH_STAGE += [s for s in STAGES if s not in WITH_STAGE]

RECIPE = """\
name: summaries
engine: {{backend: hf}}
sources:
  - path: {prompts}
stages:
  sample: {{k: 2, max_tokens: 8}}
{stage}
"""


def _recipe(tmp_path, stage: str):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "two?"])
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(prompts=prompts, stage=stage))
    return path


def test_the_docs_stage_is_declared_per_round():
    assert STAGE.name == "summarize" and STAGE.needs == ("sample",)
    assert STAGE.per_round is not None and all(STAGE.per_round(r) for r in (1, 2, 5))


def test_a_stage_of_its_own_plans_runs_and_resumes(tmp_path):
    path = _recipe(tmp_path, "  summarize: {max_tokens: 16}")
    run_dir = tmp_path / "run"
    runner = Runner(load_recipe(path, stages=WITH_STAGE), run_dir, engine=PairEngine())
    assert "summarize: at most 2 requests" in runner.plan()
    result = runner.run()
    assert [r.name for r in result.stages] == ["sample", "summarize"]
    assert {r.name: r.records for r in result.stages} == {"sample": 2, "summarize": 2}
    assert not result.failed
    records = list(RunStore(run_dir).read_stage("summarize").values())
    # Outside the rounds a record has no round, in its key or its fields.
    assert sorted(r["input_key"] for r in records) == ["p0", "p1"]
    assert all("round" not in r and r["summary"].startswith("x answer ") for r in records)

    engine = PairEngine()
    again = Runner(load_recipe(path, stages=WITH_STAGE), run_dir, engine=engine).run()
    resumed = {r.name: r for r in again.stages}["summarize"]
    assert (resumed.records, resumed.done_before) == (0, 2)
    assert engine.generate_batches == []


def test_a_per_round_stage_runs_in_every_round_on_that_rounds_samples(tmp_path, monkeypatch):
    from test_online import fake_online

    path = fake_online(tmp_path, monkeypatch)
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"] = {
        name: ({"max_tokens": 8} if name == "summarize" else options)
        for name, options in [*recipe["stages"].items(), ("summarize", None)]
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(path, stages=WITH_STAGE)
    order = [
        (s.name, r) for s, r in schedule([s for s, _ in loaded.stages.present()], loaded.online)
    ]
    assert order == [
        (name, r) for r in (1, 2) for name in ("sample", "summarize", "judge", "train_dpo")
    ]
    run_dir = tmp_path / "run"
    result = Runner(loaded, run_dir, engine=PairEngine()).run()
    assert not result.failed
    assert {t.name: t.records for t in result.stages if t.name.startswith("summarize")} == {
        "summarize r1": 2,
        "summarize r2": 2,
    }
    store = RunStore(run_dir)
    sampled = {(r["round"], r["input_key"]) for r in store.read_stage("sample").values()}
    summarized = {(r["round"], r["input_key"]) for r in store.read_stage("summarize").values()}
    assert summarized == sampled and {r for r, _ in summarized} == {1, 2}


def test_its_options_and_needs_are_checked_when_the_recipe_loads(tmp_path):
    path = _recipe(tmp_path, "  summarize: {max_tokens: 0}")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: .*max_tokens must be >= 1"):
        load_recipe(path, stages=WITH_STAGE)
    path.write_text(
        path.read_text()
        .replace("  sample: {k: 2, max_tokens: 8}\n", "  generate: {}\n")
        .replace("max_tokens: 0", "max_tokens: 4")
    )
    with pytest.raises(ConfigError, match="summarize needs a sample stage before it"):
        load_recipe(path, stages=WITH_STAGE)
    # Without the stage in the list, the recipe key is unknown, as any misspelt stage.
    with pytest.raises(ConfigError, match="summarize"):
        load_recipe(_recipe(tmp_path, "  summarize: {}"))


def test_adding_a_stage_leaves_existing_runs_resumable(tmp_path):
    # A run made before the stage existed: the new stage is unset in its recipe, and the run
    # resumes, neither refused as a changed config nor asking the engine again.
    path = _recipe(tmp_path, "")
    run_dir = tmp_path / "run"
    Runner(load_recipe(path), run_dir, engine=PairEngine()).run()
    engine = PairEngine()
    again = Runner(load_recipe(path, stages=WITH_STAGE), run_dir, engine=engine).run()
    assert {r.name: r.done_before for r in again.stages} == {"sample": 2}
    assert engine.generate_batches == []
