"""An input or output guard classifier on labelled examples: ``cai train classifier --config FILE``.

    from cai.train.classifier import ClassifierConfig, train_classifier
    result = train_classifier(ClassifierConfig(data="guard.jsonl", output_dir="runs/guard-in"))
    result.metrics["eval_auc"], result.metrics["eval_threshold"]

    from cai.classify import Guard
    Guard("runs/guard-in").check_input("How do I pick a lock?")

The model is the starting model with a one-logit head (the reward model's, see
``cai.rewards.model.load_reward_model``) read at the last token, trained with binary
cross-entropy on restricted = 1, permitted = 0 (Constitutional Classifiers, arXiv 2501.18837).
``kind: input`` trains on the examples without a ``response`` (the conversation so far);
``kind: output`` on those with one, each cut into prefixes every ``prefix_tokens`` response tokens
(and the whole response: ``cai.classify.guard.output_prefixes``, shared with the evaluation),
every prefix labelled as its example, so that the guard can judge a response as it streams and
stop it early (``Guard.stream``). Examples of the other kind are skipped and counted.

A seeded share ``eval_split`` of each label is held out (whole examples, never some of an
example's prefixes; whole groups where the records carry the export's ``group``, so that a prompt
and its augmentations never straddle the split: ``split_examples``) unless ``eval_data`` is
given. On it: ``eval_auc``, the threshold that keeps the false-positive rate on held-out
permitted examples at most ``max_fpr`` (``eval_threshold``), and ``eval_precision`` /
``eval_recall`` / ``eval_fpr`` there. An output example's held-out score is the highest over its
prefixes: a stream is stopped as soon as one prefix is flagged. The threshold and metrics go to
``cai_classifier.json`` beside the saved model (and ``cai_train.json``, as for every trainer).
With LoRA the new head trains in full.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import Trainer

from cai.classify.data import Example, load_examples
from cai.classify.guard import input_ids, output_prefixes
from cai.classify.metrics import auc, counts, threshold_at_fpr
from cai.data import DataError
from cai.layout import CLASSIFIER_FILE
from cai.train import (
    DataStats,
    TrainConfig,
    TrainResult,
    data_path,
    doc,
    train_and_save,
    training_arguments,
)
from cai.train.dpo import PreferenceTrainer
from cai.train.reward import head_model

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ClassifierConfig(TrainConfig):
    """``cai train classifier`` settings (YAML, see ``cai.config``)."""

    kind: Literal["input", "output"] = doc(
        "input: classify the conversation so far; output: a response prefix", "input"
    )
    learning_rate: float = doc("peak learning rate (AdamW)", 1e-4)
    max_length: int = doc("tokens per example; longer ones are cut at the end and counted", 512)
    prefix_tokens: int = doc("output: train on response prefixes cut every N tokens", 16)
    eval_split: float = doc(
        "share of each label held out (seeded, whole groups) when eval_data is unset", 0.2
    )
    max_fpr: float = doc(
        "the threshold keeps the false-positive rate on held-out permitted examples <= this", 0.05
    )

    def validate(self) -> None:
        super().validate()
        if self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1 (got {self.prefix_tokens})")
        if not 0.0 < self.eval_split < 1.0 and self.eval_data is None:
            raise ValueError(
                f"eval_split must be in (0, 1) (got {self.eval_split}), or set eval_data: the "
                "threshold is chosen on held-out permitted examples"
            )
        if not 0.0 <= self.max_fpr <= 1.0:
            raise ValueError(f"max_fpr must be in [0, 1] (got {self.max_fpr})")


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy ``-(y log σ(z) + (1 - y) log σ(-z))``; shapes ``(B,)``."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def example_rows(
    tokenizer, example: Example, config: ClassifierConfig, stats: DataStats
) -> list[list[int]]:
    """The token rows of one example (one for an input, one per prefix for an output), cut to
    ``max_length`` at the end (counted in ``stats``); none when the prompt alone fills it."""
    prompt = input_ids(tokenizer, example.messages)
    if config.kind == "input":
        if len(prompt) > config.max_length:
            stats.truncated += 1
            stats.truncated_tokens += len(prompt) - config.max_length
        return [prompt[: config.max_length]]
    assert example.response is not None
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    room = config.max_length - len(prompt)
    if room < 1:
        stats.dropped += 1
        return []
    if len(response) > room:
        stats.truncated += 1
        stats.truncated_tokens += len(response) - room
    # prompt + response[:n] is output_ids(tokenizer, messages, response[:n]), what Guard reads.
    return output_prefixes(prompt, response, config.prefix_tokens, config.max_length)


def examples_of_kind(path: str, kind: str) -> list[Example]:
    """The examples of ``path`` of this kind; the others are counted and skipped."""
    every = load_examples(data_path(path))
    mine = [e for e in every if e.kind == kind]
    if len(mine) < len(every):
        log.info("%s: %d %s examples skipped", path, len(every) - len(mine), _other(kind))
    if not mine:
        raise DataError(f"{path}: no {kind} examples (an output example has a response)")
    return mine


def _other(kind: str) -> str:
    return "output" if kind == "input" else "input"


def split_examples(
    examples: list[Example], share: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded ``share`` of each label held out in whole groups, at least one
    group of each label held out and at least one left to train on.

    Examples of one ``group`` (the export's: a class's seed example with its styles, look-alikes
    and augmentations, or one seed-set category) go to the same side, so that the threshold is not chosen on near-copies of training
    prompts; an example without a group is a group of its own. A group counts for the label most
    of its examples have (restricted on a tie). Per label, its groups (in order of first
    appearance) are shuffled with the seed and held out, in that order, until at least
    ``ceil(share * examples of the label)`` of the label's examples are held out, never the last
    group. Without groups this is the per-example split (the same examples for the same seed).
    """
    groups: dict[object, list[Example]] = {}
    for i, e in enumerate(examples):
        key = ("group", e.group) if e.group is not None else ("example", i)
        groups.setdefault(key, []).append(e)
    train: list[Example] = []
    held: list[Example] = []
    for label in (1, 0):
        mine = [g for g in groups.values() if _group_label(g) == label]
        name = "restricted" if label else "permitted"
        if len(mine) < 2:
            what = "example(s)" if all(e.group is None for g in mine for e in g) else "group(s)"
            raise DataError(
                f"{len(mine)} {name} {what}: a classifier needs >= 2 of each label to hold "
                "one out; add examples or set eval_data"
            )
        random.Random(f"{seed}:{label}").shuffle(mine)
        size = sum(e.label == label for g in mine for e in g)
        target = math.ceil(share * size)
        n, taken = 0, 0
        while n < len(mine) - 1 and (n == 0 or taken < target):
            taken += sum(e.label == label for e in mine[n])
            n += 1
        held.extend(e for g in mine[:n] for e in g)
        train.extend(e for g in mine[n:] for e in g)
    return train, held


