"""Tests for cai.data: every source format and record shape, errors, shipped sets, export."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest

from cai import data
from cai.data import DataError, PromptRecord, load_prompts
from cai.export import export_dataset, write_jsonl
from cai.pairs import LabelledPair, load_pairs

H, A = "\n\nHuman: ", "\n\nAssistant: "
MULTI_TURN = H + "Hi there." + A + "Hello! How can I help?" + H + "Name a fruit." + A + "An apple."


def jsonl(path: Path, *rows) -> Path:
    """Write rows (dicts, or str lines written as they are) one per line."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- formats -------------------------------------------------------------------------------------


def test_jsonl_plain_prompts_skip_blank_lines_and_keep_other_fields(tmp_path):
    path = jsonl(
        tmp_path / "p.jsonl",
        {"id": 7, "prompt": "Why is the sky blue?", "category": "science"},
        "",
        "   ",
        {"prompt": "Boil an egg?"},
    )
    first, second = load_prompts(path)
    assert first == PromptRecord(
        key="7",
        messages=[user("Why is the sky blue?")],
        source=f"{path}:1",
        meta={"category": "science"},
    )
    assert second.source == f"{path}:4"
    assert len(second.key) == data.KEY_HEX_CHARS


def test_json_list_and_object_with_one_list_field(tmp_path):
    rows = [{"prompt": "a"}, {"question": "b"}]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": rows}))
    a, b = load_prompts(as_list), load_prompts(wrapped)
    assert [r.messages for r in a] == [[user("a")], [user("b")]] == [r.messages for r in b]
    assert [r.source for r in a] == [f"{as_list}[0]", f"{as_list}[1]"]
    assert b[1].source == f"{wrapped}:data[1]"


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["one", "two"], "category": ["x", "y"]}).to_parquet(path)
    records = load_prompts(path)
    assert [r.messages[0]["content"] for r in records] == ["one", "two"]
    assert records[1].source == f"{path}[1]" and records[1].meta == {"category": "y"}


def test_datasets_folder_dataset_and_datasetdict(tmp_path):
    rows = [{"messages": [user("hi"), assistant("hello")]}, {"messages": [user("bye")]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[1:])}
    ).save_to_disk(str(tmp_path / "dict"))
    single = load_prompts(tmp_path / "single")
    assert single[0].messages == [user("hi")] and single[0].meta == {"reference": "hello"}
    assert single[1].source == f"{tmp_path / 'single'}[1]"
    test = load_prompts(tmp_path / "dict", split="test")
    assert [r.messages for r in test] == [[user("bye")]]
    assert test[0].source == f"{tmp_path / 'dict'}/test[0]"
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['train', 'test'\]\)"):
        load_prompts(tmp_path / "dict", split="validation")


