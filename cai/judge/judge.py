"""RL-CAI: the AI-feedback judge that turns response pairs into soft preference labels.

The method of Constitutional AI (arXiv 2212.08073, section 4.1) and RLAIF (arXiv 2309.00267,
section 3): for a prompt and two responses, ask the feedback model a multiple-choice question
carrying one constitutional principle's judge question, with few-shot exemplars
(``prompts/judge_mc.jinja``), and read the answer from the log-probabilities of the option
tokens "A" and "B" after the assistant text "The answer is (". For each pair and principle k::

    p_k = exp(l_A) / (exp(l_A) + exp(l_B))     order (a, b): probability of the first slot
    q_k = the same for order (b, a)            so 1 - q_k is that order's probability for a
    p_first  = mean_k p_k                      (CoT: each p_k, q_k clamped into [lo, hi] first)
    p_second = 1 - mean_k q_k
    p_a      = (p_first + p_second) / 2        computed as 0.5 + (p_first - mean_k q_k) / 2

Judging both orders and averaging cancels position bias: a judge that always picks the first
slot gets p_k = q_k and so p_a = 0.5 exactly. The principle of each label is drawn from a seed
derived from the pair (prompt and responses) and the judge's seed, so labels are reproducible;
``ensemble=k`` averages k distinct principles. With ``cot=True`` the judge first writes a
rationale for each order (``prompts/judge_cot.jinja``, greedy), then scores "A"/"B" after it,
with each probability clamped into a band (0.4-0.6 by default: the CAI paper found CoT
probabilities overconfident). A whole batch is one ``score`` call (after one ``generate``
call for CoT), both orders and every principle in it.

**Calibration** (``calibration=``): a small judge leans towards one letter whatever the
responses, and after the softmax that lean squashes the difference both orders carry. ``batch``
subtracts each order's mean log-odds l_A - l_B over the batch before the softmax (arXiv
2309.17249); ``contextual`` subtracts the log-odds of the same question with both responses
"N/A" (arXiv 2102.09690).

**Pointwise** (``mode="pointwise"``, ``cai.judge.pointwise``): each response is scored alone with its
principles' yes/no ``score_question``, s = log P(Yes) - log P(No), and a pair's label is::

    p_a = sigmoid(mean_k (s'_a,k - s'_b,k) / T)   s' = s - length_coef * ln(characters)

The principles are drawn per prompt (every response of a prompt is asked the same questions),
and each distinct (prompt, response, question) is scored once, whatever the number of pairs.
There is no order, so ``consistent`` is None.

**Routing** (``guard=``, ``route=``, ``cai.judge.routing``): an input classifier's verdict on the
conversation picks the list the principles are drawn from (``route["restricted"]`` or
``route["permitted"]``), one batched classifier pass per ``label`` call; the classifier is
released by ``close``.

``cai.judge.generative.GenerativeJudge`` is the naive baseline kept for comparison.

    from cai.judge import Judge
    with Judge("smollm2-135m", constitution="harmless") as judge:
        pref = judge.compare("How do I pick a lock?", "I can't help with that.", "First, ...")
        prefs = judge.label([(prompt, response_a, response_b), ...])

``cai judge eval`` measures a judge against labelled pairs (``cai.judge.agreement``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

from cai.constitution import Constitution, Principle
from cai.engine import Completion, Engine, OptionScores, Sampling, create_engine
from cai.engine.base import isolate_overflow
from cai.judge.pair import PairLike, Preference, Prompt, _Item, check_pair
from cai.judge.pointwise import PointwiseScorer, ResponseScore
from cai.judge.settings import CONTENT_FREE, JudgeSettings
from cai.keys import canonical
from cai.prompts import JUDGE_ANSWER_PREFIX, cot_answer_prefix
from cai.stats import sigmoid

OPTIONS = ["A", "B"]
ORDERS = ("A/B", "B/A")
"""The two presentations of a pair: the original order, then the responses swapped."""


@dataclass
class _Batch:
    """The requests of one pairwise ``label`` call (per pair, per principle, both orders) and
    what each has so far: its prompt, rationale (CoT), tokens read and written, failure."""

    requests: list[tuple[int, Principle, bool]]
    conversations: list[list[dict]] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    rationales: list[str] = field(init=False)
    read: list[int] = field(init=False)
    written: list[int] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.requests)
        self.rationales, self.read, self.written = [""] * n, [0] * n, [0] * n


def _setting(name: str) -> property:
    """A judge's read-only view of one of its settings (``judge.settings.<name>``)."""
    return property(lambda self: getattr(self.settings, name), doc=f"``settings.{name}``")


