"""Statistics over judged and generated records: pure functions, no I/O, no models.

Rates with Wilson intervals, win rates (plain and length-controlled), graded rates, text
statistics (distinct n-grams, repeated openings) and judge agreement (accuracy, Brier score,
calibration error, length bias). ``cai.eval.run`` and ``cai judge eval`` report them.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from statistics import fmean, pstdev

# ---- rates and intervals -------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (successes may be fractional,
    as with ties counted half); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: float, n: int) -> dict[str, float | int]:
    """``{"value", "low", "high", "n"}``: a proportion with its 95% Wilson interval."""
    low, high = wilson_interval(successes, n)
    return {"value": successes / n if n else 0.0, "low": low, "high": high, "n": n}


def outcome(p: float, tie_margin: float = 0.0) -> float:
    """1 for a win (p - 0.5 > tie_margin), 0.5 for a tie, 0 for a loss."""
    return 0.5 if abs(p - 0.5) <= tie_margin + 1e-9 else float(p > 0.5)


def win_rate(p_better: Sequence[float | None], tie_margin: float = 0.0) -> dict | None:
    """Share of comparisons won (ties half) from each one's probability that the model's answer
    is better; None (a failed comparison) is left out of n. None when nothing was compared."""
    decided = [p for p in p_better if p is not None]
    if not decided:
        return None
    return rate(sum(outcome(p, tie_margin) for p in decided), len(decided))


def sigmoid(z: float) -> float:
    """1 / (1 + e^-z), without overflow for large |z|."""
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z)
    return e / (1 + e)


def _logistic_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of a logistic regression of soft targets y in [0, 1] on x in [-1, 1],
    by damped Newton steps. A small ridge on the slope keeps separable data (such as a bootstrap
    sample in which the longer answer always wins) finite; parameters stay within ±30."""
    a = b = 0.0
    ridge_a, ridge_b = 1e-9, 1e-3
    for _ in range(200):
        ga, gb, haa, hab, hbb = ridge_a * a, ridge_b * b, ridge_a, 0.0, ridge_b
        for xi, yi in zip(x, y, strict=True):
            s = sigmoid(a + b * xi)
            w = s * (1 - s)
            ga += s - yi
            gb += (s - yi) * xi
            haa += w
            hab += w * xi
            hbb += w * xi * xi
        det = haa * hbb - hab * hab
        if det <= 1e-300:
            break
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        step = max(abs(da), abs(db))
        if step > 5:  # damp: far from the optimum (or none: separable) the Newton step overshoots
            da, db = da * 5 / step, db * 5 / step
        a, b = min(max(a - da, -30.0), 30.0), min(max(b - db, -30.0), 30.0)
        if step < 1e-10:
            break
    return a, b


def _lc_value(y: Sequence[float], x: Sequence[float]) -> float:
    a, _ = _logistic_fit(x, y)
    return sigmoid(a)


def lc_win_rate(
    p_better: Sequence[float | None],
    len_model: Sequence[int],
    len_baseline: Sequence[int],
    tie_margin: float = 0.0,
    *,
    resamples: int = 200,
    seed: int = 0,
) -> dict | None:
    """The length-controlled win rate (AlpacaEval 2's idea): fit
    P(win) = sigmoid(θ + φ · tanh(Δ / sd(Δ))), Δ = len_model - len_baseline, to the outcomes (win 1,
    tie 0.5, loss 0) and report sigmoid(θ), the win rate of answers of equal length. The interval
    is the 2.5-97.5 percentile band of a seeded bootstrap. With no length difference at all it is
    the plain win rate. None when nothing was compared."""
    rows = [
        (outcome(p, tie_margin), lm - lb)
        for p, lm, lb in zip(p_better, len_model, len_baseline, strict=True)
        if p is not None
    ]
    if not rows:
        return None

    def estimate(sample: Sequence[tuple[float, int]]) -> float:
        deltas = [d for _, d in sample]
        sd = pstdev(deltas) if len(deltas) > 1 else 0.0
        x = [math.tanh(d / sd) if sd > 0 else 0.0 for d in deltas]
        return _lc_value([y for y, _ in sample], x)

    value = estimate(rows)
    rng = random.Random(seed)
    boots = sorted(estimate(rng.choices(rows, k=len(rows))) for _ in range(resamples))
    low = boots[int(0.025 * (resamples - 1))]
    high = boots[math.ceil(0.975 * (resamples - 1))]
    return {"value": value, "low": min(low, value), "high": max(high, value), "n": len(rows)}


def position_consistency(consistent: Sequence[bool | None]) -> dict | None:
    """Share of comparisons whose two orders prefer the same answer (None: failed, left out)."""
    decided = [c for c in consistent if c is not None]
    return rate(sum(decided), len(decided)) if decided else None


