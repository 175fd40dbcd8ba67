"""Online RLAIF rounds (cai.pipeline.online): the recipe block, the schedule, the per-round prompts
and measurements with fakes, and the real default model through two rounds end to end, killed
(SIGKILL) in round 2 and resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cai.config import ConfigError
from cai.data import PromptRecord
from cai.pipeline.online import OnlineConfig, round_prompts, schedule
from cai.pipeline.online_eval import warnings
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.pipeline.sample import distinct_responses
from cai.pipeline.stage import PipelineError
from cai.resources import resolve
from cai.store import RunStore

ROOT = Path(__file__).resolve().parent.parent


def ci_recipe(tmp_path: Path, **online) -> Path:
    """online-tiny.yaml shrunk: 2 rounds × 2 fresh prompts, k=2, 16-token answers, 2 DPO steps
    with a learning rate high enough that round 1's policy visibly moves."""
    recipe = yaml.safe_load(resolve("pipelines", "online-tiny").read_text())
    for source in recipe["sources"]:
        source["limit"] = 2
    recipe["online"].update(prompts=2, **online)
    stages = recipe["stages"]
    stages["sample"].update(k=2, temperature=1.0, max_tokens=16)
    stages["train_dpo"].update(
        max_steps=2, batch_size=2, max_length=128, logging_steps=1, learning_rate=2.0e-3
    )
    if online.get("labels") == "reward_model":  # round 1's judged pairs train it
        stages["train_reward"] = {
            "max_steps": 2,
            "batch_size": 2,
            "max_length": 128,
            "logging_steps": 1,
            "eval_split": 0.5,
            "lora": {"r": 8, "alpha": 16},
        }
    stages["evaluate"]["max_tokens"] = 16
    for spec in stages["evaluate"]["sets"].values():
        spec["limit"] = 1
    recipe["engine"] = {"backend": "hf", "dtype": "float32"}
    path = tmp_path / "online-ci.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _prompts(n: int) -> list[PromptRecord]:
    return [
        PromptRecord(
            key=f"p{i}", messages=[{"role": "user", "content": f"q{i}"}], source="t", meta={}
        )
        for i in range(n)
    ]


# ---- the recipe block, without a model ---------------------------------------------------------


