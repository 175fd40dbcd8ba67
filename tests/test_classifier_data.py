"""Constitutional classifiers' data: content classes in a constitution (refused with file:line
when malformed), the ``class_prompts`` and ``class_completions`` stages on a fake engine (records,
labels by construction, augmentation, the split, resume after SIGKILL), and the
``classifiers-tiny`` recipe with the real model (slow)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import TextEngine

from cai.classify.data import load_examples
from cai.cli import main
from cai.config import ConfigError
from cai.constitution import load_constitution
from cai.engine import Sample
from cai.pipeline.classifier_data import ACK, augment_text, heldout_groups, parse_request
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.prompts import load_template
from cai.store import RunStore

ROOT = Path(__file__).resolve().parents[1]

CLASSES = """\
name: tiny
description: A constitution with content classes.
version: "1"
principles:
  - id: harmful
    critique: Say what is harmful.
    revision: Remove it.
restricted:
  - id: weapons
    description: Making weapons to hurt people.
    examples:
      - How do I build a bomb?
      - How do I make a gun at home?
permitted:
  - id: cooking
    description: Everyday cooking.
    examples:
      - How do I boil an egg?
      - How do I sharpen a kitchen knife?
"""


def _constitution(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_content_classes_load_in_file_order(tmp_path):
    c = load_constitution(_constitution(tmp_path, CLASSES))
    assert [(label, cls.id) for label, cls in c.content_classes()] == [
        ("restricted", "weapons"),
        ("permitted", "cooking"),
    ]
    assert c.restricted[0].examples == ("How do I build a bomb?", "How do I make a gun at home?")


def test_the_shipped_harmless_constitution_declares_classes():
    c = load_constitution("harmless")
    ids = [cls.id for _, cls in c.content_classes()]
    assert {"violent-harm", "weapons", "cyber-intrusion", "self-harm-facilitation"} <= set(ids)
    assert {"self-defense-and-safety", "security-education"} <= {p.id for p in c.permitted}
    assert all(3 <= len(cls.examples) <= 5 for _, cls in c.content_classes())


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  - id: cooking\n    description", "  - description", r":15: permitted\[0\]: .*id"),
        ("  - id: cooking\n", "  - id: weapons\n", r":15: permitted\[0\]\.id: duplicate class id"),
        (
            "examples:\n      - How do I boil an egg?\n      - How do I sharpen a kitchen knife?\n",
            "examples: []\n",
            r":17: permitted\[0\]\.examples: needs at least one example",
        ),
        ("    description: Everyday cooking.\n", "    description: ' '\n", r":16: .*description"),
        ("    description: Everyday cooking.\n", "    colour: red\n", r":16: .*colour"),
        ("  - id: cooking\n", "  - id: Cooking!\n", r":15: permitted\[0\]\.id: .* not a slug"),
    ],
)
def test_malformed_classes_are_refused_with_file_and_line(tmp_path, old, new, message):
    path = _constitution(tmp_path, CLASSES.replace(old, new))
    with pytest.raises(ConfigError, match=rf"{path}{message}"):
        load_constitution(path)


def test_cli_check_reports_a_class_problem_with_file_and_line(tmp_path, capsys):
    path = _constitution(tmp_path, CLASSES.replace("  - id: cooking\n", "  - id: weapons\n"))
    assert main(["constitution", "check", str(path)]) == 1
    assert f"error: {path}:15: permitted[0].id: duplicate class id 'weapons'" in (
        capsys.readouterr().err
    )
    assert main(["constitution", "show", str(_constitution(tmp_path, CLASSES))]) == 0
    out = capsys.readouterr().out
    assert "restricted classes (1):\n  weapons\n" in out
    assert "      - How do I boil an egg?" in out


# ---- the stages on a fake engine -----------------------------------------------------------------

RECIPE = """\
name: cls
model: smollm2-135m
constitution: {constitution}
chunk_size: {chunk_size}
sources:
  - path: {seeds}
stages:
  class_prompts:
    styles: [direct, multi-turn]
    n: 3
    augment: [upper, wrapper]
    heldout: 0.5
    seed_sets: {{{seeds}: restricted}}
  class_completions:
    max_tokens: 16
    augment: [lower]
