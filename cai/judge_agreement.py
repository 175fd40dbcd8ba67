"""``cai judge eval``: how well a judge agrees with labelled preference pairs.

Accuracy single-order and swap-averaged, position consistency, Brier score and expected
calibration error, length bias and pairs per second, for the multiple-choice judge and the naive
generative baseline side by side.

    cai judge eval --data data/hh_sample.jsonl --backend hf --limit 3
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cai.judge import GenerativeJudge, Judge, Prompt, parse_verdict
from cai.stats import accuracy, brier, ece, length_bias


def agreement(
    judge: Judge,
    baseline: GenerativeJudge | None,
    pairs: Sequence[tuple[Prompt, str, str]],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Agreement of ``judge`` (and the naive ``baseline``) with labelled (prompt, chosen,
    rejected) pairs, and each judge's throughput.

    The labelled better response is shown first in even pairs and second in odd ones, so
    that the single-order accuracy does not reward a judge that always picks one slot.
    Calibration (Brier, ECE) counts each decided pair twice, as p(chosen) with outcome 1 and
    as p(rejected) = 1 - p(chosen) with outcome 0, so the bins span [0, 1] as they would for
    pairs in random order.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    shown = [
        (prompt, chosen, rejected) if i % 2 == 0 else (prompt, rejected, chosen)
        for i, (prompt, chosen, rejected) in enumerate(pairs)
    ]

    def towards_chosen(i: int, p: float | None) -> float | None:
        return p if p is None or i % 2 == 0 else 1 - p

    chosen_lengths = [len(c) for _, c, _ in pairs]
    rejected_lengths = [len(r) for _, _, r in pairs]
    start = time.perf_counter()
    prefs = judge.label(shown, progress="log-prob judge" if progress else False)
    seconds = time.perf_counter() - start
    p_chosen = [towards_chosen(i, p.p_a) for i, p in enumerate(prefs)]
    decided = [p for p in p_chosen if p is not None]
    result: dict[str, Any] = {
        "pairs": len(pairs),
        "model": judge.engine.model_name,
        "backend": judge.engine.backend,
        "constitution": judge.constitution.name,
        "ensemble": judge.ensemble,
        "cot": judge.cot,
        "accuracy_first_order": accuracy(
            [towards_chosen(i, p.p_a_first) for i, p in enumerate(prefs)]
        ),
        "accuracy": accuracy(p_chosen, judge.tie_margin),
        "consistent": sum(bool(p.consistent) for p in prefs) / len(prefs),
        "brier": brier(
            [*decided, *(1 - p for p in decided)], [1] * len(decided) + [0] * len(decided)
        )
        if decided
        else None,
        "ece": ece([*decided, *(1 - p for p in decided)], [1] * len(decided) + [0] * len(decided))
        if decided
        else None,
        "length_bias": length_bias(chosen_lengths, rejected_lengths, p_chosen, judge.tie_margin),
        "errors": sum(p.error is not None for p in prefs),
        "pairs_per_s": len(pairs) / seconds,
    }
    if baseline is not None:
        start = time.perf_counter()
        verdicts = baseline.label(shown, progress="generative judge" if progress else False)
        seconds = time.perf_counter() - start
        votes = [towards_chosen(i, v.p_a) for i, v in enumerate(verdicts)]
        first = [
            None if v.verdict_first is None else towards_chosen(i, float(v.verdict_first == "A"))
            for i, v in enumerate(verdicts)
        ]
        texts = [t for v in verdicts for t in v.texts]
        result["generative"] = {
            "accuracy_first_order": accuracy(first),
            "accuracy": accuracy(votes),
            "consistent": sum(bool(v.consistent) for v in verdicts) / len(verdicts),
            "unparseable": sum(parse_verdict(t) is None for t in texts) / len(texts)
            if texts
            else None,
            "length_bias": length_bias(chosen_lengths, rejected_lengths, votes),
            "errors": sum(v.error is not None for v in verdicts),
            "pairs_per_s": len(pairs) / seconds,
        }
    return result