def test_shipped_online_recipes_are_valid():
    sl_cai = ["generate", "critique_revise", "train_sft"]
    for name, rounds, before in (("online-tiny", 2, []), ("online", 3, sl_cai)):
        recipe = load_recipe(resolve("pipelines", name))
        stages = [s for s, _ in recipe.stages.present()]
        order = [(s.name, r) for s, r in schedule(stages, recipe.online)]
        assert order == [
            *((n, None) for n in before),
            *((n, r) for r in range(1, rounds + 1) for n in ("sample", "judge", "train_dpo")),
            ("evaluate", None),
        ], name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"online": {"rounds": 0}}, "rounds must be >= 1"),
        ({"online": {"reference": "base"}}, "reference"),
        ({"online": {"labels": "reward_model"}}, "needs a train_reward stage"),
        ({"stages": {"train_dpo": None}}, "add a train_dpo stage"),
        ({"stages": {"sample": {"model": "x"}}}, "stages.sample.model"),
        ({"stages": {"train_dpo": {"ref_model": "x"}}}, "online.reference"),
        ({"online": {"prompts": 2, "reuse_prompts": True}}, "exclude each other"),
    ],
)
def test_bad_online_recipes_are_refused_with_the_field(tmp_path, change, message):
    recipe = yaml.safe_load(ci_recipe(tmp_path).read_text())
    for section, values in change.items():
        for key, value in values.items():
            if value is None:
                del recipe[section][key]
            elif isinstance(value, dict):
                recipe[section][key] = {**recipe[section][key], **value}
            else:
                recipe[section][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(ConfigError, match=message) as error:
        load_recipe(path)
    assert str(path) in str(error.value)


def test_rounds_draw_fresh_prompts_in_a_seeded_order():
    prompts = _prompts(10)
    rounds = round_prompts(prompts, OnlineConfig(rounds=3, prompts=3), seed=0)
    keys = [p.key for r in rounds for p in r]
    assert [len(r) for r in rounds] == [3, 3, 3] and len(set(keys)) == 9
    assert keys != [p.key for p in prompts[:9]]  # mixed, not source order
    assert rounds == round_prompts(list(reversed(prompts)), OnlineConfig(rounds=3, prompts=3))
    assert (
        round_prompts(prompts, OnlineConfig(rounds=2))[0]
        != round_prompts(prompts, OnlineConfig(rounds=2), seed=1)[0]
    )
    assert round_prompts(prompts, OnlineConfig(rounds=2, reuse_prompts=True)) == [prompts] * 2
    with pytest.raises(PipelineError, match="need 12 prompts, and the sources give 10"):
        round_prompts(prompts, OnlineConfig(rounds=3, prompts=4))


def test_the_schedule_repeats_the_round_stages(tmp_path):
    overrides = ["stages.train_reward={max_steps: 2}", "online.labels=reward_model"]
    recipe = load_recipe(resolve("pipelines", "online"), overrides)
    stages = [s for s, _ in recipe.stages.present()]
    order = [(s.name, r) for s, r in schedule(stages, recipe.online)]
    before = [name for name, r in order if r is None and name != "evaluate"]
    assert order[-1] == ("evaluate", None) and before == [
        "generate",
        "critique_revise",
        "train_sft",
    ]
    assert [(n, r) for n, r in order if r == 2] == [("sample", 2), ("judge", 2), ("train_dpo", 2)]
    assert ("train_reward", 1) in order and ("train_reward", 2) not in order


def test_the_dry_run_plans_each_round(tmp_path, capsys):
    from cai.pipeline.__main__ import main

    run = tmp_path / "run"
    assert main(["run", str(ci_recipe(tmp_path)), "--run-dir", str(run), "--dry-run"]) == 0
    plan = capsys.readouterr().err
    assert plan.count("round 1 of 2: 2 prompts") == 1 and plan.count("round 2 of 2: 2 prompts") == 1
    assert plan.index("round 1 of 2") < plan.index("round 2 of 2") < plan.index("evaluate:")
    assert f"sample: 2 requests × k=2 (0 done; model {run / 'rounds/1/dpo'}" in plan
    assert "ref_model=smollm2-135m" in plan.split("round 2 of 2")[1]
    assert "ref_model" not in plan.split("round 2 of 2")[0]
    # The evaluation's pointwise judge scores each of 3 models' 2 compared answers once (6 pairs:
    # each round against the base, round 2 against round 1); the contextual graders add a
    # content-free answer per graded prompt (red_team, over_refusal) in both orders.
    assert "eval_grade: 6 answers × 2 orders = 12 score requests + 4 content-free" in plan
    assert "eval_compare: 6 pairs, pointwise: each answer scored once = 6 score requests" in plan
    assert not run.exists() or not (run / "stages").exists()


def test_an_online_run_refuses_shards_and_too_few_prompts(tmp_path):
    recipe = load_recipe(ci_recipe(tmp_path))
    with pytest.raises(PipelineError, match="drop --shard"):
        Runner(recipe, tmp_path / "a", shard=(1, 2))
    with pytest.raises(PipelineError, match="need 4 prompts, and the sources give 3"):
        Runner(recipe, tmp_path / "b", limit=3)


def test_each_round_trains_from_the_previous_policy_against_the_chosen_reference(tmp_path):
    from cai.pipeline import training

    def runner(reference: str, r: int | None, loss: str = "soft_dpo"):
        recipe = load_recipe(
            ci_recipe(tmp_path),
            [f"online.reference={reference}", f"stages.train_dpo.loss={loss}"],
        )
        return Runner(recipe, tmp_path / "run").context_for(r)

    run = tmp_path / "run"
    assert training.start_model(runner("sft", 1), "train_dpo") == "smollm2-135m"
    assert training.start_model(runner("sft", 2), "train_dpo") == str(run / "rounds/1/dpo")
    assert training.output_dir(runner("sft", 2), "train_dpo") == run / "rounds/2/dpo"
    assert training.data_dir(runner("sft", 2), "train_dpo") == run / "rounds/2/preferences"
    assert training.data_dir(runner("sft", 1), "train_reward") == run / "rounds/1/preferences"
    assert training.output_dir(runner("sft", 1), "train_reward") == run / "models/reward"
    assert training.reference(runner("sft", 1), "train_dpo") == {}  # starts from it already
    assert training.reference(runner("sft", 2), "train_dpo") == {"ref_model": "smollm2-135m"}
    assert training.reference(runner("previous", 2), "train_dpo") == {}  # the starting model
    assert training.reference(runner("sft", 2, loss="simpo"), "train_dpo") == {}  # none used
    # Each round's context is a value of its own: the run's is left as it was.
    base = Runner(load_recipe(ci_recipe(tmp_path)), run)
    second = base.context_for(2)
    assert (second.round, [p.key for p in second.prompts]) == (
        2,
        [p.key for p in base.schedule.prompts[1]],
    )
    assert base.context.round is None and len(base.context.prompts) == 4


def fake_online(tmp_path: Path, monkeypatch, limit: int = 2, **online) -> Path:
    """ci_recipe without the evaluation, for the fake engines of test_pipeline_judge, with a
    fake trainer (its "weights" a hash of its data, deterministic as training on a CPU is)."""
    import hashlib

    from cai.pipeline import training
    from cai.train import RESULT_FILE, DataStats, TrainResult

    def fake_train(config):
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = (Path(config.data) / "data.jsonl").read_bytes()
        (out / "weights").write_text(hashlib.sha256(data).hexdigest())
        (out / RESULT_FILE).write_text("{}")
        return TrainResult(str(out), 1, {}, DataStats(), [])

    monkeypatch.setattr(training, "_trainer", lambda kind: fake_train)
    recipe = yaml.safe_load(ci_recipe(tmp_path, **online).read_text())
    del recipe["stages"]["evaluate"]
    recipe["stages"]["judge"]["few_shot"] = False
    for source in recipe["sources"]:
        source["limit"] = limit
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_round_2_keys_depend_neither_on_float_noise_nor_on_the_run_directory(tmp_path, monkeypatch):
    """One online recipe in two run directories, the second judge's probabilities off by ~1e-7
    (what smaller batches on Ray give): the same round-1 preferences, so the same trained
    model's identity, so the same round-2 keys, seeds and samples (issue 22)."""
    from fakes import PairEngine

    from cai.engine import OptionScores
    from cai.keys import model_key

    class Noisy(PairEngine):
        def score(self, conversations, options, *, prefixes=None, progress=False):
            # ~1e-7, varying with the request (a constant offset would cancel in a pointwise
            # label, which compares two scores)
            return [
                OptionScores(
                    s.options,
                    [s.logprobs[0] + 1e-7 * (1 + len(str(c)) % 5), s.logprobs[1]],
                    s.token_counts,
                )
                for s, c in zip(
                    super().score(conversations, options, prefixes=prefixes),
                    conversations,
                    strict=True,
                )
            ]

    path = fake_online(tmp_path, monkeypatch)
    runs = {"a": PairEngine(), "elsewhere/b": Noisy()}
    for name, engine in runs.items():
        assert not Runner(load_recipe(path), tmp_path / name, engine=engine).run().failed

    a, b = (RunStore(tmp_path / name) for name in runs)
    p_a = {k: r["p_a"] for k, r in a.read_stage("judge").items()}
    p_b = {k: r["p_a"] for k, r in b.read_stage("judge").items()}
    assert p_a.keys() == p_b.keys() and p_a != p_b  # the noise reached the judge records
    for r in (1, 2):
        pairs = f"rounds/{r}/preferences/data.jsonl"
        assert (tmp_path / "a" / pairs).read_bytes() == (
            tmp_path / "elsewhere/b" / pairs
        ).read_bytes()
    dpo = [model_key("model", str(tmp_path / name / "rounds/1/dpo")) for name in runs]
    assert dpo[0] == dpo[1] and "<run>/rounds/1/dpo" in dpo[0].values()
    sampled = [
        sorted((r["key"], r["seed"], r["responses"]) for r in store.read_stage("sample").values())
        for store in (a, b)
    ]
    assert sampled[0] == sampled[1]
    assert {r["round"] for r in a.read_stage("sample").values()} == {1, 2}


def test_the_dry_run_of_a_resumed_online_run_counts_each_rounds_own_pairs(
    tmp_path, monkeypatch, capsys
):
    from fakes import PairEngine

    from cai.pipeline.__main__ import main

    path, run = fake_online(tmp_path, monkeypatch, limit=3), tmp_path / "run"
    assert not Runner(load_recipe(path), run, engine=PairEngine()).run().failed
    for stage in ("sample", "judge"):  # round 2's records deleted
        lines = (run / "stages" / f"{stage}.jsonl").read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["round"] != 2]
        (run / "stages" / f"{stage}.jsonl").write_text("".join(f"{line}\n" for line in kept))
    # k=2: one pair per prompt, two prompts per round.
    assert main(["run", str(path), "--run-dir", str(run), "--dry-run"]) == 0
    round1, round2 = capsys.readouterr().err.split("round 2 of 2")
    assert (
        "judge: 0 pairs, pointwise: each response × 1 principles scored once = 0 score requests (2 pairs done)"
        in round1
    )
    assert "judge: at most 2 pairs, pointwise: each response × 1 principles" in round2
    assert "(0 pairs done)" in round2
    more = ["--force", "--set", "online.rounds=3", "--dry-run"]
    assert main(["run", str(path), "--run-dir", str(run), *more]) == 0
    round3 = capsys.readouterr().err.split("round 3 of 3")[1]
    assert "judge: at most 2 pairs" in round3 and "(0 pairs done)" in round3
    # Labelled by the reward model from round 2 on: the plan says so, and counts its scores.
    path = fake_online(tmp_path, monkeypatch, labels="reward_model")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "rm"), "--dry-run"]) == 0
    round1, round2 = capsys.readouterr().err.split("round 2 of 2")
    assert "model smollm2-135m" in round1 and "reward model" not in round1
    labelled = f"at most 4 reward-model scores (0 pairs done); labelled by the reward model {tmp_path / 'rm' / 'models' / 'reward'}"
    assert labelled in round2 and "principles" not in round2.split("judge:")[1].split("\n")[0]


