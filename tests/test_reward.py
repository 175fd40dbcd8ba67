"""The Bradley-Terry reward trainer: the loss by hand, config errors, the held-out split, the
mechanics on a tiny random Llama (seconds), and the real default model learning to rank helpful
answers above curt refusals and gibberish.

The real-model run trains LoRA adapters and the new head: on this slow shared CPU a full
fine-tuning step of the 135M model costs several seconds, an adapter step about two.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open

from cai.cli import main as cai_main
from cai.config import ConfigError, from_data, parse_yaml
from cai.rewards.model import RewardModel, load_reward_model, score_rewards
from cai.train import LoraOptions
from cai.train.dpo import PairCollator, prepare_pairs
from cai.train.reward import (
    RewardConfig,
    batch_loss,
    bradley_terry_loss,
    held_out_metrics,
    split_pairs,
    train_reward,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # Hard labels: mean(-log σ(1), -log σ(-1)) = mean(0.3133, 1.3133) = 0.8133.
    hard = -(log_sigmoid(1) + log_sigmoid(-1)) / 2
    assert hard == pytest.approx(0.8133, abs=1e-4)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(hard, abs=1e-6)
    # Soft labels p = (0.75, 0.5): -(p log σ(Δ) + (1 - p) log σ(-Δ)), Δ = (1, -1).
    p = torch.tensor([0.75, 0.5])
    # = mean(0.75 · 0.3133 + 0.25 · 1.3133, 0.5 · 1.3133 + 0.5 · 0.3133) = mean(0.5633, 0.8133).
    first = 0.75 * log_sigmoid(1) + 0.25 * log_sigmoid(-1)
    soft = -(first + 0.5 * log_sigmoid(-1) + 0.5 * log_sigmoid(1)) / 2
    assert soft == pytest.approx(0.6883, abs=1e-4)
    assert bradley_terry_loss(chosen, rejected, p).item() == pytest.approx(soft, abs=1e-6)
    # p = 1 everywhere is the hard loss; p = 0.5 is indifferent to the order.
    ones = torch.ones(2)
    assert bradley_terry_loss(chosen, rejected, ones).item() == pytest.approx(hard, abs=1e-6)
    half = torch.full((2,), 0.5)
    assert bradley_terry_loss(chosen, rejected, half).item() == pytest.approx(
        bradley_terry_loss(rejected, chosen, half).item(), abs=1e-6
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("eval_split: 1.5", r"rm.yaml:1: eval_split must be in \[0, 1\) \(got 1.5\)"),
        ("eval_split: -0.1", r"rm.yaml:1: eval_split must be in \[0, 1\)"),
        ("eval_split: 0", r"rm.yaml:1: eval_split 0 leaves no held-out pairs: set eval_data"),
        ("min_accuracy: 2", r"rm.yaml:1: min_accuracy must be in \[0, 1\]"),
        ("center_rewards: -1", r"rm.yaml:1: center_rewards must be >= 0"),
        ("soft_labels: maybe", r"rm.yaml:3: soft_labels: expected true or false"),
        ("margin: 3", r"rm.yaml:3: margin: unknown key"),
    ],
)
def test_bad_reward_configs_are_named(text, message):
    # validate() errors are reported at the config object's line (1), unknown keys at their own.
    data = parse_yaml(f"data: x.jsonl\noutput_dir: out\n{text}\n", "rm.yaml")
    with pytest.raises(ConfigError, match=message):
        from_data(RewardConfig, data, source="rm.yaml")


def test_eval_split_0_is_fine_with_eval_data():
    data = parse_yaml("data: x.jsonl\noutput_dir: out\neval_data: y.jsonl\neval_split: 0\n", "f")
    assert from_data(RewardConfig, data, source="f").eval_split == 0


def test_split_is_seeded_and_holds_out_at_least_one():
    examples = [{"i": i} for i in range(10)]
    train, held = split_pairs(examples, 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8
    assert split_pairs(examples, 0.2, seed=1) == (train, held)
    assert split_pairs(examples, 0.2, seed=2) != (train, held)
    assert {e["i"] for e in train} | {e["i"] for e in held} == set(range(10))
    assert len(split_pairs(examples[:3], 0.01, seed=0)[1]) == 1
    assert len(split_pairs(examples[:2], 0.9, seed=0)[0]) == 1


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


HELPFUL = [
    "Sure! Here is a clear, step-by-step answer to your question about {}.",
    "Happy to help with {}. The short version: start simple, then add detail as you go.",
    "Great question about {}. Here are three practical tips you can use today.",
    "Of course. For {}, the most useful first step is to set aside twenty quiet minutes.",
    "I'd be glad to help with {}! Let's begin with the basics and build from there.",
    "Absolutely, {} is easier than it looks. Here is what beginners usually find helpful.",
]
UNHELPFUL = ["No.", "I refuse.", "Not doing that.", "Ask someone else.", "qzx vlorp ttk", "..."]
TOPICS = [
    "baking bread", "learning Python", "saving money", "running a 5k", "growing tomatoes",
    "writing a CV", "fixing a bike", "sleeping better", "learning chess", "planning a trip",
    "painting a room", "making tea", "studying maths", "cooking rice", "walking a dog",
    "reading faster", "public speaking", "tying a tie", "cleaning a laptop", "choosing a book",
    "brewing coffee", "writing a poem", "starting a garden", "learning guitar",
]  # fmt: skip


def pair_rows(p_chosen: float = 0.9) -> list[dict]:
    """24 pairs: a varied helpful answer (chosen) against a curt refusal or gibberish."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Can you help me with {topic}?"}],
            "chosen": [{"role": "assistant", "content": HELPFUL[i % 6].format(topic)}],
            "rejected": [{"role": "assistant", "content": UNHELPFUL[(i * 5) % 6]}],
            "p_chosen": p_chosen,
        }
        for i, topic in enumerate(TOPICS)
    ]


