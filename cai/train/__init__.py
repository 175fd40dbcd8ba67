"""The built-in trainers: SFT on the revisions, DPO and its relatives and a Bradley-Terry reward
model on the judged pairs.

    cai train sft --config sft.yaml [--set key=value ...]
    cai train dpo --config dpo.yaml [--set key=value ...]
    cai train reward --config reward.yaml [--set key=value ...]

    from cai.train.sft import SFTConfig, train_sft
    from cai.train.dpo import DPOConfig, train_dpo
    from cai.train.reward import RewardConfig, train_reward

All run on ``transformers.Trainer``, so checkpoints, resuming, bf16, gradient accumulation and
``accelerate launch`` / ``torchrun`` (DDP, FSDP, DeepSpeed) work as for any Trainer. The output
folder is a ``save_pretrained`` model and tokenizer (LoRA adapters merged in) that
``cai.engine.create_engine("hf", model=output_dir)`` loads (a reward model is a scalar-head model
that ``cai.rewards.model.RewardModel`` loads); Trainer checkpoints go to ``output_dir/checkpoints``.

This module holds what the trainers share: the config fields every trainer has, the LoRA options,
the result, model loading, chat tokenisation and the TrainingArguments they run under.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cai.config import doc
from cai.layout import CHECKPOINTS, DATASET, TRAIN_RESULT

log = logging.getLogger(__name__)

RESULT_FILE = TRAIN_RESULT
"""Written into output_dir once the model is saved: config, metrics and data statistics."""


@dataclass(kw_only=True)
class LoraOptions:
    """Train low-rank adapters (peft) instead of every weight; merged into the saved model."""

    r: int = doc("adapter rank", 16)
    alpha: int = doc("scaling numerator: the update is scaled by alpha / r", 32)
    dropout: float = doc("dropout on the adapter input", 0.05)
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={
            "doc": "module names to adapt, or 'all-linear' for every linear layer but the head"
        },
    )

    def validate(self) -> None:
        if importlib.util.find_spec("peft") is None:
            raise ValueError("lora needs peft: pip install 'cai[lora]' (or remove the lora key)")
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1 (got {self.r})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1) (got {self.dropout})")


@dataclass(kw_only=True)
class TrainConfig:
    """The fields every trainer has."""

    data: str = doc(
        "training data: a .jsonl file, a datasets save_to_disk folder, or a folder written by "
        "cai.export.export_dataset"
    )
    output_dir: str = doc("where the trained model (and checkpoints/) go")
    model: str = doc("model spec to start from (see cai.models)", "smollm2-135m")
    eval_data: str | None = doc(
        "held-out data evaluated after training, same formats as data", None
    )
    learning_rate: float = doc("peak learning rate (AdamW)", 1e-5)
    epochs: float = doc("passes over the data (ignored when max_steps is set)", 1.0)
    max_steps: int | None = doc("optimizer steps to run; overrides epochs", None)
    batch_size: int = doc("examples per device per micro-batch", 8)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    max_length: int = doc("tokens per sequence; longer ones are cut at the end and counted", 1024)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = doc(
        "learning-rate schedule after warm-up", "linear"
    )
    warmup_ratio: float = doc("fraction of the steps spent warming up", 0.0)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    max_grad_norm: float = doc("gradient clipping norm", 1.0)
    bf16: bool = doc("bf16 mixed precision (autocast; weights stay float32)", False)
    gradient_checkpointing: bool = doc("recompute activations in backward to save memory", False)
    seed: int = doc("seed for initialisation, shuffling and dropout", 42)
    logging_steps: int = doc("log metrics every N optimizer steps", 10)
    save_steps: int | None = doc("checkpoint every N steps into output_dir/checkpoints", None)
    save_total_limit: int | None = doc("keep at most N checkpoints", 2)
    resume: bool = doc("continue from the newest checkpoint in output_dir/checkpoints if any", True)
    report_to: list[str] = field(
        default_factory=list, metadata={"doc": "trackers for the Trainer (tensorboard, wandb, ...)"}
    )
    lora: LoraOptions | None = field(
        default=None, metadata={"doc": "train LoRA adapters instead of every weight"}
    )

    def validate(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
            "logging_steps": self.logging_steps,
        }
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        if self.save_steps is not None:
            positive["save_steps"] = self.save_steps
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0 (got {self.learning_rate})")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0 (got {self.epochs})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")


@dataclass
class DataStats:
    """What tokenisation did to the data; truncation is counted, never silent."""

    examples: int = 0
    """Examples read."""
    truncated: int = 0
    """Examples longer than max_length, cut at the end."""
    truncated_tokens: int = 0
    """Tokens cut from the ends of the truncated examples, in all."""
    dropped: int = 0
    """Examples left with no trained token after truncation, so not trained on."""

    def report(self, what: str, max_length: int) -> None:
        if self.truncated:
            log.warning(
                "%s: %d of %d examples exceed max_length=%d; %d tokens were cut from their ends "
                "(raise max_length to keep them)",
                what,
                self.truncated,
                self.examples,
                max_length,
                self.truncated_tokens,
            )
        if self.dropped:
            log.warning(
                "%s: %d examples had nothing left to train on after truncation and were dropped",
                what,
                self.dropped,
            )


@dataclass
class TrainResult:
    """What a training run returns (and writes to ``output_dir/cai_train.json``)."""

    output_dir: str
    """The saved model folder."""
    global_step: int
    """Optimizer steps taken (including those of a resumed run)."""
    metrics: dict[str, float]
    """Final metrics: the Trainer's (train_loss, train_samples_per_second, ...), the last logged
    training metrics, and eval_* ones when eval_data is set."""
    data: DataStats
    """Tokenisation statistics of the training data."""
    log_history: list[dict]
    """Every logged step, as the Trainer recorded it."""


# --- shared plumbing -----------------------------------------------------------------------------


def data_path(path: str) -> Path:
    """A data source on disk; an ``export_dataset`` folder resolves to its ``dataset/`` folder."""
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{path}: no such data file or folder")
    if source.is_dir() and (source / DATASET).is_dir():
        return source / DATASET
    return source


def load_model(spec: str):
    """(model, tokenizer) in float32 from a model spec; the tokenizer gets a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.models import resolve_model

    path = resolve_model(spec).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # Training needs no KV cache; with one, transformers would also ignore the position ids that
    # keep packed sequences apart. train_and_save turns it back on in the saved config.
    model.config.use_cache = False
    return model, tokenizer


