"""Preference training on judged pairs: DPO and its relatives, with cached reference log-probs.

    cai train dpo --config dpo.yaml

    from cai.train.dpo import DPOConfig, train_dpo
    result = train_dpo(DPOConfig(data="runs/x/preferences", output_dir="models/dpo", loss="soft_dpo"))

Data: preference records ``{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant
msg], "p_chosen": float}``, or anything else ``cai.pairs.load_pairs`` reads. Prompt and
prompt+response are rendered with the model's chat template; the response is what follows their
common prefix. Pairs longer than ``max_length`` are cut at the end and counted; a pair whose prompt
alone fills ``max_length`` is dropped and counted.

``loss`` (formulas, papers and shapes in ``cai.train.losses``):

- ``dpo``, ``hinge``: summed log-probs against the reference;
- ``soft_dpo``: DPO toward the judge's ``p_chosen`` (required in every record);
- ``ipo``: length-averaged log-probs, as the IPO authors' results use;
- ``kto``: each pair gives a desirable and an undesirable example; the KL reference point is
  estimated on mismatched pairs (pair i's prompt with pair i+1's chosen response);
- ``orpo``, ``simpo``: reference-free, length-averaged; no reference pass at all.

Reference log-probs are computed once before training, under the precision training uses, and
cached beside the data (``<data>.ref-logps-<key>.safetensors``; ``ref_cache_dir`` moves it). The key
hashes the tokenised data and the reference model's files, so a changed data set, template or
model never reads a stale cache. No reference model is in memory during training. The reference is
``ref_model`` if set, else the starting model; with LoRA that is the base before the adapters are
added, which is the base with adapters off. Under DDP each process computes a share of them.

Logged every ``logging_steps``: loss, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies`` (share of pairs whose chosen reward is higher by more than float rounding:
``TIE_MARGIN``), ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` and ``kl``: the batch mean of ``log π - log π_ref`` over the
responses (over the mismatched pairs for kto, the estimate its loss uses). On off-policy pairs this
tracks how far the policy has moved rather than the exact ``KL(π ‖ π_ref)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import Trainer

from cai.data import DataError
from cai.engine.encoding import chat_ids
from cai.engine.prefix import common_start
from cai.models import resolve_model
from cai.pairs import load_pairs
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
from cai.train.losses import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
    soft_dpo_loss,
)

log = logging.getLogger(__name__)

LOSSES = ("dpo", "soft_dpo", "ipo", "hinge", "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
LENGTH_AVERAGED = ("ipo", "orpo", "simpo")
_CACHE_VERSION = 1


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    """``cai train dpo`` settings (YAML, see ``cai.config``)."""

    learning_rate: float = doc("peak learning rate (AdamW)", 1e-6)
    loss: Literal["dpo", "soft_dpo", "ipo", "hinge", "kto", "orpo", "simpo"] = doc(
        "preference loss (see cai.train.losses)", "dpo"
    )
    beta: float = doc(
        "β: KL strength (dpo, soft_dpo, hinge, kto), τ (ipo), λ (orpo), scale (simpo)", 0.1
    )
    simpo_gamma: float = doc("simpo: target reward margin γ", 0.5)
    kto_desirable_weight: float = doc("kto: weight λ_D of the chosen (desirable) examples", 1.0)
    kto_undesirable_weight: float = doc(
        "kto: weight λ_U of the rejected (undesirable) examples", 1.0
    )
    ref_model: str | None = doc("reference model spec; default: the starting model", None)
    ref_batch_size: int | None = doc("pairs per batch when computing reference log-probs", None)
    ref_cache_dir: str | None = doc(
        "folder for the reference log-prob cache; default: beside the data", None
    )

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 (got {self.beta})")
        if self.simpo_gamma < 0:
            raise ValueError(f"simpo_gamma must be >= 0 (got {self.simpo_gamma})")
        if min(self.kto_desirable_weight, self.kto_undesirable_weight) <= 0:
            raise ValueError("kto_desirable_weight and kto_undesirable_weight must be > 0")
        if self.ref_batch_size is not None and self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size must be >= 1 (got {self.ref_batch_size})")
        if self.loss in REFERENCE_FREE and self.ref_model is not None:
            raise ValueError(f"loss {self.loss!r} uses no reference model; remove ref_model")


# --- data ----------------------------------------------------------------------------------------


def tokenize_pair(
    tokenizer, prompt: list[dict], chosen: str, rejected: str
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids): the responses are the tokens that follow the
    longest prefix the rendered prompt shares with both rendered conversations."""
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    with_chosen = chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": chosen}])
    with_rejected = chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": rejected}])
    start = min(
        common_start(prompt_ids, with_chosen),
        common_start(prompt_ids, with_rejected),
    )
    return prompt_ids[:start], with_chosen[start:], with_rejected[start:]