def _group_label(group: list[Example]) -> int:
    """The label most of a group's examples have; restricted (1) on a tie."""
    restricted = sum(e.label for e in group)
    return 1 if 2 * restricted >= len(group) else 0


def tokenize(
    tokenizer, examples: list[Example], config: ClassifierConfig
) -> tuple[list[dict], DataStats]:
    """Training rows ``{"input_ids", "label"}`` (one per input, one per output prefix)."""
    stats = DataStats(examples=len(examples))
    rows = [
        {"input_ids": row, "label": float(e.label)}
        for e in examples
        for row in example_rows(tokenizer, e, config, stats)
    ]
    if not rows:
        raise DataError(f"every prompt fills max_length={config.max_length}; nothing to train on")
    return rows, stats


@dataclass
class RowCollator:
    """Right-pads rows: ``input_ids``, ``attention_mask`` ``(B, T)``; ``labels`` ``(B,)``."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
        labels = torch.tensor([r["label"] for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


class ClassifierTrainer(PreferenceTrainer):
    """The Trainer with metric logging, BCE as its loss; logs the accuracy at p = 0.5."""

    def batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = _logits(model, inputs)
        labels = inputs["labels"]
        accuracy = ((logits.detach() > 0).float() == labels).float().mean()
        return bce_loss(logits, labels), {"accuracy": accuracy}


@torch.no_grad()
def held_out_scores(
    model, tokenizer, examples: list[Example], config: ClassifierConfig
) -> list[float]:
    """P(restricted) of each example, in eval mode (an output's: its highest prefix's)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = RowCollator(tokenizer.pad_token_id)
    scores = []
    try:
        for example in examples:
            # A prompt that fills max_length alone: scored cut, as Guard.check_responses does.
            rows = example_rows(tokenizer, example, config, DataStats()) or [
                input_ids(tokenizer, example.messages)[: config.max_length]
            ]
            batch = collate([{"input_ids": r, "label": 0.0} for r in rows])
            logits = _logits(model, {k: v.to(device) for k, v in batch.items()})
            scores.append(float(torch.sigmoid(logits.float()).max()))
    finally:
        model.train(was_training)
    return scores


def held_out_metrics(scores: list[float], labels: list[int], max_fpr: float) -> dict[str, float]:
    """``eval_auc``, ``eval_threshold`` (at ``max_fpr``), ``eval_precision``, ``eval_recall``,
    ``eval_fpr`` at that threshold, ``eval_examples``."""
    threshold = threshold_at_fpr(scores, labels, max_fpr)
    c = counts(scores, labels, threshold)
    area = auc(scores, labels)
    return {
        "eval_auc": math.nan if area is None else area,
        "eval_threshold": threshold,
        "eval_precision": c.precision,
        "eval_recall": c.recall,
        "eval_fpr": c.fpr,
        "eval_examples": len(labels),
    }


def train_classifier(config: ClassifierConfig) -> TrainResult:
    """Train a guard classifier on ``config.data``; save it with its threshold; the result."""
    args = training_arguments(config)
    model, tokenizer = head_model(config)
    examples = examples_of_kind(config.data, config.kind)
    if config.eval_data:
        train, held = examples, examples_of_kind(config.eval_data, config.kind)
    else:
        train, held = split_examples(examples, config.eval_split, config.seed)
    rows, stats = tokenize(tokenizer, train, config)
    stats.report(config.data, config.max_length)
    trainer = ClassifierTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=RowCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        config=config,
    )

    def evaluate(trainer: Trainer) -> dict[str, float]:
        scores = held_out_scores(trainer.model, tokenizer, held, config)
        return held_out_metrics(scores, [e.label for e in held], config.max_fpr)

    result = train_and_save(trainer, config, stats, evaluate)
    if trainer.args.should_save:
        info = {
            "kind": config.kind,
            "threshold": result.metrics["eval_threshold"],
            "max_fpr": config.max_fpr,
            "prefix_tokens": config.prefix_tokens,
            "max_length": config.max_length,
            "metrics": {k: v for k, v in result.metrics.items() if k.startswith("eval_")},
            "data": asdict(stats),
        }
        path = Path(config.output_dir) / CLASSIFIER_FILE
        path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return result


__all__ = [
    "ClassifierConfig",
    "ClassifierTrainer",
    "bce_loss",
    "held_out_metrics",
    "split_examples",
    "train_classifier",
]
