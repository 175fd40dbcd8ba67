"""The pointwise judge's scores: each response asked about alone, with a yes/no question.

For a prompt x, a response y and a principle's ``score_question`` q, the judge model reads
``prompts/judge_score.jinja`` (the conversation ending with y, then q, "Answer Yes or No.") and
the score is the log-odds of its first answer token::

    s(x, y, q) = log P("Yes") - log P("No")          (both option tokens from the tokenizer)

A pair's soft label compares the two scores (see ``cai.judge.judge``), so no response is ever shown
next to another: there is no position to be biased towards, and a prompt's k samples take k
score requests however many of their pairs are labelled. This is P(True)-style self-evaluation
(arXiv 2207.05221); pairwise judging amplifies a weak judge's biases (arXiv 2406.12319).

``length_coef`` removes a fixed share of the judge's length preference: s' = s - c * ln(chars).
``fit_length_coef`` (``cai judge eval --fit-length``) gives the label-free estimate, the slope of
the scores on log length over a set written so that the better response is the shorter one in
about half of the pairs (there the labels carry no length signal, so the slope is the judge's own
preference): 0.14 on ``data/judge_dev.jsonl``. The shipped ``DEFAULT_LENGTH_COEF`` was chosen on
that set's labels instead (a development set: measure on held-out data).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

from cai.constitution import Constitution, Message, Principle
from cai.engine import Engine, OptionScores
from cai.engine.base import isolate_overflow
from cai.keys import record_key

DEFAULT_LENGTH_COEF = 0.25
"""The length control of the shipped CPU recipes' pointwise judge: on data/judge_dev.jsonl (the
better response the shorter in 52% of pairs) the value that maximised the mean of the overall
accuracy and the accuracy where the shorter is better, with the default model (docs/measurements.md)."""

SCORE_OPTIONS = ("Yes", "No")
"""The option tokens scored at the start of the judge's answer: s = l(Yes) - l(No)."""


@dataclass(frozen=True)
class ScoreShot:
    """A scoring exemplar for ``prompts/judge_score.jinja``."""

    conversation: tuple[Message, ...]
    response: str
    question: str
    answer: str
    """'Yes' or 'No'."""


def score_shots(constitution: Constitution, question: str) -> list[ScoreShot]:
    """The constitution's judge exemplars as scoring exemplars: each pair gives its better
    response answered "Yes" and its worse "No" (in the pair's own order, so answers alternate
    as the file's do). An exemplar without a principle is asked ``question``; the others their
    principle's score question, so the exemplar text is the same for every request."""
    shots = []
    for ex in constitution.judge_examples:
        q = (
            question
            if ex.principle is None
            else constitution.principle(ex.principle).score_question
        )
        if q is None:  # its principle has no score question: not an exemplar for this judge
            continue
        for letter, response in (("A", ex.response_a), ("B", ex.response_b)):
            answer = SCORE_OPTIONS[0] if letter == ex.better else SCORE_OPTIONS[1]
            shots.append(ScoreShot(ex.conversation, response, q, answer))
    return shots


def length_adjusted(score: float, response: str, length_coef: float) -> float:
    """s - length_coef * ln(characters): the score with a fixed length preference removed."""
    if not length_coef:
        return score
    return score - length_coef * math.log(max(len(response), 1))


def fit_length_coef(scores: Sequence[float], responses: Sequence[str]) -> float:
    """The least-squares slope of the scores on ln(characters) of their responses: the length
    preference ``length_coef`` removes. Fit it on responses whose quality does not depend on
    their length (a length-balanced labelled set), or it removes real signal too."""
    if len(scores) != len(responses) or len(scores) < 2:
        raise ValueError("fit_length_coef needs at least two scores, one per response")
    x = [math.log(max(len(r), 1)) for r in responses]
    mx, my = sum(x) / len(x), sum(scores) / len(scores)
    var = sum((v - mx) ** 2 for v in x)
    if var == 0:
        raise ValueError("fit_length_coef: every response has the same length")
    return sum((v - mx) * (s - my) for v, s in zip(x, scores, strict=True)) / var


