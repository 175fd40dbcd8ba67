"""The Bradley-Terry reward trainer: the loss by hand, config errors, the held-out split, and the
real default model learning to rank polite answers above curt refusals."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from cai.cli import main as cai_main
from cai.config import ConfigError, from_data, parse_yaml
from cai.train.reward import (
    RewardConfig,
    RewardModel,
    bradley_terry_loss,
    held_out_metrics,
    split_pairs,
    train_reward,
)


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # Hard labels: mean(-log σ(1), -log σ(-1)) = mean(0.3133, 1.3133).
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    # Soft labels p = (0.75, 0.5): -(p log σ(Δ) + (1 - p) log σ(-Δ)).
    p = torch.tensor([0.75, 0.5])
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731 - log σ(x)
    soft = -((0.75 * ls(1) + 0.25 * ls(-1)) + (0.5 * ls(-1) + 0.5 * ls(1))) / 2
    assert bradley_terry_loss(chosen, rejected, p).item() == pytest.approx(soft, abs=1e-6)
    # p = 1 everywhere is the hard loss.
    ones = torch.ones(2)
    assert bradley_terry_loss(chosen, rejected, ones).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("eval_split: 1.5", r"rm.yaml:1: eval_split must be in \[0, 1\)"),
        ("eval_split: 0", "eval_split 0 leaves no held-out pairs"),
        ("min_accuracy: 2", r"min_accuracy must be in \[0, 1\]"),
        ("center_rewards: -1", "center_rewards must be >= 0"),
        ("margin: 3", "margin: unknown key"),
    ],
)
def test_bad_reward_configs_are_named(text, message):
    data = parse_yaml(f"data: x.jsonl\noutput_dir: out\n{text}\n", "rm.yaml")
    with pytest.raises(ConfigError, match=message):
        from_data(RewardConfig, data, source="rm.yaml")


def test_split_is_seeded_and_holds_out_at_least_one():
    examples = [{"i": i} for i in range(10)]
    train, held = split_pairs(examples, 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8
    assert split_pairs(examples, 0.2, seed=1) == (train, held)
    assert {e["i"] for e in train} | {e["i"] for e in held} == set(range(10))
    assert len(split_pairs(examples[:3], 0.01, seed=0)[1]) == 1


def test_low_held_out_accuracy_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="cai.train.reward"):
        metrics = held_out_metrics([1.0, 0.0, 2.0], [0.0, 1.0, 3.0], min_accuracy=0.7)
    assert metrics == {
        "eval_accuracy": pytest.approx(1 / 3),
        "eval_margin": pytest.approx(-1 / 3),
        "eval_pairs": 3,
    }
    assert "held-out accuracy 0.33 < 0.70" in caplog.text
    caplog.clear()
    held_out_metrics([1.0], [0.0], min_accuracy=0.7)
    assert not caplog.text


POLITE = [
    "Sure! Here is a clear, step-by-step answer to your question about {}.",
    "Happy to help with {}. The short version: start simple, then add detail.",
    "Great question about {}. Here are three practical tips you can use today.",
]
CURT = ["No.", "I refuse.", "Not doing that.", "Ask someone else."]
TOPICS = [
    "baking bread", "learning Python", "saving money", "running a 5k", "growing tomatoes",
    "writing a CV", "fixing a bike", "sleeping better", "learning chess", "planning a trip",
    "painting a room", "making tea", "studying maths", "cooking rice", "walking a dog",
    "reading faster", "public speaking", "tying a tie", "cleaning a laptop", "choosing a book",
    "brewing coffee", "writing a poem", "starting a garden", "learning guitar",
]  # fmt: skip


def _pairs(path):
    with open(path, "w") as f:
        for i, topic in enumerate(TOPICS):
            row = {
                "prompt": [{"role": "user", "content": f"Can you help me with {topic}?"}],
                "chosen": [{"role": "assistant", "content": POLITE[i % 3].format(topic)}],
                "rejected": [{"role": "assistant", "content": CURT[i % 4]}],
                "p_chosen": 0.9,
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_real_model_learns_to_rank_and_reloads(tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl")
    config = tmp_path / "rm.yaml"
    config.write_text(
        f"data: {data}\noutput_dir: {tmp_path / 'rm'}\nmax_steps: 12\nbatch_size: 4\n"
        "learning_rate: 5.0e-5\neval_split: 0.25\nlogging_steps: 2\nseed: 3\n"
    )
    assert cai_main(["train", "reward", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"saved {tmp_path / 'rm'} after 12 steps" in out
    assert "eval_accuracy" in out
    record = json.loads((tmp_path / "rm" / "cai_train.json").read_text())
    assert record["metrics"]["eval_pairs"] == 6
    assert record["metrics"]["eval_accuracy"] >= 0.8
    logged = [e for e in record["log_history"] if "rewards/accuracies" in e]
    assert len(logged) == 7  # the first step, then every 2nd

    # The saved folder reloads by path and ranks unseen pairs the same way.
    with RewardModel(str(tmp_path / "rm")) as rm:
        prompt = [{"role": "user", "content": "Can you help me with knitting a scarf?"}]
        good, bad = rm.score(
            [
                [*prompt, {"role": "assistant", "content": POLITE[0].format("knitting a scarf")}],
                [*prompt, {"role": "assistant", "content": "I refuse."}],
            ]
        )
        assert good > bad
        with pytest.raises(ValueError, match="must end with the assistant response"):
            rm.score([prompt])


@pytest.mark.slow
def test_lora_reward_model_trains_the_head(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl")
    config = RewardConfig(
        data=str(data),
        output_dir=str(tmp_path / "rm"),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-3,
    )
    from cai.train import LoraOptions

    config.lora = LoraOptions(r=4, alpha=8)
    result = train_reward(config)
    assert result.global_step == 2
    assert "eval_accuracy" in result.metrics
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rm" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "score.weight" in names
    assert not any("lora" in n for n in names)  # adapters merged