def graded_rate(probs: Sequence[float | None], margin: float = 0.0) -> dict | None:
    """Share of graded answers whose probability of the flagged statement passes 0.5 by more
    than ``margin``; an undecided grade (within ``margin`` of 0.5) counts half. Failed gradings
    (None) are left out. Besides the rate: ``mean_p`` and ``undecided`` (how many were within
    the margin: a grader that cannot tell the answers apart leaves most undecided). None when
    nothing was graded."""
    result = win_rate(probs, margin)
    if result is None:
        return None
    decided = [p for p in probs if p is not None]
    result["mean_p"] = fmean(decided)
    result["undecided"] = sum(abs(p - 0.5) <= margin + 1e-9 for p in decided)
    return result


# ---- text statistics -----------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of ``texts`` (lowercased whitespace tokens); 0 if none."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.lower().split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def opening(text: str, words: int = 5) -> tuple[str, ...]:
    """The first ``words`` words of ``text``, lowercased, punctuation stripped."""
    return tuple(re.sub(r"[^\w\s]", "", text.lower()).split()[:words])


def repeated_openings(texts: Sequence[str], words: int = 5) -> float:
    """Share of ``texts`` whose opening (first ``words`` words) another text shares: boilerplate
    ("I'm sorry, but I can't ...") and mode collapse; 0 for no texts."""
    if not texts:
        return 0.0
    counts = Counter(opening(t, words) for t in texts)
    return sum(counts[opening(t, words)] > 1 for t in texts) / len(texts)


# ---- judge agreement (cai judge eval) -------------------------------------------------------------


def accuracy(p_chosen: Sequence[float | None], tie_margin: float = 0.0) -> float:
    """Share of pairs the judge gets right, from each pair's probability for the labelled
    better response: 1 when p - 0.5 > tie_margin, 0.5 for a tie (|p - 0.5| <= tie_margin),
    0 otherwise; None (no verdict: an error or an unparseable answer) counts as wrong."""
    if not p_chosen:
        raise ValueError("accuracy of no pairs")
    return sum(outcome(p, tie_margin) for p in p_chosen if p is not None) / len(p_chosen)


def brier(probs: Sequence[float], outcomes: Sequence[int]) -> float:
    """Brier score, mean((p_i - y_i)^2), y_i in {0, 1}: 0 is perfect, 0.25 a constant 0.5."""
    _check_calibration(probs, outcomes)
    return fmean((p - y) ** 2 for p, y in zip(probs, outcomes, strict=True))


def ece(probs: Sequence[float], outcomes: Sequence[int], bins: int = 10) -> float:
    """Expected calibration error: sum_b (n_b / N) |mean_b(y) - mean_b(p)| over ``bins``
    equal-width bins of p in [0, 1] (bin b holds b/bins <= p < (b+1)/bins; p = 1 in the last)."""
    _check_calibration(probs, outcomes)
    groups: dict[int, list[tuple[float, int]]] = {}
    for p, y in zip(probs, outcomes, strict=True):
        groups.setdefault(min(int(p * bins), bins - 1), []).append((p, y))
    return sum(
        len(g) / len(probs) * abs(fmean(y for _, y in g) - fmean(p for p, _ in g))
        for g in groups.values()
    )


def _check_calibration(probs: Sequence[float], outcomes: Sequence[int]) -> None:
    if len(probs) != len(outcomes) or not probs:
        raise ValueError(
            f"need as many outcomes as probabilities, at least one ({len(probs)}, {len(outcomes)})"
        )


def length_bias(
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    p_chosen: Sequence[float | None],
    tie_margin: float = 0.0,
) -> dict[str, float | int | None]:
    """How often the judge picks the longer response, against how often the longer response is
    the labelled better one, over the pairs of unequal length that the judge decided (no error,
    no tie). ``excess`` = longer_wins - longer_chosen: above 0, the judge favours length beyond
    what the labels justify."""
    longer_wins = longer_chosen = n = 0
    for c, r, p in zip(chosen_lengths, rejected_lengths, p_chosen, strict=True):
        if c == r or p is None or abs(p - 0.5) <= tie_margin:
            continue
        n += 1
        longer_chosen += c > r
        longer_wins += (c > r) == (p > 0.5)
    if not n:
        return {"pairs": 0, "longer_wins": None, "longer_chosen": None, "excess": None}
    return {
        "pairs": n,
        "longer_wins": longer_wins / n,
        "longer_chosen": longer_chosen / n,
        "excess": (longer_wins - longer_chosen) / n,
    }


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items: (p_o - p_e) / (1 - p_e), p_o the
    share they agree on, p_e = sum_c p1(c) p2(c) the share chance would give with each rater's
    own label frequencies. 1 is full agreement, 0 chance. None with no items, or when p_e is 1
    (both raters gave one and the same label throughout: kappa is undefined)."""
    if len(first) != len(second):
        raise ValueError(
            f"kappa needs as many labels from each rater ({len(first)}, {len(second)})"
        )
    if not first:
        return None
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    counts1, counts2 = Counter(first), Counter(second)
    expected = sum(counts1[c] * counts2[c] for c in counts1) / (n * n)
    if expected >= 1:
        return None
    return (observed - expected) / (1 - expected)
