"""Constitutional classifiers: input and output guards (after Anthropic's Constitutional
Classifiers, arXiv 2501.18837).

    data.py      labelled examples (prompt, label restricted/permitted, class, response)
    metrics.py   AUC, the threshold at a false-positive budget, precision and recall (pure)
    guard.py     ``Guard``: trained classifiers at inference, a streaming output check
    evaluate.py  ``cai classify eval``: a guard (or the zero-shot baseline) on labelled prompts

    cai train classifier --config FILE        (cai.train.classifier)
    cai classify eval --guard DIR --data FILE [--zero-shot]
    cai serve --guard DIR                     (POST /v1/classify)
"""

from cai.classify.guard import Classifier, Guard, Stopped, Verdict

__all__ = ["Classifier", "Guard", "Stopped", "Verdict"]
