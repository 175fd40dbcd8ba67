"""The stage ``judge``: AI-judged preferences over every pair of each prompt's samples (RL-CAI),
and the preference export ``<run>/preferences/``.

    stages:
      judge: {ensemble: 1, pairs: all, min_margin: 0.0}

One record per pair of distinct responses (i < j in sample order; every pair, in both modes).
Key: (input, sample record key, both responses, the principles drawn for the pair with their
judge questions, the judge's settings and template text, judge model spec). Fields: ``key``,
``input_key``, ``sample_key``, ``pair`` ([i, j]), ``prompt``, ``response_a``, ``response_b``,
``judge_model`` and :class:`cai.judge.Preference` fields (``winner``, ``p_a``, ``p_a_first``,
``p_a_second``, ``consistent``, ``margin``, ``principles``, ``model``, ``rationales``, ``error``).
With ``guard`` and ``route``, a pair's principles come from ``route``'s list for the input
classifier's verdict on its prompt (``cai.judge.routing``); the key holds them as ever, so the
keys need the verdicts (one classifier pass over the prompts, before the keys).

The preference export (TRL's explicit-prompt conversational format) takes, per prompt, every
decided pair (``pairs: all``) or one pair (``pairs: best_worst``: the responses with the highest
and lowest mean win probability over all their pairs, labelled by their direct comparison; only
once every pair of the prompt is judged). Ties and pairs with ``|p - 0.5| < min_margin`` stay out
of the export (they stay in the store). Probabilities are exported to
:data:`cai.judge.label.LABEL_DECIMALS` decimals.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

from cai.config import ConfigError, FieldError, doc
from cai.constitution import load_constitution
from cai.data import PromptRecord
from cai.export import export_dataset
from cai.judge.judge import Judge
from cai.judge.keys import judge_key
from cai.judge.label import LABEL_DECIMALS, preference_fields
from cai.judge.pair import JudgePair
from cai.judge.routing import check_routing
from cai.judge.settings import JudgeSettings, check_fields, check_margin, route_pools
from cai.keys import model_key, model_name, record_key
from cai.layout import DATA_FILE, DATASET
from cai.pipeline.policy import pending, sample_key
from cai.pipeline.stage import (
    PipelineError,
    Stage,
    StageContext,
    every_round,
    stage_records,
)
from cai.stats import sigmoid

if TYPE_CHECKING:
    from cai.record_loop import StageTally


@dataclass
class JudgeStage:
    constitution: str | None = doc("constitution for the judge; none: the recipe's", None)
    pairs: Literal["all", "best_worst"] = doc(
        "all: every pair of distinct responses; best_worst: judge all pairs, export one pair per "
        "prompt (best vs worst by mean win probability)",
        "all",
    )
    ensemble: int = doc("distinct principles asked per pair, their probabilities averaged", 1)
    cot: bool = doc("write a rationale before the answer (slower; probabilities clamped)", False)
    cot_max_tokens: int = doc("most tokens of a CoT rationale", 192)
    clamp: list[float] | None = doc(
        "CoT only: the band each order's probability is clamped into; none: no clamp",
        factory=lambda: [0.4, 0.6],
    )
    tie_margin: float = doc("|p - 0.5| at or below this is a tie (never exported)", 0.0)
    min_margin: float = doc(
        "export only pairs with |p - 0.5| >= this; the rest stay in the run store", 0.0
    )
    few_shot: bool = doc("show the constitution's judge exemplars", True)
    model: str | None = doc("judge model spec; none: the recipe's model (its engine reused)", None)
    # The settings below default to None (their neutral value) so that runs recorded before
    # they existed keep their config hash.
    mode: Literal["pairwise", "pointwise"] | None = doc(
        "pairwise (none): both responses in one multiple-choice prompt, both orders; pointwise: "
        "each response scored alone with its principles' score questions",
        None,
    )
    calibration: Literal["none", "batch", "contextual"] | None = doc(
        "pairwise: subtract the option bias before the softmax (batch: the chunk's mean per "
        "order; contextual: a content-free 'N/A' response pair); none (default)",
        None,
    )
    temperature: float | None = doc(
        "pointwise: p = sigmoid(score difference / temperature); none: 1", None
    )
    length_coef: float | None = doc(
        "pointwise: each score less length_coef * ln(characters) (length control); none: 0", None
    )
    principles: list[str] | None = doc(
        "ask only these principle ids of the constitution; none: every judge principle", None
    )
    guard: str | None = doc(
        "an input classifier folder (`cai train classifier`, kind: input) whose verdict on each "
        "prompt picks the principles from route; none: no routing",
        None,
    )
    route: dict[str, list[str]] | None = doc(
        "with guard: the principle ids asked of a flagged prompt and of the others, "
        "{restricted: [...], permitted: [...]}, in place of principles",
        None,
    )

    @property
    def settings(self) -> dict[str, Any]:
        """mode, calibration, temperature and length_coef with their neutral values filled in."""
        return {
            "mode": self.mode or "pairwise",
            "calibration": self.calibration or "none",
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "length_coef": 0.0 if self.length_coef is None else self.length_coef,
        }

    def judge_fields(self, seed: int = 0) -> dict[str, Any]:
        """The JudgeSettings fields this stage sets (all but the constitution)."""
        return {
            "ensemble": self.ensemble,
            "seed": seed,
            "cot": self.cot,
            "cot_max_tokens": self.cot_max_tokens,
            "clamp": tuple(self.clamp) if self.clamp is not None else None,
            "tie_margin": self.tie_margin,
            "few_shot": self.few_shot,
            **self.settings,
            "principles": self.principles,
            **({} if self.guard is None and self.route is None else self.routing),
        }

    @property
    def routing(self) -> dict[str, Any]:
        """JudgeSettings' routing fields: guard, route and the guard's loader."""
        return {"guard": self.guard, "route": self.route, "load_guard": load_guard}

    def validate(self) -> None:
        # The judge's own checks (JudgeSettings'), at load time, so that an error names the
        # recipe's line (the routing settings' their own); those that need the constitution run
        # when the stage is prepared (route's ids: check_options, with the recipe's line).
        try:
            check_routing(self.guard, self.route, self.principles)
        except ValueError as e:
            field = next(f for f in ("principles", "route", "guard") if str(e).startswith(f))
            raise FieldError(field, str(e).removeprefix(field).lstrip(" :")) from None
        check_fields(SimpleNamespace(**self.judge_fields()))
        check_margin("min_margin", self.min_margin)


def load_guard(folder: str) -> Any:
    """The routing classifier, loaded on the first verdict the stage needs (torch then)."""
    from cai.classify import Guard

    return Guard(folder)


def check_options(recipe_data: Any, source: str) -> None:
    """At recipe load: ``route``'s ids against the judge's constitution (the stage's, else the
    recipe's), an error naming the file and line of ``route``. A constitution that does not
    load is reported when the stage is prepared."""
    options = recipe_data["stages"]["judge"]
    if not isinstance(options, dict) or options.get("route") is None:
        return
    try:
        constitution = load_constitution(
            options.get("constitution") or recipe_data.get("constitution") or "harmless"
        )
    except (ValueError, OSError):
        return
    try:
        route_pools(
            constitution, options["route"], options.get("ensemble", 1), options.get("mode") or ""
        )
    except ValueError as e:
        origin = getattr(options, "key_sources", {}).get("route")
        line = getattr(options, "key_lines", {}).get("route")
        loc = f"{source} ({origin})" if origin else f"{source}:{line}" if line else source
        raise ConfigError(f"{loc}: stages.judge.{e}") from None


def judge_model(ctx: StageContext) -> str:
    return ctx.recipe.stages.judge.model or ctx.recipe.model


def reward_labels(ctx: StageContext) -> str | None:
    """The reward model that labels this round's pairs instead of the judge (online.labels:
    reward_model, rounds 2 on: train_reward trains it in round 1), else None."""
    config, r = ctx.recipe.online, ctx.round
    if config is None or config.labels != "reward_model" or r is None or r < 2:
        return None
    return str(ctx.layout.model("reward"))


def labeller(ctx: StageContext) -> dict[str, str]:
    """The stage's model role: the judge, or the reward model labelling an online round."""
    spec = reward_labels(ctx)
    return {"judge": judge_model(ctx)} if spec is None else {"labeller": spec}


