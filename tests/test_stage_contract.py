"""The stage contract: a stage declared in one place (here, this test file) runs in a recipe,
plans, resumes and is validated, without a line changed anywhere else. README.md, "Writing a
stage", shows the same stage."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from test_pipeline import FakeEngine, write_prompts

from cai.config import ConfigError, doc
from cai.keys import record_key
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.pipeline.stage import Stage, stage_records
from cai.pipeline.stages import STAGES

# ---- the stage (what a new module in cai/pipeline/ would hold) ----------------------------------


@dataclass
class SummarizeStage:
    max_tokens: int = doc("most tokens of a summary", 32)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")


def summary_key(runner, prompt_key: str, response: dict) -> str:
    options = runner.recipe.stages.summarize
    return record_key(
        input=prompt_key, stage="summarize", response=response["key"], max_tokens=options.max_tokens
    )


def run(runner, tally) -> None:
    from cai.engine import Sampling

    options = runner.recipe.stages.summarize
    responses = runner.outputs["generate"]  # prompt key → generate record
    items = [(prompt_key, response) for prompt_key, response in responses.items()]

    def call(batch, progress):
        chats = [
            [{"role": "user", "content": f"Summarize in one line: {r['response']}"}]
            for _, r in batch
        ]
        engine = runner.engine_for(runner.recipe.model)
        done = engine.generate(chats, Sampling(max_tokens=options.max_tokens), progress=progress)
        return [
            {
                "key": summary_key(runner, prompt_key, response),
                "input_key": prompt_key,
                "summary": c.samples[0].text if c.ok else None,
                "error": c.error,
            }
            for (prompt_key, response), c in zip(batch, done, strict=True)
        ]

    runner.outputs["summarize"] = stage_records(
        runner,
        "summarize",
        items,
        key=lambda item: summary_key(runner, *item),
        call=call,
        tally=tally,
        label="summarize",
    )


def plan(runner) -> list[str]:
    return [f"  summarize: at most {len(runner.prompts)} requests"]


STAGE = Stage(
    name="summarize",
    doc="a one-line summary of each generated response",
    options=SummarizeStage,
    run=run,
    plan=plan,
    needs=("generate",),
    models=lambda runner: {"policy": runner.recipe.model},
)

# ---- the tests ----------------------------------------------------------------------------------

RECIPE = """\
name: summaries
engine: {{backend: hf}}
sources:
  - path: {prompts}
stages:
  generate: {{max_tokens: 8}}
{stage}
"""


def _recipe(tmp_path, stage: str):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "two?"])
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(prompts=prompts, stage=stage))
    return path


def test_a_stage_of_its_own_plans_runs_and_resumes(tmp_path):
    path = _recipe(tmp_path, "  summarize: {max_tokens: 16}")
    recipe = load_recipe(path, stages=[*STAGES, STAGE])
    run_dir = tmp_path / "run"
    runner = Runner(recipe, run_dir, engine=FakeEngine())
    assert "summarize: at most 2 requests" in runner.plan()
    result = runner.run()
    by_name = {r.name: r for r in result.stages}
    assert [r.name for r in result.stages] == ["generate", "summarize"]
    assert by_name["summarize"].records == 2 and not result.failed
    assert (run_dir / "stages" / "summarize.jsonl").read_text().count("\n") == 2

    again = Runner(load_recipe(path, stages=[*STAGES, STAGE]), run_dir, engine=FakeEngine()).run()
    resumed = {r.name: r for r in again.stages}["summarize"]
    assert (resumed.records, resumed.done_before) == (0, 2)


def test_its_options_and_needs_are_checked_when_the_recipe_loads(tmp_path):
    path = _recipe(tmp_path, "  summarize: {max_tokens: 0}")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: .*max_tokens must be >= 1"):
        load_recipe(path, stages=[*STAGES, STAGE])
    path.write_text(path.read_text().replace("  generate: {max_tokens: 8}\n", ""))
    path.write_text(path.read_text().replace("max_tokens: 0", "max_tokens: 4"))
    with pytest.raises(ConfigError, match="summarize needs a generate stage before it"):
        load_recipe(path, stages=[*STAGES, STAGE])
    # Without the stage in the list, the recipe key is unknown, as any misspelt stage.
    with pytest.raises(ConfigError, match="summarize"):
        load_recipe(_recipe(tmp_path, "  summarize: {}"))


def test_adding_a_stage_leaves_existing_runs_resumable(tmp_path):
    # A run made before the stage existed: the new stage is unset in its recipe, and the run
    # resumes, neither refused as a changed config nor asking the engine again.
    path = _recipe(tmp_path, "")
    run_dir = tmp_path / "run"
    Runner(load_recipe(path), run_dir, engine=FakeEngine()).run()
    engine = FakeEngine()
    again = Runner(load_recipe(path, stages=[*STAGES, STAGE]), run_dir, engine=engine).run()
    assert {r.name: r.done_before for r in again.stages} == {"generate": 2}
    assert engine.batches == []
