"""The ``train_grpo`` stage: options checked when the recipe loads, and one tiny GRPO step on the
real default model with the judge's group-wise reward (2 prompts x 2 completions x 8 tokens, LoRA)
that logs the reward and the KL to the reference."""

from __future__ import annotations

import json
import math

import pytest
from fakes import TextEngine
from test_pipeline import write_prompts

from cai.config import ConfigError
from cai.data import DataError
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.train.grpo import check_prompt_lengths, load_prompts

RECIPE = """\
name: grpo
engine: {{backend: hf}}
sources:
  - path: {prompts}
stages:
  generate: {{max_tokens: 8}}
  train_grpo: {options}
"""

TINY = (
    "{max_steps: 1, batch_size: 4, num_generations: 2, max_new_tokens: 8, logging_steps: 1, "
    "learning_rate: 1.0e-4, lora: {r: 8}}"
)


def _recipe(tmp_path, options: str):
    prompts = write_prompts(
        tmp_path / "p.jsonl", ["What is the capital of France?", "How do I boil an egg?"]
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(prompts=prompts, options=options))
    return path


def test_options_are_checked_when_the_recipe_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: .*must be a multiple of num_gen"):
        load_recipe(_recipe(tmp_path, "{batch_size: 3, num_generations: 2}"))
    with pytest.raises(ConfigError, match=r"train_grpo.data: set by the pipeline"):
        load_recipe(_recipe(tmp_path, "{data: x.jsonl}"))
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        load_recipe(_recipe(tmp_path, "{beta: -1}"))
    plan = Runner(load_recipe(_recipe(tmp_path, "{}")), tmp_path / "run", engine=TextEngine())
    assert "train_grpo: smollm2-135m on" in plan.plan()


def test_cli_names_a_bad_config_line(tmp_path, capsys):
    from cai.cli import main

    config = tmp_path / "grpo.yaml"
    config.write_text("data: p.jsonl\noutput_dir: out\nbatch_size: 3\nnum_generations: 2\n")
    assert main(["train", "grpo", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"error: {config}:" in err and "multiple of num_generations" in err
    assert main(["train", "grpo", "--config", str(config), "--set", "temperature=hot"]) == 1
    assert "temperature: expected a number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for bad in ('{"prompt": ["hi"]}\n', "not json\n"):  # a line, not a traceback
        (tmp_path / "p.jsonl").write_text(bad)
        config.write_text(f"data: {tmp_path / 'p.jsonl'}\noutput_dir: {tmp_path / 'out'}\n")
        assert main(["train", "grpo", "--config", str(config)]) == 1
        assert "p.jsonl" in capsys.readouterr().err


def test_prompts_are_read_as_strings_messages_or_conversations(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Hi?"},
        {"prompt": [{"role": "user", "content": "Why?"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p["prompt"][-1]["content"] for p in load_prompts(str(path))] == ["Hi?", "Why?", "Q"]
    path.write_text('{"prompt": [{"role": "assistant", "content": "A"}]}\n')
    with pytest.raises(ValueError, match=f"{path}:1: expected a 'prompt'"):
        load_prompts(str(path))
    path.write_bytes(b'{"prompt": "Hi?"}\n{"prompt": "caf\xe9"}\n')  # a line, not a traceback
    with pytest.raises(DataError, match=f"{path}:2: not UTF-8 text"):
        load_prompts(str(path))


def test_a_prompt_over_max_length_is_refused_before_training(tmp_path, model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?"}) + "\n" + json.dumps({"prompt": "word " * 300}))
    prompts = load_prompts(str(path))
    check_prompt_lengths(prompts, tokenizer, 512, str(path))
    with pytest.raises(DataError, match=rf"{path}: prompt 2 is \d+ tokens, over max_length=64"):
        check_prompt_lengths(prompts, tokenizer, 64, str(path))


@pytest.mark.slow
def test_one_grpo_step_logs_reward_and_kl_and_is_not_redone(tmp_path):
    path = _recipe(tmp_path, TINY)
    run_dir = tmp_path / "run"
    result = Runner(load_recipe(path), run_dir, engine=TextEngine()).run()
    assert not result.failed
    trained = json.loads((run_dir / "models" / "grpo" / "cai_train.json").read_text())
    assert trained["global_step"] == 1
    [step] = [e for e in trained["log_history"] if "loss" in e]
    # Group-wise judge rewards of a group of two sum to 1: the mean reward is exactly 0.5.
    assert step["rewards/judge_group/mean"] == pytest.approx(0.5)
    assert step["reward"] == pytest.approx(0.5)
    # The KL to the reference is logged; at the first step the policy is the reference.
    assert math.isfinite(step["kl"]) and step["kl"] >= 0
    assert (run_dir / "models" / "grpo" / "model.safetensors").is_file()
    lines = (run_dir / "grpo_prompts" / "data.jsonl").read_text().splitlines()
    assert len(lines) == 2

    again = Runner(load_recipe(path), run_dir, engine=TextEngine()).run()
    tally = {r.name: r for r in again.stages}["train_grpo"]
    assert tally.done_before == 1
