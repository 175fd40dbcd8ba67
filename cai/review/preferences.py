"""People's labels as preference pairs, back into the loop: a jsonl that ``cai.pairs.load_pairs``
reads (so ``cai judge eval --data``, ``cai train reward`` and ``cai train dpo`` do).

    cai review export runs/rlaif-tiny --out human.jsonl

One row per pair with a human majority: ``id`` (the item key), ``prompt``, ``chosen`` (the
majority's choice), ``rejected``, and ``meta`` with the annotators, the votes and the judge's
label. Ties and skips are not votes; a pair whose decided votes split evenly (one A, one B) is
left out and counted, as is a pair only tied or skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cai.jsonl import encode_line, write_atomic
from cai.review.items import Item
from cai.review.stats import votes


@dataclass(frozen=True)
class Exported:
    rows: int
    split: int
    """Pairs whose people's decided votes split evenly: left out."""


def majority_rows(items: list[Item], records: list[dict]) -> tuple[list[dict], int]:
    """The export rows, and how many pairs were left out for an even split."""
    by_item: dict[str, list] = {}
    for vote in votes(items, records):
        by_item.setdefault(vote.item.key, []).append(vote)
    rows, split = [], 0
    for item in items:
        cast = by_item.get(item.key)
        if not cast:
            continue
        count = Counter(v.answer for v in cast)
        if count["A"] == count["B"]:
            split += 1
            continue
        a_wins = count["A"] > count["B"]
        chosen, rejected = (
            (item.response_a, item.response_b) if a_wins else (item.response_b, item.response_a)
        )
        meta = {
            "source": "human",
            "item_key": item.key,
            "annotators": sorted(v.annotator for v in cast),
            "votes": {"chosen": max(count.values()), "rejected": min(count.values())},
            "judge_winner": item.winner,
            "judge_agrees": None
            if item.winner not in ("A", "B")
            else (item.winner == "A") == a_wins,
        }
        if item.category is not None:
            meta["category"] = item.category
        if item.round is not None:
            meta["round"] = item.round
        rows.append(
            {
                "id": item.key,
                "prompt": item.prompt,
                "chosen": chosen,
                "rejected": rejected,
                "meta": meta,
            }
        )
    return rows, split


def export_labels(items: list[Item], records: list[dict], out: str | Path) -> Exported:
    """Write the majority rows to ``out`` (atomically: a reader sees the old file or the new)."""
    rows, split = majority_rows(items, records)

    def write(f) -> None:
        for row in rows:
            f.write(encode_line(row))

    write_atomic(Path(out), write)
    return Exported(len(rows), split)
