"""``cai judge label``: a file of pairs → TRL preference records, resumable like a stage.

A fake judge engine (P(first slot) from the responses' lengths) gives hand-checkable labels; the
real default model runs the command end to end once.
"""

from __future__ import annotations

import json

import pytest
from fakes import ScriptedEngine, options_of

import cai.cli.judge
from cai import cli
from cai.judge import Judge
from cai.judge.label import label_pairs
from cai.pairs import load_pairs

PROMPT = "How do I boil an egg?"
LONG, SHORT = "Boil it for nine minutes.", "No."


def write_pairs(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def by_length(fail: str | None = None):
    def slot_a(conversation, prefix):
        o = options_of(conversation)
        if fail in (o["A"], o["B"]):
            return "engine error"
        return (len(o["A"]), len(o["B"]))

    return slot_a


def test_label_exports_decided_pairs_oriented_and_resumes(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_pairs(
        data,
        [
            {"prompt": PROMPT, "chosen": LONG, "rejected": SHORT},  # A wins
            {"prompt": "And two eggs?", "chosen": SHORT, "rejected": LONG, "id": 7},  # B wins
            {"prompt": PROMPT, "chosen": "Same.", "rejected": "Also."},  # a tie
            {"prompt": PROMPT, "chosen": "FAIL", "rejected": SHORT},  # the engine fails
        ],
    )
    pairs = load_pairs(data)
    out = tmp_path / "labels"
    engine = ScriptedEngine(by_length(fail="FAIL"))
    first = label_pairs(Judge(engine), pairs, out, model="fake", batch_size=2, progress=False)
    assert (first.pairs, first.exported, first.ties, first.errors) == (4, 2, 1, 1)
    assert len(engine.score_calls) == 2  # batches of two pairs, both orders each

    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    # P(A first) = 25 / (25 + 3) in both orders, so p_a = 25/28 (0.89 to LABEL_DECIMALS); the
    # winner is always chosen.
    assert [r["chosen"][0]["content"] for r in rows] == [LONG, LONG]
    assert [r["rejected"][0]["content"] for r in rows] == [SHORT, SHORT]
    assert [r["p_chosen"] for r in rows] == [round(25 / 28, 2)] * 2
    assert rows[0]["prompt"] == [{"role": "user", "content": PROMPT}]
    meta = rows[1]["meta"]
    assert (meta["input_key"], meta["constitution"], meta["judge_model"]) == (
        "7",
        "harmless",
        "fake",
    )
    assert meta["p_chosen_first"] == round(25 / 28, 2) and meta["consistent"] is True
    assert [p.meta["p_chosen"] for p in load_pairs(out / "data.jsonl")] == [round(25 / 28, 2)] * 2

    # A re-run asks only for the failed pair, and exports it now.
    engine = ScriptedEngine(by_length())
    second = label_pairs(Judge(engine), pairs, out, model="fake", progress=False)
    assert (second.tally.done_before, second.exported, second.errors) == (3, 3, 0)
    [(conversations, _)] = engine.score_calls
    assert len(conversations) == 2 and "FAIL" in options_of(conversations[0]).values()
    # Other judge settings make other records: nothing is taken from the first judge's.
    third = label_pairs(Judge(engine, seed=1), pairs, out, model="fake", progress=False)
    assert third.tally.done_before == 0


@pytest.mark.slow
def test_cli_judge_label_real_model(tmp_path, capsys, monkeypatch, hf_engine):
    # The command's judge on the session's engine (the default model, loaded once for all tests).
    monkeypatch.setattr(
        cai.cli.judge, "judge_from_args", lambda args: Judge(hf_engine, args.constitution)
    )
    out = tmp_path / "labels"
    args = ["judge", "label", "--data", "hh_sample", "--limit", "1", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "judge label: 1 pairs (0 labelled before)" in printed
    records = [
        json.loads(line) for line in (out / "stages" / "label.jsonl").read_text().splitlines()
    ]
    assert len(records) == 1 and records[0]["error"] is None
    exported = load_pairs(out / "data.jsonl")
    assert len(exported) == sum(r["winner"] in ("A", "B") for r in records)
    for pair in exported:
        assert 0.5 < pair.meta["p_chosen"] <= 1
        assert pair.meta["judge_model"] == "smollm2-135m"