def add_lora(
    model,
    options: LoraOptions,
    gradient_checkpointing: bool,
    seed: int,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
):
    """Wrap ``model`` with fresh LoRA adapters (peft); only they (and ``modules_to_save``, such
    as a new reward head) train. The adapters are initialised from ``seed``, not from whatever
    the process drew before: the same data and settings train the same weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(seed)

    if gradient_checkpointing:
        # With the base frozen, recomputed blocks would get no input that requires grad.
        model.enable_input_require_grads()

    lora = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, lora)


def training_arguments(config: TrainConfig):
    """The TrainingArguments a trainer runs under (this also sets up the distributed state)."""
    import torch
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(Path(config.output_dir) / CHECKPOINTS),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        # Say so on a machine without an accelerator: only then does accelerate run DDP over
        # CPU processes (gloo) under torchrun, and allow bf16 (as CPU autocast).
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,  # unused when not saving
        save_total_limit=config.save_total_limit,
        eval_strategy="no",
        report_to=config.report_to or "none",
        # Our collators build the model inputs; the columns are not model arguments.
        remove_unused_columns=False,
        # Unused parameters (frozen base under LoRA) are excluded from DDP anyway.
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    # The (distributed) device state is set up lazily on first use; do it now, since the
    # reference pass before the Trainer exists must run in the same process group.
    log.info("training on %s, process %d of %d", args.device, args.process_index, args.world_size)
    return args


def checkpoint_to_resume(config: TrainConfig) -> str | None:
    """The newest checkpoint in output_dir/checkpoints when ``resume`` is on, else None."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(config.output_dir) / CHECKPOINTS
    if not config.resume or not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    if last is not None:
        log.info("resuming from %s", last)
    return last


def train_and_save(
    trainer, config: TrainConfig, stats: DataStats, evaluate: Any = None
) -> TrainResult:
    """Run ``trainer``, evaluate on its eval set if any (or with ``evaluate(trainer) -> dict``),
    save the model, write the result file."""
    output = trainer.train(resume_from_checkpoint=checkpoint_to_resume(config))
    metrics = dict(output.metrics)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    if logged:
        metrics.update({k: v for k, v in logged[-1].items() if k not in ("epoch", "step")})
    if evaluate is not None:
        metrics.update(evaluate(trainer))
    elif trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    out = Path(config.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if config.lora is None:
        model.config.use_cache = True
        trainer.save_model(str(out))
    elif trainer.args.should_save:
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(str(out))
        trainer.processing_class.save_pretrained(str(out))
    result = TrainResult(
        output_dir=str(out),
        global_step=trainer.state.global_step,
        metrics=metrics,
        data=stats,
        log_history=list(trainer.state.log_history),
    )
    if trainer.args.should_save:
        record = {"config": asdict(config), **asdict(result)}
        (out / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return result


__all__ = [
    "RESULT_FILE",
    "DataStats",
    "LoraOptions",
    "TrainConfig",
    "TrainResult",
]