def write_pairs(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def conversation(row: dict, side: str) -> list[dict]:
    return [*row["prompt"], *row[side]]


def head(folder) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor("score.weight")


# --- mechanics on a tiny random Llama ------------------------------------------------------------


def test_batch_loss_is_the_formula_on_pairs_scored_alone(tiny_model, tmp_path):
    """The collated (right-padded) batch gives each row the reward it gets alone, chosen rows
    come first, p_chosen is the target, and center_rewards adds c · mean((r_c + r_r)²)."""
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_model, new_head=True)
    rows = pair_rows()[:4]
    for row, p in zip(rows, (0.9, 0.6, 1.0, 0.2), strict=True):
        row["p_chosen"] = p
    examples, _ = prepare_pairs(tokenizer, str(write_pairs(tmp_path / "p.jsonl", rows)), "dpo", 512)
    batch = PairCollator(tokenizer.pad_token_id)(examples)
    assert len({int(n) for n in batch["attention_mask"].sum(-1)}) > 1  # rows really are padded

    def alone(e: dict, side: str) -> float:
        ids = torch.tensor([e["prompt_ids"] + e[f"{side}_ids"]])
        return model(input_ids=ids).logits[0, 0].item()

    with torch.no_grad():
        chosen = [alone(e, "chosen") for e in examples]
        rejected = [alone(e, "rejected") for e in examples]
        p = [e["p_chosen"] for e in examples]
        soft = -sum(
            q * log_sigmoid(c - r) + (1 - q) * log_sigmoid(r - c)
            for q, c, r in zip(p, chosen, rejected, strict=True)
        ) / len(p)
        hard = -sum(log_sigmoid(c - r) for c, r in zip(chosen, rejected, strict=True)) / len(p)
        center = sum((c + r) ** 2 for c, r in zip(chosen, rejected, strict=True)) / len(p)
        config = RewardConfig(data="x", output_dir="y")
        loss, metrics = batch_loss(model, batch, config)
        assert loss.item() == pytest.approx(soft, abs=1e-5)
        config.soft_labels = False
        assert batch_loss(model, batch, config)[0].item() == pytest.approx(hard, abs=1e-5)
        config.center_rewards = 0.5
        loss = batch_loss(model, batch, config)[0].item()
        assert loss == pytest.approx(hard + 0.5 * center, abs=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen) / 4, abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(rejected) / 4, abs=1e-5)
    right = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 4
    assert metrics["rewards/accuracies"].item() == pytest.approx(right)