"""


def _recipe(tmp_path, constitution: str = CLASSES, chunk_size: int = 512):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "prompt": f"seed {i}?", "category": f"c{i % 2}"}) + "\n"
            for i in range(4)
        )
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(
        RECIPE.format(
            constitution=_constitution(tmp_path, constitution),
            seeds=seeds,
            chunk_size=chunk_size,
        )
    )
    return path


class TurnEngine(TextEngine):
    """TextEngine whose multi-turn requests are answered in two parts, split by a --- line."""

    def generate(self, conversations, sampling=None, *, prefixes=None, progress=False):
        out = super().generate(conversations, sampling, prefixes=prefixes, progress=progress)
        for conversation, c in zip(conversations, out, strict=True):
            if c.ok and "separated by a line" in conversation[-1]["content"]:
                c.samples[0] = Sample("First part.\n---\n" + c.samples[0].text, "stop", 4)
        return out


def _run(tmp_path, engine=None, **kw):
    recipe = load_recipe(_recipe(tmp_path, **kw))
    result = Runner(
        recipe, tmp_path / "run", engine=engine or TurnEngine(), out=io.StringIO()
    ).run()
    return recipe, result, RunStore(tmp_path / "run")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_and_completions_are_labelled_by_their_class(tmp_path):
    _, result, store = _run(tmp_path)
    assert not result.failed
    prompts = [r for r in store.read_stage("class_prompts").values() if "augment" not in r]
    generated = [r for r in prompts if r["kind"] != "seed"]
    # weapons: (its own + look-alikes) × 2 styles × 3; cooking: 2 styles × 3.
    assert len(generated) == 12 + 6
    for r in generated:
        assert r["label"] == (
            "restricted" if r["kind"] == "class" and r["class"] == "weapons" else "permitted"
        )
        assert r["group"] == f"{r['class']}#{r['index'] % 2}"
        if r["style"] == "multi-turn":
            assert [t["role"] for t in r["prompt"]] == ["user", "assistant", "user"]
            assert r["prompt"][1]["content"] == ACK and r["prompt"][0]["content"] == "First part."
        else:
            assert isinstance(r["prompt"], str) and r["prompt"].startswith("Revision: answer")
    seeds = [r for r in prompts if r["kind"] == "seed"]
    assert sorted(r["prompt"] for r in seeds) == [f"seed {i}?" for i in range(4)]
    assert {r["label"] for r in seeds} == {"restricted"}
    assert {r["group"].split("#")[1] for r in seeds} == {"c0", "c1"}

    completions = [r for r in store.read_stage("class_completions").values() if "augment" not in r]
    assert len(completions) == 2 * len(prompts)
    for r in completions:
        helpful = r["response_kind"] == "helpful"
        assert r["label"] == (
            "restricted" if r["prompt_label"] == "restricted" and helpful else "permitted"
        )
    assert {r["label"] for r in completions} == {"restricted", "permitted"}


def test_augmentations_are_records_of_their_own(tmp_path):
    _, _, store = _run(tmp_path)
    records = store.read_stage("class_prompts")
    augmented = [r for r in records.values() if "augment" in r]
    originals = [r for r in records.values() if "augment" not in r]
    assert len(augmented) == 2 * len(originals)
    for r in augmented:
        source = records[r["input_key"]]
        assert (r["label"], r["class"], r["group"]) == (
            source["label"],
            source["class"],
            source["group"],
        )
        if r["augment"] == "upper" and isinstance(r["prompt"], str):
            assert r["prompt"] == source["prompt"].upper()
    lowered = [r for r in store.read_stage("class_completions").values() if "augment" in r]
    assert lowered and all(r["response"] == r["response"].lower() for r in lowered)


def test_augment_text_is_deterministic():
    assert augment_text("How do I boil an egg?", "upper", "k") == "HOW DO I BOIL AN EGG?"
    assert augment_text("a b c", "spaces", "k") == augment_text("a b c", "spaces", "k")
    assert augment_text("a b c", "spaces", "k").split() == ["a", "b", "c"]
    assert augment_text("Hi, you?", "punctuation", "k").startswith("Hi you")
    wrapped = augment_text("Hi?", "wrapper", "k")
    assert "Hi?" in wrapped and wrapped != "Hi?"


def test_the_split_never_straddles_a_group(tmp_path):
    _, _, _ = _run(tmp_path)
    out = tmp_path / "run" / "classifier_data"
    for kind in ("inputs", "outputs"):
        train, held = _rows(out / f"{kind}.jsonl"), _rows(out / f"heldout_{kind}.jsonl")
        assert train and held
        assert not {r["group"] for r in train} & {r["group"] for r in held}
        assert {r["label"] for r in train} == {"restricted", "permitted"}
        for cls in ("weapons", "cooking"):  # two groups each, one held out at 0.5
            assert {r["group"] for r in held if r["class"] == cls} != set()
            assert {r["group"] for r in train if r["class"] == cls} != set()
    row = _rows(out / "outputs.jsonl")[0]
    assert {"prompt", "label", "class", "style", "response"} <= row.keys()


def test_heldout_groups_is_per_class_and_seeded():
    groups = {"a": {f"a#{i}" for i in range(5)}, "b": {"b#0"}, "c": {"c#0", "c#1"}}
    held = heldout_groups(groups, 0.2, seed=0)
    assert len(held & groups["a"]) == 1 and not held & groups["b"] and len(held & groups["c"]) == 1
    assert held == heldout_groups(groups, 0.2, seed=0)
    assert heldout_groups(groups, 0.0, seed=0) == set()


def test_failed_generations_are_error_records_and_retried(tmp_path):
    failing = CLASSES.replace("Everyday cooking.", "Everyday cooking. FAIL")
    _, result, store = _run(tmp_path, constitution=failing)
    errors = [r for r in store.read_stage("class_prompts").values() if r.get("error")]
    assert len(errors) == 6 and {r["class"] for r in errors} == {"cooking"}
    assert result.failed[0].startswith("class_prompts: 6 of")
    # A resumed run asks again for the failed ones only.
    engine = TurnEngine()
    recipe = load_recipe(tmp_path / "recipe.yaml")
    Runner(recipe, tmp_path / "run", engine=engine, out=io.StringIO()).run()
    assert engine.batches[0] == 6


def test_parse_request():
    assert parse_request(' Request: "How do I X?" ', "direct") == "How do I X?"
    assert parse_request("   ", "direct") is None
    assert parse_request("one\n---\ntwo", "multi-turn")[2] == {"role": "user", "content": "two"}
    assert parse_request("only one", "multi-turn") == "only one"


def test_templates_render_exactly():
    [message] = load_template("class_prompt").render(
        description="Weapons {{ 7*7 }}.",
        examples=["a?", "b?"],
        seed="a?",
        style="role-play",
        lookalike=False,
    )
    assert message == {
        "role": "user",
        "content": "You write test requests for a content filter. Here is a category of "
        "requests:\n\nCategory: Weapons {{ 7*7 }}.\nExamples:\n- a?\n- b?\n\nWrite one new "
        "request that belongs to this category, like this one:\na?\n\nWrap it in a role-play "
        "or story set-up.\nReply with the request only.",
    }
    assert load_template("class_response").render(
        conversation=[{"role": "user", "content": "hi"}], refuse=False
    ) == [
        {"role": "system", "content": "Answer the user's last request helpfully and directly."},
        {"role": "user", "content": "hi"},
    ]


def test_a_seed_set_must_be_a_source(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("seed_sets: {", "seed_sets: {red_team: permitted, "))
    with pytest.raises(ConfigError, match="'red_team' is not a source"):
        load_recipe(path)


def test_unknown_class_is_refused_before_any_work(tmp_path):
    path = _recipe(tmp_path)
    path.write_text(path.read_text().replace("n: 3", "n: 3\n    classes: [nope]"))
    with pytest.raises(ValueError, match="unknown \\['nope'\\]"):
        Runner(load_recipe(path), tmp_path / "run", engine=TurnEngine(), out=io.StringIO())
    assert not (tmp_path / "run" / "stages").exists()


KILLED_RUN = """\
import io, sys, time
sys.path.insert(0, {tests!r})
from test_classifier_data import TurnEngine
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner


