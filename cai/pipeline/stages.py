"""The pipeline's stages, in the order they run.

A stage is a module that declares one ``cai.pipeline.stage.Stage``; adding one is that module and
one line here (docs/guides/write-a-stage.md). A recipe names the stages it runs under ``stages:``.
"""

from cai.pipeline import (
    classifier_data,
    critique_revise,
    evaluation,
    generate,
    judge,
    sample,
    training,
)

STAGES = (
    generate.STAGE,
    critique_revise.STAGE,
    training.SFT,
    sample.STAGE,
    judge.STAGE,
    training.REWARD,
    training.DPO,
    training.GRPO,
    evaluation.STAGE,
    classifier_data.PROMPTS,
    classifier_data.COMPLETIONS,
)
