"""The policy at each point of a run, and the responses drawn from it.

The policy is the recipe's model, then the SFT model when the recipe trains one
(``<run>/models/sft``), then in round r of an online recipe the model that round's DPO trained
(``<run>/rounds/<r>/dpo``). The generate stage (the recipe's model) and the sample stage draw
from it and write the records keyed here; the critique rounds, which revise the generated
responses, and the judge, which labels the samples, plan from the same keys.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from cai.engine import Sampling
from cai.keys import model_key, record_key

if TYPE_CHECKING:
    from cai.data import PromptRecord
    from cai.pipeline.stage import StageContext


def generate_sampling(ctx: StageContext) -> Sampling:
    gen = ctx.recipe.stages.generate
    return Sampling(max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p)


def generate_key(ctx: StageContext, prompt: PromptRecord) -> str:
    """The key of a prompt's generate record: (input, stage, the recipe's model, sampling)."""
    return record_key(
        input=prompt.key,
        stage="generate",
        model=ctx.recipe.model,
        sampling=generate_sampling(ctx).to_dict(),
    )


def after_sft(ctx: StageContext) -> str:
    """The SFT output when the recipe trains one, else the recipe's model: what sampling and the
    trainers after SFT start from."""
    if ctx.recipe.stages.train_sft is not None:
        return str(ctx.layout.model("sft"))
    return ctx.recipe.model


def after_round(ctx: StageContext, r: int) -> str:
    """The policy after round ``r`` (round 0: :func:`after_sft`)."""
    return after_sft(ctx) if r == 0 else str(ctx.layout.model("dpo", round=r))


def at_start(ctx: StageContext) -> str:
    """The policy the stage starts from: in round r, the policy after round r-1; else
    :func:`after_sft`."""
    return after_sft(ctx) if ctx.round is None else after_round(ctx, ctx.round - 1)


def sample_model(ctx: StageContext) -> str:
    """The sample stage's model: its ``model`` option, else the policy at the stage."""
    return ctx.recipe.stages.sample.model or at_start(ctx)


def sample_sampling(ctx: StageContext) -> Sampling:
    stage = ctx.recipe.stages.sample
    return Sampling(
        n=stage.k, temperature=stage.temperature, top_p=stage.top_p, max_tokens=stage.max_tokens
    )


def sample_key(ctx: StageContext, prompt: PromptRecord) -> str:
    """The key of a prompt's sample record: (input, stage, sampling, model, round)."""
    return record_key(
        input=prompt.key,
        stage="sample",
        sampling=sample_sampling(ctx).to_dict(),
        **model_key("model", sample_model(ctx)),
        **ctx.round_key(),
    )


def pending(ctx: StageContext) -> tuple[int, int]:
    """(prompts left to sample, pairs their samples will give at most): for the plans."""
    stage, store, shard = ctx.recipe.stages.sample, ctx.store, ctx.shard
    have = store.read_stage("sample", shard) if store.stage_path("sample", shard).exists() else {}
    pairs, unsampled = 0, 0
    for p in ctx.prompts:
        record = have.get(sample_key(ctx, p))
        if record is None or record.get("error") is not None:
            unsampled += 1
            pairs += math.comb(stage.k, 2)
        elif not record.get("skipped"):
            pairs += math.comb(len(record["responses"]), 2)
    return unsampled, pairs
