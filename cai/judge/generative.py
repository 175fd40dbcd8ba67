"""The naive generative judge: the multiple-choice question answered as free text and parsed.

Kept as the baseline the log-prob judge (``cai.judge.Judge``) is measured against in
``cai judge eval`` and ``bench/judge.py``: the same prompt (``judge_mc``), the same exemplars, both
orders; an unparseable verdict stays unparsed (``winner=None``), never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cai.constitution import Constitution
from cai.engine import Engine, Sampling
from cai.judge.judge import ORDERS, _PairJudge
from cai.judge.pair import PairLike, Prompt
from cai.judge.settings import JudgeSettings


@dataclass
class GenerativeVerdict:
    """The naive judge's free-text verdicts for one pair (both orders)."""

    winner: Literal["A", "B", "tie"] | None
    """Both orders agree: that response; they disagree: 'tie'; any verdict unparseable: None."""
    verdict_first: Literal["A", "B"] | None
    """Original order's verdict, naming the original responses; None when unparseable."""
    verdict_second: Literal["A", "B"] | None
    """Swapped order's verdict, mapped back to the original responses."""
    parsed: bool
    """Both verdicts parsed."""
    texts: list[str]
    """The generated verdict texts: original order, swapped order."""
    principles: list[str]
    model: str
    error: str | None = None

    @property
    def p_a(self) -> float | None:
        """Share of the two orders' votes for A (1, 0.5 or 0); None unless both parsed."""
        if not self.parsed:
            return None
        return ((self.verdict_first == "A") + (self.verdict_second == "A")) / 2

    @property
    def consistent(self) -> bool | None:
        return self.verdict_first == self.verdict_second if self.parsed else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "p_a": self.p_a, "consistent": self.consistent}


# "The answer is (A)", "the answer is: B": the wording the judge exemplars teach.
_ANSWER_IS = re.compile(r"(?i:\banswer\s+is)\s*:?\s*\(?([AB])\b")
# The whole reply is a verdict: "A", "(B).", "**A**", "Response B", "Answer: (A)".
_BARE = re.compile(r"\W*(?i:(?:the\s+)?(?:response|option|answer)\s*:?\s*)?\(?([AB])\)?\W*")
# The reply opens with a verdict: "A. Because ...", "(B) is better", "Option A is safer". The
# verdict must end there (punctuation, "is", the end): "A good answer ..." names no A, and
# "Response A or response B" names no verdict at its start.
_LEADING = re.compile(
    r"\W*(?:(?i:response|option)\s+\(?([ABab])\)?|\(([AB])\)|([AB]))(?=\s*[.:,!)]|\s+is\b|\s*$)"
)
# A verdict named anywhere: "I think response B is safer", "... so (A)".
_MENTION = re.compile(r"(?i:\b(?:response|option)\s+\(?)([ABab])\b|\(([AB])\)")


def parse_verdict(text: str) -> Literal["A", "B"] | None:
    """The option a free-text verdict names, or None when it names none or both.

    Tried in order, the first rule that finds anything decides: "answer is (X)"; the whole text
    is a verdict ("A", "(B).", "Response A"); the text opens with one ("B. Because ...");
    "Response X" / "Option X" / "(X)" anywhere. A rule finding both letters gives None: an
    ambiguous verdict is never guessed.
    """

    def one(letters: list[str]) -> Literal["A", "B"] | None:
        found = {letter.upper() for letter in letters if letter}
        return found.pop() if len(found) == 1 else None  # type: ignore[return-value]

    answers = _ANSWER_IS.findall(text)
    if answers:
        return one(answers)
    bare = _BARE.fullmatch(text)
    if bare:
        return one([bare.group(1)])
    leading = _LEADING.match(text)
    if leading:
        return one(list(leading.groups()))
    mentions = _MENTION.findall(text)
    return one([letter for pair in mentions for letter in pair]) if mentions else None


class GenerativeJudge(_PairJudge):
    """The naive baseline: the same question, answered in free text and parsed (both orders).

    It asks ``judge_mc`` with the same exemplars, lets the model write up to ``max_tokens``
    (greedy) and parses the verdict with :func:`parse_verdict`.
    """

    def __init__(
        self,
        model: Engine | str | None = None,
        constitution: Constitution | str | Path = "harmless",
        *,
        backend: str = "auto",
        engine_options: dict | None = None,
        template: str | Path = "judge_mc",
        seed: int = 0,
        few_shot: bool = True,
        max_tokens: int = 24,
    ):
        settings = JudgeSettings(constitution, template, seed=seed, few_shot=few_shot)
        super().__init__(model, settings, backend=backend, engine_options=engine_options)
        self.sampling = Sampling(max_tokens=max_tokens)

    def compare(self, prompt: Prompt, response_a: str, response_b: str) -> GenerativeVerdict:
        return self.label([(prompt, response_a, response_b)])[0]

    def label(
        self, pairs: Sequence[PairLike], *, progress: bool | str = False
    ) -> list[GenerativeVerdict]:
        """Judge every pair (one generate call, both orders)."""
        items = self._items(pairs)
        requests = self._requests(items)
        done = self.engine.generate(
            [self._render(items[i], p, swapped) for i, p, swapped in requests],
            self.sampling,
            progress=progress,
        )
        out = []
        for n, item in enumerate(items):
            first, second = done[2 * n], done[2 * n + 1]
            ids = [p.id for p in item.principles]
            model = self.engine.model_name
            bad = next((o for o, c in zip(ORDERS, (first, second), strict=True) if not c.ok), None)
            if bad is not None:
                error = f"order {bad}: {(first if bad == ORDERS[0] else second).error}"
                out.append(GenerativeVerdict(None, None, None, False, [], ids, model, error))
                continue
            v1 = parse_verdict(first.text)
            v2 = {"A": "B", "B": "A", None: None}[parse_verdict(second.text)]
            parsed = v1 is not None and v2 is not None
            winner = (v1 if v1 == v2 else "tie") if parsed else None
            out.append(
                GenerativeVerdict(winner, v1, v2, parsed, [first.text, second.text], ids, model)
            )
        return out


__all__ = ["GenerativeJudge", "GenerativeVerdict", "parse_verdict"]