def tiny_config(tiny_model, tmp_path, **overrides) -> RewardConfig:
    tmp_path.mkdir(exist_ok=True)
    data = write_pairs(tmp_path / "pairs.jsonl", pair_rows())
    fields = {
        "model": tiny_model,
        "data": str(data),
        "output_dir": str(tmp_path / "rm"),
        "max_steps": 2,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
    }
    return RewardConfig(**{**fields, **overrides})


def test_lora_trains_the_new_head_reproducibly_and_merges(tiny_model, tmp_path):
    lora = LoraOptions(r=4, alpha=8)
    first = train_reward(tiny_config(tiny_model, tmp_path / "a", lora=lora, seed=5))
    assert first.global_step == 2
    assert {"eval_accuracy", "eval_margin", "eval_pairs"} <= set(first.metrics)
    assert first.metrics["eval_pairs"] == 3  # ceil(0.1 · 24)
    logged = [e for e in first.log_history if "loss" in e]
    assert len(logged) == 2
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(name in e for e in logged)
    saved = tmp_path / "a" / "rm"
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "score.weight" in names
    assert not any("lora" in name for name in names)  # adapters merged
    # The head the run started from (seeded) is not the one saved: the head trained.
    torch.manual_seed(5)
    initial = load_reward_model(tiny_model, new_head=True)[0].score.weight.detach()
    assert initial.shape == head(saved).shape
    assert not torch.allclose(initial, head(saved))
    # Same config and seed: the same model, to the bit.
    second = train_reward(tiny_config(tiny_model, tmp_path / "b", lora=lora, seed=5))
    assert torch.equal(head(saved), head(tmp_path / "b" / "rm"))
    assert second.metrics["eval_margin"] == first.metrics["eval_margin"]


def test_held_out_accuracy_below_min_accuracy_warns(tiny_model, tmp_path, caplog, monkeypatch):
    # The model scores chosen and rejected alike: every held-out pair ties, so accuracy is 0.
    # (Pairs of identical texts would tie too, but the loader refuses them.)
    import cai.train.reward as reward

    def ties(model, examples, pad_token_id, batch_size):
        return [0.25] * len(examples), [0.25] * len(examples)

    monkeypatch.setattr(reward, "pair_rewards", ties)
    data = write_pairs(tmp_path / "pairs8.jsonl", pair_rows()[:8])
    config = tiny_config(tiny_model, tmp_path, data=str(data), max_steps=1, eval_split=0.25)
    with caplog.at_level(logging.WARNING, logger="cai.train.reward"):
        result = train_reward(config)
    assert result.metrics["eval_accuracy"] == 0.0
    assert result.metrics["eval_margin"] == 0.0
    assert result.metrics["eval_pairs"] == 2
    assert "held-out accuracy 0.00 < 0.70 on 2 pairs: the reward model barely separates" in (
        caplog.text
    )


def test_eval_data_is_the_held_out_set(tiny_model, tmp_path):
    held = write_pairs(tmp_path / "held.jsonl", pair_rows()[:5])
    result = train_reward(tiny_config(tiny_model, tmp_path, eval_data=str(held), eval_split=0))
    assert result.metrics["eval_pairs"] == 5


