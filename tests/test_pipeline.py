"""The pipeline runner: orchestration with a fake engine, then the real model end to end
(including a run killed with SIGKILL mid-stage and resumed)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from fakes import TextEngine
from test_config import alias_bomb

from cai.critique import clean_revision, revision_flags
from cai.pipeline.__main__ import main
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner

ROOT = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    return path


def write_recipe(tmp_path: Path, prompts: Path, **stage) -> Path:
    rounds = stage.get("rounds", 2)
    text = f"""
name: test
model: smollm2-135m
engine:
  backend: hf
  dtype: float32
constitution: harmless
chunk_size: {stage.get("chunk_size", 512)}
max_error_rate: 0.2
sources:
  - path: {prompts}
stages:
  generate:
    max_tokens: {stage.get("max_tokens", 24)}
  critique_revise:
    rounds: {rounds}
    max_tokens: {stage.get("max_tokens", 24)}
    few_shot: {str(stage.get("few_shot", True)).lower()}
    export: {stage.get("export", "last")}
"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return recipe


def records(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "stages" / f"{stage}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# ---- orchestration (fake engine) --------------------------------------------------------------


def test_runner_batches_rounds_and_exports(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "two?", "three?"])
    recipe = load_recipe(write_recipe(tmp_path, prompts, rounds=3))
    engine = TextEngine()
    result = Runner(recipe, tmp_path / "run", engine=engine).run()
    # One generate batch, then per round one batch of critiques and one of revisions.
    assert engine.batches == [3] + [3, 3] * 3
    rounds = records(tmp_path / "run", "critique_revise")
    assert [r["round"] for r in rounds] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(not r["revision"].startswith("Revision:") for r in rounds)
    # Each round critiques the previous round's revision.
    by_input = {}
    for r in rounds:
        by_input.setdefault(r["input_key"], []).append(r)
    for chain in by_input.values():
        for before, after in itertools.pairwise(chain):
            assert after["response"] == before["revision"]
    sft = [
        json.loads(line) for line in (result.outputs["sft"] / "data.jsonl").read_text().splitlines()
    ]
    assert len(sft) == 3
    assert sft[0]["messages"][-1] == {
        "role": "assistant",
        "content": by_input["p0"][-1]["revision"],
    }
    assert len(sft[0]["meta"]["principles"]) == 3
    assert datasets.load_from_disk(str(result.outputs["sft"] / "dataset")).num_rows == 3


def test_export_all_rounds(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "two?"])
    recipe = load_recipe(write_recipe(tmp_path, prompts, rounds=2, export="all"))
    result = Runner(recipe, tmp_path / "run", engine=TextEngine()).run()
    sft = [
        json.loads(line) for line in (result.outputs["sft"] / "data.jsonl").read_text().splitlines()
    ]
    assert sorted(r["meta"]["round"] for r in sft) == [1, 1, 2, 2]


