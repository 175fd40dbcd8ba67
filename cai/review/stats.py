"""What people's labels say about the judge: agreement with a 95% Wilson interval and Cohen's
kappa (overall, per category, per round), a reliability table by judge margin, the judge's
length preference against the people's, and inter-annotator agreement.

    cai review stats runs/rlaif-tiny      # a table, then one JSON line

The unit is one person's label of one pair: a pair two people labelled counts twice. Only
decided labels count: a person's tie or skip, and a pair the judge called a tie (or did not
judge), are left out of agreement, kappa and length preference.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cai.review.items import Item
from cai.review.labels import live_labels
from cai.stats import cohen_kappa, rate

MARGIN_BUCKETS = ((0.0, 0.05), (0.05, 0.15), (0.15, 0.5))
"""Judge margins |p_a - 0.5|: [0, 0.05), [0.05, 0.15), [0.15, 0.5] (the last one closed)."""


@dataclass(frozen=True)
class Vote:
    """One person's decided label of a judged pair."""

    item: Item
    annotator: str
    answer: str
    """``A`` or ``B``."""


def votes(items: Iterable[Item], records: list[dict]) -> list[Vote]:
    """The decided labels (``A`` / ``B``) of the items, in item then annotator order."""
    live = live_labels(records)
    by_item: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (annotator, key), record in sorted(live.items()):
        if record["answer"] in ("A", "B"):
            by_item[key].append((annotator, record["answer"]))
    return [Vote(item, who, answer) for item in items for who, answer in by_item[item.key]]


def agreement(pairs: list[Vote]) -> dict[str, Any]:
    """Human-judge agreement of the votes on pairs the judge decided: ``rate`` (value, low,
    high, n) and ``kappa``."""
    decided = [v for v in pairs if v.item.winner in ("A", "B")]
    agree = sum(v.answer == v.item.winner for v in decided)
    kappa = cohen_kappa([v.item.winner for v in decided], [v.answer for v in decided])
    return {**rate(agree, len(decided)), "kappa": kappa}


def grouped(pairs: list[Vote], group) -> dict[str, dict[str, Any]]:
    """Agreement per value of ``group(item)`` (None: ``-``)."""
    groups: dict[str, list[Vote]] = defaultdict(list)
    for v in pairs:
        value = group(v.item)
        groups["-" if value is None else str(value)].append(v)
    return {name: agreement(groups[name]) for name in sorted(groups)}


def bucket(margin: float) -> str:
    """The reliability-table row of a judge margin."""
    for low, high in MARGIN_BUCKETS:
        if low <= margin < high or (high == MARGIN_BUCKETS[-1][1] and margin <= high):
            return f"[{low:g}, {high:g}{']' if high == MARGIN_BUCKETS[-1][1] else ')'}"
    raise ValueError(f"a margin is |p - 0.5|, in [0, 0.5]; got {margin}")


def reliability(pairs: list[Vote]) -> dict[str, dict[str, Any]]:
    """Agreement by judge-margin bucket, every bucket listed (n 0 where none fell in it): a
    judge worth trusting agrees more where it is surer."""
    rows = {bucket(low): agreement([]) for low, _ in MARGIN_BUCKETS}
    judged = [v for v in pairs if v.item.margin is not None]
    rows.update(grouped(judged, lambda item: bucket(item.margin)))
    return rows


def length_preference(pairs: list[Vote]) -> dict[str, Any]:
    """Over votes on pairs the judge decided whose responses differ in length (characters):
    the share where the judge preferred the longer one, and where the person did."""
    rows = [
        v
        for v in pairs
        if v.item.winner in ("A", "B") and len(v.item.response_a) != len(v.item.response_b)
    ]

    def longer(item: Item) -> str:
        return "A" if len(item.response_a) > len(item.response_b) else "B"

    judge = sum(v.item.winner == longer(v.item) for v in rows)
    people = sum(v.answer == longer(v.item) for v in rows)
    n = len(rows)
    return {
        "pairs": n,
        "judge_longer": judge / n if n else None,
        "people_longer": people / n if n else None,
        "excess": (judge - people) / n if n else None,
    }


def inter_annotator(pairs: list[Vote]) -> dict[str, Any]:
    """Per two annotators, on the pairs both decided: agreement with its interval and kappa;
    ``all`` pools every two annotators' shared pairs."""
    by_person: dict[str, dict[str, str]] = defaultdict(dict)
    for v in pairs:
        by_person[v.annotator][v.item.key] = v.answer
    out: dict[str, Any] = {}
    pooled: tuple[list[str], list[str]] = ([], [])
    for a, b in itertools.combinations(sorted(by_person), 2):
        shared = sorted(by_person[a].keys() & by_person[b].keys())
        if not shared:
            continue
        first = [by_person[a][k] for k in shared]
        second = [by_person[b][k] for k in shared]
        agree = sum(x == y for x, y in zip(first, second, strict=True))
        out[f"{a} / {b}"] = {**rate(agree, len(shared)), "kappa": cohen_kappa(first, second)}
        pooled[0].extend(first)
        pooled[1].extend(second)
    if out:
        agree = sum(x == y for x, y in zip(*pooled, strict=True))
        out["all"] = {**rate(agree, len(pooled[0])), "kappa": cohen_kappa(*pooled)}
    return out


def review_stats(items: list[Item], records: list[dict]) -> dict[str, Any]:
    """Every statistic of ``cai review stats`` for the items and a labels file's records."""
    live = live_labels(records)
    answers = [r["answer"] for r in live.values()]
    pairs = votes(items, records)
    return {
        "labels": len(answers),
        "annotators": sorted({who for who, _ in live}),
        "answers": {a: answers.count(a) for a in ("A", "B", "tie", "skip")},
        "agreement": agreement(pairs),
        "by_category": grouped(pairs, lambda item: item.category),
        "by_round": grouped(pairs, lambda item: item.round),
        "by_margin": reliability(pairs),
        "length": length_preference(pairs),
        "inter_annotator": inter_annotator(pairs),
    }


def _cell(row: dict[str, Any]) -> str:
    if not row["n"]:
        return "n/a (n 0)"
    kappa = "n/a" if row["kappa"] is None else f"{row['kappa']:.2f}"
    return f"{row['value']:.2f} [{row['low']:.2f}, {row['high']:.2f}] n {row['n']} κ {kappa}"


def format_table(stats: dict[str, Any]) -> str:
    """The human table ``cai review stats`` prints before its JSON line."""
    answers = ", ".join(f"{k} {v}" for k, v in stats["answers"].items())
    lines = [
        f"labels: {stats['labels']} ({answers}) by {', '.join(stats['annotators']) or 'nobody'}",
        f"{'human-judge agreement':<28} {_cell(stats['agreement'])}",
    ]
    for title, name in (("category", "by_category"), ("round", "by_round")):
        lines += [f"  {title + ' ' + k:<26} {_cell(v)}" for k, v in stats[name].items()]
    lines.append("judge margin (reliability)")
    lines += [f"  {k:<26} {_cell(v)}" for k, v in stats["by_margin"].items()]
    length = stats["length"]
    if length["pairs"]:
        lines.append(
            f"{'longer response preferred':<28} judge {length['judge_longer']:.2f}, people "
            f"{length['people_longer']:.2f} (n {length['pairs']})"
        )
    for name, row in stats["inter_annotator"].items():
        lines.append(f"  {'annotators ' + name:<26} {_cell(row)}")
    return "\n".join(lines)
