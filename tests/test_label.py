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
from cai.data import DataError
from cai.engine import PromptTooLong
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


class RaisingEngine(ScriptedEngine):
    """Raises PromptTooLong for a batch holding a response with HUGE, as the backends do when
    built with overflow="raise" (their default): before any work, for the whole call."""

    def score(self, conversations, options, *, prefixes=None, progress=False):
        for i, conversation in enumerate(conversations):
            if "HUGE" in options_of(conversation).values():
                raise PromptTooLong(f"conversation {i}: prompt exceeds the model's context")
        return super().score(conversations, options, prefixes=prefixes, progress=progress)


def test_label_an_overflowing_pair_fails_only_itself(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Egg {i}?", "chosen": LONG, "rejected": SHORT} for i in range(6)]
    rows.insert(4, {"prompt": PROMPT, "chosen": "HUGE", "rejected": SHORT, "id": "big"})
    write_pairs(data, rows)
    pairs = load_pairs(data)
    engine = RaisingEngine(by_length())
    result = label_pairs(Judge(engine), pairs, tmp_path / "out", model="fake", progress=False)
    assert (result.pairs, result.exported, result.errors) == (7, 6, 1)
    [(source, key, error)] = result.failed
    assert (source, key) == (f"{data}:5", "big")
    assert "pair big" in error and f"{data}:5" in error and "context" in error
    records = [
        json.loads(line)
        for line in (tmp_path / "out" / "stages" / "label.jsonl").read_text().splitlines()
    ]
    assert [r["input_key"] for r in records if r["error"] is not None] == ["big"]


def near_limit_pairs(path) -> None:
    """Six ordinary pairs and, on line 7, one whose text (~8000 tokens) fits the default
    model's 8192-token context alone but not inside the judge's template."""
    rows = [
        {"prompt": f"How long do I boil {n} eggs?", "chosen": LONG, "rejected": SHORT}
        for n in range(1, 7)
    ]
    rows.append({"prompt": PROMPT, "chosen": " egg" * 7990, "rejected": SHORT, "id": "big"})
    write_pairs(path, rows)


@pytest.mark.slow
def test_label_near_limit_pair_real_model(tmp_path, hf_engine):
    data = tmp_path / "pairs.jsonl"
    near_limit_pairs(data)
    pairs = load_pairs(data)
    cai.cli.judge._check_pair_lengths(pairs, None, "hf")  # the text alone fits
    judge = Judge(hf_engine)
    with pytest.raises(DataError, match=f"{data}:7: the judge's prompt for this pair"):
        cai.cli.judge._check_pair_lengths(pairs, None, "hf", judge.settings)

    result = label_pairs(judge, pairs, tmp_path / "out", model="smollm2-135m", progress=False)
    assert (result.pairs, result.exported + result.ties, result.errors) == (7, 6, 1)
    [(source, key, error)] = result.failed
    assert (source, key) == (f"{data}:7", "big") and "context" in error


@pytest.mark.slow
def test_cli_judge_label_refuses_near_limit_pair_before_loading(tmp_path, capsys, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    near_limit_pairs(data)

    def unloaded_only(args):
        assert isinstance(args.model, cai.cli.judge._NoEngine), "the model loaded"
        return Judge(args.model, args.constitution)

    monkeypatch.setattr(cai.cli.judge, "judge_from_args", unloaded_only)
    args = ["judge", "label", "--data", str(data), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:7: the judge's prompt for this pair")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["data.jsonl", "dataset", "stages/label.jsonl", "."])
def test_cli_judge_label_refuses_out_on_its_input(tmp_path, capsys, monkeypatch, inside):
    out = tmp_path / "runs" / "d"
    data = out / inside
    if inside == ".":
        data = out  # a saved dataset folder, read as the input
    elif inside == "dataset":
        data.mkdir(parents=True)
    else:
        data.parent.mkdir(parents=True, exist_ok=True)
        write_pairs(data, [{"prompt": PROMPT, "chosen": LONG, "rejected": SHORT}])
    out.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in out.rglob("*"))

    def no_model(args):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(cai.cli.judge, "judge_from_args", no_model)
    # Spelled another way (relative, through ..), the input is still the output.
    monkeypatch.chdir(tmp_path)
    args = ["judge", "label", "--data", str(data), "--out", "runs/x/../d"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --out runs/x/../d")
    assert sorted(p.name for p in out.rglob("*")) == before