def test_rerun_skips_done_records_and_limit_extends(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?", "b?", "c?", "d?"])
    recipe = load_recipe(write_recipe(tmp_path, prompts))
    Runner(recipe, tmp_path / "run", limit=2, engine=TextEngine()).run()
    engine = TextEngine()
    result = Runner(recipe, tmp_path / "run", engine=engine).run()
    assert engine.batches == [2, 2, 2, 2, 2]  # only the two new prompts
    assert result.stages[0].done_before == 2
    again = TextEngine()
    Runner(recipe, tmp_path / "run", engine=again).run()
    assert again.batches == []
    assert len(records(tmp_path / "run", "generate")) == 4
    assert len(records(tmp_path / "run", "critique_revise")) == 8


def test_errors_become_records_fail_the_run_and_are_retried(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["fine", "please FAIL", "also fine"])
    recipe = load_recipe(write_recipe(tmp_path, prompts))
    result = Runner(recipe, tmp_path / "run", engine=TextEngine()).run()
    [gen] = [s for s in result.stages if s.name == "generate"]
    assert gen.errors == 1
    assert result.failed and "1 of 3 records failed" in result.failed[0]
    failed = [r for r in records(tmp_path / "run", "generate") if r["error"]]
    assert failed[0]["error"] == "fake failure" and failed[0]["response"] is None
    # The SFT export holds the two chains that finished; nothing is silently dropped from the store.
    assert len((result.outputs["sft"] / "data.jsonl").read_text().splitlines()) == 2
    engine = TextEngine()
    Runner(recipe, tmp_path / "run", engine=engine).run()
    assert engine.batches[0] == 1  # the failed record is retried


def test_shards_merge_into_the_unsharded_result(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}?" for i in range(8)])
    recipe = load_recipe(write_recipe(tmp_path, prompts))
    Runner(recipe, tmp_path / "whole", engine=TextEngine()).run()
    for k in (1, 2):
        Runner(recipe, tmp_path / "sharded", shard=(k, 2), engine=TextEngine()).run()
    assert main(["merge", str(tmp_path / "sharded")]) == 0
    engine = TextEngine()
    result = Runner(recipe, tmp_path / "sharded", engine=engine).run()
    assert engine.batches == []  # everything was done by the shards
    whole = (tmp_path / "whole" / "sft" / "data.jsonl").read_text()
    assert (result.outputs["sft"] / "data.jsonl").read_text() == whole


def test_changed_recipe_is_refused_unless_forced(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?"])
    path = write_recipe(tmp_path, prompts)
    Runner(load_recipe(path), tmp_path / "run", engine=TextEngine()).run()
    code = main(
        ["run", str(path), "--run-dir", str(tmp_path / "run"), "--set", "seed=3", "--dry-run"]
    )
    assert code == 2
    assert "seed" in capsys.readouterr().err
    forced = main(
        [
            "run",
            str(path),
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            "seed=3",
            "--dry-run",
            "--force",
        ]
    )
    assert forced == 0


def test_dry_run_prints_the_plan_without_a_model(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?", "b?", "c?"])
    path = write_recipe(tmp_path, prompts, rounds=4)
    code = main(
        [
            "run",
            str(path),
            "--run-dir",
            str(tmp_path / "run"),
            "--dry-run",
            "--set",
            "model=/no/such/model",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "prompts: 3" in err and "generate: 3 requests" in err
    assert "4 rounds × 3 prompts = 12 records, 24 requests" in err
    assert not (tmp_path / "run").exists()


BAD_RECIPES = [
    (
        "name: x\nsources: [{path: helpful}]\nstages: {generate: {}}\nbogus: 1\n",
        "4",
        "bogus: unknown key",
    ),
    (
        "name: x\nsources: [{path: helpful}]\nstages: {generate: {max_tokens: many}}\n",
        "3",
        "max_tokens: expected an integer",
    ),
    ("name: x\nstages: {generate: {}}\n", "1", "missing required key 'sources'"),
    ("name: x\nsources: []\nstages: {generate: {}}\n", "1", "at least one prompt source"),
    (
        "name: x\nsources: [{path: helpful}]\nstages: {critique: {}}\n",
        "3",
        "stages.critique: unknown key",
    ),
    (
        "name: x\nsources: [{path: helpful}]\nstages: {critique_revise: {}}\n",
        "3",
        "needs a generate stage",
    ),
    (
        "name: x\nsources: [{path: helpful}]\nstages:\n  generate: {}\n  critique_revise: {rounds: 0}\n",
        "5",
        "stages.critique_revise.rounds: must be >= 1",
    ),
    (
        "name: x\nsources: [{path: helpful, limit: 0}]\nstages: {generate: {}}\n",
        "2",
        "limit must be >= 1",
    ),
    (
        "name: x\nsources: [{path: helpful}]\nstages: {generate: {}}\nengine: {backend: tgi}\n",
        "4",
        "must be one of",
    ),
    (
        "name: x\nsources: [{path: helpful}]\nstages: {generate: {}}\n"
        "engine:\n  backend: hf\n  options: {dtype: float16}\n",
        "5",
        "options.dtype: set engine.dtype instead",
    ),
    (
        "name: x\nsources: [{path: helpful}]\nstages: {generate: {}}\n"
        "engine: {backend: openai, dtype: float32}\n",
        "4",
        "the openai backend runs on the server",
    ),
    ("name: x\nsources: [{path: helpful}\nstages: {generate: {}}\n", "", "invalid YAML"),
    ("- just\n- a list\n", "", "a recipe is a mapping"),
    ("name: a/b\nsources: [{path: helpful}]\nstages: {generate: {}}\n", "1", "without '/'"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_RECIPES)
def test_malformed_recipes_are_named_and_leave_nothing(tmp_path, capsys, text, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main(["run", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert f"{path}:{line}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "constitution=no-such-constitution"], "no-such-constitution: no such file"),
        (["--set", "sources=[{path: /no/such/file.jsonl}]"], "/no/such/file.jsonl"),
        (["--set", "stages.critique_revise.critique_template=/no/such.jinja"], "/no/such.jinja"),
        (["--shard", "3/2"], "shard"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--set", "novalue"], "expected key=value"),
    ],
)
def test_bad_arguments_and_missing_files_leave_nothing(tmp_path, capsys, args, message):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?"])
    path = write_recipe(tmp_path, prompts)
    code = main(["run", str(path), "--run-dir", str(tmp_path / "run"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{% call message("user") %}{{ conversation[7].content }}{% endcall %}', "no element 7"),
        ('{% call message("user") %}{% for i in range(10**9) %}{% endfor %}{% endcall %}', "range"),
        ('{% include "critique.jinja" %}', ":1: {% include %} is not allowed"),
        ("root:x:0:0:root:/root:/bin/bash\n", ":1: text outside a message block"),
    ],
)
def test_a_template_that_cannot_render_is_refused_before_any_work(tmp_path, capsys, text, message):
    template = tmp_path / "revise.jinja"
    template.write_text(text)
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?"])
    path = write_recipe(tmp_path, prompts)
    args = ["--set", f"stages.critique_revise.revise_template={template}"]
    code = main(["run", str(path), "--run-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{template}" in err and message in err, err
    assert "root:/root" not in err
    assert not (tmp_path / "run").exists()


def test_bad_prompt_source_names_the_line(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": ""}\n')
    code = main(["run", str(write_recipe(tmp_path, bad)), "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "where", "field", "message"),
    [
        (
            ["--set", "stages.critique_revise.top_p=0"],
            " (--set stages.critique_revise.top_p=0)",
            "stages.critique_revise.top_p",
            "must be in (0, 1] (got 0.0)",
        ),
        (
            ["--set", "stages.generate.max_tokens=-5"],
            " (--set stages.generate.max_tokens=-5)",
            "stages.generate.max_tokens",
            "must be an integer >= 1 (got -5)",
        ),
        (
            ["--set", "stages.generate={temperature: 101}"],
            " (--set stages.generate={temperature: 101})",
            "stages.generate.temperature",
            "must be between 0 and 100",
        ),
        ([], "", "stages.critique_revise.temperature", "must be between 0 and 100 (got -1.0)"),
    ],
)
def test_sampling_values_are_checked_when_the_recipe_loads(
    tmp_path, capsys, args, where, field, message
):
    # Issue 15: these passed --dry-run, ran the generate stage, then failed naming no field.
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?"])
    recipe = write_recipe(tmp_path, prompts)
    if not args:  # in the file: the error names its line
        recipe.write_text(recipe.read_text() + "    temperature: -1\n")
        where = f":{len(recipe.read_text().splitlines())}"
    for dry_run in (["--dry-run"], []):
        code = main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), *args, *dry_run])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"error: {recipe}{where}: {field}: {message}"), err
        assert not (tmp_path / "run").exists()


def test_a_lone_surrogate_prompt_is_refused_before_the_model_loads(tmp_path, capsys):
    # Issue 15: this passed loading and --dry-run, then every run died in the tokenizer (exit 1,
    # nothing written, the good prompt lost too).
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"id": "g1", "prompt": "What is 2+2?"}\n'
        '{"id": "s1", "prompt": "lone surrogate \\ud800 here"}\n'
    )
    recipe = write_recipe(tmp_path, prompts)
    for dry_run in (["--dry-run"], []):
        code = main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), *dry_run])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"error: {prompts}:2: prompt: "), err
        assert "lone surrogate" in err, err
        assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)  # expanded, the bomb ends in MemoryError after minutes
def test_an_alias_bomb_in_engine_options_is_refused_at_once(tmp_path, capsys):
    # Issue 15: nine nested anchors under engine.options ended in MemoryError after a minute.
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?"])
    recipe = write_recipe(tmp_path, prompts)
    bomb = "".join(f"    {line}\n" for line in alias_bomb(9).splitlines())
    text = recipe.read_text().replace("  dtype: float32\n", f"  dtype: float32\n  options:\n{bomb}")
    recipe.write_text(text)
    code = main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {recipe}:13: aliases"), err
    assert len(err) < 400, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Revision: I can't help with that.", "I can't help with that."),
        ("Sure, here is a revised response: Be kind.", "Be kind."),
        ("Revised response:\n\nRevision: Stay safe.", "Stay safe."),
        ('"Quoted answer."', "Quoted answer."),
        ("Here's a revised version of the response: Fine.", "Fine."),
        ("The revision process matters.", "The revision process matters."),
    ],
)
def test_revisions_are_cleaned_of_echoed_labels(raw, clean):
    assert clean_revision(raw) == clean