def prepare_pairs(tokenizer, path: str, loss: str, max_length: int) -> tuple[list[dict], DataStats]:
    """Tokenised pairs of ``path``: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
    ``p_chosen``, and for kto ``kl_ids`` (pair i+1's chosen response), cut to ``max_length``."""
    pairs = load_pairs(data_path(path))
    stats = DataStats(examples=len(pairs))
    examples = []
    for pair in pairs:
        p_chosen = pair.meta.get("p_chosen")
        if loss == "soft_dpo" and p_chosen is None:
            raise DataError(f"{pair.source}: loss soft_dpo needs p_chosen in every record")
        prompt_ids, chosen_ids, rejected_ids = tokenize_pair(
            tokenizer, pair.prompt, pair.chosen, pair.rejected
        )
        room = max_length - len(prompt_ids)
        if room < 1:
            stats.dropped += 1
            continue
        cut = [max(len(ids) - room, 0) for ids in (chosen_ids, rejected_ids)]
        if any(cut):
            stats.truncated += 1
            stats.truncated_tokens += sum(cut)
        examples.append(
            {
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen_ids[:room],
                "rejected_ids": rejected_ids[:room],
                "p_chosen": 1.0 if p_chosen is None else float(p_chosen),
            }
        )
    if not examples:
        raise DataError(f"{path}: every prompt fills max_length={max_length}; nothing to train on")
    if loss == "kto":
        if len(examples) < 2:
            raise DataError(
                f"{path}: kto estimates its KL term on mismatched pairs: needs >= 2 pairs"
            )
        for i, example in enumerate(examples):
            other = examples[(i + 1) % len(examples)]["chosen_ids"]
            example["kl_ids"] = other[: max_length - len(example["prompt_ids"])]
    return examples, stats


RESPONSES = ("chosen", "rejected", "kl")
"""The response kinds of an example, in the order the collator stacks them."""


@dataclass
class PairCollator:
    """Stacks a batch of B pairs into rows ``[prompt+chosen × B, prompt+rejected × B(, kl × B)]``.

    Output: ``input_ids``, ``attention_mask``, ``response_mask`` (1 on response tokens), all
    ``(kB, T)`` right-padded; ``p_chosen`` ``(B,)``; and ``ref_<kind>`` ``(B,)`` when the examples
    carry reference log-probs.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        kinds = [k for k in RESPONSES if f"{k}_ids" in examples[0]]
        rows = [(e["prompt_ids"], e[f"{k}_ids"]) for k in kinds for e in examples]
        width = max(len(p) + len(r) for p, r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (prompt, response) in enumerate(rows):
            n = len(prompt) + len(response)
            input_ids[i, :n] = torch.tensor(prompt + response)
            attention_mask[i, :n] = 1
            response_mask[i, len(prompt) : n] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "p_chosen": torch.tensor([e["p_chosen"] for e in examples]),
        }
        for kind in kinds:
            if f"ref_{kind}" in examples[0]:
                batch[f"ref_{kind}"] = torch.tensor([e[f"ref_{kind}"] for e in examples])
        return batch


# --- the loss of a batch -------------------------------------------------------------------------


def response_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``(kB,)`` of each row's response and its token counts ``(kB,)``."""
    ids, mask = batch["input_ids"], batch["response_mask"]
    # The LM head runs only from the position before the earliest response token: the prompt's
    # logits are never used, and on long prompts they are most of the (kB, T, V) tensor.
    keep = min(ids.shape[1], ids.shape[1] - int(mask.argmax(-1).min()) + 1)
    logits = model(
        input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
    ).logits
    return sequence_logps(logits, ids[:, -keep:], mask[:, -keep:]), mask.sum(-1)


TIE_MARGIN = 1e-4
"""Reward margins within ``TIE_MARGIN · beta`` (1e-4 nats of log-prob) count as ties, not wins,
in ``rewards/accuracies``. The reference pass batches and pads the pairs otherwise than the
shuffled training batches, so a policy equal to its reference (step 0; LoRA starts there) differs
from the cached log-probs by float32 rounding (~1e-6 nats), whose sign depends on the kernels and
threads the machine picked: a strict ``>`` then reported a random share of wins at step 0."""


