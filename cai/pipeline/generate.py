"""The stage ``generate``: the policy model's initial response to every prompt.

    stages:
      generate: {max_tokens: 256, temperature: 0.0}

One record per prompt. Key: (input key, stage, model spec, sampling); the sampling seed derives
from the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cai.config import doc
from cai.pipeline.policy import generate_key, generate_sampling
from cai.pipeline.stage import (
    Stage,
    StageContext,
    check_sampling,
    generate_seeded,
    stage_records,
    usage,
)

if TYPE_CHECKING:
    from cai.record_loop import StageTally


@dataclass
class GenerateStage:
    max_tokens: int = doc("most new tokens per response", 256)
    temperature: float = doc("0 is greedy", 0.0)
    top_p: float = doc("nucleus sampling", 1.0)

    def validate(self) -> None:
        check_sampling(self)


def run(ctx: StageContext, tally: StageTally) -> None:
    """Initial responses; leaves prompt key → generate record (done ones only) in
    ``ctx.outputs["generate"]``."""
    base = generate_sampling(ctx)
    keys = {p.key: generate_key(ctx, p) for p in ctx.prompts}

    def call(chunk, progress):
        done = generate_seeded(ctx, ctx.recipe.model, chunk, keys, base, progress)
        records = []
        for p, seed, c in done:
            records.append(
                {
                    "key": keys[p.key],
                    "input_key": p.key,
                    "prompt": p.messages,
                    "response": c.samples[0].text if c.ok else None,
                    "finish_reason": c.samples[0].finish_reason if c.ok else None,
                    "seed": seed,
                    "usage": usage(c),
                    "meta": p.meta,
                    "error": c.error,
                }
            )
        return records

    records = stage_records(
        ctx,
        "generate",
        ctx.prompts,
        key=lambda p: keys[p.key],
        call=call,
        tally=tally,
        label="generate",
    )
    ctx.outputs["generate"] = {
        p.key: records[keys[p.key]]
        for p in ctx.prompts
        if keys[p.key] in records and records[keys[p.key]].get("error") is None
    }


def plan(ctx: StageContext) -> list[str]:
    store, shard = ctx.store, ctx.shard
    done = (
        store.done_keys("generate", shard)
        if store.stage_path("generate", shard).exists()
        else set()
    )
    todo = sum(generate_key(ctx, p) not in done for p in ctx.prompts)
    return [f"  generate: {todo} requests ({len(ctx.prompts) - todo} done)"]


STAGE = Stage(
    name="generate",
    doc="initial responses from the policy model",
    options=GenerateStage,
    run=run,
    plan=plan,
    starts=True,
    prompt_key=generate_key,
    models=lambda ctx: {"policy": ctx.recipe.model},
)
