"""A Bradley-Terry reward model on preference pairs: ``cai train reward --config FILE``.

    from cai.rewards.model import RewardModel, score_rewards
    from cai.train.reward import RewardConfig, train_reward
    result = train_reward(RewardConfig(data="runs/x/preferences", output_dir="runs/rm"))
    result.metrics["eval_accuracy"]                 # held-out pairs ranked right
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    score_rewards("runs/rm", [conversation])        # load, score, unload
    with RewardModel("runs/rm") as rm:              # load once, score many times
        rm.score([conversation])

The model is the starting model with a new scalar head (``AutoModelForSequenceClassification``,
``num_labels=1``) read at the last token. The loss is the Bradley-Terry negative log-likelihood
of the labelled order, ``-log σ(r_chosen - r_rejected)`` (Ouyang et al. 2022, arXiv 2203.02155),
or with ``soft_labels`` and the judge's ``p_chosen`` as the target,
``-(p log σ(Δ) + (1 - p) log σ(-Δ))``; ``center_rewards`` adds ``c · mean((r_c + r_r)²)`` to keep
rewards near 0 (TRL's ``center_rewards_coefficient``; Eisenstein et al. 2023, arXiv 2312.09244).
A share ``eval_split`` of the pairs is held out (seeded) unless ``eval_data`` is given; after
training the held-out accuracy (``eval_accuracy``: the share of held-out pairs whose chosen
response gets the higher reward) and mean margin are reported, with a warning below
``min_accuracy`` (0.70 by default). With LoRA the new head trains in full (``modules_to_save``).

Logged every ``logging_steps``: loss, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from cai.data import DataError
from cai.rewards.model import HEAD, load_reward_model
from cai.train import (
    TrainConfig,
    TrainResult,
    add_lora,
    doc,
    train_and_save,
    training_arguments,
)
from cai.train.dpo import PairCollator, PreferenceTrainer, prepare_pairs

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RewardConfig(TrainConfig):
    """``cai train reward`` settings (YAML, see ``cai.config``)."""

    learning_rate: float = doc("peak learning rate (AdamW)", 1e-5)
    eval_split: float = doc(
        "share of the pairs held out for the accuracy check (seeded) when eval_data is unset", 0.1
    )
    soft_labels: bool = doc("use each pair's p_chosen as the Bradley-Terry target", True)
    center_rewards: float = doc("coefficient c of c·mean((r_chosen + r_rejected)²)", 0.0)
    min_accuracy: float = doc("warn when the held-out accuracy is below this", 0.70)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split must be in [0, 1) (got {self.eval_split})")
        if self.eval_split == 0.0 and self.eval_data is None:
            raise ValueError(
                "eval_split 0 leaves no held-out pairs: set eval_data, or eval_split > 0 "
                "(the held-out accuracy is how you know the reward model learned anything)"
            )
        if self.center_rewards < 0:
            raise ValueError(f"center_rewards must be >= 0 (got {self.center_rewards})")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1] (got {self.min_accuracy})")


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``-(p log σ(r_c - r_r) + (1 - p) log σ(r_r - r_c))`` over the batch.

    Shapes: ``chosen``, ``rejected`` ``(B,)`` rewards; ``target`` ``(B,)`` = p_chosen (None: 1).
    """
    delta = chosen - rejected
    if target is None:
        return -F.logsigmoid(delta).mean()
    return -(target * F.logsigmoid(delta) + (1 - target) * F.logsigmoid(-delta)).mean()