def test_messages_trailing_assistant_is_dropped_and_kept_as_reference(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    path = jsonl(
        tmp_path / "m.jsonl",
        {"messages": [system, user("Hi"), assistant("Hello"), user("Joke?"), assistant("No.")]},
        {"messages": [user("Only a question")]},
    )
    first, second = load_prompts(path)
    assert first.messages == [system, user("Hi"), assistant("Hello"), user("Joke?")]
    assert first.meta == {"reference": "No."}
    assert second.meta == {}


def test_hh_transcripts_first_turn_and_full_context(tmp_path):
    path = jsonl(
        tmp_path / "hh.jsonl",
        {"chosen": MULTI_TURN, "rejected": "x"},
        {"transcript": H + "Only one turn"},
    )
    first = load_prompts(path)
    assert first[0].messages == [user("Hi there.")]
    assert first[0].meta == {"rejected": "x", "reference": "Hello! How can I help?"}
    assert first[1].messages == [user("Only one turn")] and first[1].meta == {}
    full = load_prompts(path, hh_mode="full_context")
    assert full[0].messages == [
        user("Hi there."),
        assistant("Hello! How can I help?"),
        user("Name a fruit."),
    ]
    assert full[0].meta["reference"] == "An apple."


def test_hh_prompt_column_with_empty_assistant_cue(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", {"prompt": MULTI_TURN.rsplit(A, 1)[0] + "\n\nAssistant:"})
    (record,) = load_prompts(path, hh_mode="full_context")
    assert record.messages[-1] == user("Name a fruit.") and "reference" not in record.meta


def test_prompt_fields_in_order_of_preference_and_alpaca_input(tmp_path):
    path = jsonl(
        tmp_path / "f.jsonl",
        {"prompt": "P", "instruction": "I", "text": "T"},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a color.", "input": ""},
        {"question": "Q", "text": "T"},
        {"text": "T"},
        {"prompt": [user("as messages")]},
    )
    records = load_prompts(path)
    assert [r.messages[-1]["content"] for r in records] == [
        "P",
        "Translate to French.\n\nGood morning",
        "Name a color.",
        "Q",
        "T",
        "as messages",
    ]
    assert records[0].meta == {"instruction": "I", "text": "T"}
    assert records[1].meta == {"output": "Bonjour"}


def test_forced_fields(tmp_path):
    path = jsonl(tmp_path / "f.jsonl", {"body": "hello", "prompt": "ignored", "conv": [user("c")]})
    (by_prompt,) = load_prompts(path, prompt_field="body")
    assert by_prompt.messages == [user("hello")] and by_prompt.meta["prompt"] == "ignored"
    (by_messages,) = load_prompts(path, messages_field="conv")
    assert by_messages.messages == [user("c")]
    with pytest.raises(ValueError, match="not both"):
        load_prompts(path, prompt_field="body", messages_field="conv")


def test_limit_and_meta_merging(tmp_path):
    path = jsonl(
        tmp_path / "l.jsonl",
        {"prompt": "a", "meta": {"round": 1}},
        {"prompt": "b", "meta_json": '{"round": 2}'},
        {"prompt": "c"},
    )
    records = load_prompts(path, limit=2)
    assert [r.meta for r in records] == [{"round": 1}, {"round": 2}]
    with pytest.raises(ValueError, match="limit"):
        load_prompts(path, limit=0)


def test_keys_are_stable_and_equal_for_equal_content(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", {"prompt": "same"}, {"prompt": "other"})
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"messages": [user("same")], "category": "z"}]))
    keys = [r.key for r in load_prompts(a)]
    assert keys == [r.key for r in load_prompts(a)]
    assert keys[0] != keys[1]
    assert load_prompts(b)[0].key == keys[0]
    assert keys[0] == data._hash_key([user("same")])


def test_duplicate_content_raises_or_is_dropped_on_request(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"prompt": "x"}, {"prompt": "y"}, {"prompt": "x"})
    with pytest.raises(DataError, match=rf"{path}:3: same messages as {path}:1"):
        load_prompts(path)
    assert [r.source for r in load_prompts(path, duplicates="drop")] == [f"{path}:1", f"{path}:2"]


def test_record_round_trips_through_dict():
    record = PromptRecord("k", [user("x")], "f:1", {"a": 1})
    assert PromptRecord.from_dict(record.to_dict()) == record
    pair = LabelledPair("k", [user("x")], "good", "bad", "f:1", {})
    assert LabelledPair.from_dict(pair.to_dict()) == pair
    with pytest.raises(DataError, match=r"missing \['meta'\]"):
        PromptRecord.from_dict({"key": "k", "messages": [], "source": "s"})


# --- sources: shipped, hub, missing --------------------------------------------------------------

SHIPPED = {"red_team": 160, "helpful": 100, "edgy_benign": 50, "false_premise": 50}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sets(name):
    records = load_prompts(name)
    assert len(records) == SHIPPED[name]
    prefix = {"red_team": "rt", "helpful": "hp", "edgy_benign": "eb", "false_premise": "fp"}[name]
    assert all(r.key.startswith(f"{prefix}-") for r in records)
    assert len({r.key for r in records}) == len(records)
    assert len({r.messages[0]["content"] for r in records}) == len(records)
    assert all(len(r.messages) == 1 and r.meta["category"] for r in records)
    if name == "false_premise":
        assert all(r.meta["false_premise"] for r in records)
    # The source names the shipped file as data/<file>, not where cai is checked out: exports
    # carry it, and a trained model's identity must not change with the folder.
    assert [r.source for r in records[:2]] == [f"data/{name}.jsonl:1", f"data/{name}.jsonl:2"]


