"""Judge records as labels: the rule that turns one into a TRL preference row (shared with the
pipeline's judge stage), and labelling a file of response pairs resumably: ``cai judge label``.
Their record keys take the judge's part from ``cai.judge.keys.judge_key``, as every judge
record's does.

    cai judge label --data pairs.jsonl --out runs/labels [--model SPEC] [--constitution NAME]

The pairs are read as ``cai judge eval`` reads them (``cai.pairs.load_pairs``: our exports, TRL's
formats, HH-RLHF transcripts); their chosen / rejected are only the two responses, shown to the
judge as A and B in that order (it judges both orders). Every pair goes through the record loop
(``cai.record_loop.run_records``) into ``OUT/stages/label.jsonl``, one record per pair (the judge's
``Preference`` fields), so a killed run resumes and failed pairs are retried on the next run.
The decided pairs are exported as the pipeline's judge stage exports them (TRL's explicit-prompt
format with ``p_chosen``: ``OUT/data.jsonl`` and ``OUT/dataset/``); ties stay out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cai.data import DataError
from cai.export import export_dataset
from cai.judge.judge import Judge
from cai.judge.keys import judge_key
from cai.judge.pair import JudgePair, check_pair
from cai.judge.settings import JudgeSettings
from cai.keys import record_key
from cai.layout import DATA_FILE, DATASET, STAGES
from cai.pairs import LabelledPair
from cai.record_loop import StageTally, run_records
from cai.resources import resolve, shipped_names
from cai.store import RunStore

STAGE = "label"

LABEL_DECIMALS = 2
"""Decimals of the probabilities in a preference export. A soft label means nothing finer, and
the judge's float noise (~1e-6 between batch sizes, as on Ray, and between backends) must not
change the data a model trains on: that data is the trained model's identity, and so the keys
and samples of every later round (see ``cai.keys.model_key``)."""


def preference_fields(record: dict) -> tuple[dict, dict] | None:
    """A decided pair record in TRL's preference format, the winner as ``chosen``: the row's
    ``chosen``, ``rejected`` and ``p_chosen``, and the judge's fields for its ``meta``; None
    for an error or a tie. The one rule for turning a judge record into an export row."""
    if record.get("error") is not None or record["winner"] not in ("A", "B"):
        return None
    a_wins = record["winner"] == "A"
    chosen, rejected = (
        (record["response_a"], record["response_b"])
        if a_wins
        else (record["response_b"], record["response_a"])
    )

    def towards_chosen(p: float) -> float:
        return round(p if a_wins else 1 - p, LABEL_DECIMALS)

    row = {
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": towards_chosen(record["p_a"]),
    }
    judged = {
        "principles": record["principles"],
        "consistent": record["consistent"],
        "p_chosen_first": towards_chosen(record["p_a_first"]),
        "p_chosen_second": towards_chosen(record["p_a_second"]),
        "margin": round(record["margin"], LABEL_DECIMALS),
    }
    return row, judged


@dataclass
class LabelResult:
    pairs: int
    exported: int
    ties: int
    errors: int
    tally: StageTally
    out: Path
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    """(source, input key, error) of each pair that failed, in input order."""


def check_out(source: str | Path, out: str | Path) -> None:
    """Raise DataError if a labelling run's outputs in ``out`` (the export, the dataset folder,
    the stage records) would overwrite, or sit inside or around, the input ``source`` (a file
    or a folder; a shipped set's name is its file): the export replaces its file whole, so
    ``--data D/data.jsonl --out D`` would put the labelled rows in place of the pairs. Paths
    are compared resolved, so any spelling of the same file is caught."""
    path = Path(source).expanduser()
    if not path.exists() and str(source) in shipped_names("data"):
        path = resolve("data", source)
    if not path.exists():
        return  # a hub id, or a missing file that loading reports
    path = path.resolve()
    for name in (DATA_FILE, DATASET, STAGES):
        output = (Path(out).expanduser() / name).resolve()
        if output == path or path in output.parents or output in path.parents:
            raise DataError(
                f"--out {out}: its {name} would overwrite or sit on the input {source}; "
                "write the labels to another folder"
            )


def label_key(settings: JudgeSettings, pair: LabelledPair, model: str) -> str:
    """A pair's record key: the pair and the judge's part (``cai.judge.keys.judge_key``).
    Changed settings make new records; the old ones stay in the store, unexported."""
    return record_key(
        input=pair.key,
        stage=STAGE,
        prompt=pair.prompt,
        response_a=pair.chosen,
        response_b=pair.rejected,
        **judge_key(settings, JudgePair(pair.prompt, pair.chosen, pair.rejected, pair.key), model),
    )


def _judged(judge: Judge, pairs: list[LabelledPair], progress: bool | str) -> list[dict]:
    """The judge's Preference fields per pair. A pair the judge's check refuses gets its own
    error record naming it, and the others are judged in one batch (the judge gives a pair too
    long for its context an error of its own, so no pair fails another's label)."""
    out: list[dict | None] = []
    ready: list[JudgePair] = []
    for n, p in enumerate(pairs):
        try:
            check_pair((p.prompt, p.chosen, p.rejected), n)
        except ValueError as e:
            reason = str(e).split(": ", 1)[-1]  # check_pair names it by its index in the batch
            out.append({"error": f"pair {p.key} ({p.source}): {reason}"})
            continue
        out.append(None)
        ready.append(JudgePair(p.prompt, p.chosen, p.rejected, key=p.key))
    judged = iter(judge.label(ready, progress=progress) if ready else [])
    rows = []
    for p, row in zip(pairs, out, strict=True):
        if row is None:
            row = next(judged).to_dict()
            if row["error"] is not None:
                row["error"] = f"pair {p.key} ({p.source}): {row['error']}"
        rows.append(row)
    return rows


def label_pairs(
    judge: Judge,
    pairs: list[LabelledPair],
    out: str | Path,
    *,
    model: str,
    batch_size: int = 64,
    progress: bool = True,
) -> LabelResult:
    """Judge the pairs not yet labelled in ``out``, then export every decided pair there."""
    out = Path(out)
    judge.settings.verdicts([p.prompt for p in pairs])  # routed: the keys' verdicts in one pass
    items = [(label_key(judge.settings, p, model), p) for p in pairs]

    def call(batch, label):
        prefs = _judged(judge, [pair for _, pair in batch], label)
        return [
            {
                "key": key,
                "input_key": pair.key,
                "pair_source": pair.source,
                "prompt": pair.prompt,
                "response_a": pair.chosen,
                "response_b": pair.rejected,
                "judge_model": model,
                **pref,
            }
            for (key, pair), pref in zip(batch, prefs, strict=True)
        ]

    tally = StageTally(STAGE)
    records = run_records(
        RunStore(out),
        STAGE,
        items,
        key=lambda item: item[0],
        call=call,
        tally=tally,
        batch_size=batch_size,
        label="label" if progress else False,
    )
    rows, ties, failed = [], 0, []
    for key, pair in items:
        record = records[key]
        fields = preference_fields(record)
        if fields is None:
            if record.get("error") is not None:
                failed.append((pair.source, pair.key, record["error"]))
            else:
                ties += 1
            continue
        row, judged = fields
        meta = {
            **pair.meta,
            "source": "judge",
            "pair_source": pair.source,
            "input_key": pair.key,
            "pair_key": key,
            **judged,
            "constitution": judge.constitution.name,
            "judge_model": model,
        }
        rows.append({"prompt": pair.prompt, **row, "meta": meta})
    if rows:
        export_dataset(rows, out)
    return LabelResult(len(items), len(rows), ties, len(failed), tally, out, failed)


__all__ = ["LabelResult", "check_out", "label_key", "label_pairs", "preference_fields"]
