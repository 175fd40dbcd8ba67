"""``cai judge eval``: how well a judge agrees with labelled preference pairs.

For each judge variant (pairwise with each calibration, pointwise with and without length
control, the naive generative baseline) side by side on one loaded model: accuracy
(swap-averaged, and single-order for the pairwise judge), accuracy on the pairs whose better
response is the shorter one, position consistency (pairwise only: a pointwise judge has no
order), Brier score and expected calibration error, length bias, pairs per second; and the
"longer wins" baseline that every judge must beat.

    cai judge eval --data data/judge_dev.jsonl --mode pairwise,pointwise --calibration none,batch

A routed variant (``guard`` and ``route``, ``cai.judge.routing``) adds the share of prompts its
input classifier flags, overall and per category (``guard`` in the result).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cai.engine import Engine, OptionScores, Sampling
from cai.judge.generative import GenerativeJudge, parse_verdict
from cai.judge.judge import Judge
from cai.judge.pair import Prompt, check_pair
from cai.judge.routing import RESTRICTED
from cai.judge.settings import JudgeSettings
from cai.keys import canonical
from cai.stats import accuracy, brier, ece, length_bias

Labelled = tuple[Prompt, str, str]
"""(prompt, chosen, rejected)."""


def _shown(pairs: Sequence[Labelled]) -> list[Labelled]:
    """The pairs as judged: the labelled better response first in even pairs and second in odd
    ones, so that the single-order accuracy does not reward a judge that always picks a slot."""
    return [
        (prompt, chosen, rejected) if i % 2 == 0 else (prompt, rejected, chosen)
        for i, (prompt, chosen, rejected) in enumerate(pairs)
    ]


def _towards_chosen(i: int, p: float | None) -> float | None:
    return p if p is None or i % 2 == 0 else 1 - p


def _shorter_better(pairs: Sequence[Labelled]) -> list[int]:
    """Indices of the pairs whose labelled better response is the shorter (in characters)."""
    return [i for i, (_, c, r) in enumerate(pairs) if len(c) < len(r)]


def _calibration(p_chosen: Sequence[float | None]) -> dict[str, float | None]:
    """Brier and ECE, counting each decided pair twice, as p(chosen) with outcome 1 and as
    p(rejected) = 1 - p(chosen) with outcome 0, so the bins span [0, 1] as they would for
    pairs in random order."""
    decided = [p for p in p_chosen if p is not None]
    if not decided:
        return {"brier": None, "ece": None}
    probs = [*decided, *(1 - p for p in decided)]
    outcomes = [1] * len(decided) + [0] * len(decided)
    return {"brier": brier(probs, outcomes), "ece": ece(probs, outcomes)}


def longer_wins(pairs: Sequence[Labelled]) -> dict[str, Any]:
    """The baseline that prefers the longer response (in characters; equal lengths tie)."""
    p = [0.5 if len(c) == len(r) else float(len(c) > len(r)) for _, c, r in pairs]
    shorter = _shorter_better(pairs)
    return {
        "accuracy": accuracy(p),
        "accuracy_shorter_better": accuracy([p[i] for i in shorter]) if shorter else None,
        "consistent": None,
    }


def judge_metrics(
    judge: Judge, pairs: Sequence[Labelled], *, progress: bool | str = False
) -> dict[str, Any]:
    """One judge's agreement with labelled (prompt, chosen, rejected) pairs."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    start = time.perf_counter()
    prefs = judge.label(_shown(pairs), progress=progress)
    seconds = time.perf_counter() - start
    p_chosen = [_towards_chosen(i, p.p_a) for i, p in enumerate(prefs)]
    shorter = _shorter_better(pairs)
    pairwise = judge.mode == "pairwise"
    return {
        "accuracy": accuracy(p_chosen, judge.settings.tie_margin),
        "accuracy_first_order": accuracy(
            [_towards_chosen(i, p.p_a_first) for i, p in enumerate(prefs)]
        )
        if pairwise
        else None,
        "accuracy_shorter_better": accuracy(
            [p_chosen[i] for i in shorter], judge.settings.tie_margin
        )
        if shorter
        else None,
        # A pointwise judge shows each response alone: there is no order to be consistent in.
        "consistent": sum(bool(p.consistent) for p in prefs) / len(prefs) if pairwise else None,
        **_calibration(p_chosen),
        "length_bias": length_bias(
            [len(c) for _, c, _ in pairs],
            [len(r) for _, _, r in pairs],
            p_chosen,
            judge.settings.tie_margin,
        ),
        "errors": sum(p.error is not None for p in prefs),
        "pairs_per_s": len(pairs) / seconds,
        "p_chosen": p_chosen,
        "scores": [
            None if p.scores is None else (p.scores if i % 2 == 0 else p.scores[::-1])
            for i, p in enumerate(prefs)
        ],
    }