def test_shipped_red_team_covers_ten_categories_and_no_prompt_is_in_two_sets():
    categories = Counter(r.meta["category"] for r in load_prompts("red_team"))
    assert len(categories) >= 10 and min(categories.values()) >= 5
    texts = [r.messages[0]["content"] for name in SHIPPED for r in load_prompts(name)]
    assert len(set(texts)) == len(texts)


def test_shipped_hh_sample_loads_as_prompts_and_pairs():
    assert len(load_prompts("hh_sample")) == 5
    pairs = load_pairs("hh_sample")
    assert len(pairs) == 5 and all(
        p.chosen and p.rejected and p.chosen != p.rejected for p in pairs
    )


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "from the hub"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (record,) = load_prompts("someone/prompts", split="test")
    assert record.source == "someone/prompts:test[0]" and record.messages == [user("from the hub")]
    load_prompts("org/red_team")  # close to a shipped name, but a hub id
    assert calls == [("someone/prompts", "test"), ("org/red_team", "train")]


def test_hub_id_offline_error_is_clear(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)nobody/no-such-set: not a local file.*hub failed"
    ):
        load_prompts("nobody/no-such-set")


def test_missing_file_lists_shipped_sets(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such file.*red_team"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts("./red_team")
    with pytest.raises(FileNotFoundError, match="did you mean 'red_team'"):
        load_prompts("red_tem")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.jsonl", "\n\n", "no records; the source is empty"),
        ("p.txt", "hello", r"cannot tell the format.*format="),
        ("empty.json", "[]", "no records"),
        ("scalar.json", "3", "expected a JSON list of records"),
        ("two.json", '{"a": [], "b": []}', r"exactly one list field.*\['a', 'b'\]"),
        ("bad.json", '[\n{"prompt": "x"},\n{oops}\n]', r"bad\.json:3: invalid JSON"),
        ("bad.parquet", "not parquet", "cannot read as parquet"),
    ],
)
def test_bad_sources(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match) as error:
        load_prompts(path)
    assert str(path) in str(error.value)


def test_folders_that_are_not_data_sets(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: not a folder written by datasets"):
        load_prompts(tmp_path)
    with pytest.raises(DataError, match=rf"{tmp_path}: cannot read"):
        load_prompts(tmp_path, format="jsonl")


# --- malformed records ---------------------------------------------------------------------------

MALFORMED = [
    # (lines of the jsonl file, load_prompts kwargs, where, message)
    (['{"prompt": "ok"}', '{"prompt": "unterminated'], {}, ":2", "invalid JSON"),
    (['["a", "list"]'], {}, ":1", "expected a JSON object"),
    (
        ['{"prompt": "ok"}', '{"answer": "x", "label": 1}'],
        {},
        ":2",
        r"no prompt found.*\['answer', 'label'\].*accepted",
    ),
    (['{"prompt": "   "}'], {}, ":1", "prompt is empty"),
    (['{"prompt": 42}'], {}, ":1", "prompt must be a string"),
    (['{"messages": [{"role": "tool", "content": "x"}]}'], {}, ":1", "role 'tool' is not one of"),
    (
        [
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}'
        ],
        {},
        ":1",
        "must end with a user turn",
    ),
    (
        ['{"messages": [{"role": "system", "content": "s"}]}'],
        {},
        ":1",
        "must end with a user turn.*ends with system",
    ),
    (
        [
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]}'
        ],
        {},
        ":1",
        r"messages\[1\]: a system message may only come first",
    ),
    (
        ['{"messages": [{"role": "user", "content": ["part"]}]}'],
        {},
        ":1",
        "content must be a string",
    ),
    (['{"messages": []}'], {}, ":1", "non-empty list of chat messages"),
    (['{"messages": [{"role": "user", "content": ""}]}'], {}, ":1", "empty user content"),
    (
        ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "a", "prompt": "z"}'],
        {},
        ":3",
        r"duplicate id 'a' \(also at .*:1\)",
    ),
    (['{"id": 1.5, "prompt": "x"}'], {}, ":1", "id must be a non-empty string or an integer"),
    (
        ['{"transcript": "\\n\\nHuman: a\\n\\nHuman: b"}'],
        {"hh_mode": "full_context"},
        ":1",
        "turn 2 is Human; turns must alternate",
    ),
    (['{"chosen": "\\n\\nHuman: \\n\\nAssistant: hi"}'], {}, ":1", "Human turn 1 is empty"),
    (
        ['{"body": ["x"]}'],
        {"prompt_field": "body"},
        ":1",
        "body must be a string.*messages_field='body'",
    ),
    (
        ['{"prompt": "x"}'],
        {"messages_field": "conv"},
        ":1",
        r"no field 'conv'; the record has fields \['prompt'\]",
    ),
    (['{"prompt": "x", "meta_json": "{not json"}'], {}, ":1", "meta_json is not valid JSON"),
]


