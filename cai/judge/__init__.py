"""The judge: AI feedback as soft preference labels (RL-CAI, RLAIF), in one package.

settings.py    JudgeSettings: what defines a judge's labels (no engine), its checks, its key
pair.py        JudgePair, Preference: a judge's inputs and outputs
judge.py       Judge: the settings on an engine, pairwise (both orders) or pointwise
pointwise.py   the pointwise scorer: each response alone, yes/no score questions
generative.py  GenerativeJudge: the naive "write A or B" baseline, kept for comparison
agreement.py   ``cai judge eval``: a judge against labelled pairs
label.py       ``cai judge label``: a file of pairs labelled resumably; the export row rule
routing.py     the principle picked by an input classifier's verdict (guard, route)

from cai.judge import Judge
with Judge("smollm2-135m", constitution="harmless") as judge:
    pref = judge.compare("How do I pick a lock?", "I can't help with that.", "First, ...")
"""

from cai.judge.judge import Judge
from cai.judge.pair import JudgePair, Preference
from cai.judge.settings import CALIBRATIONS, MODES, JudgeSettings, check_ensemble

__all__ = [
    "CALIBRATIONS",
    "MODES",
    "Judge",
    "JudgePair",
    "JudgeSettings",
    "Preference",
    "check_ensemble",
]