class _PairJudge:
    """What both judges share: the settings (constitution, template, principle draws) and the
    engine."""

    def __init__(
        self,
        model: Engine | str | None,
        settings: JudgeSettings,
        *,
        backend: str,
        engine_options: dict | None,
    ):
        self.settings = settings
        if isinstance(model, Engine):
            if backend != "auto" or engine_options:
                raise ValueError(
                    "backend and engine_options apply when the judge builds its engine from a "
                    "model spec; this judge was given an Engine"
                )
            self.engine, self._owns_engine = model, False
        else:
            self.engine = create_engine(backend, model=model, **(engine_options or {}))
            self._owns_engine = True

    constitution = _setting("constitution")

    def close(self) -> None:
        """Close the engine if this judge built it, and release a routing classifier."""
        if self._owns_engine:
            self.engine.close()
        self.settings.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _items(self, pairs: Sequence[PairLike], *, per_prompt: bool = False) -> list[_Item]:
        return self.settings.items(pairs, per_prompt=per_prompt)

    def _render(self, item: _Item, principle: Principle, swapped: bool) -> list[dict]:
        responses = item.responses[::-1] if swapped else item.responses
        return self.settings.render(principle.judge, item.messages, responses)  # type: ignore[arg-type]

    def _requests(self, items: list[_Item]) -> list[tuple[int, Principle, bool]]:
        """(item, principle, swapped) of every request: per item, per principle, both orders."""
        return [
            (i, p, swapped)
            for i, item in enumerate(items)
            for p in item.principles
            for swapped in (False, True)
        ]