@pytest.mark.parametrize(("lines", "kwargs", "where", "match"), MALFORMED)
def test_malformed_records_name_file_and_line(tmp_path, lines, kwargs, where, match):
    path = jsonl(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(DataError, match=match) as error:
        load_prompts(path, **kwargs)
    assert str(error.value).startswith(f"{path}{where}: ")


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text"):
        load_prompts(path)


# A lone surrogate (half of a UTF-16 pair) is valid JSON but not text: no tokenizer and no UTF-8
# writer can take it. Issue 15: one such prompt crashed every run after the model loaded.
LONE_SURROGATE = r'"lone surrogate \ud800 here"'


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ('{"id": "s1", "prompt": BAD}'.replace("BAD", LONE_SURROGATE), "prompt"),
        (
            '{"messages": [{"role": "user", "content": BAD}]}'.replace("BAD", LONE_SURROGATE),
            r"messages\[0\].content",
        ),
        ('{"prompt": "fine", "category": BAD}'.replace("BAD", LONE_SURROGATE), "category"),
        (
            '{"prompt": "fine", "meta": {"notes": [BAD]}}'.replace("BAD", LONE_SURROGATE),
            r"meta.notes\[0\]",
        ),
    ],
)
def test_lone_surrogates_are_refused_naming_line_and_field(tmp_path, row, field):
    path = jsonl(tmp_path / "p.jsonl", {"id": "g1", "prompt": "What is 2+2?"}, row)
    with pytest.raises(DataError, match=rf"^{path}:2: {field}: .*lone surrogate '\\ud800'"):
        load_prompts(path)


def test_lone_surrogates_are_refused_in_pairs_and_json_lists(tmp_path):
    pairs = jsonl(
        tmp_path / "pairs.jsonl",
        {"prompt": "fine", "chosen": "a", "rejected": "b"},
        '{"prompt": "q", "chosen": BAD, "rejected": "b"}'.replace("BAD", LONE_SURROGATE),
    )
    with pytest.raises(DataError, match=rf"^{pairs}:2: chosen: .*lone surrogate"):
        load_pairs(pairs)
    as_json = tmp_path / "p.json"
    as_json.write_text('[{"prompt": "ok"}, {"prompt": BAD}]'.replace("BAD", LONE_SURROGATE))
    with pytest.raises(DataError, match=rf"^{as_json}\[1\]: prompt: .*lone surrogate"):
        load_prompts(as_json)


def test_malformed_rows_in_json_and_parquet_name_the_index(tmp_path):
    as_json = tmp_path / "bad.json"
    as_json.write_text(json.dumps([{"prompt": "ok"}, {"nothing": "here"}]))
    with pytest.raises(DataError, match=rf"{as_json}\[1\]: no prompt found"):
        load_prompts(as_json)
    as_parquet = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt": ["ok", ""]}).to_parquet(as_parquet)
    with pytest.raises(DataError, match=rf"{as_parquet}\[1\]: prompt is empty"):
        load_prompts(as_parquet)


# --- pairs ---------------------------------------------------------------------------------------


def test_pairs_in_our_format_and_trl_explicit_formats(tmp_path):
    path = jsonl(
        tmp_path / "pairs.jsonl",
        {
            "prompt": [user("Q1")],
            "chosen": [assistant("good")],
            "rejected": [assistant("bad")],
            "p_chosen": 0.8,
            "meta": {"principle": "harmless-1"},
        },
        {"prompt": "Q2", "chosen": "good", "rejected": "bad", "id": "x"},
        {"prompt": H + "Q3" + "\n\nAssistant:", "chosen": " good", "rejected": " bad"},
    )
    ours, trl, hh_prompt = load_pairs(path)
    assert (ours.prompt, ours.chosen, ours.rejected) == ([user("Q1")], "good", "bad")
    assert ours.meta == {"principle": "harmless-1", "p_chosen": 0.8}
    assert (trl.key, trl.prompt, trl.source) == ("x", [user("Q2")], f"{path}:2")
    assert hh_prompt.prompt == [user("Q3")] and hh_prompt.chosen == " good"