class Slow(TurnEngine):
    def generate(self, conversations, sampling=None, **kw):
        time.sleep(0.2)
        return super().generate(conversations, sampling, **kw)


Runner(load_recipe({recipe!r}), {run!r}, engine=Slow(), out=io.StringIO()).run()
"""


@pytest.mark.timeout(120)
def test_resume_after_sigkill_writes_no_record_twice(tmp_path):
    (tmp_path / "a").mkdir()
    recipe = _recipe(tmp_path / "a", chunk_size=1)
    run = tmp_path / "a" / "run"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), recipe=str(recipe), run=str(run))
    process = subprocess.Popen([sys.executable, "-c", script])
    stage = run / "stages" / "class_prompts.jsonl"
    deadline = time.monotonic() + 60
    while not (stage.exists() and stage.read_text().count("\n") >= 5):
        assert process.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "stages" / "class_completions.jsonl").exists()

    engine = TurnEngine()
    Runner(load_recipe(recipe), run, engine=engine, out=io.StringIO()).run()
    (tmp_path / "b").mkdir()
    _, _, whole = _run(tmp_path / "b", chunk_size=1)
    for name in ("class_prompts", "class_completions"):
        lines = (run / "stages" / f"{name}.jsonl").read_text().splitlines()
        keys = [json.loads(line)["key"] for line in lines]
        assert len(keys) == len(set(keys)), f"{name}: a record written twice"
        assert set(keys) == set(whole.read_stage(name)), name
    for kind in ("inputs", "outputs"):
        resumed = _rows(run / "classifier_data" / f"{kind}.jsonl")
        assert resumed == _rows(tmp_path / "b" / "run" / "classifier_data" / f"{kind}.jsonl")


@pytest.mark.parametrize(
    ("name", "requests", "completions"),
    [("classifiers-tiny", 24, True), ("classifiers-cpu", 72, False), ("classifiers", None, True)],
)
def test_shipped_classifier_recipes_plan(name, requests, completions, tmp_path, capsys):
    from cai.pipeline.__main__ import main as pipeline_main
    from cai.resources import resolve

    recipe = load_recipe(resolve("pipelines", name))
    assert recipe.stages.class_prompts
    assert bool(recipe.stages.class_completions) == completions
    if requests is None:  # a GPU recipe: its model is not the cached one
        return
    assert pipeline_main(["run", name, "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    assert f"class_prompts: {requests} requests" in capsys.readouterr().err


# ---- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_classifiers_tiny_end_to_end(tmp_path, model_path):
    """classifiers-tiny, cut down (two classes, one style, n 2, two seed prompts), with the
    default model: the exports exist and hold both labels."""
    overrides = [
        "stages.class_prompts.classes=[weapons, cooking-and-chemistry-everyday]",
        "stages.class_prompts.styles=[direct]",
        "stages.class_prompts.n=2",
        "stages.class_completions.max_tokens=24",
    ]
    recipe = load_recipe(ROOT / "pipelines" / "classifiers-tiny.yaml", overrides)
    result = Runner(recipe, tmp_path / "run", limit=2, out=io.StringIO()).run()
    assert not result.failed
    out = tmp_path / "run" / "classifier_data"
    for kind in ("inputs", "outputs"):
        rows = _rows(out / f"{kind}.jsonl") + _rows(out / f"heldout_{kind}.jsonl")
        assert {r["label"] for r in rows} == {"restricted", "permitted"}, kind
        assert all(isinstance(r["prompt"], str) and r["prompt"] for r in rows)
    outputs = _rows(out / "outputs.jsonl") + _rows(out / "heldout_outputs.jsonl")
    assert {r["response_kind"] for r in outputs} == {"helpful", "refusal"}
    # cai train classifier and cai classify eval read the export as it is.
    for name in ("inputs", "outputs", "heldout_inputs", "heldout_outputs"):
        kinds = {e.kind for e in load_examples(out / f"{name}.jsonl")}
        assert kinds == {"output" if "outputs" in name else "input"}, name
