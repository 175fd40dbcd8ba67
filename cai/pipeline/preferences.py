"""The RL-CAI stages of a recipe: ``sample`` K responses per prompt, ``judge`` their pairs, and the
preference exports (``<run>/preferences/`` and, from critique→revision, ``<run>/revision_pairs/``).

Records (one jsonl per stage in the run store, sharded by ``input_key`` like every stage):

- ``sample``: one per prompt. Key: (input, stage, model spec, sampling with ``n=k``); seed from the
  key. ``responses`` holds the distinct non-empty responses (stripped, in sample order);
  ``duplicates_dropped`` / ``empty_dropped`` count what was dropped. A prompt left with fewer than
  two distinct responses is *skipped* (``skipped`` says why, ``error`` stays null): the seed comes
  from the key, so a re-run would draw the same samples (exactly on HF) and retrying is pointless.
  Raise ``k`` or ``temperature`` for new keys. An engine failure is an error record, retried.
- ``judge``: one per pair of distinct responses (i < j in sample order; every pair, in both
  modes). Key: (input, sample record key, both responses, the principles drawn for the pair with
  their judge questions, the judge's settings and template text, judge model spec). Fields:
  ``key``, ``input_key``, ``sample_key``, ``pair`` ([i, j]), ``prompt``, ``response_a``,
  ``response_b``, ``judge_model`` and :class:`cai.judge.Preference` fields (``winner``, ``p_a``,
  ``p_a_first``, ``p_a_second``, ``consistent``, ``margin``, ``principles``, ``model``,
  ``rationales``, ``error``).

The preference export (TRL's explicit-prompt conversational format) takes, per prompt, every
decided pair (``pairs: all``) or one pair (``pairs: best_worst``: the responses with the highest
and lowest mean win probability over all their pairs, labelled by their direct comparison; only
once every pair of the prompt is judged). Ties and pairs with ``|p - 0.5| < min_margin`` stay out
of the export (they stay in the store).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

from cai.critique import revision_flags
from cai.data import PromptRecord, export_dataset
from cai.engine import Engine, Sampling
from cai.judge import Judge, JudgePair
from cai.keys import record_key, revision_key, seed_for
from cai.pipeline import training

if TYPE_CHECKING:
    from cai.pipeline.run import Runner, StageReport


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _LazyEngine(Engine):
    """An engine built on first use, so that a judge stage with nothing left to do loads no
    model (the judge needs an Engine to exist before any key can be computed)."""

    def __init__(self, factory: Callable[[], Engine]):
        self._factory = factory
        self._engine: Engine | None = None

    @property
    def inner(self) -> Engine:
        if self._engine is None:
            self._engine = self._factory()
        return self._engine

    @property
    def backend(self) -> str:  # type: ignore[override]
        return self.inner.backend

    @property
    def model_name(self) -> str:  # type: ignore[override]
        return self.inner.model_name

    def generate(self, conversations, sampling=Sampling(), *, prefixes=None, progress=False):
        return self.inner.generate(conversations, sampling, prefixes=prefixes, progress=progress)

    def score(self, conversations, options, *, prefixes=None, progress=False):
        return self.inner.score(conversations, options, prefixes=prefixes, progress=progress)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


# ---- sample -------------------------------------------------------------------------------------


def sample_model(runner: Runner) -> str:
    """The stage's model, else the SFT model when the recipe trains one, else the recipe's."""
    return runner.recipe.stages.sample.model or training.policy_after_sft(runner)


def judge_model(runner: Runner) -> str:
    return runner.recipe.stages.judge.model or runner.recipe.model


def sample_sampling(runner: Runner) -> Sampling:
    stage = runner.recipe.stages.sample
    return Sampling(
        n=stage.k, temperature=stage.temperature, top_p=stage.top_p, max_tokens=stage.max_tokens
    )


def sample_key(runner: Runner, prompt: PromptRecord) -> str:
    return record_key(
        input=prompt.key,
        stage="sample",
        model=sample_model(runner),
        sampling=sample_sampling(runner).to_dict(),
        **revision_key(sample_model(runner)),
    )


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


def run_sample(runner: Runner, report: StageReport) -> dict[str, dict]:
    """K responses per prompt; returns prompt key → sample record with >= 2 responses."""
    recipe = runner.recipe
    stage = recipe.stages.sample
    sampling = sample_sampling(runner)
    keys = {p.key: sample_key(runner, p) for p in runner.prompts}
    start = time.perf_counter()
    with runner.store.writer("sample", runner.shard) as writer:
        todo = [p for p in runner.prompts if keys[p.key] not in writer]
        report.done_before = len(runner.prompts) - len(todo)
        if todo:
            engine = runner.engine_for(sample_model(runner))
        for n, chunk in enumerate(_chunks(todo, recipe.chunk_size)):
            params = [replace(sampling, seed=seed_for(keys[p.key], recipe.seed)) for p in chunk]
            label = f"sample {n * recipe.chunk_size + len(chunk)}/{len(todo)}"
            completions = engine.generate([p.messages for p in chunk], params, progress=label)
            for p, s, c in zip(chunk, params, completions, strict=True):
                usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
                responses, duplicates, empty = distinct_responses(
                    [x.text for x in c.samples] if c.ok else []
                )
                skipped = None
                if c.ok and len(responses) < 2:
                    skipped = (
                        f"{len(responses)} distinct non-empty response(s) of k={stage.k} "
                        f"({duplicates} duplicate(s), {empty} empty); a pair needs 2"
                    )
                writer.write(
                    {
                        "key": keys[p.key],
                        "input_key": p.key,
                        "prompt": p.messages,
                        "responses": responses if c.ok else [],
                        "finish_reasons": [x.finish_reason for x in c.samples] if c.ok else [],
                        "duplicates_dropped": duplicates,
                        "empty_dropped": empty,
                        "skipped": skipped,
                        "model": sample_model(runner),
                        "seed": s.seed,
                        "usage": usage,
                        "meta": p.meta,
                        "error": c.error,
                    }
                )
                report.records += 1
                report.requests += 1
                report.errors += not c.ok
                report.skipped += skipped is not None
                report.add_usage(usage)
            writer.flush()
    report.seconds = time.perf_counter() - start
    records = runner.store.read_stage("sample", runner.shard)
    done = {}
    for p in runner.prompts:
        record = records.get(keys[p.key])
        if record is not None and record.get("error") is None and not record.get("skipped"):
            done[p.key] = record
    return done


# ---- judge --------------------------------------------------------------------------------------


def make_judge(runner: Runner) -> Judge:
    stage = runner.recipe.stages.judge
    spec = judge_model(runner)
    engine = runner.injected_engine or _LazyEngine(lambda: runner.engine_for(spec))
    return Judge(
        engine,
        runner.judge_constitution,
        ensemble=stage.ensemble,
        seed=runner.recipe.seed,
        cot=stage.cot,
        cot_max_tokens=stage.cot_max_tokens,
        clamp=tuple(stage.clamp) if stage.clamp is not None else None,
        tie_margin=stage.tie_margin,
        few_shot=stage.few_shot,
    )


def judge_config(judge: Judge) -> dict[str, Any]:
    """The judge's settings that define its labels (not the engine's runtime description)."""
    described = {
        "judge": type(judge).__name__,
        "constitution": judge.constitution.name,
        "constitution_version": judge.constitution.version,
        "template_text": judge.template.source,
        "ensemble": judge.ensemble,
        "seed": judge.seed,
        "few_shot": judge.few_shot,
        "cot": judge.cot,
        "cot_max_tokens": judge.cot_max_tokens if judge.cot else None,
        "clamp": list(judge.clamp) if judge.cot and judge.clamp else None,
        "tie_margin": judge.tie_margin,
    }
    return described


def pair_items(
    runner: Runner, judge: Judge, samples: dict[str, dict]
) -> dict[str, list[tuple[str, JudgePair, tuple[int, int]]]]:
    """prompt key → its pairs: (record key, JudgePair, (i, j)), in prompt then pair order."""
    config = judge_config(judge)
    spec = judge_model(runner)
    out: dict[str, list] = {}
    for prompt_key, sample in samples.items():
        pairs = []
        for i, j in itertools.combinations(range(len(sample["responses"])), 2):
            a, b = sample["responses"][i], sample["responses"][j]
            seed_key = record_key(
                input=prompt_key, sample=sample["key"], response_a=a, response_b=b
            )
            principles = judge.principles_for(seed_key)
            key = record_key(
                input=prompt_key,
                stage="judge",
                sample=sample["key"],
                response_a=a,
                response_b=b,
                principles=[[p.id, p.judge] for p in principles],
                judge=config,
                model=spec,
            )
            pairs.append((key, JudgePair(sample["prompt"], a, b, key=seed_key), (i, j)))
        out[prompt_key] = pairs
    return out


def run_judge(runner: Runner, samples: dict[str, dict], report: StageReport) -> dict[str, list]:
    """Judge every pair of each prompt's distinct samples; returns prompt key → its pair records
    (the latest for each pair: done, or an error), in pair order."""
    stage = runner.recipe.stages.judge
    judge = make_judge(runner)
    items = pair_items(runner, judge, samples)
    per_pair = 2 * stage.ensemble * (2 if stage.cot else 1)
    start = time.perf_counter()
    with runner.store.writer("judge", runner.shard) as writer:
        todo = [
            (prompt_key, key, pair, ij)
            for prompt_key, pairs in items.items()
            for key, pair, ij in pairs
            if key not in writer
        ]
        report.done_before = sum(len(p) for p in items.values()) - len(todo)
        size = runner.recipe.chunk_size
        for n, chunk in enumerate(_chunks(todo, size)):
            label = f"judge {n * size + len(chunk)}/{len(todo)}"
            try:
                prefs = [p.to_dict() for p in judge.label([c[2] for c in chunk], progress=label)]
            except ValueError as e:  # a malformed pair fails its chunk, recorded, never dropped
                prefs = [_failed(str(e)) for _ in chunk]
            for (prompt_key, key, pair, ij), pref in zip(chunk, prefs, strict=True):
                writer.write(
                    {
                        "key": key,
                        "input_key": prompt_key,
                        "sample_key": samples[prompt_key]["key"],
                        "pair": list(ij),
                        "prompt": pair.prompt,
                        "response_a": pair.response_a,
                        "response_b": pair.response_b,
                        "judge_model": judge_model(runner),
                        **pref,
                    }
                )
                report.records += 1
                report.requests += per_pair
                report.errors += pref["error"] is not None
            writer.flush()
    report.seconds = time.perf_counter() - start
    records = runner.store.read_stage("judge", runner.shard)
    return {
        prompt_key: [records[key] for key, _, _ in pairs if key in records]
        for prompt_key, pairs in items.items()
    }


def _failed(error: str) -> dict[str, Any]:
    return {
        "winner": None,
        "p_a": None,
        "p_a_first": None,
        "p_a_second": None,
        "consistent": None,
        "margin": None,
        "principles": [],
        "model": "",
        "error": error,
        "rationales": [],
    }


# ---- exports ------------------------------------------------------------------------------------


def _preference_row(
    runner: Runner, prompt: PromptRecord, record: dict, selection: str, **extra: Any
) -> dict | None:
    """The export row of a judged pair, or None when it is a tie or below min_margin."""
    stage = runner.recipe.stages.judge
    if record.get("error") is not None or record["winner"] not in ("A", "B"):
        return None
    if record["margin"] < stage.min_margin:
        return None
    a_wins = record["winner"] == "A"
    chosen, rejected = (
        (record["response_a"], record["response_b"])
        if a_wins
        else (record["response_b"], record["response_a"])
    )

    def towards_chosen(p: float) -> float:
        return p if a_wins else 1 - p

    return {
        "prompt": prompt.messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": towards_chosen(record["p_a"]),
        "meta": {
            **prompt.meta,
            "source": "judge",
            "prompt_source": prompt.source,
            "input_key": prompt.key,
            "pair_key": record["key"],
            "selection": selection,
            "principles": record["principles"],
            "consistent": record["consistent"],
            "p_chosen_first": towards_chosen(record["p_a_first"]),
            "p_chosen_second": towards_chosen(record["p_a_second"]),
            "margin": record["margin"],
            "constitution": runner.judge_constitution.name,
            "judge_model": record["judge_model"],
            "sample_model": sample_model(runner),
            **extra,
        },
    }


def best_worst(records: list[dict], count: int) -> tuple[dict, list[float]] | None:
    """The direct comparison of the best and the worst response by mean win probability over
    all pairs, and those means; None unless every pair is judged and best != worst."""
    if len(records) != math.comb(count, 2) or any(r.get("error") for r in records):
        return None
    wins: list[list[float]] = [[] for _ in range(count)]
    for r in records:
        i, j = r["pair"]
        wins[i].append(r["p_a"])
        wins[j].append(1 - r["p_a"])
    scores = [fmean(w) for w in wins]
    best = max(range(count), key=lambda i: scores[i])
    worst = min(range(count), key=lambda i: scores[i])
    if best == worst:
        return None
    pair = sorted((best, worst))
    [direct] = [r for r in records if r["pair"] == pair]
    return direct, scores


def export_preferences(
    runner: Runner, samples: dict[str, dict], judged: dict[str, list[dict]]
) -> Path | None:
    """``<run>/preferences/`` from the judge records; None when no pair qualifies."""
    stage = runner.recipe.stages.judge
    rows = []
    for prompt in runner.prompts:
        records = judged.get(prompt.key)
        if not records:
            continue
        if stage.pairs == "all":
            rows.extend(_preference_row(runner, prompt, r, "all") for r in records)
        else:
            picked = best_worst(records, len(samples[prompt.key]["responses"]))
            if picked is not None:
                direct, scores = picked
                rows.append(
                    _preference_row(runner, prompt, direct, "best_worst", mean_win_p=scores)
                )
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    out = runner.run_dir / "preferences"
    export_dataset(rows, out)
    return out


def export_revision_pairs(runner: Runner, chains: dict[str, list[dict]]) -> Path | None:
    """``<run>/revision_pairs/``: the final revision chosen over the initial response
    (``p_chosen`` 1.0), leaving out chains whose final answer is empty or unchanged."""
    rows = []
    for prompt in runner.prompts:
        chain = chains.get(prompt.key)
        if not chain:
            continue
        initial, last = chain[0]["response"], chain[-1]
        final = last["response"] if "empty" in last["flags"] else last["revision"]
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
                    "constitution": runner.constitution.name,
                    "model": runner.recipe.model,
                },
            }
        )
    if not rows:
        return None
    out = runner.run_dir / "revision_pairs"
    export_dataset(rows, out)
    return out


# ---- plan ---------------------------------------------------------------------------------------


def plan_lines(runner: Runner) -> list[str]:
    stages = runner.recipe.stages
    store, shard = runner.store, runner.shard
    lines = []
    if stages.sample is None:
        return lines
    k = stages.sample.k
    have = store.read_stage("sample", shard) if store.stage_path("sample", shard).exists() else {}
    pairs, unsampled = 0, 0
    for p in runner.prompts:
        record = have.get(sample_key(runner, p))
        if record is None or record.get("error") is not None:
            unsampled += 1
            pairs += math.comb(k, 2)
        elif not record.get("skipped"):
            pairs += math.comb(len(record["responses"]), 2)
    lines.append(
        f"  sample: {unsampled} requests × k={k} ({len(runner.prompts) - unsampled} done; "
        f"model {sample_model(runner)}, temperature {stages.sample.temperature})"
    )
    judge = stages.judge
    if judge is None:
        return lines
    done = len(store.done_keys("judge", shard)) if store.stage_path("judge", shard).exists() else 0
    todo = max(pairs - done, 0)
    score = todo * 2 * judge.ensemble
    bound = "at most " if unsampled else ""
    cot = f" + {score} rationale generations" if judge.cot else ""
    lines.append(
        f"  judge: {bound}{todo} pairs × 2 orders × {judge.ensemble} principles = {bound}{score} "
        f"score requests{cot} ({done} pairs done); constitution "
        f"{runner.judge_constitution.name!r}, model {judge_model(runner)}"
    )
    lines.append(
        f"  export: {judge.pairs} pairs, min_margin {judge.min_margin} → "
        f"{runner.run_dir / 'preferences'}" + (" (skipped for a shard)" if shard else "")
    )
    return lines
