"""Supervised fine-tuning on conversations: only the assistant turns train.

    cai train sft --config sft.yaml

    from cai.train.sft import SFTConfig, train_sft
    result = train_sft(SFTConfig(data="runs/x/sft", output_dir="models/sft"))

Data: SFT records ``{"messages": [...], "meta": {...}}`` (the format of
``cai.export.export_dataset`` and TRL's conversational format) in a .jsonl file, a ``datasets``
folder or an export folder. Each conversation is rendered with the model's own chat template.
The loss covers the assistant turns (their text and end-of-turn tokens); every other token
(system, user, template markup, padding) has label -100. An assistant turn starts where the
rendered conversation so far, with the generation prompt, stops being a prefix of the whole.

Conversations longer than ``max_length`` are cut at the end; the result counts them and the
tokens cut. With ``packing``, conversations are laid end to end in rows of up to ``max_length``
tokens with position ids restarting at each one; transformers turns that into a block-diagonal
causal mask, so packed conversations do not attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.data import DataError, check_messages, read_rows
from cai.engine.encoding import chat_ids
from cai.engine.prefix import common_start
from cai.train import (
    DataStats,
    TrainConfig,
    TrainResult,
    add_lora,
    data_path,
    doc,
    load_model,
    train_and_save,
    training_arguments,
)
from cai.train.losses import IGNORE_INDEX


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """``cai train sft`` settings (YAML, see ``cai.config``)."""

    learning_rate: float = doc("peak learning rate (AdamW)", 2e-5)
    packing: bool = doc("lay conversations end to end in rows of max_length tokens", False)


def load_conversations(path: str) -> list[list[dict]]:
    """The ``messages`` of each SFT record in a .jsonl file, ``datasets`` folder or export folder.

    Raises:
        FileNotFoundError: no such file or folder.
        DataError: a record is not ``{"messages": [...]}`` with an assistant turn.
    """
    rows = read_rows(data_path(path))
    conversations = [_messages(row, where) for where, row in rows]
    if not conversations:
        raise DataError(f"{path}: no records")
    return conversations


def _messages(row: dict, where: str) -> list[dict]:
    if "messages" not in row:
        raise DataError(f"{where}: an SFT record needs messages: a list of {{role, content}}")
    messages = check_messages(row["messages"], where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: messages have no assistant turn to train on")
    return messages


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are -100 outside the assistant turns.

    Raises:
        ValueError: the chat template renders earlier turns differently once later ones follow,
            so no turn boundary can be found in the whole conversation.
    """
    ids = chat_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, messages[:turn], add_generation_prompt=True) if turn else []
        upto = chat_ids(tokenizer, messages[: turn + 1])
        if ids[: len(upto)] != upto:
            raise ValueError(
                f"{tokenizer.name_or_path}: the chat template renders assistant turn {turn} "
                "differently when later turns follow, so its tokens cannot be located; train on "
                "conversations that end with that turn instead"
            )
        start = common_start(prompt, ids)
        labels[start : len(upto)] = ids[start : len(upto)]
    return ids, labels


def tokenize_all(
    tokenizer, conversations: list[list[dict]], max_length: int
) -> tuple[list[dict], DataStats]:
    """Tokenised examples ``{"input_ids", "labels"}``, cut to ``max_length``, and the counts."""
    stats = DataStats(examples=len(conversations))
    examples = []
    for messages in conversations:
        ids, labels = tokenize_conversation(tokenizer, messages)
        if len(ids) > max_length:
            stats.truncated += 1
            stats.truncated_tokens += len(ids) - max_length
            ids, labels = ids[:max_length], labels[:max_length]
        # The first label is never predicted (nothing precedes it), so it cannot count as trained.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, stats


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Lay examples end to end (in order) into rows of at most ``max_length`` tokens.

    Each row has ``position_ids`` restarting at 0 for each example; the first label of each
    example is masked, since in a row it would be predicted from the previous example.
    """
    rows: list[dict] = []
    row: dict = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        n = len(example["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > max_length:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX, *example["labels"][1:]]
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


@dataclass
class SFTCollator:
    """Right-pads examples into a batch; packed rows get position ids and no attention mask."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_token_id),
            "labels": torch.full((len(examples), width), IGNORE_INDEX),
        }
        packed = "position_ids" in examples[0]
        if packed:
            # Padding forms its own segment (positions from 0), which nothing real attends to.
            batch["position_ids"] = torch.arange(width).repeat(len(examples), 1)
        else:
            batch["attention_mask"] = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
            batch["labels"][i, :n] = torch.tensor(e["labels"])
            if packed:
                batch["position_ids"][i, :n] = torch.tensor(e["position_ids"])
                batch["position_ids"][i, n:] = torch.arange(width - n)
            else:
                batch["attention_mask"][i, :n] = 1
        return batch


def _dataset(path: str, tokenizer, config: SFTConfig) -> tuple[list[dict], DataStats]:
    examples, stats = tokenize_all(tokenizer, load_conversations(path), config.max_length)
    stats.report(path, config.max_length)
    if not examples:
        raise DataError(f"{path}: no example has an assistant token left within max_length")
    return (pack(examples, config.max_length) if config.packing else examples), stats


def train_sft(config: SFTConfig) -> TrainResult:
    """Fine-tune ``config.model`` on the assistant turns of ``config.data``; save and return."""
    from transformers import Trainer

    args = training_arguments(config)
    model, tokenizer = load_model(config.model)
    train, stats = _dataset(config.data, tokenizer, config)
    evaluation = _dataset(config.eval_data, tokenizer, config)[0] if config.eval_data else None
    if config.lora is not None:
        model = add_lora(model, config.lora, config.gradient_checkpointing, config.seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=SFTCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    return train_and_save(trainer, config, stats)


__all__ = [
    "SFTCollator",
    "SFTConfig",
    "load_conversations",
    "pack",
    "tokenize_all",
    "tokenize_conversation",
    "train_sft",
]