def generative_metrics(
    baseline: GenerativeJudge, pairs: Sequence[Labelled], *, progress: bool | str = False
) -> dict[str, Any]:
    """The naive generative judge's agreement: votes of its two parsed verdicts."""
    start = time.perf_counter()
    verdicts = baseline.label(_shown(pairs), progress=progress)
    seconds = time.perf_counter() - start
    votes = [_towards_chosen(i, v.p_a) for i, v in enumerate(verdicts)]
    first = [
        None if v.verdict_first is None else _towards_chosen(i, float(v.verdict_first == "A"))
        for i, v in enumerate(verdicts)
    ]
    texts = [t for v in verdicts for t in v.texts]
    shorter = _shorter_better(pairs)
    return {
        "accuracy_first_order": accuracy(first),
        "accuracy": accuracy(votes),
        "accuracy_shorter_better": accuracy([votes[i] for i in shorter]) if shorter else None,
        "consistent": sum(bool(v.consistent) for v in verdicts) / len(verdicts),
        "unparseable": sum(parse_verdict(t) is None for t in texts) / len(texts) if texts else None,
        "length_bias": length_bias(
            [len(c) for _, c, _ in pairs], [len(r) for _, _, r in pairs], votes
        ),
        "errors": sum(v.error is not None for v in verdicts),
        "pairs_per_s": len(pairs) / seconds,
    }


