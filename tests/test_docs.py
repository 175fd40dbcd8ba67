"""The docs site's generated references (docs/gen_ref.py, docs/hooks.py): every recipe key,
trainer and evaluation config key has a doc and every command-line argument has help text, a
new key or flag without one fails the build, and the pages hold what they describe. No model
loads (the trainer modules import torch and transformers, nothing more)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from cai.config import ConfigError, doc
from cai.pipeline import evaluation, training
from cai.pipeline.judge import JudgeStage
from cai.pipeline.recipe import load_recipe
from cai.pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    """A module of docs/ (not a package: the files beside the pages)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gen_ref = _load("gen_ref")


@pytest.fixture(scope="module")
def recipe_page() -> str:
    return gen_ref.recipe_page()


@pytest.fixture(scope="module")
def cli_page() -> str:
    return gen_ref.cli_page()


def section(page: str, anchor: str) -> str:
    """The text under the heading ``{#anchor}`` up to the next heading of its level or above."""
    match = re.search(rf"^(#+) .*\{{#{re.escape(anchor)}\}}$", page, re.M)
    assert match, f"no heading {{#{anchor}}}"
    level = len(match.group(1))
    rest = page[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def rows(text: str) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell (code spans unwrapped)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[cells[0].strip("`")] = cells[1:]
    return out


# --- (a) everything is documented ---------------------------------------------------------------


def test_every_recipe_and_config_key_has_a_doc_and_a_row(recipe_page):
    # recipe_page() raised if a key had no doc; here: each dataclass field is on the page.
    judge = rows(section(recipe_page, "stages-judge"))
    assert {f"stages.judge.{f.name}" for f in dataclasses.fields(JudgeStage)} == set(judge)
    for stage in STAGES:
        assert f"{{#stages-{stage.name}}}" in recipe_page
        if dataclasses.is_dataclass(stage.options):
            keys = rows(section(recipe_page, f"stages-{stage.name}"))
            assert {
                f"stages.{stage.name}.{f.name}" for f in dataclasses.fields(stage.options)
            } == set(keys)
    for kind in ("sft", "dpo", "reward", "grpo", "classifier"):
        assert f"{{#train-{kind}}}" in recipe_page
    for key in rows(recipe_page):
        row = rows(recipe_page)[key]
        assert len(row) == 3 and all(row), (key, row)  # type, default, doc: none empty


def test_every_command_line_argument_has_help(cli_page):
    progs = [c.prog for top in gen_ref.commands() for c in top.walk()]
    for prog in (
        "cai",
        "cai constitution convert",
        "cai train grpo",
        "cai judge label",
        "cai serve",
        "cai review",
        "python -m cai.pipeline run",
        "python -m cai.pipeline merge",
    ):
        assert prog in progs
        assert f"{{#{gen_ref.anchor(prog)}}}" in cli_page
    for top in gen_ref.commands():
        for command in top.walk():
            for argument in command.arguments:
                assert argument.help.strip(), (command.prog, argument.names)


def test_the_keys_the_pipeline_sets_are_those_a_recipe_may_not_set(tmp_path):
    """The recipe page says which trainer and evaluation keys a stage's options may not hold
    (SET_BY_PIPELINE): exactly those that load_recipe refuses."""
    path = tmp_path / "recipe.yaml"
    stages = "".join(f"  {s}: {{}}\n" for s in ("generate", "sample", "judge"))
    stages += "".join(f"  {kind}: {{}}\n" for kind in training.TRAINERS) + "  evaluate: {}\n"
    path.write_text(
        "name: t\nsources:\n  - path: red_team\nstages:\n  critique_revise: {}\n" + stages
    )
    load_recipe(path)
    configs = {
        kind: (training.config_class(kind), training.SET_BY_PIPELINE) for kind in training.TRAINERS
    }
    from cai.eval.config import EvalConfig

    configs["evaluate"] = (EvalConfig, evaluation.SET_BY_PIPELINE)
    for stage, (config, set_by) in configs.items():
        refused = set()
        for f in dataclasses.fields(config):
            try:
                load_recipe(path, [f"stages.{stage}.{f.name}=x"])
            except (ConfigError, ValueError, OSError) as e:  # a bad value: any error but that
                if "set by the pipeline" in str(e):
                    refused.add(f.name)
        assert refused == set(set_by), stage


# --- (b) a key or flag without a doc fails ------------------------------------------------------


def test_a_stage_option_without_a_doc_fails_naming_the_key():
    @dataclasses.dataclass
    class JudgeOptions(JudgeStage):
        new_knob: int = 3  # a plain default: no cai.config.doc

    stages = [
        dataclasses.replace(s, options=JudgeOptions) if s.name == "judge" else s for s in STAGES
    ]
    with pytest.raises(
        gen_ref.Undocumented, match=r"stages\.judge\.new_knob .*JudgeOptions\.new_knob"
    ):
        gen_ref.stage_sections(stages)
    assert gen_ref.stage_sections(STAGES)  # the real stages pass


def test_a_nested_or_made_dataclass_key_without_a_doc_fails():
    inner = dataclasses.make_dataclass("Inner", [("depth", int, dataclasses.field(default=1))])
    outer = dataclasses.make_dataclass(
        "Outer",
        [("name", str, doc("documented", "x")), ("inner", inner | None, doc("nested", None))],
    )
    with pytest.raises(gen_ref.Undocumented, match=r"^engine\.inner\.depth "):
        gen_ref.config_keys(outer, "engine.")
    blank = dataclasses.make_dataclass("Blank", [("knob", int, doc("  ", 0))])
    with pytest.raises(gen_ref.Undocumented, match=r"^knob "):
        gen_ref.config_keys(blank)


def test_a_stage_without_a_doc_or_a_known_config_fails():
    stages = [dataclasses.replace(s, doc="") if s.name == "sample" else s for s in STAGES]
    with pytest.raises(gen_ref.Undocumented, match=r"^stages\.sample "):
        gen_ref.stage_sections(stages)
    mystery = dataclasses.replace(STAGES[0], name="mystery", options=dict)
    with pytest.raises(gen_ref.Undocumented, match=r"stages\.mystery: .*_free_form_config"):
        gen_ref.stage_sections([*STAGES, mystery])


def test_a_trainer_key_without_a_doc_fails():
    from cai.train.dpo import DPOConfig

    @dataclasses.dataclass(kw_only=True)
    class Config(DPOConfig):
        margin: float = 0.0

    with pytest.raises(gen_ref.Undocumented, match=r"^margin .*Config\.margin"):
        gen_ref.config_keys(Config)


def test_a_flag_or_subcommand_without_help_fails():
    parser = argparse.ArgumentParser(prog="cai")
    sub = parser.add_subparsers(dest="command")
    judge = sub.add_parser("judge", help="the judge")
    judge.add_argument("--model", help="judge model")
    gen_ref.command(parser)
    judge.add_argument("--fast", action="store_true")
    with pytest.raises(gen_ref.Undocumented, match=r"^cai judge --fast: "):
        gen_ref.command(parser)
    other = argparse.ArgumentParser(prog="cai")
    other.add_subparsers().add_parser("quiet")
    with pytest.raises(gen_ref.Undocumented, match=r"^cai quiet: the subcommand has no help"):
        gen_ref.command(other)


def test_an_undocumented_key_fails_the_docs_build(monkeypatch, tmp_path, capsys):
    """gen_ref.py exits 1 with the message; the hook turns that into a failed build."""

    def broken() -> str:
        raise gen_ref.Undocumented("stages.judge.new_knob (x.JudgeStage.new_knob) has no doc")

    monkeypatch.setattr(gen_ref, "PAGES", {"reference/recipe.md": broken})
    assert gen_ref.main() == 1
    assert "stages.judge.new_knob" in capsys.readouterr().err

    from mkdocs.config import load_config
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import Files

    config = load_config(str(ROOT / "mkdocs.yml"))
    hooks = config.plugins["docs/hooks.py"]  # the hook as mkdocs.yml registers it
    script = tmp_path / "gen.py"
    script.write_text(
        "import sys\nprint('x.py: stages.judge.new_knob has no doc', file=sys.stderr)\nsys.exit(1)\n"
    )
    monkeypatch.setattr(hooks, "GENERATOR", script)
    with pytest.raises(PluginError, match=r"stages\.judge\.new_knob has no doc"):
        config.plugins.on_files(Files([]), config=config)
    script.write_text(f"print({json.dumps(json.dumps({'reference/x.md': '# X'}))})\n")
    files = config.plugins.on_files(Files([]), config=config)
    assert files.get_file_from_path("reference/x.md").content_string == "# X"


# --- (c) the pages hold the keys and flags ------------------------------------------------------


def test_the_recipe_page_has_each_key_with_type_default_and_doc(recipe_page):
    judge = rows(section(recipe_page, "stages-judge"))
    kind, default, text = judge["stages.judge.mode"]
    assert "`pairwise`" in kind and "`pointwise`" in kind and "null" in kind
    assert default == "`null`" and "each response scored alone" in text
    assert rows(section(recipe_page, "sources"))["sources[].path"][1] == "required"
    assert rows(section(recipe_page, "engine"))["engine.ray.replicas"][:2] == ["integer", "`1`"]
    assert rows(section(recipe_page, "online"))["online.rounds"][1] == "`2`"
    common = rows(section(recipe_page, "train-common"))
    assert common["lora.r"][1] == "`16`" and "data" in common
    dpo = rows(section(recipe_page, "train-dpo"))
    assert "beta" in dpo and dpo["learning_rate"][1] == "`1e-06`"  # DPO's own default
    assert "batch_size" not in dpo  # the common key, as every trainer has it
    assert rows(section(recipe_page, "eval-config"))["sets.<name>.skip"][1] == "`0`"
    train_dpo = section(recipe_page, "stages-train_dpo")
    assert "(#train-dpo)" in train_dpo and "`beta`" in train_dpo
    assert "`data`, `output_dir`, `model` (the pipeline sets them)" in train_dpo


def test_the_cli_page_has_each_command_with_its_flags(cli_page):
    label = rows(section(cli_page, "cai-judge-label"))
    assert "--out" in label and "--data" in label
    run = rows(section(cli_page, "python-m-cai-pipeline-run"))
    assert "Choices: `local`, `ray`" in run["--executor"][0]
    assert "RECIPE" not in run and "recipe" in run  # a positional, by its name
    assert rows(section(cli_page, "cai-serve"))["--port"][1] == "`8000`"
    convert = rows(section(cli_page, "cai-constitution-convert"))
    assert convert["-o, --output"][1] == "required"
    assert "[`cai judge label`](#cai-judge-label)" in section(cli_page, "cai-judge")
    assert "python -m cai.pipeline: bad input" in section(cli_page, "exit-codes")


def test_no_environment_value_reaches_the_cli_page(monkeypatch):
    monkeypatch.setenv("CAI_API_KEY", "sekrit-7f3a")
    page = gen_ref.cli_page()
    assert "sekrit-7f3a" not in page
    import os

    assert os.environ["CAI_API_KEY"] == "sekrit-7f3a"  # put back


def test_defaults_are_written_as_yaml_reads_them():
    values = [None, True, 0.05, 1e-05, "auto", "", "yes", "1", [0.4, 0.6], ("a", "b"), {"k": None}]
    assert [gen_ref._value(v) for v in values] == [
        "null", "true", "0.05", "1e-05", "auto", "''", "'yes'", "'1'", "[0.4, 0.6]", "[a, b]",
        "{k: null}",
    ]  # fmt: skip


def test_markdown_from_docs_is_literal():
    assert gen_ref.prose("runs/<name> *all* of ``x|y`` [a](b)") == (
        r"runs/\<name\> \*all\* of `x\|y` \[a\](b)"
    )
    assert gen_ref.paragraphs("Usage:\n\n    cai ``x``\n    more\n\nText\nwraps.") == (
        "Usage:\n\n```text\ncai x\nmore\n```\n\nText wraps.\n"
    )
