"""The stage ``critique_revise``: SL-CAI critique→revision rounds over the generated responses,
and the SFT export.

    stages:
      critique_revise: {rounds: 4, export: last, export_pairs: false}

One record per (prompt, round). Each round's key chains to the previous record's key, so a changed
upstream record (say a regenerated response) gives new keys for every later round. A key holds the
principle's id, the constitution's name and, where they differ from the shipped constitution's,
the text its prompts render from the constitution (``cai.critique.text_key``): editing a
principle's requests critiques again the rounds that drew it and the rounds after them. After the
rounds (not for a shard), ``<run>/sft/`` holds the SFT dataset and, with ``export_pairs``,
``<run>/revision_pairs/`` the final revision chosen over the initial response.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cai.config import FieldError, doc
from cai.constitution import Constitution, load_constitution
from cai.critique import (
    CritiqueReviser,
    RoundInput,
    critique_principle,
    load_templates,
    next_response,
    revision_flags,
    template_text,
    text_key,
)
from cai.engine import Sampling
from cai.export import export_dataset
from cai.keys import record_key
from cai.layout import DATA_FILE, DATASET
from cai.pipeline.policy import generate_key
from cai.pipeline.stage import Stage, StageContext, check_sampling, stage_records

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cai.constitution import Principle
    from cai.data import PromptRecord
    from cai.record_loop import StageTally


@dataclass
class CritiqueReviseStage:
    rounds: int = doc("critique→revision rounds (the paper uses 4)", 4)
    constitution: str | None = doc("constitution for this stage; none: the recipe's", None)
    critique_template: str = doc("template for the critique request", "critique")
    revise_template: str = doc("template for the revision request", "revise")
    few_shot: bool = doc("include the constitution's critique exemplars", True)
    max_tokens: int = doc("most tokens of a critique and of a revision", 256)
    temperature: float = doc("0 is greedy", 0.0)
    top_p: float = doc("nucleus sampling", 1.0)
    export: Literal["last", "all"] = doc(
        "SFT examples from the last revision or from every round", "last"
    )
    export_pairs: bool = doc(
        "also export <run>/revision_pairs/: final revision chosen over the initial response", False
    )

    def validate(self) -> None:
        if self.rounds < 1:
            raise FieldError("rounds", f"must be >= 1 (got {self.rounds})")
        check_sampling(self)


def prepare(ctx: StageContext) -> Constitution:
    """The stage's constitution; the templates are loaded and test-rendered to fail before any
    work."""
    stage = ctx.recipe.stages.critique_revise
    constitution = load_constitution(stage.constitution or ctx.recipe.constitution)
    load_templates(constitution, stage.critique_template, stage.revise_template, stage.few_shot)
    return constitution


def _sampling(ctx: StageContext) -> Sampling:
    stage = ctx.recipe.stages.critique_revise
    return Sampling(max_tokens=stage.max_tokens, temperature=stage.temperature, top_p=stage.top_p)


@dataclass(frozen=True)
class KeyParts:
    """The parts of every round's key that depend on the stage alone, made once per run."""

    templates: str
    """The critique and revise templates' text (``cai.critique.template_text``)."""
    texts: dict[str, dict[str, str]]
    """Principle id → the text its prompts render from the constitution
    (``cai.critique.text_key``)."""


def key_parts(ctx: StageContext) -> KeyParts:
    stage = ctx.recipe.stages.critique_revise
    constitution = ctx.prepared["critique_revise"]
    templates = load_templates(
        constitution, stage.critique_template, stage.revise_template, stage.few_shot
    )
    return KeyParts(
        template_text(*templates),
        {p.id: text_key(constitution, p, stage.few_shot) for p in constitution.critique_principles},
    )