def agreement(
    judge: Judge,
    baseline: GenerativeJudge | None,
    pairs: Sequence[Labelled],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Agreement of ``judge`` (and the naive ``baseline``) with labelled (prompt, chosen,
    rejected) pairs, and each judge's throughput (see :func:`judge_metrics`)."""
    metrics = judge_metrics(judge, pairs, progress="log-prob judge" if progress else False)
    result: dict[str, Any] = {
        "pairs": len(pairs),
        "model": judge.engine.model_name,
        "backend": judge.engine.backend,
        "constitution": judge.constitution.name,
        "ensemble": judge.settings.ensemble,
        "cot": judge.settings.cot,
        "mode": judge.mode,
        **{k: v for k, v in metrics.items() if k not in ("p_chosen", "scores")},
    }
    if baseline is not None:
        label = "generative judge" if progress else False
        result["generative"] = generative_metrics(baseline, pairs, progress=label)
    return result


class ScoreMemo(Engine):
    """An engine that answers a ``score`` request it has seen from memory: judge variants that
    differ only after the scores (calibration, length control, temperature) then pay for each
    request once in a side-by-side evaluation."""

    def __init__(self, engine: Engine):
        self.inner = engine
        self.backend, self.model_name = engine.backend, engine.model_name
        self._memo: dict[bytes, OptionScores] = {}
        self.asked = 0
        """Requests sent to the engine (not answered from memory)."""

    def generate(self, conversations, sampling=Sampling(), *, prefixes=None, progress=False):
        return self.inner.generate(conversations, sampling, prefixes=prefixes, progress=progress)

    def score(self, conversations, options, *, prefixes=None, progress=False):
        each = (
            list(prefixes)
            if isinstance(prefixes, list | tuple)
            else [prefixes] * len(conversations)
        )
        keys = [canonical([c, list(options), p]) for c, p in zip(conversations, each, strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        self.asked += len(todo)
        if todo:
            done = self.inner.score(
                [conversations[i] for i in todo],
                options,
                prefixes=[each[i] for i in todo]
                if isinstance(prefixes, list | tuple)
                else prefixes,
                progress=progress,
            )
            for i, s in zip(todo, done, strict=True):
                if s.ok:
                    self._memo[keys[i]] = s
            missing = dict(zip(todo, done, strict=True))
        else:
            missing = {}
        return [missing.get(i) or self._memo[k] for i, k in enumerate(keys)]

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def side_by_side(
    variants: dict[str, JudgeSettings],
    engine: Engine,
    pairs: Sequence[Labelled],
    *,
    categories: Sequence[str | None] | None = None,
    generative: Callable[[Engine], GenerativeJudge] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every judge variant (name → its settings, judged on the given engine) on the same pairs and the
    same loaded model, with the "longer wins" baseline and, optionally, the generative judge;
    per-category accuracies when ``categories`` (one per pair) are given."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    memo = ScoreMemo(engine)
    rows: dict[str, dict[str, Any]] = {"longer wins": longer_wins(pairs)}
    per_pair: dict[str, list[float | None]] = {}
    scores: dict[str, list] = {}
    for name, settings in variants.items():
        judge = Judge.from_settings(settings, memo)
        asked = memo.asked
        try:
            metrics = judge_metrics(judge, pairs, progress=name if progress else False)
        finally:
            settings.close()  # a routing classifier: one loaded at a time
        if memo.asked == asked:  # every score came from an earlier variant: no speed to report
            metrics["pairs_per_s"] = None
        per_pair[name] = metrics.pop("p_chosen")
        scores[name] = metrics.pop("scores")
        rows[name] = metrics
    if generative is not None:
        rows["generative"] = generative_metrics(
            generative(engine), pairs, progress="generative" if progress else False
        )
    result: dict[str, Any] = {
        "pairs": len(pairs),
        "shorter_better": len(_shorter_better(pairs)),
        "model": engine.model_name,
        "backend": engine.backend,
        "modes": rows,
    }
    if categories is not None and any(c is not None for c in categories):
        by: dict[str, dict[str, float]] = {}
        for category in sorted({str(c) for c in categories}):
            idx = [i for i, c in enumerate(categories) if str(c) == category]
            by[category] = {"pairs": len(idx)}
            subset = [pairs[i] for i in idx]
            by[category]["longer wins"] = longer_wins(subset)["accuracy"]
            for name, p in per_pair.items():
                by[category][name] = accuracy([p[i] for i in idx])
        result["by_category"] = by
    routed = next((s for s in variants.values() if s.router is not None), None)
    if routed is not None:
        result["guard"] = flagged_shares(routed, pairs, categories)
    result["pair_scores"] = scores
    return result


def flagged_shares(
    settings: JudgeSettings, pairs: Sequence[Labelled], categories: Sequence[str | None] | None
) -> dict[str, Any]:
    """The share of the pairs' prompts that the routed judge's input classifier flags
    (restricted), overall and per category (its verdicts are kept: nothing is classified
    twice)."""
    messages = [check_pair(pair, i)[0] for i, pair in enumerate(pairs)]
    flagged = [v == RESTRICTED for v in settings.verdicts(messages) or []]
    out: dict[str, Any] = {
        "folder": settings.guard,
        "flagged": sum(flagged) / len(flagged),
    }
    if categories is not None and any(c is not None for c in categories):
        out["by_category"] = {}
        for category in sorted({str(c) for c in categories}):
            idx = [i for i, c in enumerate(categories) if str(c) == category]
            out["by_category"][category] = sum(flagged[i] for i in idx) / len(idx)
    return out