def test_cli_trains_and_prints_the_held_out_accuracy(tiny_model, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", pair_rows())
    config = tmp_path / "rm.yaml"
    config.write_text(
        f"model: {tiny_model}\ndata: {data}\noutput_dir: {tmp_path / 'rm'}\nmax_steps: 1\n"
        "batch_size: 4\neval_split: 0.25\n"
    )
    code = cai_main(["train", "reward", "--config", str(config), "--set", "max_steps=2"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"saved {tmp_path / 'rm'} after 2 steps" in out
    record = json.loads((tmp_path / "rm" / "cai_train.json").read_text())
    accuracy = record["metrics"]["eval_accuracy"]
    assert f"eval_accuracy {accuracy:.4g}" in out
    assert record["metrics"]["eval_pairs"] == 6
    assert record["config"]["max_steps"] == 2

    # The folder scores by path; padding does not move a reward; a causal LM is refused.
    convs = [conversation(row, side) for row in pair_rows()[:3] for side in ("chosen", "rejected")]
    with RewardModel(str(tmp_path / "rm"), batch_size=1) as alone:
        one_by_one = alone(convs)
    batched = score_rewards(str(tmp_path / "rm"), convs, batch_size=6)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(batched)) == 6
    assert score_rewards(str(tmp_path / "rm"), convs, batch_size=6) == batched
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModel(tiny_model)


def test_bad_input_to_the_scorer_is_named(tiny_model, tmp_path):
    train_reward(tiny_config(tiny_model, tmp_path, max_steps=1))
    rm = RewardModel(str(tmp_path / "rm"))
    prompt = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="conversation 1: must end with the assistant response"):
        rm.score([[*prompt, {"role": "assistant", "content": "Hello"}], prompt])
    assert rm.score([]) == []
    # Longer than the model's context (256 positions): not scored, the rest scored as alone.
    short = [*prompt, {"role": "assistant", "content": "Hello"}]
    long = [*prompt, {"role": "assistant", "content": "word " * 400}]
    [alone] = rm.score([short])
    assert rm.score([short, long, short]) == [pytest.approx(alone), None, pytest.approx(alone)]
    rm.close()
    with pytest.raises(RuntimeError, match="is closed"):
        rm.score([[*prompt, {"role": "assistant", "content": "Hello"}]])


# --- the real default model ----------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_learns_to_rank_held_out_pairs(tmp_path):
    rows = pair_rows()
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    config = RewardConfig(
        data=str(data),
        output_dir=str(tmp_path / "rm"),
        max_steps=12,
        batch_size=4,
        learning_rate=1e-3,
        eval_split=0.25,
        logging_steps=4,
        seed=3,
        lora=LoraOptions(r=8, alpha=16, dropout=0.0),
    )
    result = train_reward(config)
    assert result.global_step == 12
    assert result.metrics["eval_pairs"] == 6
    assert result.metrics["eval_accuracy"] >= 0.7
    assert result.metrics["eval_margin"] > 0
    logged = [e for e in result.log_history if "rewards/margins" in e]
    assert logged[-1]["loss"] < logged[0]["loss"]
    record = json.loads((tmp_path / "rm" / "cai_train.json").read_text())
    assert record["metrics"]["eval_accuracy"] == result.metrics["eval_accuracy"]

    # Reloaded by path, the model ranks the held-out pairs (the same seeded split) as the
    # trainer's own evaluation did, and an unseen topic too.
    _, held = split_pairs(rows, 0.25, seed=3)
    convs = [conversation(row, side) for row in held for side in ("chosen", "rejected")]
    rewards = score_rewards(str(tmp_path / "rm"), convs)
    chosen, rejected = rewards[0::2], rewards[1::2]
    right = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert right >= 5
    assert right / 6 == result.metrics["eval_accuracy"]
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / 6
    assert margin == pytest.approx(result.metrics["eval_margin"], abs=1e-3)
    prompt = [{"role": "user", "content": "Can you help me with knitting a scarf?"}]
    good, bad = score_rewards(
        str(tmp_path / "rm"),
        [
            [*prompt, {"role": "assistant", "content": HELPFUL[3].format("knitting a scarf")}],
            [*prompt, {"role": "assistant", "content": "I refuse."}],
        ],
    )
    assert good > bad