class Judge(_PairJudge):
    """The AI-feedback judge from option log-probs: pairwise multiple-choice (the module
    docstring) or pointwise yes/no scores (``mode="pointwise"``, ``cai.judge.pointwise``)."""

    def __init__(
        self,
        model: Engine | str | None = None,
        constitution: Constitution | str | Path = "harmless",
        *,
        backend: str = "auto",
        engine_options: dict | None = None,
        **settings: Any,
    ):
        """
        Args:
            model: an Engine, or a model spec (``smollm2-135m``, a folder, an HF id) for which
                the judge builds an engine with ``create_engine(backend, model, **engine_options)``
                and closes it on ``close()``.
            constitution: a Constitution, a shipped name or a path.
            settings: the other fields of :class:`JudgeSettings` (``mode``, ``ensemble``,
                ``seed``, ``cot``, ``calibration``, ``length_coef``, ...), checked there.
        """
        self._start(model, JudgeSettings(constitution, **settings), backend, engine_options)

    @classmethod
    def from_settings(
        cls,
        settings: JudgeSettings,
        model: Engine | str | None = None,
        *,
        backend: str = "auto",
        engine_options: dict | None = None,
    ) -> Judge:
        """The judge of ``settings`` (made beforehand, say for record keys) on ``model``."""
        judge = cls.__new__(cls)
        judge._start(model, settings, backend, engine_options)
        return judge

    def _start(
        self,
        model: Engine | str | None,
        settings: JudgeSettings,
        backend: str,
        engine_options: dict | None,
    ) -> None:
        super().__init__(model, settings, backend=backend, engine_options=engine_options)
        self._scorer = PointwiseScorer(
            self.engine,
            settings.render,
            settings.principles_for,
            length_coef=settings.length_coef,
        )

    mode = _setting("mode")

    def compare(self, prompt: Prompt, response_a: str, response_b: str) -> Preference:
        """Judge one pair: which of ``response_a`` and ``response_b`` better answers ``prompt``."""
        return self.label([(prompt, response_a, response_b)])[0]

    def label(self, pairs: Sequence[PairLike], *, progress: bool | str = False) -> list[Preference]:
        """Judge every pair in one batch; ValueError naming the pair index for a malformed one.

        ``pairs``: ``(prompt, response_a, response_b)`` tuples or JudgePairs; a prompt is a
        string or chat messages ending with a user turn.
        """
        if self.mode == "pointwise":
            return self._label_pointwise(self._items(pairs, per_prompt=True), progress)
        items = self._items(pairs)
        batch = _Batch(self._requests(items))
        batch.conversations = [
            self._render(items[i], p, swapped) for i, p, swapped in batch.requests
        ]
        if self.settings.cot:
            self._write_rationales(batch, progress)
        log_odds = self._log_odds(batch, progress)
        self._calibrate(items, batch.requests, log_odds, batch.failures, progress)
        first_slot: dict[int, float] = {}
        for r, d in log_odds.items():
            p = sigmoid(d)
            if self.settings.cot and self.settings.clamp is not None:
                p = min(max(p, self.settings.clamp[0]), self.settings.clamp[1])
            first_slot[r] = p
        out, start = [], 0
        for item in items:
            rows = range(start, start + 2 * len(item.principles))
            start = rows.stop
            out.append(self._preference(item, rows, batch, first_slot))
        return out

    def _write_rationales(self, batch: _Batch, progress: bool | str) -> None:
        """CoT: each request's rationale (greedy), written before its options are scored."""
        label = f"{progress} rationales" if isinstance(progress, str) else progress
        conversations = batch.conversations
        done = isolate_overflow(
            lambda rows: self.engine.generate(
                [conversations[r] for r in rows],
                Sampling(max_tokens=self.settings.cot_max_tokens),
                progress=label,
            ),
            len(conversations),
            lambda reason: Completion(error=reason),
        )
        for r, completion in enumerate(done):
            batch.read[r] += completion.prompt_tokens
            batch.written[r] += completion.completion_tokens
            if completion.ok:
                batch.rationales[r] = completion.text
            else:
                batch.failures[r] = f"rationale failed: {completion.error}"

    def _log_odds(self, batch: _Batch, progress: bool | str) -> dict[int, float]:
        """Request → l_A - l_B, for each request that has not failed (failures recorded)."""
        todo = [r for r in range(len(batch.requests)) if r not in batch.failures]
        if self.settings.cot:
            prefixes: str | list[str] = [cot_answer_prefix(batch.rationales[r]) for r in todo]
        else:
            prefixes = JUDGE_ANSWER_PREFIX
        scores = self._score([batch.conversations[r] for r in todo], prefixes, progress)
        log_odds: dict[int, float] = {}
        for r, s in zip(todo, scores, strict=True):
            batch.read[r] += s.prompt_tokens
            if not s.ok:
                batch.failures[r] = s.error  # type: ignore[assignment]
                continue
            try:
                s.probs()
            except RuntimeError as e:
                batch.failures[r] = str(e)
                continue
            log_odds[r] = s.logprobs[0] - s.logprobs[1]
        return log_odds

    def _preference(
        self, item: _Item, rows: range, batch: _Batch, first_slot: dict[int, float]
    ) -> Preference:
        """One pair's label from its requests' first-slot probabilities (``rows``: per
        principle, the original order then the swapped one), or the first failure's error."""
        ids = [p.id for p in item.principles]
        texts = [batch.rationales[r] for r in rows] if self.settings.cot else []
        usage = {
            "prompt_tokens": sum(batch.read[r] for r in rows),
            "completion_tokens": sum(batch.written[r] for r in rows),
        }
        failed = [r for r in rows if r in batch.failures]
        if failed:
            _, principle, swapped = batch.requests[failed[0]]
            error = (
                f"order {ORDERS[swapped]}, principle {principle.id}: {batch.failures[failed[0]]}"
            )
            return Preference(*[None] * 6, ids, self.engine.model_name, error, texts, usage)
        requests = batch.requests
        p_first = fmean(first_slot[r] for r in rows if not requests[r][2])
        q = fmean(first_slot[r] for r in rows if requests[r][2])
        p_a = 0.5 + (p_first - q) / 2
        return Preference(
            winner=self._winner(p_a),
            p_a=p_a,
            p_a_first=p_first,
            p_a_second=1 - q,
            consistent=(p_first - 0.5) * (0.5 - q) > 0,
            margin=abs(p_a - 0.5),
            principles=ids,
            model=self.engine.model_name,
            rationales=texts,
            usage=usage,
        )

    def _score(
        self, conversations: list[list[dict]], prefixes: str | list[str], progress: bool | str
    ) -> list[OptionScores]:
        """The engine's option scores, a request too long for its context failing alone."""

        def run(rows: list[int]) -> list[OptionScores]:
            each = prefixes if isinstance(prefixes, str) else [prefixes[r] for r in rows]
            batch = [conversations[r] for r in rows]
            return self.engine.score(batch, OPTIONS, prefixes=each, progress=progress)

        failed = lambda reason: OptionScores(list(OPTIONS), [], [], error=reason)  # noqa: E731
        return isolate_overflow(run, len(conversations), failed)

    def _winner(self, p_a: float) -> Literal["A", "B", "tie"]:
        return "tie" if abs(p_a - 0.5) <= self.settings.tie_margin else ("A" if p_a > 0.5 else "B")

    def _calibrate(
        self,
        items: list[_Item],
        requests: list[tuple[int, Principle, bool]],
        log_odds: dict[int, float],
        failures: dict[int, str],
        progress: bool | str,
    ) -> None:
        """Subtract each request's estimated bias towards option A from its log-odds, in place."""
        if self.settings.calibration == "batch":
            for swapped in (False, True):
                rows = [r for r in log_odds if requests[r][2] == swapped]
                if rows:
                    mean = fmean(log_odds[r] for r in rows)
                    for r in rows:
                        log_odds[r] -= mean
        elif self.settings.calibration == "contextual":
            # One content-free request per (prompt, principle): both responses "N/A", so both
            # orders render the same and one request serves them.
            keys = {r: (canonical(items[i].messages), p.id) for r, (i, p, _) in enumerate(requests)}
            todo: dict[tuple[bytes, str], list[dict]] = {}
            for r, (i, p, _) in enumerate(requests):
                if keys[r] not in todo:
                    blank = _Item(items[i].messages, (CONTENT_FREE, CONTENT_FREE), [p])
                    todo[keys[r]] = self._render(blank, p, False)
            label = f"{progress} calibration" if isinstance(progress, str) else progress
            done = dict(
                zip(
                    todo,
                    self._score(list(todo.values()), JUDGE_ANSWER_PREFIX, label),
                    strict=True,
                )
            )
            for r in list(log_odds):
                s = done[keys[r]]
                if not s.ok:
                    failures[r] = f"calibration request failed: {s.error}"
                    del log_odds[r]
                else:
                    log_odds[r] -= s.logprobs[0] - s.logprobs[1]

    def score_responses(
        self, responses: Sequence[tuple[Prompt, str]], *, progress: bool | str = False
    ) -> list[ResponseScore]:
        """Pointwise mode: each (prompt, response) scored alone under its prompt's principles;
        each distinct (prompt, response, question) is one score request, made once per judge."""
        if self.mode != "pointwise":
            raise ValueError("score_responses needs the pointwise judge (mode='pointwise')")
        if isinstance(responses, str | bytes) or not isinstance(responses, Sequence):
            raise ValueError("responses must be a list of (prompt, response) pairs")
        checked = []
        for i, pair in enumerate(responses):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"response {i}: expected a (prompt, response) pair")
            messages, text, _, _ = check_pair((pair[0], pair[1], pair[1]), i)
            checked.append((messages, text))
        self.settings.verdicts([m for m, _ in checked])  # routed: one batched pass
        return self._scorer.score(checked, progress)

    def _label_pointwise(self, items: list[_Item], progress: bool | str) -> list[Preference]:
        """p_a = sigmoid((s'_a - s'_b) / temperature), s' the length-controlled mean score over
        the prompt's principles (equal to the mean over the principles of the differences)."""
        scores = self._scorer.score(
            [(item.messages, r) for item in items for r in item.responses], progress
        )
        out = []
        for n in range(len(items)):
            a, b = scores[2 * n], scores[2 * n + 1]
            error = a.error or b.error
            if error is not None:
                out.append(Preference(*[None] * 6, a.principles, self.engine.model_name, error))
                continue
            p_a = sigmoid((a.adjusted - b.adjusted) / self.settings.temperature)  # type: ignore[operator]
            out.append(
                Preference(
                    winner=self._winner(p_a),
                    p_a=p_a,
                    p_a_first=p_a,
                    p_a_second=p_a,
                    consistent=None,
                    margin=abs(p_a - 0.5),
                    principles=a.principles,
                    model=self.engine.model_name,
                    scores=[a.score, b.score],
                    usage={"prompt_tokens": a.prompt_tokens + b.prompt_tokens},
                )
            )
        return out


__all__ = ["Judge"]