def _rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar rewards ``(rows,)`` of a right-padded batch."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def batch_loss(
    model, batch: dict[str, torch.Tensor], config: RewardConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a PairCollator batch and the metrics to log."""
    rewards = _rewards(model, batch)
    chosen, rejected = rewards.chunk(2)
    target = batch["p_chosen"].to(rewards.dtype) if config.soft_labels else None
    loss = bradley_terry_loss(chosen, rejected, target)
    if config.center_rewards:
        loss = loss + config.center_rewards * ((chosen + rejected) ** 2).mean()
    detached = chosen.detach(), rejected.detach()
    return loss, {
        "rewards/chosen": detached[0].mean(),
        "rewards/rejected": detached[1].mean(),
        "rewards/accuracies": (detached[0] > detached[1]).float().mean(),
        "rewards/margins": (detached[0] - detached[1]).mean(),
    }


class RewardTrainer(PreferenceTrainer):
    """The preference Trainer (metric logging, eval step) with :func:`batch_loss` as its loss."""

    def batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch_loss(model, inputs, self.config)


def split_pairs(examples: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded ``share`` of ``examples`` held out (at least one, and at
    least one left to train on)."""
    if len(examples) < 2:
        raise DataError(
            f"{len(examples)} pair(s): the reward model needs >= 2 to hold one out; add pairs "
            "or set eval_data"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = min(max(1, math.ceil(share * len(examples))), len(examples) - 1)
    keep = set(order[held:])
    return (
        [e for i, e in enumerate(examples) if i in keep],
        [e for i, e in enumerate(examples) if i not in keep],
    )


@torch.no_grad()
def pair_rewards(
    model, examples: list[dict], pad_token_id: int, batch_size: int
) -> tuple[list[float], list[float]]:
    """(chosen rewards, rejected rewards) of tokenised pairs, in eval mode."""
    was_training = model.training
    model.eval()
    collate = PairCollator(pad_token_id)
    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            rewards = _rewards(model, {k: v.to(device) for k, v in batch.items()}).float()
            c, r = rewards.chunk(2)
            chosen.extend(c.tolist())
            rejected.extend(r.tolist())
    finally:
        model.train(was_training)
    return chosen, rejected


def held_out_metrics(
    chosen: Sequence[float], rejected: Sequence[float], min_accuracy: float
) -> dict[str, float]:
    """``eval_accuracy``, ``eval_margin``, ``eval_pairs``; warns below ``min_accuracy``."""
    n = len(chosen)
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n
    if accuracy < min_accuracy:
        log.warning(
            "held-out accuracy %.2f < %.2f on %d pairs: the reward model barely separates the "
            "pairs; more data, more steps or a larger model may help",
            accuracy,
            min_accuracy,
            n,
        )
    return {
        "eval_accuracy": accuracy,
        "eval_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
        "eval_pairs": n,
    }


def head_model(config: TrainConfig) -> tuple[Any, Any]:
    """(model, tokenizer) to train a scalar head on: ``config.model`` with a new one-logit head,
    seeded by ``config.seed`` (the head is initialised as the model loads, before the Trainer
    seeds anything), and LoRA adapters with the head trained in full (``modules_to_save``)
    when ``config.lora`` is set. The reward model and the guard classifiers start here."""
    from transformers import set_seed

    set_seed(config.seed)
    model, tokenizer = load_reward_model(config.model, new_head=True)
    model.config.use_cache = False
    if config.lora is not None:
        model = add_lora(
            model,
            config.lora,
            config.gradient_checkpointing,
            config.seed,
            "SEQ_CLS",
            modules_to_save=[HEAD],
        )
    return model, tokenizer


def train_reward(config: RewardConfig) -> TrainResult:
    """Train a reward model on the pairs of ``config.data``; save it, return the result."""
    args = training_arguments(config)
    model, tokenizer = head_model(config)
    examples, stats = prepare_pairs(tokenizer, config.data, "dpo", config.max_length)
    stats.report(config.data, config.max_length)
    if config.eval_data:
        train = examples
        held, held_stats = prepare_pairs(tokenizer, config.eval_data, "dpo", config.max_length)
        held_stats.report(config.eval_data, config.max_length)
    else:
        train, held = split_pairs(examples, config.eval_split, config.seed)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=PairCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        config=config,
    )

    def evaluate(trainer: Trainer) -> dict[str, float]:
        chosen, rejected = pair_rewards(
            trainer.model, held, tokenizer.pad_token_id, config.batch_size
        )
        return held_out_metrics(chosen, rejected, config.min_accuracy)

    return train_and_save(trainer, config, stats, evaluate)


__all__ = [
    "RewardConfig",
    "RewardTrainer",
    "bradley_terry_loss",
    "held_out_metrics",
    "split_pairs",
    "train_reward",
]