def test_grpo_curves_show_reward_and_kl(tmp_path):
    from cai.report.plots import plot_training

    history = [{"step": s, "loss": 0.1, "reward": 0.5, "kl": 0.01 * s} for s in (1, 2)]
    assert plot_training("grpo", {"log_history": history}, tmp_path / "g.png") == 2
    assert (
        plot_training("sft", {"log_history": [{"step": 1, "loss": 1.0}]}, tmp_path / "s.png") == 1
    )


def _row(r, win, reward, drift=0.0):
    rate = None if win is None else {"value": win, "low": 0.0, "high": 1.0, "n": 10}
    return {
        "round": r,
        "win_rate": rate,
        "reward": None,
        "reward_margin": reward,
        "length_drift": drift,
    }


def test_warnings_for_reward_hacking_and_length_growth():
    quiet = [_row(0, None, None), _row(1, 0.6, 0.1), _row(2, 0.7, 0.3)]
    assert warnings(quiet, 0.5) == []
    hacking = [_row(0, None, None), _row(1, 0.6, 0.1), _row(2, 0.4, 0.3, drift=0.8)]
    found = warnings(hacking, 0.5)
    assert len(found) == 2
    assert "round 2: the reward rose (0.100 → 0.300)" in found[0] and "0.60 → 0.40" in found[0]
    assert "+80% longer" in found[1]