def batch_loss(
    model, batch: dict[str, torch.Tensor], config: DPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss of a collated batch and its metrics (scalar tensors, detached)."""
    pairs = batch["p_chosen"].shape[0]
    logps, counts = response_logps(model, batch)
    if config.loss in LENGTH_AVERAGED:
        logps = logps / counts.clamp(min=1)
    policy = dict(zip(RESPONSES, logps.split(pairs), strict=False))
    ref = {k: batch[f"ref_{k}"] for k in policy if f"ref_{k}" in batch}
    if config.loss in LENGTH_AVERAGED and ref:
        sizes = dict(zip(RESPONSES, counts.split(pairs), strict=False))
        ref = {k: v / sizes[k].clamp(min=1) for k, v in ref.items()}
    chosen, rejected = policy["chosen"], policy["rejected"]
    kl = None
    if config.loss == "kto":
        kl = _mean_across_processes((policy["kl"] - ref["kl"]).mean().detach())
        losses, rewards = kto_loss(
            torch.cat([chosen, rejected]),
            torch.cat([ref["chosen"], ref["rejected"]]),
            torch.arange(2 * pairs, device=chosen.device) < pairs,
            kl,
            config.beta,
            config.kto_desirable_weight,
            config.kto_undesirable_weight,
        )
        loss = losses.mean()
        chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    else:
        if config.loss == "orpo":
            out = orpo_loss(chosen, rejected, config.beta)
        elif config.loss == "simpo":
            out = simpo_loss(chosen, rejected, config.beta, config.simpo_gamma)
        else:
            args = (chosen, rejected, ref["chosen"], ref["rejected"], config.beta)
            if config.loss == "soft_dpo":
                out = soft_dpo_loss(*args, batch["p_chosen"].to(chosen))
            else:
                out = {"dpo": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}[config.loss](*args)
            kl = (
                torch.cat([chosen, rejected]) - torch.cat([ref["chosen"], ref["rejected"]])
            ).mean()
        loss = out.losses.mean()
        chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards - rejected_rewards > TIE_MARGIN * config.beta)
        .float()
        .mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }
    if kl is not None:
        metrics["kl"] = kl.detach()
    return loss, metrics


def _mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """KTO's KL estimate is a population quantity: average it over every process's batch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


class PreferenceTrainer(Trainer):
    """A Trainer whose loss is :func:`batch_loss`; it logs the preference metrics too."""

    def __init__(self, *args, config: TrainConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch and the metrics to log (a subclass swaps in its own loss)."""
        return batch_loss(model, inputs, self.config)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.batch_loss(model, inputs)
        values = self.accelerator.reduce(torch.stack(list(metrics.values())), reduction="mean")
        mode = "train" if model.training else "eval"
        for name, value in zip(metrics, values.tolist(), strict=True):
            self._metrics[mode][name].append(value)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The default step looks for labels; a preference batch has none, only a loss.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items()})
        self._metrics[mode].clear()
        super().log(logs, start_time)


# --- reference log-probs -------------------------------------------------------------------------


@torch.no_grad()
def reference_logps(
    model, examples: list[dict], pad_token_id: int, batch_size: int, bf16: bool = False
) -> dict[str, torch.Tensor]:
    """Summed log-probs of each example's responses under ``model``: ``{"chosen": (N,), ...}``.

    Batched and right-padded like training, under bf16 autocast when training uses it. Under
    DDP each process scores every n-th example and the shares are exchanged.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    model.to(state.device)
    was_training = model.training
    model.eval()
    collate = PairCollator(pad_token_id)
    mine = list(range(state.process_index, len(examples), state.num_processes))
    scored: list[tuple[int, list[float]]] = []
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        batch = {k: v.to(state.device) for k, v in collate([examples[i] for i in indices]).items()}
        with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=bf16):
            logps = response_logps(model, batch)[0].float().cpu()
        per_kind = logps.view(-1, len(indices)).T.tolist()
        scored += zip(indices, per_kind, strict=True)
    if state.num_processes > 1:
        scored = gather_object(scored)
    model.train(was_training)
    values = torch.tensor([v for _, v in sorted(scored)], dtype=torch.float32)
    kinds = [k for k in RESPONSES if f"{k}_ids" in examples[0]]
    return {kind: values[:, i].contiguous() for i, kind in enumerate(kinds)}


def model_fingerprint(spec: str) -> str:
    """Identity of a model's weights for cache keys: its resolved folder and the name, size and
    mtime of each file (hashing the weights themselves would cost minutes on large models)."""
    resolved = resolve_model(spec)
    folder = Path(resolved.path)
    if not resolved.is_local:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(resolved.path, local_files_only=True))
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json.dumps({"folder": str(folder), "files": stats})