def prepare(ctx: StageContext) -> JudgeSettings:
    """The stage's judge settings (what its record keys hold, known without loading a model),
    checked once before the run: ``ensemble`` judge principles, a score question for each when
    pointwise."""
    stage = ctx.recipe.stages.judge
    try:
        return JudgeSettings(
            load_constitution(stage.constitution or ctx.recipe.constitution),
            **stage.judge_fields(ctx.recipe.seed),
        )
    except ValueError as e:
        raise PipelineError(f"stages.judge: {e}") from None


def pair_items(
    ctx: StageContext, settings: JudgeSettings, samples: dict[str, dict]
) -> dict[str, list[tuple[str, JudgePair, tuple[int, int]]]]:
    """prompt key → its pairs: (record key, JudgePair, (i, j)), in prompt then pair order."""
    spec = judge_model(ctx)
    reward_model = reward_labels(ctx)
    if reward_model is None:  # routed: every prompt's verdict in one pass, before the keys
        settings.verdicts([sample["prompt"] for sample in samples.values()])
    out: dict[str, list] = {}
    for prompt_key, sample in samples.items():
        pairs = []
        for i, j in itertools.combinations(range(len(sample["responses"])), 2):
            a, b = sample["responses"][i], sample["responses"][j]
            seed_key = record_key(
                input=prompt_key, sample=sample["key"], response_a=a, response_b=b
            )
            pair = {"input": prompt_key, "stage": "judge", "sample": sample["key"]}
            pair.update(response_a=a, response_b=b)
            if reward_model is not None:
                labelled_by = {"labeller": "reward_model", "tie_margin": settings.tie_margin}
                labelled_by.update(model_key("reward_model", reward_model))
            else:
                labelled_by = judge_key(settings, JudgePair(sample["prompt"], a, b, seed_key), spec)
            key = record_key(**pair, **labelled_by)
            pairs.append((key, JudgePair(sample["prompt"], a, b, key=seed_key), (i, j)))
        out[prompt_key] = pairs
    return out


