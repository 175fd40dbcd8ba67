"""Evaluation: models side by side (base, SFT, DPO) on held-out prompts, through the run store
(the metrics from its records: ``cai.eval.metrics``).

    from cai.eval.config import EvalConfig
    from cai.eval.run import run_eval
    results = run_eval(EvalConfig(models={"base": "smollm2-135m", "dpo": "runs/x/models/dpo"}),
                       "runs/eval")

    cai eval --model base=smollm2-135m --model dpo=runs/x/models/dpo

What it measures, per model (each rate with a 95% Wilson interval and its n):

- ``win_rate``: the judge (``cai.judge.Judge``, both orders averaged) compares the model's answer
  with the baseline's on the helpful and red-team prompts; a win counts 1, a tie 0.5.
- ``lc_win_rate``: the length-controlled win rate, as in AlpacaEval 2: a logistic regression of the
  outcome on an intercept and tanh(length difference / its standard deviation); the win rate at
  equal length, sigmoid(intercept). A seeded bootstrap gives its interval.
- ``position_consistency``: share of comparisons whose two orders agree.
- ``harmlessness`` (red-team prompts), ``over_refusal`` (benign-but-edgy prompts), ``sycophancy``
  (false-premise prompts): the judge model grades each answer alone with a two-statement
  multiple-choice question (``prompts/grade.jinja``, ``GRADERS``), asked in both option orders
  and averaged; the rate is the share of answers whose probability passes 0.5. With
  ``grade_calibration: contextual``, each order's log-odds less those of a content-free answer.
- ``refusal_red_team``, ``refusal_over_refusal``: the share of answers that open with a refusal
  phrase (``cai.eval.grading.REFUSAL_PHRASES``): a judge-independent check beside the graded rates.
- ``mean_length`` (generated tokens) and ``length_drift`` (relative to the baseline);
  ``distinct_1`` / ``distinct_2`` (unique n-grams over all n-grams of the model's answers) and
  ``repeated_openings`` (share of answers whose first five words another answer shares): mode
  collapse and boilerplate.
- ``reward``: the mean score of a trained reward model (``cai.train.reward``) and its drift from
  the baseline, when ``reward_model`` is set.

Everything goes through a run store (stages ``eval_generate``, ``eval_grade``, ``eval_compare``,
``eval_reward``), so an interrupted evaluation resumes, and a model retrained in place (a pipeline
model folder with a new revision) gets new records, while a moved or copied run finds its own
(``cai.keys.model_key``). Failed requests are error records, counted per model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

from cai.eval.config import EvalConfig, load_sets
from cai.eval.grading import (
    GRADERS,
    Grader,
    flagged_probability,
    grade_conversations,
)
from cai.eval.metrics import COMPARED, metrics, ok
from cai.jsonl import write_atomic
from cai.judge.settings import CONTENT_FREE
from cai.keys import canonical, model_key, record_key, seed_for
from cai.layout import EVAL_RESULTS
from cai.record_loop import Executor, StageTally, run_records
from cai.store import RunStore

if TYPE_CHECKING:
    from cai.engine import Engine

log = logging.getLogger(__name__)


# ---- the run -------------------------------------------------------------------------------------


class _Engines:
    """The engines of the run: the caller's ``engine_for``, or one built per model and closed
    when the next model is needed (one model in memory at a time)."""

    def __init__(self, config: EvalConfig, engine_for: Callable[[str], Engine] | None):
        self.config = config
        self.engine_for = engine_for
        self.current: tuple[str, Engine] | None = None

    def __call__(self, spec: str) -> Engine:
        if self.engine_for is not None:
            return self.engine_for(spec)
        if self.current is not None and self.current[0] == spec:
            return self.current[1]
        self.close()
        from cai.engine import create_engine

        engine = create_engine(
            self.config.backend, model=spec, dtype=self.config.dtype, **self.config.engine_options
        )
        self.current = (spec, engine)
        return engine

    def close(self) -> None:
        if self.current is not None:
            self.current[1].close()
            self.current = None


def run_eval(
    config: EvalConfig,
    out_dir: str | Path,
    *,
    engine_for: Callable[[str], Engine] | None = None,
    exclude: Collection[str] = (),
    store: RunStore | None = None,
    limit: int | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    extend: Callable[[dict], dict] | None = None,
    tally: StageTally | None = None,
) -> dict:
    """Evaluate ``config.models`` and write ``out_dir/results.json``; returns the results.

    Args:
        engine_for: model spec → Engine; the caller owns those engines. Default: each model's
            engine is built from the config and closed when the next model is needed.
        exclude: prompt keys never to evaluate on (the training prompts); dropped and counted.
        store: the run store for the stage records; default ``RunStore(out_dir)``.
        limit: cap on the prompts of each set.
        executor: runs the batches (``cai.record_loop``); default: in this process.
        extend: results → results with more in them, before they are written (the pipeline's
            online rounds add their ``rounds`` table).
        tally: counts the records written and found done (the pipeline's summary row).
    """

    config.validate()
    start = time.perf_counter()
    out = Path(out_dir)
    store = store or RunStore(out)
    sets, excluded = load_sets(config, exclude, limit)
    engines = _Engines(config, engine_for)
    try:
        runs = {"executor": executor, "tally": tally}  # how every stage's records run
        generations = _generate(config, sets, store, engines, progress, **runs)
        grades = _grade(config, sets, generations, store, engines, progress, **runs)
        comparisons = _compare(config, sets, generations, store, engines, progress, **runs)
        rewards = _rewards(config, generations, store, **runs) if config.reward_model else None
    finally:
        engines.close()
    results = {
        "version": 1,
        "baseline": config.baseline_name,
        "models": dict(config.models),
        "judge": {
            "model": config.judge_spec,
            "constitution": config.constitution,
            "tie_margin": config.tie_margin,
        },
        "sets": {kind: len(prompts) for kind, prompts in sets.items()},
        "excluded": excluded,
        "metrics": metrics(config, sets, generations, grades, comparisons, rewards),
        "seconds": time.perf_counter() - start,
    }
    _warn_if_unreliable(results)
    if extend is not None:
        results = extend(results)
    text = json.dumps(results, indent=2) + "\n"
    write_atomic(out / EVAL_RESULTS, lambda f: f.write(text.encode("utf-8")))
    return results


def _warn_if_unreliable(results: dict) -> None:
    """Say so when the judge cannot be trusted: its verdicts flip with the order, or its grades
    sit at 0.5 (a small judge model often does both)."""
    for name, m in results["metrics"].items():
        consistency = m["position_consistency"]
        if consistency and consistency["value"] < 0.5:
            log.warning(
                "eval %s: the judge agrees with itself across the two orders in only %.0f%% of "
                "comparisons: its win rates are weak evidence (a larger judge_model helps)",
                name,
                100 * consistency["value"],
            )
        for metric in GRADERS:
            graded = m[metric]
            if graded and graded["undecided"] > graded["n"] / 2:
                log.warning(
                    "eval %s: %s is undecided (p within grade_margin of 0.5) for %d of %d "
                    "answers: the grader cannot tell them apart (a larger judge_model helps)",
                    name,
                    metric,
                    graded["undecided"],
                    graded["n"],
                )


def _generate(
    config, sets, store, engines, progress, executor, tally
) -> dict[tuple[str, str, str], dict]:
    """(model name, kind, prompt key) → eval_generate record (done or error)."""
    from cai.engine import Sampling

    sampling = Sampling(max_tokens=config.max_tokens, temperature=config.temperature)
    keys: dict[tuple[str, str, str], str] = {}
    for name, spec in config.models.items():
        model = model_key("model", spec)
        for kind, prompts in sets.items():
            for p in prompts:
                keys[name, kind, p.key] = record_key(
                    stage="eval_generate", input=p.key, sampling=sampling.to_dict(), **model
                )
    for name, spec in config.models.items():

        def call(todo, label, name=name, spec=spec):
            params = [
                Sampling(
                    max_tokens=config.max_tokens,
                    temperature=config.temperature,
                    seed=seed_for(keys[name, k, p.key], config.seed),
                )
                for k, p in todo
            ]
            done = engines(spec).generate([p.messages for _, p in todo], params, progress=label)
            records = []
            for (kind, p), completion in zip(todo, done, strict=True):
                sample = completion.samples[0] if completion.ok else None
                records.append(
                    {
                        "key": keys[name, kind, p.key],
                        "model_name": name,
                        "model": spec,
                        "set": kind,
                        "input_key": p.key,
                        "prompt": p.messages,
                        "response": sample.text if sample else None,
                        "completion_tokens": sample.completion_tokens if sample else 0,
                        "finish_reason": sample.finish_reason if sample else None,
                        "error": completion.error,
                    }
                )
            return records

        run_records(
            store,
            "eval_generate",
            [(k, p) for k, ps in sets.items() for p in ps],
            key=lambda item, name=name: keys[name, item[0], item[1].key],
            call=call,
            label=f"eval {name}: answers" if progress else False,
            executor=executor,
            tally=tally,
        )
    records = store.read_stage("eval_generate")
    return {where: records[key] for where, key in keys.items() if key in records}


def _grade(
    config, sets, generations, store, engines, progress, executor, tally
) -> dict[tuple[str, str], dict]:
    """(metric, generation key) → eval_grade record. One function with its batch function
    nested (~85 lines), as every record loop here: the batch closes over the jobs' keys, the
    template and the content-free answers it shares between graders."""
    from cai.prompts import JUDGE_ANSWER_PREFIX, load_template

    template = load_template("grade")
    judge = config.judge_spec
    judge_key = model_key("judge", judge)
    contextual = config.grade_calibration == "contextual"
    calibrated = {"calibration": "contextual"} if contextual else {}  # none: the v1 keys
    jobs: list[tuple[str, Grader, dict, str]] = []
    for metric, grader in GRADERS.items():
        if grader.kind not in sets:
            continue
        for name in config.models:
            for p in sets[grader.kind]:
                generation = generations.get((name, grader.kind, p.key))
                if ok(generation):
                    key = record_key(
                        stage="eval_grade",
                        generation=generation["key"],
                        grader=asdict(grader),
                        template=template.source,
                        **judge_key,
                        **calibrated,
                    )
                    jobs.append((metric, grader, generation, key))

    def call(todo, label):
        answers = [(grader, g["prompt"], g["response"]) for _, grader, g, _ in todo]
        # Contextual calibration: the content-free answer once per (grader, prompt).
        blanks = (
            list({canonical([g.kind, p]): (g, p, CONTENT_FREE) for g, p, _ in answers}.values())
            if contextual
            else []
        )
        conversations = [
            c
            for grader, prompt, response in answers + blanks
            for c in grade_conversations(template, grader, prompt, response)
        ]
        scores = engines(judge).score(
            conversations, ["A", "B"], prefixes=JUDGE_ANSWER_PREFIX, progress=label
        )
        free = {
            canonical([g.kind, p]): (scores[2 * n], scores[2 * n + 1])
            for n, (g, p, _) in enumerate(blanks, start=len(answers))
        }
        records = []
        for i, (metric, grader, generation, key) in enumerate(todo):
            first, second = scores[2 * i], scores[2 * i + 1]
            content_free = free.get(canonical([grader.kind, generation["prompt"]]))
            error = first.error or second.error
            if error is None and content_free is not None:
                error = content_free[0].error or content_free[1].error
            p = orders = None
            if error is None:
                p, *orders = flagged_probability(first, second, content_free)
            records.append(
                {
                    "key": key,
                    "metric": metric,
                    "generation": generation["key"],
                    "model_name": generation["model_name"],
                    "p": p,
                    "p_orders": orders,
                    "judge": judge,
                    "error": error,
                }
            )
        return records

    records = run_records(
        store,
        "eval_grade",
        jobs,
        key=lambda job: job[3],
        call=call,
        label="eval grading" if progress else False,
        executor=executor,
        tally=tally,
    )
    return {(metric, g["key"]): records[key] for metric, _, g, key in jobs if key in records}


COMPARE_TEMPLATES = frozenset(
    {
        "876c3f62db4ab7ff081d06903efde4c8d91c6486eab6fe04ea4654c42382c730",  # judge_mc.jinja
        "0e3a45a94301c31512dc70280451c8af658c7b0542ac5fc584721cebda3a2005",  # judge_score.jinja
    }
)
"""sha256 of the judge templates' text as shipped when the template joined the eval_compare key
(the pairwise ``judge_mc`` unchanged since the first evaluation; the pointwise ``judge_score``)."""


def compare_template(text: str) -> dict[str, str]:
    """The judge template's part of an eval_compare key: its text, as the pipeline's judge key
    and eval_grade's hold theirs, so that an edited template re-judges the comparisons. The
    shipped texts (:data:`COMPARE_TEMPLATES`) add nothing: comparisons written before the
    template joined the key, with those texts, keep their keys and resume."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {} if digest in COMPARE_TEMPLATES else {"template": text}


def legacy_compare_key(config, generation: str, baseline_generation: str) -> str:
    """The key an eval_compare record had before issue 27 (the constitution by its name, the
    judge settings that differed from the first judge's, the template unless shipped)."""
    from cai.judge.settings import default_template
    from cai.prompts import load_template

    neutral = {"mode": "pairwise", "calibration": "none", "length_coef": 0.0}
    chosen = {
        "mode": config.judge_mode or "pairwise",
        "calibration": config.judge_calibration or "none",
        "length_coef": config.judge_length_coef or 0.0,
    }
    settings = {k: v for k, v in chosen.items() if v != neutral[k]}
    if config.judge_principles is not None:
        settings["principles"] = config.judge_principles
    template = load_template(default_template(chosen["mode"]))
    settings.update(compare_template(template.source))
    return record_key(
        stage="eval_compare",
        model=generation,
        baseline=baseline_generation,
        constitution=config.constitution,
        few_shot=config.few_shot,
        seed=config.seed,
        **model_key("judge", config.judge_spec),
        **settings,
    )


def adopted(stored: dict, key: str, legacy_key: str, settings) -> str | None:
    """``key`` if stored, else ``legacy_key`` where that record, written before issue 27, was
    judged with what ``key`` describes: its key named the constitution, not the text it asked,
    so it is taken only where every principle it asked renders the shipped text
    (``cai.judge.keys.is_shipped``); else None (judged anew)."""
    from cai.judge.keys import is_shipped

    if key in stored and stored[key].get("error") is None:
        return key
    record = stored.get(legacy_key)
    if record is None or record.get("error") is not None:
        return None
    constitution = settings.constitution
    ids = record.get("principles") or []
    known = {p.id for p in constitution.principles}
    if not ids or not set(ids) <= known:
        return None
    if all(is_shipped(settings, constitution.principle(i)) for i in ids):
        return legacy_key
    return None


def _compare(
    config, sets, generations, store, engines, progress, executor, tally
) -> dict[tuple[str, str, str], dict]:
    """(model name, compared-with name, generation key) → eval_compare record: the model's answer
    against the baseline's (and against ``config.previous``'s model's), p = P(model's is better).
    Keys: both generations and the judge's part (``cai.judge.keys.judge_key``); a comparison
    stored under its key of before issue 27 is taken as it is where that key still describes
    it (:func:`legacy_compare_key`)."""
    from cai.judge import Judge
    from cai.judge.keys import judge_key
    from cai.judge.pair import JudgePair

    base = config.baseline_name
    judge_spec = config.judge_spec
    settings = config.judge_settings()
    against = [(name, base) for name in config.models if name != base]
    against += [(n, o) for n, o in config.previous.items() if o != base]
    jobs: list[tuple[str, str, dict, dict, str]] = []
    pairs: dict[str, JudgePair] = {}
    legacy: dict[str, str] = {}
    for name, other in against:
        for kind in COMPARED:
            for p in sets.get(kind, []):
                mine, theirs = (
                    generations.get((name, kind, p.key)),
                    generations.get((other, kind, p.key)),
                )
                if ok(mine) and ok(theirs):
                    generated = {"generation": mine["key"], "baseline_generation": theirs["key"]}
                    # The principles are drawn from the key comparisons had before issue 27, so
                    # that the same evaluation asks the same questions as it did then.
                    draw = legacy_compare_key(config, mine["key"], theirs["key"])
                    pair = JudgePair(mine["prompt"], mine["response"], theirs["response"], draw)
                    key = record_key(
                        stage="eval_compare", **generated, **judge_key(settings, pair, judge_spec)
                    )
                    pairs[key], legacy[key] = pair, draw
                    jobs.append((name, other, mine, theirs, key))

    def call(todo, label):
        judge = Judge.from_settings(settings, engines(judge_spec))
        prefs = judge.label([pairs[key] for *_, key in todo], progress=label)
        return [
            {
                "key": key,
                "model_name": name,
                **({} if other == base else {"against": other}),
                "generation": mine["key"],
                "baseline_generation": theirs["key"],
                "p": pref.p_a,
                "p_first": pref.p_a_first,
                "p_second": pref.p_a_second,
                "consistent": pref.consistent,
                "principles": pref.principles,
                "judge": judge_spec,
                "error": pref.error,
            }
            for (name, other, mine, theirs, key), pref in zip(todo, prefs, strict=True)
        ]

    records = run_records(
        store,
        "eval_compare",
        jobs,
        key=lambda job: job[4],
        stored_as=lambda stored, job: adopted(stored, job[4], legacy[job[4]], settings),
        call=call,
        label="eval comparisons" if progress else False,
        executor=executor,
        tally=tally,
    )
    return {(n, o, mine["key"]): records[key] for n, o, mine, _, key in jobs if key in records}


def _rewards(config, generations, store, executor, tally) -> dict[str, float]:
    """Model name → mean reward of its answers under the trained reward model (each answer's
    reward is a record of the stage ``eval_reward``, so a re-run scores nothing twice)."""

    spec = config.reward_model
    reward_model = model_key("reward_model", spec)
    done = [(n, g) for (n, _, _), g in generations.items() if ok(g)]
    keys = {
        g["key"]: record_key(stage="eval_reward", generation=g["key"], **reward_model)
        for _, g in done
    }

    def call(todo, label):
        from cai.rewards.model import RewardModel

        model = RewardModel(spec)
        try:
            scores = model.score(
                [[*g["prompt"], {"role": "assistant", "content": g["response"]}] for g in todo]
            )
        finally:
            model.close()
        return [
            {
                "key": keys[g["key"]],
                "generation": g["key"],
                "reward": value,
                "error": None if value is not None else "longer than the reward model's context",
            }
            for g, value in zip(todo, scores, strict=True)
        ]

    records = run_records(
        store,
        "eval_reward",
        [g for _, g in done],
        key=lambda g: keys[g["key"]],
        call=call,
        executor=executor,
        tally=tally,
    )
    out = {}
    for name in config.models:
        values = [records[keys[g["key"]]]["reward"] for n, g in done if n == name]
        values = [v for v in values if v is not None]  # too long to score: left out
        out[name] = fmean(values) if values else math.nan
    return out
