"""The RL-CAI pipeline stages (sample → judge → preference export) and the revision-pairs export:
orchestration with a fake engine, then the real model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from fakes import PairEngine
from test_pipeline import records, write_prompts, write_recipe

from cai.pipeline.__main__ import main
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner, summary_table


def pref_recipe(tmp_path: Path, prompts: Path, *, sample=None, judge=None, **top) -> Path:
    data = {
        "name": "pairs",
        "model": "smollm2-135m",
        "engine": {"backend": "hf", "dtype": "float32"},
        "constitution": "harmless",
        "max_error_rate": 0.5,
        "sources": [{"path": str(prompts)}],
        "stages": {
            "sample": {"k": 3, "max_tokens": 16, **(sample or {})},
            "judge": {"few_shot": False, **(judge or {})},
        },
        **top,
    }
    if judge is False:
        del data["stages"]["judge"]
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def exported(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "data.jsonl").read_text().splitlines()]


def report(result, name):
    [r] = [s for s in result.stages if s.name == name]
    return r


# ---- sample and judge (fake engine) -----------------------------------------------------------


@pytest.mark.parametrize(("pairs", "rows"), [("all", 6), ("best_worst", 2)])
def test_sample_judge_export_counts(tmp_path, pairs, rows):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "two?"])
    recipe = load_recipe(pref_recipe(tmp_path, prompts, judge={"pairs": pairs}))
    engine = PairEngine()
    result = Runner(recipe, tmp_path / "run", engine=engine).run()
    # One generate call (n=k per prompt), then one score call: 6 pairs × 2 orders × 1 principle.
    assert engine.generate_batches == [2] and engine.score_batches == [12]
    samples = records(tmp_path / "run", "sample")
    assert [len(s["responses"]) for s in samples] == [3, 3]
    judged = records(tmp_path / "run", "judge")
    assert len(judged) == 6  # every pair is judged in both modes
    assert {tuple(r["pair"]) for r in judged} == {(0, 1), (0, 2), (1, 2)}
    assert all(r["input_key"] in ("p0", "p1") and r["error"] is None for r in judged)
    assert report(result, "judge").requests == 12
    assert report(result, "judge").prompt_tokens == 12 * 10  # what judging read is counted
    prefs = exported(result.outputs["preferences"])
    assert len(prefs) == rows
    for row in prefs:
        # The fake judge prefers the shorter response.
        assert len(row["chosen"][0]["content"]) < len(row["rejected"][0]["content"])
        assert row["p_chosen"] > 0.5
        assert row["prompt"][-1]["role"] == "user"
        assert row["meta"]["consistent"] is True
        assert row["meta"]["p_chosen_first"] > 0.5 and row["meta"]["p_chosen_second"] > 0.5
        assert row["meta"]["sample_model"] == "smollm2-135m"
        assert row["meta"]["judge_model"] == "smollm2-135m"
        assert row["meta"]["principles"] and row["meta"]["input_key"] in ("p0", "p1")
    if pairs == "best_worst":
        # Best (shortest, sample 0) vs worst (longest, sample 2): their direct p is 0.6.
        assert all(row["p_chosen"] == pytest.approx(0.6) for row in prefs)
        assert all(row["meta"]["selection"] == "best_worst" for row in prefs)
        assert all(len(row["meta"]["mean_win_p"]) == 3 for row in prefs)
    ds = datasets.load_from_disk(str(result.outputs["preferences"] / "dataset"))
    assert ds.num_rows == rows and {"prompt", "chosen", "rejected", "p_chosen"} <= set(
        ds.column_names
    )


def test_identical_samples_are_dropped_and_counted(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["fine?", "DUP please", "SAME please"])
    recipe = load_recipe(pref_recipe(tmp_path, prompts, sample={"k": 4}))
    engine = PairEngine()
    result = Runner(recipe, tmp_path / "run", engine=engine).run()
    by_input = {r["input_key"]: r for r in records(tmp_path / "run", "sample")}
    assert len(by_input["p0"]["responses"]) == 4 and by_input["p0"]["duplicates_dropped"] == 0
    assert len(by_input["p1"]["responses"]) == 3 and by_input["p1"]["duplicates_dropped"] == 1
    same = by_input["p2"]
    assert same["responses"] == ["the same answer"] and same["duplicates_dropped"] == 3
    assert same["error"] is None and "1 distinct" in same["skipped"]
    sample = report(result, "sample")
    assert (sample.records, sample.errors, sample.skipped) == (3, 0, 1)
    assert "skipped" in summary_table(result, 1.0)
    # Pairs: C(4,2) + C(3,2); the skipped prompt has none.
    assert len(records(tmp_path / "run", "judge")) == 6 + 3
    assert not result.failed
    # A skipped prompt is done: a re-run does not sample it again (its seed would repeat it).
    again = PairEngine()
    Runner(recipe, tmp_path / "run", engine=again).run()
    assert again.generate_batches == [] and again.score_batches == []


def test_margin_filter_and_ties_stay_out_of_the_export(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "TIE please"])
    recipe = load_recipe(pref_recipe(tmp_path, prompts, judge={"min_margin": 0.08}))
    result = Runner(recipe, tmp_path / "run", engine=PairEngine()).run()
    judged = records(tmp_path / "run", "judge")
    ties = [r for r in judged if r["input_key"] == "p1"]
    assert len(ties) == 3 and all(r["winner"] == "tie" and r["p_a"] == 0.5 for r in ties)
    margins = sorted(round(r["margin"], 6) for r in judged if r["input_key"] == "p0")
    assert margins == [0.05, 0.05, 0.1]
    # Kept in the store, left out of the export: the ties and the two pairs below min_margin.
    [row] = exported(result.outputs["preferences"])
    assert row["p_chosen"] == pytest.approx(0.6) and row["meta"]["input_key"] == "p0"
    # Without the margin filter only the ties are left out.
    prompts2 = write_prompts(tmp_path / "p2.jsonl", ["one?", "TIE please"])
    (tmp_path / "second").mkdir()
    recipe = load_recipe(pref_recipe(tmp_path / "second", prompts2))
    result = Runner(recipe, tmp_path / "run2", engine=PairEngine()).run()
    assert len(exported(result.outputs["preferences"])) == 3


def test_resume_sends_no_engine_work(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?", "b?", "c?", "d?"])
    recipe = load_recipe(pref_recipe(tmp_path, prompts, judge={"ensemble": 2}, chunk_size=2))
    first = PairEngine()
    Runner(recipe, tmp_path / "run", limit=2, engine=first).run()
    assert first.generate_batches == [2] and first.score_batches == [8, 8, 8]
    second = PairEngine()
    result = Runner(recipe, tmp_path / "run", engine=second).run()
    # Only the two new prompts: one chunk of samples, then 6 pairs in chunks of 2.
    assert second.generate_batches == [2] and second.score_batches == [8, 8, 8]
    assert report(result, "sample").done_before == 2 and report(result, "judge").done_before == 6
    third = PairEngine()
    result = Runner(recipe, tmp_path / "run", engine=third).run()
    assert third.generate_batches == [] and third.score_batches == []
    assert len(records(tmp_path / "run", "judge")) == 12
    assert len(exported(result.outputs["preferences"])) == 12
    # Every judged pair carries its ensemble's principles, drawn from the pair's key.
    assert all(len(r["principles"]) == 2 for r in records(tmp_path / "run", "judge"))


def test_failed_requests_are_error_records_and_retried(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["fine?", "please FAIL", "BADJUDGE this"])
    recipe = load_recipe(pref_recipe(tmp_path, prompts, max_error_rate=0.2))
    result = Runner(recipe, tmp_path / "run", engine=PairEngine()).run()
    failed = [r for r in records(tmp_path / "run", "sample") if r["error"]]
    assert len(failed) == 1 and failed[0]["error"] == "fake failure"
    assert failed[0]["input_key"] == "p1" and failed[0]["responses"] == []
    judged = records(tmp_path / "run", "judge")
    bad = [r for r in judged if r["error"]]
    assert len(bad) == 3 and all(r["input_key"] == "p2" for r in bad)
    assert "fake score failure" in bad[0]["error"] and bad[0]["p_a"] is None
    assert report(result, "judge").errors == 3
    assert any("judge: 3 of 6 records failed" in f for f in result.failed)
    # The export holds the good prompt's pairs; the failures are retried on the next run.
    assert {r["meta"]["input_key"] for r in exported(result.outputs["preferences"])} == {"p0"}
    engine = PairEngine()
    Runner(recipe, tmp_path / "run", engine=engine).run()
    assert engine.generate_batches == [1] and engine.score_batches == [6]


def test_malformed_pairs_become_error_records(tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?"])
    recipe = load_recipe(pref_recipe(tmp_path, prompts))

    def broken(self, pairs, *, progress=False):
        raise ValueError("pair 0: response_a is empty")

    monkeypatch.setattr("cai.judge.Judge.label", broken)
    result = Runner(recipe, tmp_path / "run", engine=PairEngine()).run()
    judged = records(tmp_path / "run", "judge")
    assert len(judged) == 3 and all("response_a is empty" in r["error"] for r in judged)
    assert "preferences" not in result.outputs and result.failed


def test_judge_records_have_the_documented_fields(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?"])
    recipe = load_recipe(pref_recipe(tmp_path, prompts, sample={"k": 2}))
    Runner(recipe, tmp_path / "run", engine=PairEngine()).run()
    [record] = records(tmp_path / "run", "judge")
    assert {
        "key",
        "input_key",
        "sample_key",
        "pair",
        "prompt",
        "response_a",
        "response_b",
        "winner",
        "p_a",
        "p_a_first",
        "p_a_second",
        "consistent",
        "margin",
        "principles",
        "model",
        "judge_model",
        "error",
    } <= set(record)
    [sample] = records(tmp_path / "run", "sample")
    assert record["sample_key"] == sample["key"]
    assert [record["response_a"], record["response_b"]] == sample["responses"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(manifest["models"]) == {"sampler", "judge"}


def test_a_changed_judge_setting_makes_new_records(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?"])
    path = pref_recipe(tmp_path, prompts)
    Runner(load_recipe(path), tmp_path / "run", engine=PairEngine()).run()
    changed = load_recipe(path, ["stages.judge.ensemble=2"])
    engine = PairEngine()
    Runner(changed, tmp_path / "run", engine=engine, force=True).run()
    assert engine.generate_batches == [] and engine.score_batches == [3 * 2 * 2]


def test_shard_skips_the_preference_export(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}?" for i in range(6)])
    recipe = load_recipe(pref_recipe(tmp_path, prompts))
    for k in (1, 2):
        result = Runner(recipe, tmp_path / "run", shard=(k, 2), engine=PairEngine()).run()
        assert "preferences" not in result.outputs
    assert main(["merge", str(tmp_path / "run")]) == 0
    engine = PairEngine()
    result = Runner(recipe, tmp_path / "run", engine=engine).run()
    assert engine.generate_batches == [] and engine.score_batches == []
    assert len(exported(result.outputs["preferences"])) == 18


# ---- revision pairs ------------------------------------------------------------------------------


def test_revision_pairs_export(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "STUCK please", "two?"])
    path = write_recipe(tmp_path, prompts, rounds=2)
    recipe = load_recipe(path, ["stages.critique_revise.export_pairs=true"])
    result = Runner(recipe, tmp_path / "run", engine=PairEngine()).run()
    assert result.outputs["revision_pairs"] == tmp_path / "run" / "revision_pairs"
    rows = exported(result.outputs["revision_pairs"])
    chains = {}
    for r in records(tmp_path / "run", "critique_revise"):
        chains.setdefault(r["input_key"], []).append(r)
    # The STUCK prompt's revision repeats its response: left out.
    assert [r["meta"]["input_key"] for r in rows] == ["p0", "p2"]
    for row in rows:
        chain = chains[row["meta"]["input_key"]]
        assert row["chosen"] == [{"role": "assistant", "content": chain[-1]["revision"]}]
        assert row["rejected"] == [{"role": "assistant", "content": chain[0]["response"]}]
        assert row["p_chosen"] == 1.0 and row["meta"]["source"] == "revision"
        assert len(row["meta"]["principles"]) == 2
    assert datasets.load_from_disk(str(result.outputs["revision_pairs"] / "dataset")).num_rows == 2
    # Off by default.
    plain = Runner(load_recipe(path), tmp_path / "plain", engine=PairEngine()).run()
    assert "revision_pairs" not in plain.outputs
    assert not (tmp_path / "plain" / "revision_pairs").exists()


def test_generate_and_sample_stages_in_one_recipe(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["one?", "two?"])
    data = yaml.safe_load(write_recipe(tmp_path, prompts, rounds=1).read_text())
    data["stages"]["sample"] = {"k": 2, "max_tokens": 8}
    data["stages"]["judge"] = {"few_shot": False}
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(data))
    result = Runner(load_recipe(path), tmp_path / "run", engine=PairEngine()).run()
    assert [s.name for s in result.stages] == ["generate", "critique_revise", "sample", "judge"]
    run = tmp_path / "run"
    assert (result.outputs["sft"], result.outputs["preferences"]) == (
        run / "sft",
        run / "preferences",
    )
    assert len(exported(result.outputs["preferences"])) == 2


# ---- plan and recipe errors ----------------------------------------------------------------------


def test_dry_run_plan_numbers(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?", "b?", "c?"])
    path = pref_recipe(tmp_path, prompts, judge={"ensemble": 2})
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "sample: 3 requests × k=3 (0 done" in err
    assert "judge: at most 9 pairs × 2 orders × 2 principles = at most 36 score requests" in err
    assert "generate" not in err
    assert "export: all pairs, min_margin 0.0" in err
    assert not run_dir.exists()
    Runner(load_recipe(path), run_dir, limit=1, engine=PairEngine()).run()
    assert main(["run", str(path), "--run-dir", str(run_dir), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "sample: 2 requests × k=3 (1 done" in err
    assert "judge: at most 6 pairs × 2 orders × 2 principles = at most 24 score requests" in err
    assert "(3 pairs done)" in err


BAD_STAGES = [
    ("  sample: {k: 1}\n", "4", "k must be >= 2"),
    ("  sample: {temperature: 0}\n", "4", "temperature must be > 0"),
    ("  sample: {top_p: 0}\n", "4", "stages.sample.top_p: must be in (0, 1]"),
    ("  sample: {k: two}\n", "4", "k: expected an integer"),
    ("  judge: {}\n", "4", "judge needs a sample stage"),
    ("  sample: {}\n  judge: {pairs: some}\n", "5", "must be one of 'all', 'best_worst'"),
    ("  sample: {}\n  judge: {min_margin: 0.7}\n", "5", "min_margin must be in [0, 0.5)"),
    ("  sample: {}\n  judge: {clamp: [0.3, 0.6]}\n", "5", "symmetric about 0.5"),
    ("  sample: {}\n  judge: {ensembel: 2}\n", "5", "ensembel: unknown key"),
]


@pytest.mark.parametrize(("stages", "line", "message"), BAD_STAGES)
def test_malformed_stage_config_names_file_and_line(tmp_path, capsys, stages, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsources: [{path: helpful}]\nstages:\n" + stages)
    code = main(["run", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert f"{path}:{line}" in err
    assert not (tmp_path / "run").exists()


def test_a_recipe_needs_generate_or_sample(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsources: [{path: helpful}]\nstages: {}\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "at least one of the stages that make records: generate, sample" in err


def test_ensemble_larger_than_the_constitution_is_refused(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?"])
    path = pref_recipe(tmp_path, prompts, judge={"ensemble": 99})
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 2
    assert "ensemble=99" in capsys.readouterr().err


def test_shipped_rlaif_recipe_plan(capsys, tmp_path):
    assert main(["run", "rlaif-pairs", "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "prompts: 16" in err and "sample: 16 requests × k=3" in err
    # pointwise: 16 prompts × 3 responses, each scored once
    assert "48 pairs, pointwise: each response × 1 principles scored once = at most 48" in err


# ---- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_model_preference_export(tmp_path, hf_engine):
    prompts = write_prompts(
        tmp_path / "p.jsonl", ["How do I pick my neighbour's lock?", "Name a fruit."]
    )
    path = pref_recipe(
        tmp_path, prompts, sample={"k": 2, "max_tokens": 16, "temperature": 1.0}, max_error_rate=0
    )
    result = Runner(load_recipe(path), tmp_path / "run", engine=hf_engine).run()
    assert not result.failed, result.failed
    samples = records(tmp_path / "run", "sample")
    assert len(samples) == 2 and all(len(s["responses"]) == 2 for s in samples)
    judged = records(tmp_path / "run", "judge")
    assert len(judged) == 2 and all(0 <= r["p_a"] <= 1 for r in judged)
    ds = datasets.load_from_disk(str(result.outputs["preferences"] / "dataset"))
    assert ds.num_rows >= 1
    for row in ds:
        assert row["prompt"] and row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert [m["role"] for m in row["rejected"]] == ["assistant"]
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert row["p_chosen"] > 0.5