def test_pairs_implicit_prompt_formats(tmp_path):
    conversation = [user("Hi"), assistant("Hello"), user("Fruit?")]
    path = jsonl(
        tmp_path / "implicit.jsonl",
        {
            "chosen": [*conversation, assistant("Apple")],
            "rejected": [*conversation, assistant("Rock")],
        },
        {"chosen": MULTI_TURN, "rejected": MULTI_TURN.replace("An apple.", "No.")},
    )
    messages, hh = load_pairs(path)
    assert (messages.prompt, messages.chosen, messages.rejected) == (conversation, "Apple", "Rock")
    assert hh.prompt == [
        user("Hi there."),
        assistant("Hello! How can I help?"),
        user("Name a fruit."),
    ]
    assert (hh.chosen, hh.rejected) == ("An apple.", "No.")
    assert messages.key == load_pairs(path)[0].key != hh.key


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            {"prompt": "q", "chosen": "a"},
            r"no rejected; the record has fields \['chosen', 'prompt'\]",
        ),
        (
            {"chosen": "a", "rejected": "b"},
            "no prompt field, so chosen and rejected must be whole conversations",
        ),
        (
            {"chosen": H + "x" + A + "a", "rejected": H + "y" + A + "b"},
            "must be equal up to their last",
        ),
        (
            {"chosen": [user("x"), assistant("a")], "rejected": [user("y"), assistant("b")]},
            "they differ earlier",
        ),
        (
            {"prompt": "q", "chosen": [user("u"), assistant("a")], "rejected": "b"},
            r"chosen must be one assistant message, found roles \['user', 'assistant'\]",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 1.5},
            r"p_chosen must be a number in \[0, 1\]",
        ),
        (
            {"prompt": H + "q" + A + "answer", "chosen": "a", "rejected": "b"},
            "must end with a Human turn",
        ),
        (
            {"prompt": [user("q"), assistant("a")], "chosen": "a", "rejected": "b"},
            "prompt must end with a user turn",
        ),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": [assistant(" \n")]}, "rejected is empty"),
        (
            {"prompt": "q", "chosen": "same", "rejected": "same "},
            "chosen and rejected are the same",
        ),
        (
            {"chosen": [user("x"), assistant("a")], "rejected": [user("x"), assistant("a")]},
            "chosen and rejected are the same",
        ),
    ],
)
def test_malformed_pairs(tmp_path, row, match):
    path = jsonl(tmp_path / "pairs.jsonl", {"prompt": "fine", "chosen": "a", "rejected": "b"}, row)
    with pytest.raises(DataError, match=match) as error:
        load_pairs(path)
    assert str(error.value).startswith(f"{path}:2: ")


# --- export --------------------------------------------------------------------------------------