# ---- the real model: two rounds, SIGKILL in round 2, resume --------------------------------------


def _records(path: Path) -> list[dict]:
    """The complete lines of a stage file being written (a torn last line left out)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _stage_keys(run: Path, stage: str) -> list[str]:
    path = run / "stages" / f"{stage}.jsonl"
    return [json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_two_rounds_end_to_end_killed_in_round_2_and_resumed(tmp_path):
    """Round 1: the judge labels, a reward model trains on its pairs; round 2 samples from round
    1's policy and the reward model labels; DPO's reference stays the starting model."""
    recipe_path = ci_recipe(tmp_path, labels="reward_model")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cai.pipeline", "run", str(recipe_path), "--run-dir", str(run)]
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    samples = run / "stages" / "sample.jsonl"
    deadline = time.monotonic() + 600
    while not any(r.get("round") == 2 for r in _records(samples)):
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "round 2 never sampled"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    round1 = run / "rounds" / "1" / "dpo"
    trained = _files(round1)
    assert "model.safetensors" in trained

    recipe = load_recipe(recipe_path)
    result = Runner(recipe, run).run()
    assert not result.failed
    tallies = {t.name: t for t in result.stages}
    for name in ("sample r1", "judge r1", "sample r2"):
        assert tallies[name].records == 0 and tallies[name].done_before > 0, name
    for name in ("train_dpo r1", "train_reward r1"):
        assert tallies[name].done_before == 1 and tallies[name].records == 0, name
    assert "train_reward r2" not in tallies
    assert tallies["judge r2"].records > 0 and tallies["train_dpo r2"].records == 1
    assert _files(round1) == trained  # round 1 is never redone

    for stage in ("sample", "judge", "eval_generate", "eval_compare"):
        keys = _stage_keys(run, stage)
        assert len(keys) == len(set(keys)), f"{stage}: a record written twice"
    store = RunStore(run)
    sampled = list(store.read_stage("sample").values())
    assert sorted(r["round"] for r in sampled) == [1, 1, 2, 2]
    assert not {r["input_key"] for r in sampled if r["round"] == 1} & {
        r["input_key"] for r in sampled if r["round"] == 2
    }, "each round draws fresh prompts"
    judged = list(store.read_stage("judge").values())
    assert {r["round"] for r in judged} == {1, 2}
    assert (run / "rounds" / "2" / "preferences" / "data.jsonl").is_file()
    marker = json.loads((run / "rounds" / "2" / "dpo" / "cai_pipeline.json").read_text())
    assert marker["config"]["ref_model"] == "smollm2-135m"  # reference: sft (no SFT: the base)
    assert marker["config"]["model"] == str(round1)

    # Round 2's pairs carry the reward model's label: p_a = sigmoid(r(A) - r(B)), and the same
    # model as an RL reward function (cai.rewards.functions) gives the same scores.
    from cai.rewards.functions import RewardModelReward
    from cai.rewards.model import RewardModel

    by_rm = [r for r in judged if r["round"] == 2]
    # Named relative to the run: the same recipe elsewhere writes the same records (issue 22).
    assert by_rm and all(r["judge_model"] == "<run>/models/reward" for r in by_rm)
    assert {r["model"] for r in sampled if r["round"] == 2} == {"<run>/rounds/1/dpo"}
    first = by_rm[0]
    r_a, r_b = first["rewards"]
    assert first["p_a"] == pytest.approx(1 / (1 + math.exp(r_b - r_a)))
    model = RewardModel(str(run / "models" / "reward"))
    try:
        scores = RewardModelReward(model)(
            [first["prompt"]] * 2, [first["response_a"], first["response_b"]]
        )
    finally:
        model.close()
    assert scores == pytest.approx([r_a, r_b], abs=1e-4)
    assert all("rewards" not in r for r in judged if r["round"] == 1)

    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["base", "round1", "round2"]
    assert [row["round"] for row in results["rounds"]] == [0, 1, 2]
    round2 = results["rounds"][2]
    for key in ("win_rate", "lc_win_rate", "win_rate_vs_previous", "length_drift", "kl"):
        assert round2[key] is not None, key
    assert round2["pairs"]["n"] == len([r for r in judged if r["round"] == 2])
    assert results["metrics"]["round2"]["win_rate_vs_previous"]["n"] > 0
    report = (run / "report.html").read_text()
    assert "Online rounds" in report and 'src="report/rounds.png"' in report
    assert (run / "report" / "rounds.png").stat().st_size > 10_000
    assert "round2 dpo" in report  # the round's training curves

    # Round 2 sampled from round 1's policy: the same seeds give round 1's model's texts again,
    # and other texts from the base model.
    from cai.engine import Sampling, create_engine

    stage = recipe.stages.sample
    sampling = Sampling(
        n=stage.k, temperature=stage.temperature, top_p=stage.top_p, max_tokens=stage.max_tokens
    )
    round2 = [r for r in sampled if r["round"] == 2]

    def texts(model: str) -> list[list[str]]:
        with create_engine("hf", model=model, dtype="float32") as engine:
            done = engine.generate(
                [r["prompt"] for r in round2], [replace(sampling, seed=r["seed"]) for r in round2]
            )
        return [distinct_responses([s.text for s in c.samples])[0] for c in done]

    stored = [r["responses"] for r in round2]
    assert texts(str(round1)) == stored
    assert texts("smollm2-135m") != stored
