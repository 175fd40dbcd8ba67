"""The stage ``sample``: K responses per prompt, the candidates of preference pairs (RL-CAI).

    stages:
      sample: {k: 4, temperature: 0.8, model: runs/x/models/sft}

One record per prompt. Key: (input, stage, model spec, sampling with ``n=k``, the model's revision
when the pipeline trained it); seed from the key. ``responses`` holds the distinct non-empty
responses (stripped, in sample order); ``duplicates_dropped`` / ``empty_dropped`` count what was
dropped. A prompt left with fewer than two distinct responses is *skipped* (``skipped`` says why,
``error`` stays null): the seed comes from the key, so a re-run would draw the same samples
(exactly on HF) and retrying is pointless. Raise ``k`` or ``temperature`` for new keys. An engine
failure is an error record, retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cai.config import doc
from cai.keys import model_name
from cai.pipeline.policy import pending, sample_key, sample_model, sample_sampling
from cai.pipeline.stage import (
    Stage,
    StageContext,
    check_sampling,
    every_round,
    generate_seeded,
    stage_records,
    usage,
)

if TYPE_CHECKING:
    from cai.record_loop import StageTally


@dataclass
class SampleStage:
    k: int = doc("responses sampled per prompt (>= 2); identical ones are dropped", 4)
    temperature: float = doc("sampling temperature, > 0 (greedy samples would all be equal)", 0.8)
    top_p: float = doc("nucleus sampling", 1.0)
    max_tokens: int = doc("most new tokens per response", 256)
    model: str | None = doc(
        "policy model spec for sampling (e.g. an SFT output folder); none: the recipe's", None
    )

    def validate(self) -> None:
        if self.k < 2:
            raise ValueError(
                f"k must be >= 2: a preference pair needs two responses (got {self.k})"
            )
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0: greedy samples of one prompt are identical "
                f"(got {self.temperature})"
            )
        check_sampling(self)


def distinct_responses(texts: Sequence[str]) -> tuple[list[str], int, int]:
    """(distinct non-empty stripped texts in order, duplicates dropped, empty ones dropped)."""
    out: list[str] = []
    duplicates = empty = 0
    for text in texts:
        text = text.strip()
        if not text:
            empty += 1
        elif text in out:
            duplicates += 1
        else:
            out.append(text)
    return out, duplicates, empty


def run(ctx: StageContext, tally: StageTally) -> None:
    """K responses per prompt; ``ctx.outputs["sample"]``: prompt key → sample record with
    >= 2 responses."""
    recipe = ctx.recipe
    stage = recipe.stages.sample
    sampling = sample_sampling(ctx)
    model = sample_model(ctx)
    keys = {p.key: sample_key(ctx, p) for p in ctx.prompts}

    def call(chunk, progress):
        records = []
        for p, seed, c in generate_seeded(ctx, model, chunk, keys, sampling, progress):
            responses, duplicates, empty = distinct_responses(
                [x.text for x in c.samples] if c.ok else []
            )
            skipped = None
            if c.ok and len(responses) < 2:
                skipped = (
                    f"{len(responses)} distinct non-empty response(s) of k={stage.k} "
                    f"({duplicates} duplicate(s), {empty} empty); a pair needs 2"
                )
            records.append(
                {
                    "key": keys[p.key],
                    "input_key": p.key,
                    "prompt": p.messages,
                    "responses": responses if c.ok else [],
                    "finish_reasons": [x.finish_reason for x in c.samples] if c.ok else [],
                    "duplicates_dropped": duplicates,
                    "empty_dropped": empty,
                    "skipped": skipped,
                    "model": model_name(model),
                    "seed": seed,
                    "usage": usage(c),
                    "meta": p.meta,
                    **ctx.round_key(),
                    "error": c.error,
                }
            )
        return records

    records = stage_records(
        ctx,
        "sample",
        ctx.prompts,
        key=lambda p: keys[p.key],
        call=call,
        tally=tally,
        label="sample",
    )
    done = {}
    for p in ctx.prompts:
        record = records.get(keys[p.key])
        if record is not None and record.get("error") is None and not record.get("skipped"):
            done[p.key] = record
    ctx.outputs["sample"] = done


def plan(ctx: StageContext) -> list[str]:
    stage = ctx.recipe.stages.sample
    unsampled, _ = pending(ctx)
    return [
        f"  sample: {unsampled} requests × k={stage.k} ({len(ctx.prompts) - unsampled} done; "
        f"model {sample_model(ctx)}, temperature {stage.temperature})"
    ]


def check_recipe(recipe: Any) -> None:
    """An online recipe samples from each round's policy, and judges and trains on the samples."""
    if recipe.online is None:
        return
    for name in ("judge", "train_dpo"):
        if getattr(recipe.stages, name, None) is None:
            raise ValueError(
                f"online: the rounds run sample → judge → train_dpo; add a {name} stage"
            )
    if recipe.stages.sample.model is not None:
        raise ValueError(
            "stages.sample.model: an online recipe samples from each round's policy; remove it"
        )


STAGE = Stage(
    name="sample",
    doc="K responses per prompt for preference pairs",
    options=SampleStage,
    run=run,
    plan=plan,
    starts=True,
    prompt_key=sample_key,
    models=lambda ctx: {"sampler": sample_model(ctx)},
    per_round=every_round,
    check_recipe=check_recipe,
)