def cache_key(examples: list[dict], ref_spec: str, bf16: bool) -> str:
    """sha256 of the tokenised examples, the reference model's fingerprint and the precision."""
    digest = hashlib.sha256()
    head = {"version": _CACHE_VERSION, "model": model_fingerprint(ref_spec), "bf16": bf16}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for e in examples:
        digest.update(
            json.dumps([e["prompt_ids"], *(e.get(f"{k}_ids") for k in RESPONSES)]).encode()
        )
    return digest.hexdigest()


def cache_path(data: str, key: str, cache_dir: str | None) -> Path:
    """``<folder>/<data name>.ref-logps-<key16>.safetensors``, beside the data by default."""
    source = data_path(data)
    folder = Path(cache_dir).expanduser() if cache_dir else source.parent
    return folder / f"{source.name}.ref-logps-{key[:16]}.safetensors"


def attach_reference(
    model, examples: list[dict], data: str, config: DPOConfig, pad_token_id: int
) -> Path:
    """Set ``ref_<kind>`` on every example, from the cache or computed (and cached); returns
    the cache file."""
    from accelerate import PartialState
    from safetensors.torch import load_file, save_file

    ref_spec = config.ref_model or config.model
    path = cache_path(data, cache_key(examples, ref_spec, config.bf16), config.ref_cache_dir)
    values = load_file(str(path)) if path.is_file() else None
    if values is None or any(len(v) != len(examples) for v in values.values()):
        batch_size = config.ref_batch_size or config.batch_size
        values = reference_logps(model, examples, pad_token_id, batch_size, config.bf16)
        if PartialState().is_main_process:
            _write_cache(save_file, values, path, ref_spec, data)
        PartialState().wait_for_everyone()
    for kind, column in values.items():
        for example, value in zip(examples, column.tolist(), strict=True):
            example[f"ref_{kind}"] = value
    return path


def _write_cache(save_file, values: dict, path: Path, ref_spec: str, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(values, str(tmp), metadata={"ref_model": ref_spec, "data": str(data)})
        os.replace(tmp, path)
    except OSError as e:
        # The values are in memory; an unwritable data folder only costs recomputing next time.
        tmp.unlink(missing_ok=True)
        log.warning("could not cache reference log-probs at %s (%s); set ref_cache_dir", path, e)


# --- training ------------------------------------------------------------------------------------


def train_dpo(config: DPOConfig) -> TrainResult:
    """Train ``config.model`` on the pairs of ``config.data`` with ``config.loss``; save, return."""
    args = training_arguments(config)
    model, tokenizer = load_model(config.model)
    train, stats = prepare_pairs(tokenizer, config.data, config.loss, config.max_length)
    stats.report(config.data, config.max_length)
    evaluation = None
    if config.eval_data:
        evaluation = prepare_pairs(tokenizer, config.eval_data, config.loss, config.max_length)[0]
    if config.loss not in REFERENCE_FREE:
        reference = model
        if config.ref_model is not None:
            reference, ref_tokenizer = load_model(config.ref_model)
            if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"ref_model {config.ref_model!r} has another vocabulary than {config.model!r}; "
                    "the reference must share the policy's tokenizer"
                )
        for examples, data in ((train, config.data), (evaluation, config.eval_data)):
            if examples is not None:
                attach_reference(reference, examples, data, config, tokenizer.pad_token_id)
        del reference
    if config.lora is not None:
        model = add_lora(model, config.lora, config.gradient_checkpointing, config.seed)
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=PairCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        config=config,
    )
    return train_and_save(trainer, config, stats)


__all__ = [
    "LOSSES",
    "DPOConfig",
    "PairCollator",
    "PreferenceTrainer",
    "attach_reference",
    "batch_loss",
    "prepare_pairs",
    "reference_logps",
    "response_logps",
    "tokenize_pair",
    "train_dpo",
]
