"""The batch pipeline: ``python -m cai.pipeline run pipelines/<recipe>.yaml [--set key=value ...]``.

A recipe's stages run over whole batches and record their output in a run store
(:mod:`cai.store`), so a job killed at any moment resumes when re-run with the same
command, and ``--shard k/n`` splits it across machines.

    stage.py          the stage contract (Stage, StageContext), the record loop as stages call it
    policy.py         the policy at each point of a run, and the sample records' keys
    stages.py         the ordered list of stages
    generate.py  critique_revise.py  sample.py  judge.py  training.py  evaluation.py
                      one module per stage (training.py declares train_sft, train_reward,
                      train_dpo and train_grpo); none imports another
    classifier_data.py  class_prompts and class_completions: constitutional classifiers' data
    online.py         the rounds: the online: block and the schedule built from the stages
    online_eval.py    the rounds' evaluation models, rounds table and warnings
    recipe.py         the typed recipe YAML; its stages: section comes from the list
    run.py            the runner: prepares, plans and runs the recipe's stages; the summary table
    __main__.py       the command line
"""
