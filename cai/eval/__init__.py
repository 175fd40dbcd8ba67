"""The evaluation: held-out prompts answered by each model, compared by the judge (win rates),
graded (harmlessness, over-refusal, sycophancy) and scored by a reward model.

    config.py   EvalConfig: the settings (``cai eval --config``, the ``evaluate`` stage), the sets
    grading.py  the pointwise graders and the lexical refusal check
    run.py      the evaluation run (answers, comparisons, grades, rewards) through the run store
    metrics.py  the metrics from those records, the table and the summary line

    cai eval --config eval.yaml --out runs/eval
"""

from cai.eval.config import EvalConfig, EvalSet
from cai.eval.run import run_eval

__all__ = ["EvalConfig", "EvalSet", "run_eval"]