SFT = [
    {"messages": [user("Hi"), assistant("Hello")], "meta": {"principle": "p1", "rounds": 2}},
    {"messages": [user("Bye"), assistant("Goodbye")], "meta": {"model": "m", "critiques": ["c"]}},
]
PREFERENCE = [
    {
        "prompt": [user("Q")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
        "p_chosen": 0.75,
        "meta": {"principle": "p1"},
    },
    {
        "prompt": [{"role": "system", "content": "S"}, user("Q2")],
        "chosen": [assistant("yes")],
        "rejected": [assistant("no")],
        "p_chosen": 1,
        "meta": {},
    },
]


@pytest.mark.parametrize("records", [SFT, PREFERENCE], ids=["sft", "preference"])
def test_export_round_trip(tmp_path, records):
    export_dataset(records, tmp_path / "out")
    lines = (tmp_path / "out" / "data.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    loaded = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    rows = [
        {**{k: v for k, v in row.items() if k != "meta_json"}, "meta": json.loads(row["meta_json"])}
        for row in loaded
    ]
    assert rows == records
    assert sorted(tmp_path.joinpath("out").iterdir()) == [
        tmp_path / "out" / "data.jsonl",
        tmp_path / "out" / "dataset",
    ]


def test_exported_data_reads_back_as_prompts_and_pairs(tmp_path):
    export_dataset(SFT, tmp_path / "sft")
    prompts = load_prompts(tmp_path / "sft" / "dataset")
    assert prompts[0].messages == [user("Hi")]
    assert prompts[0].meta == {"principle": "p1", "rounds": 2, "reference": "Hello"}
    export_dataset(PREFERENCE, tmp_path / "pref")
    for source in (tmp_path / "pref" / "dataset", tmp_path / "pref" / "data.jsonl"):
        pairs = load_pairs(source)
        assert [p.meta for p in pairs] == [{"principle": "p1", "p_chosen": 0.75}, {"p_chosen": 1.0}]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        export_dataset(SFT, tmp_path / "sft")
        write_jsonl(SFT, tmp_path / "plain.jsonl")
    finally:
        os.umask(old)
    for path in (tmp_path / "sft" / "data.jsonl", tmp_path / "plain.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert (tmp_path / "sft" / "dataset").stat().st_mode & 0o777 == 0o777 & ~umask


def test_export_replaces_an_earlier_export(tmp_path):
    export_dataset(SFT, tmp_path)
    export_dataset(SFT[:1], tmp_path)
    assert len(datasets.load_from_disk(str(tmp_path / "dataset"))) == 1
    assert len((tmp_path / "data.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "dataset"]


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([], "no records to export"),
        ([SFT[0], PREFERENCE[0]], r"records\[1\]: expected an SFT record like records\[0\]"),
        (
            [{**SFT[0], "key": "k"}],
            r"found \['key', 'messages', 'meta'\]; put extra fields in meta",
        ),
        ([{"messages": [user("no answer")]}], "must end with an assistant turn"),
        (
            [{"messages": [{"role": "user", "content": "x", "name": "n"}, assistant("a")]}],
            "only the keys role and content",
        ),
        (
            [{**PREFERENCE[0], "chosen": [assistant("a"), assistant("b")]}],
            "chosen must be a list of one assistant message",
        ),
        ([{**PREFERENCE[0], "p_chosen": float("nan")}], "p_chosen must be a number"),
    ],
)
def test_export_rejects_malformed_records(tmp_path, records, match):
    with pytest.raises(DataError, match=match):
        export_dataset(records, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl([{"old": 1}], path)

    def failing():
        yield {"new": 1}
        raise RuntimeError("generator died half way")

    with pytest.raises(RuntimeError, match="half way"):
        write_jsonl(failing(), path)
    with pytest.raises(DataError, match=r"record 1 cannot be written as JSON"):
        write_jsonl([{"ok": 1}, {"bad": object()}], path)
    assert path.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_failed_export_leaves_no_partial_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"records\[1\]: meta cannot be written as JSON"):
        export_dataset([SFT[0], {**SFT[1], "meta": {"x": object()}}], out)
    assert list(out.iterdir()) == []


def test_jsonl_line_over_the_limit_fails_fast_naming_it(tmp_path, monkeypatch):
    import tracemalloc

    from cai import sources

    limit = 64 * 1024
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", limit, raising=False)
    path = tmp_path / "pairs.jsonl"
    fits = json.dumps({"prompt": "p" * (limit - 100), "chosen": "a", "rejected": "b"})
    huge = json.dumps({"prompt": "q", "chosen": "x" * 4_000_000, "rejected": "b"})
    assert len(fits) <= limit
    path.write_text(f"{fits}\n{huge}\n")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            load_pairs(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{path}:2: ")
    assert f"{limit:,} bytes" in str(e.value) and "MAX_LINE_BYTES" in str(e.value)
    assert peak < 1_000_000  # the 4 MB line was never read whole
    with pytest.raises(DataError, match=f"{path}:2: "):
        load_prompts(path)
    assert len(load_pairs(path, limit=1)) == 1  # a line up to the limit reads


def test_shipped_pairs_source_is_portable():
    [pair] = load_pairs("judge_dev", limit=1)
    assert pair.source == "data/judge_dev.jsonl:1"