def round_key(
    ctx: StageContext, parts: KeyParts, prompt_key: str, previous: str, r: int
) -> tuple[str, Principle]:
    """The key of a prompt's round ``r`` record, chained to ``previous`` (the key of the round
    before, or of the prompt's generate record), and the principle it critiques by (sampled from
    a seed of ``previous``)."""
    stage = ctx.recipe.stages.critique_revise
    constitution = ctx.prepared["critique_revise"]
    principle = critique_principle(constitution, f"{previous}/round{r}", ctx.recipe.seed)
    key = record_key(
        input=prompt_key,
        stage="critique_revise",
        round=r,
        previous=previous,
        principle=principle.id,
        constitution=constitution.name,
        templates=parts.templates,
        few_shot=stage.few_shot,
        model=ctx.recipe.model,
        sampling=_sampling(ctx).to_dict(),
        **parts.texts[principle.id],
    )
    return key, principle


def run(ctx: StageContext, tally: StageTally) -> None:
    """Critique→revision rounds, then the exports (of the complete chains), unless this is a
    shard. Its batch function is nested (~85 lines in all): a chain's rounds close over the
    stage's settings, constitution and seeds, as the record loop's stages do."""
    stage = ctx.recipe.stages.critique_revise
    constitution = ctx.prepared["critique_revise"]
    responses = ctx.outputs["generate"]
    sampling = _sampling(ctx)
    parts = key_parts(ctx)

    @functools.cache
    def reviser() -> CritiqueReviser:  # the engine loads only when a round has work
        return CritiqueReviser(
            ctx.engine_for(ctx.recipe.model),
            constitution,
            critique_template=stage.critique_template,
            revise_template=stage.revise_template,
            few_shot=stage.few_shot,
            sampling=sampling,
            seed=ctx.recipe.seed,
        )

    chains: dict[str, list[dict]] = {key: [] for key in responses}
    previous = {key: (rec["key"], rec["response"]) for key, rec in responses.items()}
    for r in range(1, stage.rounds + 1):
        items = []
        for prompt_key, (prev_key, response) in previous.items():
            key, principle = round_key(ctx, parts, prompt_key, prev_key, r)
            prompt = responses[prompt_key]["prompt"]
            items.append((prompt_key, RoundInput(key, prompt, response, principle)))

        def call(chunk, progress, r=r):
            rounds = reviser().run_round([it for _, it in chunk], progress=progress)
            return [
                {"key": item.key, "input_key": prompt_key, "round": r, "prompt": item.prompt}
                | res.to_dict()
                for (prompt_key, item), res in zip(chunk, rounds, strict=True)
            ]

        records = stage_records(
            ctx,
            "critique_revise",
            items,
            key=lambda it: it[1].key,
            call=call,
            tally=tally,
            label=f"round {r}/{stage.rounds}",
            requests=lambda rec: 1 + (rec["error"] is None or rec["error"].startswith("revision")),
        )
        survivors = {}
        for prompt_key, item in items:
            record = records.get(item.key)
            if record is None or record.get("error") is not None:
                continue  # the chain stops here; a re-run retries it
            chains[prompt_key].append(record)
            survivors[prompt_key] = (record["key"], next_response(record))
        previous = survivors
    final = {key: chain for key, chain in chains.items() if len(chain) == stage.rounds}
    if ctx.shard is None:
        sft = export_sft(ctx, final)
        if sft is not None:
            ctx.result.add("sft", sft, f"SFT dataset: {sft}/{DATA_FILE} and {sft}/{DATASET}")
        pairs = export_revision_pairs(ctx, final) if stage.export_pairs else None
        if pairs is not None:
            line = f"revision pairs: {pairs}/{DATA_FILE} and {pairs}/{DATASET}"
            ctx.result.add("revision_pairs", pairs, line)


def _walk(
    ctx: StageContext, chains: dict[str, list[dict]]
) -> Iterator[tuple[PromptRecord, list[dict]]]:
    """(prompt, its complete chain of round records) in prompt order: what the exports walk."""
    for prompt in ctx.prompts:
        chain = chains.get(prompt.key)
        if chain:
            yield prompt, chain


