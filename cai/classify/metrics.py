"""A guard's numbers, as pure functions of scores and labels: ROC AUC (ties count half), the
threshold that keeps the false-positive rate under a budget, precision and recall at a threshold.

Labels are 1 for restricted (the positive class, what a guard flags) and 0 for permitted. A score
``s`` is flagged when ``s >= threshold``. Used by ``cai train classifier`` (held-out metrics) and
``cai classify eval``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _check(scores: Sequence[float], labels: Sequence[int]) -> None:
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels (one each)")
    if any(label not in (0, 1) for label in labels):
        raise ValueError("labels must be 1 (restricted) or 0 (permitted)")


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """ROC AUC: the probability that a random positive scores above a random negative, a tie
    counting one half (Mann-Whitney U / (n_pos · n_neg), with mid-ranks for tied scores).
    None when either class is absent."""
    _check(scores, labels)
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        mid = (start + end) / 2 + 1  # ranks are 1-based; a tie group shares its mean rank
        for k in range(start, end + 1):
            ranks[order[k]] = mid
        start = end + 1
    rank_sum = sum(r for r, label in zip(ranks, labels, strict=True) if label == 1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def threshold_at_fpr(scores: Sequence[float], labels: Sequence[int], max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on the negatives is at most ``max_fpr``:
    at most ``k = floor(max_fpr · n_neg)`` negatives score ``>= threshold``.

    The threshold is the lowest observed score above the (k+1)-th highest negative score (so
    every positive that can be flagged within the budget is); where no score is above it, the
    next float above it (nothing is flagged). With ``k >= n_neg`` it is the lowest score (all
    flagged). Raises ValueError without negatives: there is no false-positive rate to keep.
    """
    _check(scores, labels)
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1] (got {max_fpr})")
    negatives = sorted((s for s, y in zip(scores, labels, strict=True) if y == 0), reverse=True)
    if not negatives:
        raise ValueError("no permitted (negative) examples: the false-positive rate is undefined")
    allowed = math.floor(max_fpr * len(negatives) + 1e-9)
    if allowed >= len(negatives):
        return min(scores)
    bound = negatives[allowed]
    above = [s for s in scores if s > bound]
    return min(above) if above else math.nextafter(bound, math.inf)


@dataclass(frozen=True)
class Counts:
    """A confusion matrix at one threshold, and its rates."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 0 when nothing is flagged."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN): the share of restricted examples flagged; 0 without any."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def fpr(self) -> float:
        """FP / (FP + TN): the share of permitted examples flagged (over-refusal); 0 without any."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0


def counts(scores: Sequence[float], labels: Sequence[int], threshold: float) -> Counts:
    """The confusion matrix of flagging ``score >= threshold``."""
    _check(scores, labels)
    flagged = [s >= threshold for s in scores]
    tp = sum(f and y == 1 for f, y in zip(flagged, labels, strict=True))
    fp = sum(f and y == 0 for f, y in zip(flagged, labels, strict=True))
    positives = sum(labels)
    return Counts(tp=tp, fp=fp, tn=len(labels) - positives - fp, fn=positives - tp)


def summary(scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict:
    """``n``, ``restricted``, ``auc``, ``precision``, ``recall``, ``over_refusal`` (the flagged
    share of permitted examples) at ``threshold``: one row of a guard's report."""
    c = counts(scores, labels, threshold)
    return {
        "n": len(labels),
        "restricted": sum(labels),
        "auc": auc(scores, labels),
        "precision": c.precision,
        "recall": c.recall,
        "over_refusal": c.fpr,
    }


__all__ = ["Counts", "auc", "counts", "summary", "threshold_at_fpr"]
