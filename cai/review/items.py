"""The items a person reviews: judged pairs read from a run, a ``cai judge label`` folder or a
pairs file, and the order they are shown in (``random``, ``margin``, ``stratified``).

    cai review runs/rlaif-tiny --sample margin --limit 50

Sources: a pipeline run's judge records (``stages/judge.jsonl``, every round); a ``cai judge
label`` output folder (``stages/label.jsonl``, with its ``data.jsonl`` for the pairs'
categories); or any pairs file ``cai judge eval`` reads (``cai.pairs.load_pairs``), whose items
carry no judge label. Records with an ``error`` are skipped. An item's identity is its judge
record's key (or the pair's key): labels name items by it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cai.jsonl import iter_jsonl
from cai.judge.label import STAGE as LABEL_STAGE
from cai.layout import DATA_FILE, RunLayout
from cai.pairs import load_pairs
from cai.store import RunStore

JUDGE_STAGE = "judge"
"""The pipeline's judge stage (``cai.pipeline.judge``): its records are the pairs to review."""
SAMPLES = ("random", "margin", "stratified")
Sampling = Literal["random", "margin", "stratified"]


class ReviewError(ValueError):
    """A review source or labels file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Item:
    """One pair to review, in the judge's A/B terms."""

    key: str
    """The judge record's key (or the pair's key): what labels name."""
    prompt: list[dict]
    """Chat messages ending with a user turn."""
    response_a: str
    response_b: str
    category: str | None = None
    """The prompt's ``category`` (its meta), if it has one."""
    round: int | None = None
    """The online round the pair was judged in; None outside rounds."""
    winner: str | None = None
    """The judge's ``A``, ``B`` or ``tie``; None where no judge labelled the pair."""
    p_a: float | None = None
    margin: float | None = None
    """|p_a - 0.5|: how sure the judge was."""

    @property
    def judged(self) -> bool:
        return self.winner is not None

    def judge_label(self) -> dict[str, Any]:
        """What the reveal shows once a person has answered."""
        return {"winner": self.winner, "p_a": self.p_a, "margin": self.margin}


def _from_record(record: dict, meta: dict | None) -> Item:
    meta = {**(meta or {}), **(record.get("meta") or {})}
    return Item(
        key=record["key"],
        prompt=record["prompt"],
        response_a=record["response_a"],
        response_b=record["response_b"],
        category=meta.get("category"),
        round=record.get("round"),
        winner=record.get("winner"),
        p_a=record.get("p_a"),
        margin=record.get("margin"),
    )


def from_run(run_dir: Path) -> list[Item]:
    """The judged pairs of a pipeline run (all rounds), or of a ``cai judge label`` folder."""
    layout = RunLayout(run_dir)
    if layout.stage(JUDGE_STAGE).is_file():
        store = RunStore(run_dir)
        samples = store.read_stage("sample") if layout.stage("sample").is_file() else {}
        records = store.read_stage(JUDGE_STAGE).values()
        return [
            _from_record(r, samples.get(r.get("sample_key"), {}).get("meta"))
            for r in records
            if r.get("error") is None
        ]
    if layout.stage(LABEL_STAGE).is_file():
        return from_label_dir(run_dir)
    raise ReviewError(
        f"{run_dir}: no judge records (neither {layout.stage(JUDGE_STAGE)} nor "
        f"{layout.stage(LABEL_STAGE)}); give a pipeline run, a `cai judge label` folder, or --data"
    )


def from_label_dir(out: Path) -> list[Item]:
    """A ``cai judge label`` folder: its records, with the categories its export kept."""
    meta: dict[str, dict] = {}
    if (out / DATA_FILE).is_file():
        for row in iter_jsonl(out / DATA_FILE):
            row_meta = row.get("meta") or {}
            meta[row_meta.get("pair_key", "")] = row_meta
    records = RunStore(out).read_stage(LABEL_STAGE).values()
    return [_from_record(r, meta.get(r["key"])) for r in records if r.get("error") is None]


def from_pairs(source: str | Path) -> list[Item]:
    """Any pairs file ``cai judge eval`` reads: chosen as A, rejected as B, no judge label (the
    page shows each person the two in an order of its own, so A is not the left one)."""
    path = Path(source)
    if path.is_dir() and RunLayout(path).stage(LABEL_STAGE).is_file():
        return from_label_dir(path)
    return [
        Item(p.key, p.prompt, p.chosen, p.rejected, category=p.meta.get("category"))
        for p in load_pairs(source)
    ]


def load_items(run_dir: str | Path | None, data: str | Path | None = None) -> list[Item]:
    """The items of ``data`` if given, else of ``run_dir``. Raises ReviewError (no such run, no
    records), cai.data.DataError or FileNotFoundError (a bad pairs file)."""
    if data is not None:
        items = from_pairs(data)
    elif run_dir is None:
        raise ReviewError("give a run directory or --data PAIRS")
    elif not Path(run_dir).is_dir():
        raise ReviewError(f"{run_dir}: no such run directory")
    else:
        items = from_run(Path(run_dir))
    if not items:
        raise ReviewError(f"{data or run_dir}: no pairs to review (every record failed?)")
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        raise ReviewError(
            f"{data or run_dir}: two pairs share a key; labels could not tell them apart"
        )
    return items


def stratum(item: Item) -> tuple[str, str]:
    """The group stratified sampling takes turns over: (category, round)."""
    return (item.category or "", "" if item.round is None else str(item.round))


def sample(
    items: list[Item], how: Sampling = "random", limit: int | None = None, seed: int = 0
) -> list[Item]:
    """The items in review order, the first ``limit`` of them.

    ``random``: a seeded shuffle. ``margin``: the judge's least sure first (lowest margin; ties
    by key), for finding where the judge is wrong; needs judge labels. ``stratified``: a seeded
    shuffle within each (category, round), then one item from each group in turn, so a small
    limit still covers every group.
    """
    if how not in SAMPLES:
        raise ReviewError(f"--sample must be one of {', '.join(SAMPLES)}, got {how!r}")
    if limit is not None and limit < 1:
        raise ReviewError(f"--limit must be at least 1, got {limit}")
    rng = random.Random(seed)
    if how == "margin":
        unjudged = [i.key for i in items if i.margin is None]
        if unjudged:
            raise ReviewError(
                f"--sample margin needs the judge's margins; {len(unjudged)} pair(s) have none "
                f"(e.g. {unjudged[0]}): a pairs file has no judge labels, use random or stratified"
            )
        ordered = sorted(items, key=lambda i: (i.margin, i.key))
    elif how == "random":
        ordered = sorted(items, key=lambda i: i.key)
        rng.shuffle(ordered)
    else:
        groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
        for item in sorted(items, key=lambda i: i.key):
            groups[stratum(item)].append(item)
        queues = [groups[g] for g in sorted(groups)]
        for queue in queues:
            rng.shuffle(queue)
        ordered = [q[n] for n in range(max(map(len, queues))) for q in queues if n < len(q)]
    return ordered[:limit]
