"""The training stages of the pipeline (train_sft, train_dpo): recipe checks, a fake-engine run
that trains a tiny random model, skip-on-resume and retrain-on-change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fakes import TextEngine
from test_pipeline import write_prompts

from cai.config import ConfigError
from cai.keys import MARKER, model_key, model_name, record_key, revision
from cai.pipeline.__main__ import main
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.pipeline.sample import sample_sampling
from cai.train import RESULT_FILE

RECIPE = """
name: train-test
model: {model}
engine:
  backend: hf
constitution: harmless
sources:
  - path: {prompts}
stages:
  generate:
    max_tokens: 16
  critique_revise:
    rounds: 1
    max_tokens: 16
  train_sft:
    max_steps: 2
    batch_size: 2
    max_length: 64
    learning_rate: 0.001
"""


def recipe_file(tmp_path: Path, model: str, extra: str = "") -> Path:
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"question {i}?" for i in range(4)])
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, prompts=prompts) + extra)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("    data: other.jsonl\n", r"recipe.yaml:19: stages.train_sft.data: set by the pipeline"),
        ("    max_steps: 0\n", r"recipe.yaml:\d+: stages.train_sft: max_steps must be >= 1"),
        ("    optimiser: sgd\n", r"recipe.yaml:19: stages.train_sft.optimiser: unknown key"),
        ("    warmup_ratio: lots\n", r"recipe.yaml:19: stages.train_sft.warmup_ratio: expected"),
    ],
)
def test_bad_trainer_options_name_the_recipe_line(tmp_path, edit, message):
    text = recipe_file(tmp_path, "smollm2-135m").read_text().replace("    max_steps: 2\n", "")
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("    learning_rate: 0.001\n", "    learning_rate: 0.001\n" + edit))
    path = path.rename(tmp_path / "recipe.yaml")
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_training_stages_need_their_data_stage(tmp_path):
    path = recipe_file(tmp_path, "smollm2-135m", "  train_dpo: {}\n")
    with pytest.raises(ConfigError, match="train_dpo trains on judged pairs: it needs a judge"):
        load_recipe(path)
    text = path.read_text().replace("  critique_revise:\n    rounds: 1\n    max_tokens: 16\n", "")
    path.write_text(text.replace("  train_dpo: {}\n", ""))
    with pytest.raises(ConfigError, match="train_sft trains on the revisions"):
        load_recipe(path)


def test_train_sft_trains_once_and_again_when_its_data_changes(tmp_path, tiny_model, capsys):
    path = recipe_file(tmp_path, tiny_model)
    run_dir = tmp_path / "run"
    recipe = load_recipe(path)
    runner = Runner(recipe, run_dir, engine=TextEngine(), limit=2)
    assert "train_sft: " + tiny_model in runner.plan()
    result = runner.run()
    model = run_dir / "models" / "sft"
    assert result.outputs == {"sft": run_dir / "sft", "train_sft": model}
    assert result.lines[-1] == f"SFT model: {model}"
    trained = json.loads((model / RESULT_FILE).read_text())
    assert trained["global_step"] == 2
    assert trained["config"]["data"] == str(run_dir / "sft")
    assert trained["config"]["model"] == tiny_model
    assert (model / "model.safetensors").is_file()
    first = revision(str(model))
    assert first is not None
    stamp = (model / "model.safetensors").stat().st_mtime_ns

    # Same data and settings: nothing is trained again.
    again = Runner(recipe, run_dir, engine=TextEngine(), limit=2).run()
    [report] = [r for r in again.stages if r.name == "train_sft"]
    assert (report.done_before, report.records) == (1, 0)
    assert (model / "model.safetensors").stat().st_mtime_ns == stamp

    # Two more prompts change the SFT data: the model is trained anew, with a new revision.
    Runner(recipe, run_dir, engine=TextEngine()).run()
    assert revision(str(model)) != first
    assert json.loads((model / MARKER).read_text())["config"]["max_steps"] == 2


def test_cli_summary_names_the_trained_model(tmp_path, tiny_model, capsys, monkeypatch):
    import cai.pipeline.run as run_module

    monkeypatch.setattr(run_module, "create_engine", lambda *a, **k: TextEngine())
    path = recipe_file(tmp_path, tiny_model)
    code = main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--limit", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"SFT model: {tmp_path / 'run' / 'models' / 'sft'}" in err
    assert "train_sft" in err


def test_a_copied_run_resumes_with_no_new_work(tmp_path, tiny_model):
    """`cp -a runs/x runs/y`, then the same recipe with --run-dir runs/y: nothing is trained,
    sampled or written again (keys and the trained model's identity do not name the run's
    folder)."""
    recipe = load_recipe(recipe_file(tmp_path, tiny_model, "  sample: {k: 2, max_tokens: 8}\n"))
    first = Runner(recipe, tmp_path / "run", engine=TextEngine(), limit=2)
    first.run()
    # The key names the model by its folder relative to the run, and its revision.
    sft = str(tmp_path / "run" / "models" / "sft")
    sampled = [json.loads(line) for line in (tmp_path / "run/stages/sample.jsonl").open()]
    assert [r["key"] for r in sampled] == [
        record_key(
            input=r["input_key"],
            stage="sample",
            model="<run>/models/sft",
            sampling=sample_sampling(first).to_dict(),
            model_revision=revision(sft),
        )
        for r in sampled
    ]
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(tmp_path / "run", copy)
    stages = {p.name: p.read_bytes() for p in (copy / "stages").iterdir()}
    assert set(stages) == {"generate.jsonl", "critique_revise.jsonl", "sample.jsonl"}
    weights = (copy / "models" / "sft" / "model.safetensors").stat().st_mtime_ns

    engine = TextEngine()
    result = Runner(recipe, copy, engine=engine, limit=2).run()
    assert engine.batches == []  # no engine request at all
    [train] = [r for r in result.stages if r.name == "train_sft"]
    assert (train.done_before, train.records) == (1, 0)
    assert (copy / "models" / "sft" / "model.safetensors").stat().st_mtime_ns == weights
    assert {p.name: p.read_bytes() for p in (copy / "stages").iterdir()} == stages


def test_keys_name_a_trained_model_relative_to_its_run_and_older_markers_as_they_did(tmp_path):
    folder = tmp_path / "models" / "sft"
    folder.mkdir(parents=True)
    old = {"revision": "r1", "config": {"output_dir": "/old/run/models/sft"}}
    (folder / MARKER).write_text(json.dumps(old))
    # A model trained before markers held model_id: its runs' keys stay as they were.
    assert model_key("model", str(folder)) == {
        "model": "/old/run/models/sft",
        "model_revision": "r1",
    }
    (folder / MARKER).write_text(json.dumps({**old, "model_id": "<run>/models/sft"}))
    assert model_key("model", str(folder)) == {"model": "<run>/models/sft", "model_revision": "r1"}
    assert (
        model_name(str(folder)) == "<run>/models/sft"
        and model_name("smollm2-135m") == "smollm2-135m"
    )