def run(ctx: StageContext, tally: StageTally) -> None:
    """Judge every pair of each prompt's distinct samples, then export the preferences (unless
    this is a shard)."""
    stage = ctx.recipe.stages.judge
    samples = ctx.outputs["sample"]
    settings: JudgeSettings = ctx.prepared["judge"]
    items = pair_items(ctx, settings, samples)
    judge: Judge | None = None  # its engine loads on the first chunk with pairs to judge

    reward_model = reward_labels(ctx)
    scorer = RewardScorer(reward_model) if reward_model is not None else None

    def call(chunk, progress):
        nonlocal judge
        try:
            if scorer is not None:
                prefs = reward_model_labels(scorer, [c[2] for c in chunk], settings.tie_margin)
            else:
                if judge is None:
                    judge = Judge.from_settings(settings, ctx.engine_for(judge_model(ctx)))
                pairs = [c[2] for c in chunk]
                prefs = [p.to_dict() for p in judge.label(pairs, progress=progress)]
        except ValueError as e:  # a malformed pair fails its chunk, recorded, never dropped
            prefs = [_label_fields(error=str(e)) for _ in chunk]
        return [
            {
                "key": key,
                "input_key": prompt_key,
                "sample_key": samples[prompt_key]["key"],
                "pair": list(ij),
                "prompt": pair.prompt,
                "response_a": pair.response_a,
                "response_b": pair.response_b,
                "judge_model": model_name(reward_model or judge_model(ctx)),
                **ctx.round_key(),
                **pref,
            }
            for (prompt_key, key, pair, ij), pref in zip(chunk, prefs, strict=True)
        ]

    # Pointwise: a prompt's k samples take k × ensemble requests for its k(k-1)/2 pairs, one
    # request per pair and principle at k = 3 (the count is per record, so approximate).
    if reward_model:
        per_pair = 2
    elif stage.settings["mode"] == "pointwise":
        per_pair = stage.ensemble
    else:
        per_pair = 2 * stage.ensemble * (2 if stage.cot else 1)
    try:
        records = stage_records(
            ctx,
            "judge",
            [
                (prompt_key, key, pair, ij)
                for prompt_key, pairs in items.items()
                for key, pair, ij in pairs
            ],
            key=lambda item: item[1],
            call=call,
            tally=tally,
            label="judge",
            requests=lambda record: per_pair,
        )
    finally:
        if scorer is not None:
            scorer.close()
        settings.close()  # a routing classifier, if loaded (its verdicts stay)
    judged = {
        prompt_key: [records[key] for key, _, _ in pairs if key in records]
        for prompt_key, pairs in items.items()
    }
    if ctx.shard is None:
        out = export_preferences(ctx, samples, judged)
        if out is not None:
            line = f"preference dataset: {out}/{DATA_FILE} and {out}/{DATASET}"
            ctx.result.add("preferences", out, line)


