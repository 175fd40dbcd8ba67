"""Constitutions: shipped files, validation errors with file:line:field, sampling, converters,
YAML round trip, and the ``cai constitution`` commands."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from test_config import alias_bomb

from cai.cli import main
from cai.config import ConfigError
from cai.constitution import (
    _SLUG_RULE,
    Constitution,
    CritiqueExample,
    JudgeExample,
    Message,
    Principle,
    load_constitution,
)
from cai.constitution_convert import dump_constitution, from_anthropic, from_huggingface
from cai.resources import shipped_names

# Line numbers are those of this text; the malformed cases below edit it line by line.
TINY = """\
name: tiny
description: A tiny constitution.
version: "1"
system_prompt: Be good.
principles:
  - id: safe
    critique: What is unsafe?
    revision: Make it safe.
    judge: Which is safer?
    tags: [harmless]
    weight: 2
  - id: kind
    critique: What is unkind?
    revision: Make it kind.
critique_examples:
  - principle: safe
    conversation:
      - role: user
        content: Hi
      - role: assistant
        content: Go away.
    critique: Rude.
    revision: Hello!
judge_examples:
  - principle: safe
    conversation:
      - role: user
        content: Hi
    response_a: Hello!
    response_b: Go away.
    better: A
"""


def _edit(text: str, changes: dict[int, str | None]) -> str:
    """Replace (or, for None, delete) lines by their 1-based number; a new text may span lines."""
    lines = text.splitlines()
    for number in sorted(changes, reverse=True):
        new = changes[number]
        lines[number - 1 : number] = [] if new is None else new.splitlines()
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- shipped constitutions ----------------------------------------------------------------------

SHIPPED_MINIMUMS = {  # name: (principles with critique+revision, judge questions)
    "harmless": (16, 16),
    "hhh": (8, 8),
    "sycophancy": (5, 5),
    "over-refusal": (5, 5),
}


def test_all_shipped_constitutions_are_listed():
    assert set(SHIPPED_MINIMUMS) <= set(shipped_names("constitutions"))


@pytest.mark.parametrize("name", sorted(SHIPPED_MINIMUMS))
def test_shipped_constitution_loads_with_enough_principles_and_examples(name):
    c = load_constitution(name)
    critique_min, judge_min = SHIPPED_MINIMUMS[name]
    assert c.name == name
    assert c.system_prompt
    assert len(c.critique_principles) >= critique_min
    assert len(c.judge_principles) >= judge_min
    assert len(c.critique_examples) >= 3
    assert len(c.judge_examples) >= 3
    # Both answers occur among the exemplars, so they do not teach "always A".
    assert {ex.better for ex in c.judge_examples} == {"A", "B"}
    assert len(c.critique_shots()) == len(c.critique_examples)


def test_harmless_has_exactly_16_critique_and_16_judge_principles():
    c = load_constitution("harmless")
    assert len(c.critique_principles) == 16
    assert len(c.judge_principles) == 16


# --- malformed input: file, line and field in every error ---------------------------------------


def test_tiny_constitution_is_valid(tmp_path):
    c = load_constitution(_write(tmp_path, TINY))
    assert [p.id for p in c.principles] == ["safe", "kind"]
    assert c.principle("safe").weight == 2.0
    assert c.principle("safe").tags == ("harmless",)
    assert c.critique_examples[0].conversation[1] == Message("assistant", "Go away.")


MALFORMED = [
    # (id, line edits, expected line, field, words in the message)
    ("unknown-key", {10: "    tag: [harmless]"}, 10, "principles[0].tag", "unknown key"),
    ("missing-version", {3: None}, 1, "'version'", "missing required key"),
    ("missing-id", {12: "  - tags: [kind]"}, 12, "principles[1].id", "missing required key"),
    ("duplicate-id", {12: "  - id: safe"}, 12, "principles[1].id", "duplicate principle id"),
    ("id-not-slug", {12: "  - id: Kind Words"}, 12, "principles[1].id", "not a slug"),
    ("blank-critique", {7: '    critique: "   "'}, 7, "principles[0].critique", "must not be empty"),
    ("blank-system", {4: 'system_prompt: ""'}, 4, "system_prompt", "must not be empty"),
    ("zero-weight", {11: "    weight: 0"}, 11, "principles[0].weight", "> 0"),
    ("negative-weight", {11: "    weight: -1.5"}, 11, "principles[0].weight", "> 0"),
    ("text-weight", {11: "    weight: heavy"}, 11, "principles[0].weight", "expected a number"),
    ("tags-not-list", {10: "    tags: harmless"}, 10, "principles[0].tags", "expected a list"),
    ("revision-missing", {14: None}, 12, "principles[1].revision", "missing"),
    ("no-principles", {n: None for n in range(6, 15)} | {5: "principles: []"}, 5, "principles", "at least one"),
    ("example-unknown-principle", {16: "  - principle: nope"}, 16, "critique_examples[0].principle", "unknown principle 'nope'"),
    ("bad-role", {20: "      - role: robot"}, 20, "critique_examples[0].conversation[1].role", "must be one of"),
    ("wrong-order", {18: "      - role: assistant"}, 18, "critique_examples[0].conversation[0].role", "expected 'user'"),
    ("critique-example-ends-with-user", {20: None, 21: None}, 18, "critique_examples[0].conversation[0].role", "an assistant turn"),
    ("blank-example-critique", {22: '    critique: ""'}, 22, "critique_examples[0].critique", "must not be empty"),
    ("blank-turn", {21: "        content: ' '"}, 21, "critique_examples[0].conversation[1].content", "must not be empty"),
    ("judge-example-ends-with-assistant", {28: "        content: Hi\n      - role: assistant\n        content: Yo"}, 29, "judge_examples[0].conversation[1].role", "a user turn"),
    ("judge-principle-without-question", {25: "  - principle: kind"}, 25, "judge_examples[0].principle", "no judge question"),
    ("better-not-a-letter", {31: "    better: C"}, 31, "judge_examples[0].better", "must be one of"),
    ("duplicate-yaml-key", {10: "    weight: 3"}, 11, "'weight'", "duplicate key"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edits", "line", "field", "words"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_constitution_error_names_file_line_and_field(
    tmp_path, edits, line, field, words
):
    path = _write(tmp_path, _edit(TINY, edits))
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert field in message, message
    assert words in message, message


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, _edit(TINY, {7: "    critique: What: is unsafe?"}))
    with pytest.raises(ConfigError, match=rf"^{path}:7: invalid YAML"):
        load_constitution(path)


def test_unknown_name_lists_shipped_constitutions():
    with pytest.raises(FileNotFoundError, match="harmless"):
        load_constitution("no-such-constitution")


def test_judge_only_principle_is_valid(tmp_path):
    c = load_constitution(
        _write(tmp_path, _edit(TINY, {13: None, 14: "    judge: Which is kinder?"}))
    )
    assert c.principle("kind").critique is None
    assert [p.id for p in c.critique_principles] == ["safe"]
    assert [p.id for p in c.judge_principles] == ["safe", "kind"]


# --- lookup, sampling, shots --------------------------------------------------------------------


def _constitution(*principles: Principle, **fields) -> Constitution:
    return Constitution(
        name="t", description="d", version="1", principles=tuple(principles), **fields
    )


def test_principle_lookup_and_unknown_id():
    c = _constitution(Principle("a", "c?", "r."), Principle("b", judge="j?"))
    assert c.principle("b").judge == "j?"
    with pytest.raises(KeyError, match="known: a, b"):
        c.principle("zzz")


def test_sampling_is_seeded_reproducible_and_independent_per_call():
    c = load_constitution("harmless")
    first = c.sample_principles(20, seed := 1234)
    c.sample_principles(5, 99)  # another call in between does not shift the next one
    assert c.sample_principles(20, seed) == first
    assert c.sample_principles(20, "key-abc") == c.sample_principles(20, "key-abc")
    assert c.sample_principles(20, 1235) != first
    assert len(set(first)) > 1


def test_sampling_with_a_random_instance_advances_it():
    c = load_constitution("harmless")
    rng = random.Random(7)
    draws = [c.sample_principles(1, rng)[0] for _ in range(10)]
    assert draws == c.sample_principles(10, random.Random(7))


def test_sampling_follows_weights():
    c = _constitution(Principle("heavy", "c?", "r.", weight=10), Principle("light", "c?", "r."))
    counts = Counter(p.id for p in c.sample_principles(2000, 0))
    # Expected 1818 vs 182; a 5-sigma band is about +-68.
    assert 1700 < counts["heavy"] < 1940
    assert counts["light"] == 2000 - counts["heavy"]


def test_sampling_respects_require():
    c = _constitution(Principle("crit", "c?", "r."), Principle("judge", judge="j?"))
    assert {p.id for p in c.sample_principles(50, 0, require="critique")} == {"crit"}
    assert {p.id for p in c.sample_principles(50, 0, require="judge")} == {"judge"}
    with pytest.raises(ValueError, match="require"):
        c.sample_principles(1, 0, require="nope")
    with pytest.raises(ValueError, match="no principle with a judge question"):
        _constitution(Principle("crit", "c?", "r.")).sample_principles(1, 0, require="judge")
    with pytest.raises(TypeError, match="seed"):
        c.sample_principles(1, None)
    assert c.sample_principles(0, 0) == []


def test_shots_fill_in_requests_and_questions():
    turn = (Message("user", "u"), Message("assistant", "a"))
    c = _constitution(
        Principle("a", "crit a?", "rev a.", judge="judge a?"),
        critique_examples=(CritiqueExample("a", turn, "the critique", "the revision"),),
        judge_examples=(
            JudgeExample(turn[:1], "ra", "rb", "B", principle="a"),
            JudgeExample(turn[:1], "ra", "rb", "A"),
        ),
    )
    [shot] = c.critique_shots()
    assert (shot.critique_request, shot.critique, shot.revision_request, shot.revision) == (
        "crit a?",
        "the critique",
        "rev a.",
        "the revision",
    )
    assert [s.question for s in c.judge_shots("asked?")] == ["judge a?", "asked?"]


# --- YAML round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED_MINIMUMS))
def test_dump_round_trips_shipped(tmp_path, name):
    c = load_constitution(name)
    assert load_constitution(_write(tmp_path, dump_constitution(c))) == c


def test_dump_round_trips_awkward_strings(tmp_path):
    awkward = [
        "two\nlines",
        "trailing newline\n",
        "  leading spaces\n  kept",
        "yes",
        "1.0",
        "null",
        "colon: inside",
        "# not a comment",
        "quotes ' and \" and {{ 7*7 }}",
        "unicode: café ✓",
        "trailing spaces  \nhere",
    ]
    principles = tuple(Principle(f"p{i}", text, text, judge=text) for i, text in enumerate(awkward))
    c = _constitution(*principles, system_prompt="line one\nline two")
    text = dump_constitution(c)
    assert load_constitution(_write(tmp_path, text)) == c
    assert "weight" not in text  # defaults are left out


# --- converters ---------------------------------------------------------------------------------


def _anthropic_files(tmp_path: Path) -> tuple[Path, Path]:
    cr = {
        "harmful0": {
            "prompt": ["Say how the last response is harmful."],
            "edit_request": "Rewrite the last response to remove the harm.",
        },
        "harmful1": {
            "prompt": ["Say how the last response is rude. "],
            "edit_request": "Rewrite it politely.",
        },
    }
    rl = ["Which response is less harmful?", "Which response is more polite?"]
    cr_path = tmp_path / "CritiqueRevisionInstructions.json"
    rl_path = tmp_path / "RLMadisonInstructions.json"
    cr_path.write_text(json.dumps(cr, indent=4))
    rl_path.write_text(json.dumps(rl))
    return cr_path, rl_path


def test_from_anthropic(tmp_path):
    cr_path, rl_path = _anthropic_files(tmp_path)
    c = from_anthropic(cr_path)
    assert [p.id for p in c.principles] == ["harmful0", "harmful1"]
    assert c.principle("harmful1").critique == "Say how the last response is rude."
    assert c.principle("harmful1").revision == "Rewrite it politely."
    assert c.judge_principles == ()

    c = from_anthropic(cr_path, rl_path)
    assert [p.id for p in c.judge_principles] == ["judge0", "judge1"]
    assert c.principle("judge1") == Principle("judge1", judge="Which response is more polite?")
    assert load_constitution(_write(tmp_path, dump_constitution(c))) == c


def test_from_anthropic_bad_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "harmful0": {\n    "prompt": ["x"],\n  }\n}')
    with pytest.raises(ConfigError, match=rf"^{bad}:4: invalid JSON"):
        from_anthropic(bad)


def test_from_anthropic_wrong_layout(tmp_path):
    cr_path, _ = _anthropic_files(tmp_path)
    with pytest.raises(ConfigError, match="judge question strings"):
        from_anthropic(cr_path, cr_path)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"harmful0": {"prompt": "x"}}))
    with pytest.raises(ConfigError, match=rf"^{wrong}: harmful0"):
        from_anthropic(wrong)
    with pytest.raises(ConfigError, match="file not found"):
        from_anthropic(tmp_path / "missing.json")


def _chat(*contents: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"] * len(contents)
    return [{"role": r, "content": t} for r, t in zip(roles, contents, strict=False)]


def test_from_huggingface(tmp_path):
    data = {
        "constitutions": [
            {"critic": "What is harmful here?", "revision": "Remove the harm."},
            {"critic": "What is rude here?", "revision": "Be polite."},
        ],
        "system_chat": [
            # Matches constitutions[1] exactly: the exemplar points at principle-1.
            _chat("Insult me.", "You fool.", "What is rude here?", "Name-calling.", "Be polite.", "I'd rather not."),
            # Requests found nowhere: they become a principle of their own.
            _chat("q1", "a1", "q2", "a2", "Find errors.", "a2 is wrong.", "Fix them.", "a2 fixed."),
            # Not the critique/revision shape: skipped.
            _chat("hello", "hi"),
        ],
    }  # fmt: skip
    path = tmp_path / "anthropic_constitution.json"
    path.write_text(json.dumps(data))
    c = from_huggingface(path)
    assert c.name == "anthropic_constitution"
    assert [p.id for p in c.principles] == ["principle-0", "principle-1", "system-chat-1"]
    assert c.principle("system-chat-1") == Principle("system-chat-1", "Find errors.", "Fix them.")
    first, second = c.critique_examples
    assert first == CritiqueExample(
        "principle-1",
        (Message("user", "Insult me."), Message("assistant", "You fool.")),
        "Name-calling.",
        "I'd rather not.",
    )
    assert second.principle == "system-chat-1"
    assert [m.content for m in second.conversation] == ["q1", "a1", "q2", "a2"]
    assert (second.critique, second.revision) == ("a2 is wrong.", "a2 fixed.")
    assert "1 system_chat entries skipped" in c.description
    assert load_constitution(_write(tmp_path, dump_constitution(c))) == c


def test_from_huggingface_errors_name_the_file(tmp_path):
    bad = tmp_path / "hf.json"
    bad.write_text('{"constitutions": [}')
    with pytest.raises(ConfigError, match=rf"^{bad}:1: invalid JSON"):
        from_huggingface(bad)
    bad.write_text(json.dumps({"constitutions": [{"critic": "x"}]}))
    with pytest.raises(ConfigError, match=rf"^{bad}: constitutions\[0\]"):
        from_huggingface(bad)
    bad.write_text(json.dumps({"constitutions": [], "system_chat": [[{"role": "user"}]]}))
    with pytest.raises(ConfigError, match=rf"^{bad}: system_chat\[0\]\[0\]"):
        from_huggingface(bad)
    bad.write_text(json.dumps({"principles": []}))
    with pytest.raises(ConfigError, match='"constitutions"'):
        from_huggingface(bad)


# --- cai constitution ---------------------------------------------------------------------------


def test_cli_check_ok(capsys):
    assert main(["constitution", "check", "harmless", "sycophancy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "ok: harmless (16 principles, 16 judge questions, 16 score questions, 6 examples, "
        "6 restricted and 6 permitted classes)",
        "ok: sycophancy (6 principles, 6 judge questions, 6 score questions, 6 examples)",
    ]


def test_cli_check_bad_file_exits_1(tmp_path, capsys):
    bad = _write(tmp_path, _edit(TINY, {11: "    weight: 0"}), "bad.yaml")
    assert main(["constitution", "check", "hhh", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("ok: hhh (")
    assert f"{bad}:11: principles[0].weight" in captured.err
    # A file that is no constitution at all (a system file) is named, its content not shown.
    passwd = _write(tmp_path, "root:x:0:0:root:/root:/bin/bash\nbin:x:1:1::/:/sbin/nologin\n", "p")
    assert main(["constitution", "check", str(passwd)]) == 1
    err = capsys.readouterr().err
    assert (
        f"{passwd}: expected a YAML mapping of keys for Constitution; the file holds a str" in err
    )
    assert "root" not in err.replace(str(passwd), "")


def test_cli_show(tmp_path, capsys):
    assert main(["constitution", "show", str(_write(tmp_path, TINY))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny (version 1)\n")
    for text in [
        "safe  weight 2  [harmless]",
        "critique: What is unsafe?",
        "judge: Which is safer?",
    ]:
        assert text in out
    assert "critique examples (1):" in out and "judge examples (1):" in out


def test_cli_show_bad_file_exits_1(tmp_path, capsys):
    assert main(["constitution", "show", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_cli_convert(tmp_path, capsys):
    cr_path, rl_path = _anthropic_files(tmp_path)
    out = tmp_path / "out.yaml"
    args = ["constitution", "convert", "--anthropic", str(cr_path), "--judge", str(rl_path)]
    assert main([*args, "-o", str(out)]) == 0
    assert (
        "anthropic (4 principles, 2 judge questions, 0 score questions, 0 examples)"
        in capsys.readouterr().out
    )
    assert load_constitution(out) == from_anthropic(cr_path, rl_path)

    hf = tmp_path / "hf.json"
    hf.write_text(json.dumps({"constitutions": [{"critic": "c?", "revision": "r."}]}))
    assert main(["constitution", "convert", "--huggingface", str(hf), "-o", str(out)]) == 0
    assert load_constitution(out) == from_huggingface(hf)

    args = ["constitution", "convert", "--huggingface", str(hf), "--judge", str(rl_path)]
    # Bad arguments are the command failing on its input: exit 1, as docs/concepts/stages.md says.
    assert main([*args, "-o", str(out)]) == 1
    assert "--judge goes with --anthropic" in capsys.readouterr().err
    assert main(["constitution", "convert", "-o", str(out)]) == 1
    assert "one of the arguments --anthropic --huggingface is required" in capsys.readouterr().err
    assert main(["constitution", "convert", "--anthropic", str(cr_path)]) == 1
    assert "-o/--output" in capsys.readouterr().err
    assert main(["constitution", "convert", "--huggingface", str(hf), "-o", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err


def test_cli_check_refuses_an_alias_bomb_quickly(tmp_path, capsys):
    # Issue 15: nested anchors as the description ran for minutes, then printed the expansion.
    # The anchors as the items of the description, l5 on line 8: "  - &l5 [*l4, ...]".
    bomb = "".join(f"  - {line.split(': ', 1)[1]}\n" for line in alias_bomb(9).splitlines())
    text = TINY.replace("description: A tiny constitution.\n", f"description:\n{bomb}")
    path = _write(tmp_path, text, "bomb.yaml")
    assert main(["constitution", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:8: aliases"), err
    assert len(err) < 400, err


def test_cli_check_reports_every_problem_of_a_file(tmp_path, capsys):
    # Issue 15: one problem per run, so fixing a file took as many runs as it had mistakes.
    edits = {1: "name: ' '", 11: "    weight: 0", 12: "  - id: Kind", 22: "    critique: ' '"}
    bad = _write(tmp_path, _edit(TINY, edits), "bad.yaml")
    assert main(["constitution", "check", str(bad)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {bad}:1: name: must not be empty",
        f"error: {bad}:11: principles[0].weight: must be a number > 0, got 0.0",
        f"error: {bad}:12: principles[1].id: 'Kind' is not a slug ({_SLUG_RULE})",
        f"error: {bad}:22: critique_examples[0].critique: must not be empty",
    ]
    with pytest.raises(ConfigError) as info:
        load_constitution(bad)
    assert str(info.value).count(f"{bad}:") == 4
