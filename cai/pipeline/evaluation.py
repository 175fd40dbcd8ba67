"""The stage ``evaluate``: the run's models side by side on held-out prompts (``cai.eval.run``).

    stages:
      evaluate:                       # any cai.eval.config.EvalConfig field but those below
        max_tokens: 128
        sets: {helpful: {path: helpful, skip: 80, limit: 20}}

The pipeline fills in ``models`` (``base``: the recipe's model, then ``sft``, ``dpo`` for each model
the recipe trains), the engine settings (the recipe's), and ``reward_model`` (the run's reward model
when a ``train_reward`` stage trains one). The judge defaults to the judge stage's model, else the
recipe's. Evaluation prompts that also appear among the recipe's sources are dropped (held out),
and counted in ``results.json``. The records go to ``<run>/stages/eval_*.jsonl`` (resumable, like
every stage), the results to ``<run>/eval/results.json``, and
the run report (``<run>/report.html``) follows.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from cai.pipeline import online_eval
from cai.pipeline.stage import Stage, StageContext, stage_config

if TYPE_CHECKING:
    from cai.eval.config import EvalConfig
    from cai.record_loop import StageTally

_MODELS = (("train_sft", "sft"), ("train_dpo", "dpo"), ("train_grpo", "grpo"))

_PLACEHOLDERS: dict[str, Any] = {
    "models": {"base": "-"},
    "backend": "auto",
    "dtype": None,
    "engine_options": {},
    "reward_model": None,
}
"""Values of the fields the pipeline sets, to check a recipe's options before the run."""
SET_BY_PIPELINE = tuple(_PLACEHOLDERS)
"""The EvalConfig fields that the pipeline sets itself (the run's models, the recipe's engine):
the stage's options must not."""


def models(ctx: StageContext) -> dict[str, str]:
    """Name → model spec of the models the stage compares: the base model, then each trained
    (with rounds: base, sft, then each round's policy)."""
    if ctx.rounds:
        return online_eval.eval_models(ctx)[0]
    out = {"base": ctx.recipe.model}
    for kind, name in _MODELS:
        if getattr(ctx.recipe.stages, kind) is not None:
            out[name] = str(ctx.layout.model(name))
    return out


def _config(options: Any, filled: dict[str, Any], source: str) -> EvalConfig:
    from cai.eval.config import EvalConfig

    return stage_config(
        EvalConfig,
        "evaluate",
        options,
        filled,
        source=source,
        why="the models are the run's own (base and each trained one), the engine is the recipe's",
    )


def check_options(recipe_data: Any, source: str) -> None:
    """Validate the evaluate stage's options with recipe line numbers before any work starts
    (``cai.pipeline.recipe.load_recipe`` calls this)."""
    options = recipe_data["stages"]["evaluate"]
    if isinstance(options, dict):
        _config(options, dict(_PLACEHOLDERS), source)


def eval_config(ctx: StageContext) -> EvalConfig:
    """The stage's EvalConfig with the run's models and engine settings filled in."""
    stages = ctx.recipe.stages
    engine = ctx.recipe.engine
    options: Any = stages.evaluate
    filled: dict[str, Any] = {
        "models": models(ctx),
        "backend": engine.backend,
        "dtype": engine.dtype,
        "engine_options": dict(engine.options),
        "reward_model": str(ctx.layout.model("reward"))
        if stages.train_reward is not None
        else None,
    }
    if ctx.rounds:
        filled["previous"] = online_eval.eval_models(ctx)[1]
    if "judge_model" not in options:  # the judge stage's model, else the recipe's
        filled["judge_model"] = (stages.judge and stages.judge.model) or ctx.recipe.model
    return _config(options, filled, "<recipe>")


def run(ctx: StageContext, tally: StageTally) -> None:
    """Evaluate the run's models into ``<run>/eval/results.json``."""
    from cai.eval.run import run_eval

    config = ctx.prepared["evaluate"]

    def engine_for(spec: str):
        ctx.release_engines({spec})  # one model in memory at a time (GPU memory)
        return ctx.engine_for(spec)

    extend = None
    if ctx.rounds:  # the rounds table joins results.json
        extend = functools.partial(online_eval.measure, ctx)
    ctx.release_engines()
    run_eval(
        config,
        ctx.layout.eval,
        engine_for=engine_for,
        exclude=ctx.source_keys,
        store=ctx.store,
        executor=ctx.executor,
        extend=extend,
        tally=tally,
    )
    results = ctx.layout.eval_results
    ctx.result.add("evaluation", results, f"evaluation: {results}")


def plan(ctx: StageContext) -> list[str]:
    """The models and, per store stage, the requests a fresh evaluation makes and the records
    already done (held-out prompts are loaded: no model)."""
    from cai.eval.config import load_sets
    from cai.eval.grading import GRADERS
    from cai.eval.metrics import COMPARED

    config: EvalConfig = ctx.prepared["evaluate"]
    store = ctx.store
    shard = " (skipped for a shard)" if ctx.shard else ""
    names = ", ".join(f"{name}={spec}" for name, spec in models(ctx).items())
    sets, excluded = load_sets(config, ctx.source_keys)
    prompts = {kind: len(records) for kind, records in sets.items()}
    answers = len(config.models) * sum(prompts.values())
    graded = len(config.models) * sum(prompts.get(g.kind, 0) for g in GRADERS.values())
    also = sum(other != config.baseline_name for other in config.previous.values())
    compared = (len(config.models) - 1 + also) * sum(prompts.get(kind, 0) for kind in COMPARED)

    def done(stage: str) -> int:
        return len(store.done_keys(stage)) if store.stage_path(stage).exists() else 0

    grade = f"{graded} answers × 2 orders = {2 * graded} score requests"
    if config.grade_calibration == "contextual":  # a content-free answer per prompt, both orders
        free = 2 * sum(prompts.get(g.kind, 0) for g in GRADERS.values())
        grade = f"{grade} + {free} content-free"
    compare = f"{compared} pairs × 2 orders = {2 * compared} score requests"
    if config.judge_mode == "pointwise":  # each answer scored once, whatever it is compared with
        scored = len(config.models) * sum(prompts.get(kind, 0) for kind in COMPARED)
        compare = f"{compared} pairs, pointwise: each answer scored once = {scored} score requests"
    lines = [
        f"  evaluate: {names} → {ctx.layout.eval}{shard}",
        f"    eval_generate: {answers} answers ({sum(prompts.values())} held-out prompts × "
        f"{len(config.models)} models, {excluded} training prompts left out; "
        f"{done('eval_generate')} done)",
        f"    eval_grade: {grade} at most ({done('eval_grade')} done)",
        f"    eval_compare: {compare} at most ({done('eval_compare')} done)",
    ]
    if config.reward_model:
        lines.append(f"    eval_reward: {answers} answers scored ({done('eval_reward')} done)")
    return lines


STAGE = Stage(
    name="evaluate",
    doc="held-out comparison of the base model and each trained one → <run>/eval/: "
    "cai.eval.config.EvalConfig fields (sets, max_tokens, judge_model, ...); {} for the defaults",
    options=dict[str, Any],
    run=run,
    plan=plan,
    check_options=check_options,
    prepare=eval_config,
    in_shard=False,
    ends_with_report=True,
)
