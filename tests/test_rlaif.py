"""The full RLAIF recipe, CI-sized: pipelines/rlaif-tiny.yaml with fewer prompts, shorter answers
and a few training steps, through the real default model end to end (generate → critique_revise
→ train_sft → sample → judge → train_reward → train_dpo → evaluate → report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cai.engine.hf import HFEngine
from cai.pipeline.__main__ import main
from cai.pipeline.recipe import load_recipe
from cai.resources import resolve

pytestmark = pytest.mark.slow

STAGES = ("generate", "critique_revise", "sample", "judge", "eval_generate", "eval_grade")


def ci_sized(tmp_path: Path) -> Path:
    """rlaif-tiny.yaml shrunk: 2+2 prompts, 16-token answers, 2 steps per trainer."""
    recipe = yaml.safe_load(resolve("pipelines", "rlaif-tiny").read_text())
    for source in recipe["sources"]:
        source["limit"] = 2
    stages = recipe["stages"]
    stages["generate"]["max_tokens"] = 16
    stages["critique_revise"].update(rounds=1, max_tokens=16)
    stages["sample"]["max_tokens"] = 16
    for kind in ("train_sft", "train_reward", "train_dpo"):
        stages[kind].update(max_steps=2, batch_size=2, max_length=128, logging_steps=1)
    stages["train_reward"]["eval_split"] = 0.34
    stages["evaluate"]["max_tokens"] = 16
    for spec in stages["evaluate"]["sets"].values():
        spec["limit"] = 2
    recipe["engine"] = {"backend": "hf", "dtype": "float32"}
    path = tmp_path / "rlaif-ci.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_shipped_rlaif_recipes_are_valid():
    for name in ("rlaif", "rlaif-tiny"):
        stages = load_recipe(resolve("pipelines", name)).stages
        assert [s.name for s, _ in stages.present()] == [
            "generate",
            "critique_revise",
            "train_sft",
            "sample",
            "judge",
            "train_reward",
            "train_dpo",
            "evaluate",
        ], name


def test_rlaif_tiny_end_to_end_writes_every_report_file(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["run", str(ci_sized(tmp_path)), "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err
    for name in ("SFT model", "Reward model", "DPO model", "evaluation:", "report:"):
        assert name in err

    for stage in STAGES:
        lines = (run / "stages" / f"{stage}.jsonl").read_text().splitlines()
        assert lines, stage
    for model in ("sft", "reward", "dpo"):
        trained = json.loads((run / "models" / model / "cai_train.json").read_text())
        assert trained["global_step"] == 2
    dpo = json.loads((run / "models" / "dpo" / "cai_train.json").read_text())
    assert dpo["config"]["model"] == str(run / "models" / "sft")  # DPO starts from the SFT model

    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["base", "sft", "dpo"]
    assert results["sets"] == {"helpful": 2, "red_team": 2, "over_refusal": 2, "sycophancy": 2}
    base_reward = results["metrics"]["base"]["reward"]["mean"]
    for name, metrics in results["metrics"].items():
        assert metrics["errors"] == 0
        assert len(metrics["lengths"]) == 8
        reward = metrics["reward"]  # the reward model's mean score, and its drift against base
        assert isinstance(reward["mean"], float), name
        assert reward["drift"] == (
            None if name == "base" else pytest.approx(reward["mean"] - base_reward)
        )
        for rate in ("harmlessness", "over_refusal", "sycophancy"):
            assert 0 <= metrics[rate]["low"] <= metrics[rate]["value"] <= metrics[rate]["high"]
        if name != "base":
            assert metrics["win_rate"]["n"] == 4

    html = (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    images = sorted(p.name for p in (run / "report").glob("*.png"))
    assert len(images) >= 6, images
    for image in images:
        assert f"report/{image}" in html and f"report/{image}" in md
        assert (run / "report" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resumable at every stage: a second run finds everything done and trains nothing.
    assert main(["run", str(ci_sized(tmp_path)), "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err
    for kind in ("train_sft", "train_reward", "train_dpo"):
        assert f"{kind}: training" not in err
    assert json.loads((run / "eval" / "results.json").read_text())["metrics"] == results["metrics"]
    # No engine loaded on that run, yet the manifest still describes the models it used.
    models = json.loads((run / "manifest.json").read_text())["models"]
    assert models["policy"]["backend"] == "hf" and models["policy"]["dtype"] == "float32"

    # A copied (or moved) run resumes with zero new work: no training, no engine request, no
    # record written (`cp -a runs/x runs/y`, then --run-dir runs/y).
    copy = tmp_path / "moved" / "run"
    shutil.copytree(run, copy)
    stages = {p.name: p.read_bytes() for p in (copy / "stages").iterdir()}
    weights = {m: (copy / "models" / m / "model.safetensors").stat() for m in ("sft", "dpo")}
    requests = []
    for verb in ("generate", "score"):
        real = getattr(HFEngine, verb)

        def spy(self, conversations, *args, _real=real, **kwargs):
            requests.append(len(conversations))
            return _real(self, conversations, *args, **kwargs)

        monkeypatch.setattr(HFEngine, verb, spy)
    assert main(["run", str(ci_sized(tmp_path)), "--run-dir", str(copy)]) == 0
    err = capsys.readouterr().err
    assert requests == []
    for kind in ("train_sft", "train_reward", "train_dpo"):
        assert f"{kind}: training" not in err
    for model, stat in weights.items():
        assert (
            copy / "models" / model / "model.safetensors"
        ).stat().st_mtime_ns == stat.st_mtime_ns
    assert {p.name: p.read_bytes() for p in (copy / "stages").iterdir()} == stages
    assert json.loads((copy / "eval" / "results.json").read_text())["metrics"] == results["metrics"]
