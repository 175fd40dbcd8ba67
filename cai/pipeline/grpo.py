"""The stage ``train_grpo``: GRPO on the run's prompts with the judge as the reward.

    stages:
      train_grpo: {max_steps: 50, num_generations: 4, beta: 0.04, lora: {}}   # cai.train.grpo.GRPOConfig

The recipe's prompts (after ``--limit``) are written to ``<run>/grpo_prompts/data.jsonl``; the
policy starts from the SFT model when the recipe trains one (else the recipe's model), which is
also the KL reference, and is trained into ``<run>/models/grpo``. Each completion's reward is its
mean win probability against the other completions of its prompt, from the judge
(``cai.rewards.JudgeReward``, group-wise, both orders): ``judge_model``, ``constitution`` and
``judge_ensemble`` are options of the stage. Resuming and skipping a finished training follow the
other training stages (``cai.pipeline.training``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cai.jsonl import encode_line, write_atomic
from cai.pipeline import training
from cai.pipeline.stage import PipelineError, Stage, StageContext

if TYPE_CHECKING:
    from cai.records import StageTally

KIND = "train_grpo"


def write_prompts(runner: StageContext) -> None:
    """The run's prompts as GRPO's training data (rewritten each run: the training's identity
    hashes the file's content, so the same prompts are the same training)."""
    if not runner.prompts:
        raise PipelineError(f"{KIND}: the recipe has no prompts to train on")
    lines = [encode_line({"key": p.key, "prompt": p.messages}) for p in runner.prompts]
    path = training.data_dir(runner, KIND) / "data.jsonl"
    write_atomic(path, lambda f: f.writelines(lines))


def run(runner: StageContext, tally: StageTally) -> None:
    write_prompts(runner)
    runner.result.models[KIND] = training.run_train(runner, KIND, tally)


STAGE = Stage(
    name=KIND,
    doc="GRPO on the recipe's prompts with the judge's group-wise reward → <run>/models/grpo, "
    "from the SFT model if one is trained: cai.train.grpo.GRPOConfig fields (num_generations, "
    "max_new_tokens, beta, lora, judge_model, ...) but data/output_dir/model; {} for the defaults",
    options=dict[str, Any],
    run=run,
    plan=lambda runner: training.plan(runner, KIND),
    check_options=lambda data, source: training.check_options(KIND, data, source),
    models=lambda runner: {"grpo": str(training.output_dir(runner, KIND))},
    in_shard=False,
    ends_with_report=True,
)