class RewardScorer:
    """A trained reward model, loaded on its first chunk and kept for the stage's others."""

    def __init__(self, spec: str):
        self.spec = spec
        self._model = None

    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        if self._model is None:
            from cai.rewards.model import RewardModel

            self._model = RewardModel(self.spec)
        return self._model.score(conversations)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None


def reward_model_labels(
    scorer: RewardScorer, pairs: list[JudgePair], tie_margin: float
) -> list[dict]:
    """Soft labels from a trained reward model (the paper's preference model): p_a =
    sigmoid(r(A) - r(B)), one score per response, so both "orders" are the same and consistent."""
    rewards = scorer.score(
        [
            [*pair.prompt, {"role": "assistant", "content": response}]
            for pair in pairs
            for response in (pair.response_a, pair.response_b)
        ]
    )
    out = []
    for n, _ in enumerate(pairs):
        r_a, r_b = rewards[2 * n], rewards[2 * n + 1]
        if r_a is None or r_b is None:
            out.append(_label_fields(error="longer than the reward model's context: not scored"))
            continue
        p_a = sigmoid(r_a - r_b)
        margin = abs(p_a - 0.5)
        winner = "tie" if margin <= tie_margin else ("A" if p_a > 0.5 else "B")
        out.append(
            _label_fields(
                winner=winner,
                p_a=p_a,
                p_a_first=p_a,
                p_a_second=p_a,
                consistent=True,
                margin=margin,
                model=scorer.spec,
                rewards=[r_a, r_b],
            )
        )
    return out


def _label_fields(**fields: Any) -> dict[str, Any]:
    """A pair record's label fields (those of ``cai.judge.Preference``): ``fields`` over the
    empty label's, which a failed pair keeps (with its ``error``)."""
    empty = {
        "winner": None,
        "p_a": None,
        "p_a_first": None,
        "p_a_second": None,
        "consistent": None,
        "margin": None,
        "principles": [],
        "model": "",
        "error": None,
        "rationales": [],
    }
    return {**empty, **fields}