class ScoreCache:
    """Scores already computed, by request key, so that a response scored for one pair is not
    scored again for the prompt's other pairs (in the same call or a later chunk). Bounded: the
    oldest entries go first. Failures are never cached: they are retried."""

    def __init__(self, size: int = 65536):
        self.size = size
        self._scores: OrderedDict[str, float] = OrderedDict()

    def get(self, key: str) -> float | None:
        return self._scores.get(key)

    def put(self, key: str, score: float) -> None:
        self._scores[key] = score
        self._scores.move_to_end(key)
        while len(self._scores) > self.size:
            self._scores.popitem(last=False)

    def __len__(self) -> int:
        return len(self._scores)


@dataclass
class ResponseScore:
    """The pointwise judge's score of one response, or the error that prevented it."""

    score: float | None
    """log P(Yes) - log P(No), the mean over the prompt's principles."""
    adjusted: float | None
    """``score`` less the length control, ``length_coef * ln(characters)``."""
    principles: list[str]
    error: str | None = None
    prompt_tokens: int = 0
    """Tokens this call read for it (0 when its scores came from the cache or an earlier
    entry of the same call)."""


class PointwiseScorer:
    """Scores (prompt, response) pairs: each under its prompt's principles (drawn by
    ``principles_for(key of the prompt, its messages)``), each distinct (prompt, response,
    question) one request of one batched ``score`` call, and never twice (a ``ScoreCache``)."""

    def __init__(
        self,
        engine: Engine,
        render: Callable[[str, list[dict], Sequence[str]], list[dict]],
        principles_for: Callable[[str, list[dict]], list[Principle]],
        *,
        length_coef: float,
    ):
        self.engine = engine
        self.render = render
        """(question, conversation, [response]) → the prompt (``JudgeSettings.render``)."""
        self.principles_for = principles_for
        self.length_coef = length_coef
        self.cache = ScoreCache()

    def score(
        self, responses: Sequence[tuple[list[dict], str]], progress: bool | str = False
    ) -> list[ResponseScore]:
        """The score of each (chat messages ending with the user turn, response)."""
        principles: dict[str, list[Principle]] = {}
        keys: list[list[str]] = []
        todo: dict[str, list[dict]] = {}
        for messages, response in responses:
            prompt_key = record_key(prompt=messages)
            if prompt_key not in principles:
                principles[prompt_key] = self.principles_for(prompt_key, messages)
            row = []
            for p in principles[prompt_key]:
                question = p.score_question or ""
                key = record_key(prompt=messages, response=response, question=question)
                row.append(key)
                if self.cache.get(key) is None and key not in todo:
                    todo[key] = self.render(question, messages, [response])
            keys.append(row)
        failures: dict[str, str] = {}
        tokens: dict[str, int] = {}
        scored = {key: self.cache.get(key) for row in keys for key in row if key not in todo}
        if todo:
            prompts = list(todo.values())
            done = isolate_overflow(
                lambda rows: self.engine.score(
                    [prompts[r] for r in rows], SCORE_OPTIONS, progress=progress
                ),
                len(prompts),
                lambda reason: OptionScores(list(SCORE_OPTIONS), [], [], error=reason),
            )
            for key, s in zip(todo, done, strict=True):
                tokens[key] = s.prompt_tokens
                if not s.ok:
                    failures[key] = s.error or "failed"
                elif max(s.logprobs) == -math.inf:
                    failures[key] = "both Yes and No have probability 0 under the model"
                else:
                    scored[key] = s.logprobs[0] - s.logprobs[1]
                    self.cache.put(key, scored[key])
        out = []
        for (messages, response), row in zip(responses, keys, strict=True):
            ids = [p.id for p in principles[record_key(prompt=messages)]]
            failed = [key for key in row if key in failures]
            if failed:
                error = f"score request failed: {failures[failed[0]]}"
                out.append(ResponseScore(None, None, ids, error))
                continue
            raw = fmean(scored[key] for key in row)  # type: ignore[misc]
            read = sum(tokens.pop(key, 0) for key in row)  # counted once, where first met
            adjusted = length_adjusted(raw, response, self.length_coef)
            out.append(ResponseScore(raw, adjusted, ids, prompt_tokens=read))
        return out


__all__ = [
    "DEFAULT_LENGTH_COEF",
    "SCORE_OPTIONS",
    "PointwiseScorer",
    "ResponseScore",
    "ScoreCache",
    "ScoreShot",
    "fit_length_coef",
    "length_adjusted",
    "score_shots",
]
