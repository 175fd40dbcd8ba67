"""A trained reward model at inference: ``RewardModel(spec).score(conversations) -> rewards``.

Inference only: loading it needs transformers and torch, not the training stack
(``cai.train.reward`` trains one and shares :func:`load_reward_model`, so training and scoring
read the head at the same token).

    from cai.rewards.model import RewardModel
    with RewardModel("runs/x/reward") as rm:
        rm.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from cai.engine.encoding import chat_ids

log = logging.getLogger(__name__)

HEAD = "score"
"""The scalar head of ``AutoModelForSequenceClassification`` on decoder LMs (Llama, Qwen, ...)."""


def load_reward_model(spec: str, *, new_head: bool):
    """(model, tokenizer) with a scalar head, float32.

    ``new_head``: training from a causal LM, whose checkpoint has no head, so it is initialised
    here (from the global seed) and transformers' report of it as missing is expected; it is not
    shown. Otherwise the checkpoint must hold a trained head: a model without one would score
    with random weights, so that raises.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cai.models import resolve_model

    path = resolve_model(spec).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    verbosity = hf_logging.get_verbosity()
    # transformers logs a load report as a warning whenever a weight is missing; we check the
    # missing keys ourselves below and say what they mean.
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])
    head = {k for k in missing if k.split(".")[0] == HEAD}
    if missing - head:
        log.warning(
            "%s: weights missing from the checkpoint, initialised at random: %s",
            spec,
            ", ".join(sorted(missing - head)),
        )
    if not new_head and head:
        raise ValueError(
            f"{spec}: not a reward model (its checkpoint has no trained {HEAD!r} head, so every "
            "reward would come from random weights); train one with `cai train reward`"
        )
    if new_head:
        log.info(
            "%s: %s",
            spec,
            f"no reward head in the checkpoint (as expected for a language model): a new scalar "
            f"head ({HEAD!r}) is initialised for training"
            if head
            else f"training on from its existing {HEAD!r} head",
        )
    # The head reads each row at its last token that is not the pad token (transformers'
    # sequence classifiers), which is right for right- and left-padded rows alike. When the pad
    # token is also the end-of-turn token and a row ends with it, the reward is read one token
    # earlier; training and scoring share that rule, so rewards stay comparable.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@torch.no_grad()
def head_logits(
    model: Any, rows: Sequence[Sequence[int]], pad: int, batch_size: int
) -> list[float]:
    """The scalar head's logit for each token row, in batches of ``batch_size``, right-padded
    like training (see :func:`load_reward_model` on where the head reads), on the model's
    device. The reward model and the guard classifiers score through it."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = [list(r) for r in rows[start : start + batch_size]]
        width = max(len(r) for r in batch)
        input_ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, row in enumerate(batch):
            input_ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        out.extend(logits[:, 0].float().tolist())
    return out


class RewardModel:
    """A trained reward model, loaded once: ``score(conversations) -> rewards``.

    ``spec``: a ``cai train reward`` output folder (or any spec ``cai.models`` resolves to a
    model with a trained scalar head). Scoring is batched, without gradients and in eval mode, so
    the same conversations always get the same rewards.
    """

    def __init__(self, spec: str, *, batch_size: int = 8, device: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.spec = spec
        self.batch_size = batch_size
        self.model, self.tokenizer = load_reward_model(spec, new_head=False)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    @torch.no_grad()
    def score(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[float | None]:
        """The reward of each conversation (chat messages ending with the assistant turn);
        ``None`` for one longer than the model's context (``max_position_embeddings``), which is
        never scored: cut or run past its positions, it would get a meaningless number."""
        if self.model is None:
            raise RuntimeError(f"reward model {self.spec} is closed")
        for i, conversation in enumerate(conversations):
            if not conversation or conversation[-1].get("role") != "assistant":
                raise ValueError(f"conversation {i}: must end with the assistant response scored")
        ids = [chat_ids(self.tokenizer, list(c)) for c in conversations]
        context = self.context_length
        fits = [i for i, row in enumerate(ids) if context is None or len(row) <= context]
        out: list[float | None] = [None] * len(ids)
        values = head_logits(
            self.model, [ids[i] for i in fits], self.tokenizer.pad_token_id, self.batch_size
        )
        for i, value in zip(fits, values, strict=True):
            out[i] = value
        return out

    @property
    def context_length(self) -> int | None:
        """The most tokens a scored conversation may have (None: the model states no limit)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    __call__ = score

    def close(self) -> None:
        """Free the model; scoring afterwards raises."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> RewardModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_rewards(
    model_dir_or_spec: str,
    conversations: Sequence[Sequence[dict[str, Any]]],
    *,
    batch_size: int = 8,
) -> list[float | None]:
    """Load a trained reward model (a ``cai train reward`` folder or spec), score
    ``conversations`` with it (None: longer than its context), unload it. To score several batches, load a :class:`RewardModel`
    once instead."""
    with RewardModel(model_dir_or_spec, batch_size=batch_size) as rm:
        return rm.score(conversations)


__all__ = ["HEAD", "RewardModel", "head_logits", "load_reward_model", "score_rewards"]