def export_sft(ctx: StageContext, chains: dict[str, list[dict]]) -> Path | None:
    """``<run>/sft/``: the SFT dataset from the complete chains; None when there is none."""
    stage = ctx.recipe.stages.critique_revise
    records = []
    for prompt, chain in _walk(ctx, chains):
        initial = chain[0]["response"]
        picked = chain if stage.export == "all" else chain[-1:]
        for record in picked:
            answer = next_response(record)
            records.append(
                {
                    "messages": [*prompt.messages, {"role": "assistant", "content": answer}],
                    "meta": {
                        "input_key": prompt.key,
                        "source": prompt.source,
                        "round": record["round"],
                        "rounds": stage.rounds,
                        "principles": [c["principle"] for c in chain[: record["round"]]],
                        "critiques": [c["critique"] for c in chain[: record["round"]]],
                        "flags": sorted({f for c in chain[: record["round"]] for f in c["flags"]}),
                        "initial_response": initial,
                        "constitution": ctx.prepared["critique_revise"].name,
                        "model": ctx.recipe.model,
                        **prompt.meta,
                    },
                }
            )
    if not records:
        return None
    out = ctx.layout.sft
    export_dataset(records, out)
    return out


def export_revision_pairs(ctx: StageContext, chains: dict[str, list[dict]]) -> Path | None:
    """``<run>/revision_pairs/``: the final revision chosen over the initial response
    (``p_chosen`` 1.0), leaving out chains whose final answer is empty or unchanged."""
    rows = []
    for prompt, chain in _walk(ctx, chains):
        initial, final = chain[0]["response"], next_response(chain[-1])
        if not final.strip() or not initial.strip() or revision_flags(final, initial):
            continue
        rows.append(
            {
                "prompt": prompt.messages,
                "chosen": [{"role": "assistant", "content": final}],
                "rejected": [{"role": "assistant", "content": initial}],
                "p_chosen": 1.0,
                "meta": {
                    **prompt.meta,
                    "source": "revision",
                    "prompt_source": prompt.source,
                    "input_key": prompt.key,
                    "rounds": len(chain),
                    "principles": [c["principle"] for c in chain],
                    "flags": sorted({f for c in chain for f in c["flags"]}),
                    "constitution": ctx.prepared["critique_revise"].name,
                    "model": ctx.recipe.model,
                },
            }
        )
    if not rows:
        return None
    out = ctx.layout.revision_pairs
    export_dataset(rows, out)
    return out


def done_records(ctx: StageContext) -> int:
    """How many of the stage's records are done under today's keys: each prompt's chain of
    rounds, keyed from its generate record's key (``cai.pipeline.policy.generate_key``)."""
    store, shard = ctx.store, ctx.shard
    if not store.stage_path("critique_revise", shard).exists():
        return 0
    done_keys = store.done_keys("critique_revise", shard)
    parts = key_parts(ctx)
    done = 0
    for p in ctx.prompts:
        previous = generate_key(ctx, p)
        for r in range(1, ctx.recipe.stages.critique_revise.rounds + 1):
            previous, _ = round_key(ctx, parts, p.key, previous, r)
            done += previous in done_keys
    return done


def plan(ctx: StageContext) -> list[str]:
    stage = ctx.recipe.stages.critique_revise
    shard = ctx.shard
    done = done_records(ctx)
    total = len(ctx.prompts) * stage.rounds
    constitution = ctx.prepared["critique_revise"].name
    lines = [
        f"  critique_revise: {stage.rounds} rounds × {len(ctx.prompts)} prompts = {total} records, "
        f"{2 * (total - done)} requests at most ({done} records done); constitution "
        f"{constitution!r}",
        f"  export: {stage.export} → {ctx.layout.sft}"
        + (" (skipped for a shard)" if shard else ""),
    ]
    if stage.export_pairs:
        lines.append(
            f"  export: revision pairs → {ctx.layout.revision_pairs}"
            + (" (skipped for a shard)" if shard else "")
        )
    return lines


STAGE = Stage(
    name="critique_revise",
    doc="SL-CAI critique→revision rounds",
    options=CritiqueReviseStage,
    run=run,
    plan=plan,
    needs=("generate",),
    prepare=prepare,
    models=lambda ctx: {"policy": ctx.recipe.model},
)
