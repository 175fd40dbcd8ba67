"""GRPO with the constitution judge as the reward, on TRL's ``GRPOTrainer``.

    from cai.train.grpo import GRPOConfig, train_grpo
    result = train_grpo(GRPOConfig(data="prompts.jsonl", output_dir="models/grpo", lora=LoraOptions()))

Data: one prompt per row, ``{"prompt": [messages]}`` or ``{"prompt": "text"}`` (also
``{"messages": [...]}``: the messages up to the last user turn). Each step samples
``num_generations`` completions of each prompt (up to ``max_new_tokens`` tokens, at
``temperature``) and rewards each with its mean win probability against the others of its group
(``cai.rewards.JudgeReward``, group-wise, both orders); GRPO normalises the rewards within the
group and penalises the KL to the reference with coefficient ``beta`` (0 turns the reference off).
The reference is the starting model; with LoRA, the base with adapters off. ``batch_size`` is
completions per device per step, a multiple of ``num_generations`` (whole groups, as the
group-wise reward needs). Logged: ``reward``, ``reward_std``, ``rewards/judge_group/mean``,
``kl`` (when ``beta > 0``), ``entropy``, completion lengths.

The judge runs in the training process (an HF engine on ``judge_model``). TRL 1.16 on a CPU takes
tens of seconds for one step of 2 prompts x 2 completions x 8 tokens with the default model; GRPO
is a GPU method here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from cai.config import doc
from cai.data import DataError, read_rows
from cai.engine.base import check_conversation
from cai.engine.encoding import chat_ids
from cai.layout import DATA_FILE
from cai.train import (
    DataStats,
    TrainConfig,
    TrainResult,
    add_lora,
    data_path,
    load_model,
    train_and_save,
    training_arguments,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class GRPOConfig(TrainConfig):
    """GRPO settings (YAML, see ``cai.config``)."""

    learning_rate: float = doc("peak learning rate (AdamW)", 1e-6)
    batch_size: int = doc("completions per device per step: a multiple of num_generations", 8)
    num_generations: int = doc("completions sampled per prompt (the group)", 4)
    max_new_tokens: int = doc("most tokens of a sampled completion", 64)
    temperature: float = doc("sampling temperature", 1.0)
    beta: float = doc("KL coefficient to the reference (the starting model); 0: none", 0.04)
    judge_model: str = doc("model spec of the judge that rewards the completions", "smollm2-135m")
    constitution: str = doc("the judge's constitution (a shipped name or a path)", "harmless")
    judge_ensemble: int = doc("principles the judge averages per pair", 1)
    centered: bool = doc("rewards in [-1, 1] (2p - 1) instead of [0, 1]", False)

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (got {self.num_generations})")
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of num_generations="
                f"{self.num_generations}: each device scores whole groups"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (got {self.beta})")


def load_prompts(path: str) -> list[dict[str, Any]]:
    """``[{"prompt": [messages]}]`` from a jsonl file, a folder holding ``data.jsonl`` or a
    ``datasets`` folder."""
    source = data_path(path)
    if source.is_dir() and (source / DATA_FILE).is_file():
        source = source / DATA_FILE
    rows = read_rows(source)
    out = []
    for i, (where, row) in enumerate(rows, 1):
        prompt = row.get("prompt")
        if prompt is None and isinstance(row.get("messages"), list):
            messages = row["messages"]
            last_user = max(
                (
                    j
                    for j, m in enumerate(messages)
                    if isinstance(m, dict) and m.get("role") == "user"
                ),
                default=None,
            )
            prompt = messages[: last_user + 1] if last_user is not None else None
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        try:
            check_conversation(prompt, i)
            if prompt[-1]["role"] != "user":
                raise ValueError("the last message is not a user turn")
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise DataError(
                f"{where}: expected a 'prompt' (a string, or messages ending with a user "
                f"turn) or 'messages' ({e})"
            ) from None
        out.append({"prompt": prompt})
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def check_prompt_lengths(prompts: list[dict], tokenizer, max_length: int, data: str) -> None:
    """Refuse a prompt longer than ``max_length`` tokens (chat template and generation prompt
    included): TRL would not cut it, and one 7,000-token prompt grows a CPU run past 6 GB."""
    for number, row in enumerate(prompts, 1):
        tokens = len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True))
        if tokens > max_length:
            raise DataError(
                f"{data}: prompt {number} is {tokens} tokens, over max_length={max_length}; "
                "shorten or remove it, or raise max_length"
            )


def grpo_arguments(config: GRPOConfig):
    """TRL's GRPOConfig: the TrainingArguments every cai trainer runs under, plus GRPO's own."""
    from transformers import TrainingArguments
    from trl import GRPOConfig as TRLGRPOConfig

    base = training_arguments(config)
    defaults = TrainingArguments(output_dir=base.output_dir)
    shared = {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(TrainingArguments)
        if f.init and getattr(base, f.name) != getattr(defaults, f.name)
    }
    return TRLGRPOConfig(
        **shared,
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        beta=config.beta,
    )


def train_grpo(config: GRPOConfig) -> TrainResult:
    """GRPO on the prompts of ``config.data`` with the judge's group-wise reward; save, return."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from cai.judge import Judge
    from cai.rewards import JudgeReward

    args = grpo_arguments(config)
    prompts = load_prompts(config.data)
    model, tokenizer = load_model(config.model)
    check_prompt_lengths(prompts, tokenizer, config.max_length, config.data)
    model.config.use_cache = True  # GRPO generates with the model; load_model turns it off
    if config.lora is not None:
        model = add_lora(model, config.lora, config.gradient_checkpointing, config.seed)
    with Judge(
        config.judge_model,
        constitution=config.constitution,
        backend="hf",
        # An over-long completion is an error result (its reward None), not a failed step.
        engine_options={"dtype": "float32", "overflow": "error"},
        ensemble=config.judge_ensemble,
        seed=config.seed,
    ) as judge:
        reward = JudgeReward(
            judge, against="group", num_generations=config.num_generations, centered=config.centered
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=Dataset.from_list(prompts),
            processing_class=tokenizer,
        )
        return train_and_save(trainer, config, DataStats(examples=len(prompts)))


__all__ = ["GRPOConfig", "check_prompt_lengths", "grpo_arguments", "load_prompts", "train_grpo"]