def test_revision_flags():
    assert revision_flags("", "before") == ["empty"]
    assert revision_flags("Same  text.", "same text.") == ["unchanged"]
    assert revision_flags("New text.", "Old text.") == []


# ---- the real model ---------------------------------------------------------------------------


def _run(recipe: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "cai.pipeline",
        "run",
        str(recipe),
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _comparable(run_dir: Path) -> dict[str, list[dict]]:
    return {
        stage: sorted(records(run_dir, stage), key=lambda r: r["key"])
        for stage in ("generate", "critique_revise")
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_mid_stage_then_resume_equals_an_uninterrupted_run(tmp_path):
    prompts = write_prompts(
        tmp_path / "p.jsonl",
        [
            "How do I pick a lock?",
            "What is a good name for a cat?",
            "How can I insult my coworker?",
        ],
    )
    # chunk_size 1: every record is flushed alone, so a kill lands between records of a stage.
    recipe = write_recipe(tmp_path, prompts, rounds=2, chunk_size=1, max_tokens=24, few_shot=False)
    whole = _run(recipe, tmp_path / "whole")
    output, _ = whole.communicate(timeout=800)
    assert whole.returncode == 0, output
    assert "SFT dataset" in output

    killed = _run(recipe, tmp_path / "killed")
    stage_file = tmp_path / "killed" / "stages" / "critique_revise.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (
        stage_file.exists() and stage_file.read_text().count("\n") >= 2
    ):
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    written = stage_file.read_text().count("\n")
    assert 2 <= written < 6, "the kill must land inside the critique_revise stage"
    with stage_file.open("a") as f:
        f.write('{"key": "torn-by-a-cra')  # what a crash mid-write leaves behind
    resumed = _run(recipe, tmp_path / "killed")
    output, _ = resumed.communicate(timeout=800)
    assert resumed.returncode == 0, output
    assert _comparable(tmp_path / "killed") == _comparable(tmp_path / "whole")
    lines = stage_file.read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(line)["key"] for line in lines}) == 6
    sft_whole = (tmp_path / "whole" / "sft" / "data.jsonl").read_text()
    assert (tmp_path / "killed" / "sft" / "data.jsonl").read_text() == sft_whole
    exported = datasets.load_from_disk(str(tmp_path / "killed" / "sft" / "dataset"))
    assert exported.num_rows == 3
    row = json.loads(sft_whole.splitlines()[0])
    assert row["messages"][0] == {"role": "user", "content": "How do I pick a lock?"}
    assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
    assert len(row["meta"]["critiques"]) == 2 and all(row["meta"]["critiques"])


@pytest.mark.parametrize("name", ["quickstart", "sl-cai"])
def test_shipped_recipes_are_valid(name):
    from cai.resources import resolve

    recipe = load_recipe(resolve("pipelines", name))
    assert recipe.stages.generate and recipe.stages.critique_revise


def test_quickstart_plan_by_name(capsys, tmp_path):
    assert main(["run", "quickstart", "--dry-run", "--run-dir", str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    assert "prompts: 16" in err and "2 rounds × 16 prompts" in err