def _preference_row(
    ctx: StageContext,
    prompt: PromptRecord,
    sample: dict,
    record: dict,
    selection: str,
    **extra: Any,
) -> dict | None:
    """The export row of a judged pair of ``sample``'s responses, or None when it is a tie or
    below min_margin."""
    fields = preference_fields(record)
    if fields is None or record["margin"] < ctx.recipe.stages.judge.min_margin:
        return None
    row, judged = fields
    return {
        "prompt": prompt.messages,
        **row,
        "meta": {
            **prompt.meta,
            "source": "judge",
            "prompt_source": prompt.source,
            "input_key": prompt.key,
            "pair_key": record["key"],
            "selection": selection,
            **judged,
            "constitution": ctx.prepared["judge"].constitution.name,
            **ctx.round_key(),
            "judge_model": record["judge_model"],
            # From the record, as the judge model is: the export (what train_reward and
            # train_dpo fingerprint) must not change when the run directory moves.
            "sample_model": sample["model"],
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
    ctx: StageContext, samples: dict[str, dict], judged: dict[str, list[dict]]
) -> Path | None:
    """``<run>/preferences/`` from the judge records; None when no pair qualifies."""
    stage = ctx.recipe.stages.judge
    rows = []
    for prompt in ctx.prompts:
        records = judged.get(prompt.key)
        if not records:
            continue
        sample = samples[prompt.key]
        if stage.pairs == "all":
            rows.extend(_preference_row(ctx, prompt, sample, r, "all") for r in records)
        else:
            picked = best_worst(records, len(sample["responses"]))
            if picked is not None:
                direct, scores = picked
                rows.append(
                    _preference_row(
                        ctx,
                        prompt,
                        sample,
                        direct,
                        "best_worst",
                        mean_win_p=[round(p, LABEL_DECIMALS) for p in scores],
                    )
                )
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    out = ctx.layout.preferences(ctx.round)
    export_dataset(rows, out)
    return out


def done_pairs(ctx: StageContext) -> int:
    """Pairs of this run's (this round's) samples already judged under the keys the run would
    give them now, so that the plan counts as the run does: a changed judge setting or
    question re-judges, and the plan says so."""
    store, shard = ctx.store, ctx.shard
    if not store.stage_path("judge", shard).exists():
        return 0
    have = store.read_stage("sample", shard) if store.stage_path("sample", shard).exists() else {}
    samples = {}
    for p in ctx.prompts:
        record = have.get(sample_key(ctx, p))
        if record is not None and record.get("error") is None and not record.get("skipped"):
            samples[p.key] = record
    judged = store.read_stage("judge", shard)
    settings = ctx.prepared["judge"]
    try:
        return sum(
            key in judged and judged[key].get("error") is None
            for pairs in pair_items(ctx, settings, samples).values()
            for key, _, _ in pairs
        )
    finally:
        settings.close()  # routed: the keys needed the verdicts; the classifier goes


def plan(ctx: StageContext) -> list[str]:
    judge, shard = ctx.recipe.stages.judge, ctx.shard
    unsampled, pairs = pending(ctx)
    done = done_pairs(ctx)
    todo = max(pairs - done, 0)
    bound = "at most " if unsampled else ""
    reward_model = reward_labels(ctx)
    if reward_model is not None:
        labels = (
            f"  judge: {bound}{todo} pairs × 2 responses = {bound}{todo * 2} reward-model scores "
            f"({done} pairs done); labelled by the reward model {reward_model}"
        )
    else:
        if judge.settings["mode"] == "pointwise":
            # k responses of a prompt make k(k-1)/2 pairs; each response is scored once
            k = max(ctx.recipe.stages.sample.k, 2)
            score = todo * 2 // (k - 1) * judge.ensemble
            how = (
                f"{bound}{todo} pairs, pointwise: each response × {judge.ensemble} principles "
                f"scored once = {bound}{score} score requests"
            )
        else:
            score = todo * 2 * judge.ensemble
            cot = f" + {score} rationale generations" if judge.cot else ""
            how = (
                f"{bound}{todo} pairs × 2 orders × {judge.ensemble} principles = {bound}{score} "
                f"score requests{cot}"
            )
            if judge.settings["calibration"] != "none":
                how += f", {judge.settings['calibration']} calibration"
        routed = ""
        if judge.route is not None:
            routed = f"; principles routed by the input classifier {judge.guard}"
        labels = (
            f"  judge: {how} ({done} pairs done); constitution "
            f"{ctx.prepared['judge'].constitution.name!r}, model {judge_model(ctx)}{routed}"
        )
    return [
        labels,
        f"  export: {judge.pairs} pairs, min_margin {judge.min_margin} → "
        f"{ctx.layout.preferences(ctx.round)}" + (" (skipped for a shard)" if shard else ""),
    ]


def check_recipe(recipe: Any) -> None:
    online = recipe.online
    if (
        online is not None
        and online.labels == "reward_model"
        and recipe.stages.train_reward is None
    ):
        raise ValueError(
            "online.labels: reward_model needs a train_reward stage (round 1 trains it)"
        )


STAGE = Stage(
    name="judge",
    doc="RL-CAI: AI-judged preferences over the sampled pairs",
    options=JudgeStage,
    run=run,
    plan=plan,
    needs=("sample",),
    prepare=prepare,
    models=labeller,
    per_round=every_round,
    check_recipe=check_recipe,
    check_options=check_options,
)
