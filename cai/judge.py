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

``GenerativeJudge`` is the naive baseline kept for comparison: the same question answered as free
text and parsed; an unparseable verdict stays unparsed (``winner=None``).

    from cai.judge import Judge
    with Judge("smollm2-135m", constitution="harmless") as judge:
        pref = judge.compare("How do I pick a lock?", "I can't help with that.", "First, ...")
        prefs = judge.label([(prompt, response_a, response_b), ...])

``cai judge eval`` measures a judge against labelled pairs (``cai.judge_agreement``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

from cai.constitution import Constitution, Principle, load_constitution
from cai.engine import Engine, OptionScores, Sampling, create_engine
from cai.engine.base import ROLES
from cai.keys import record_key, seed_for
from cai.prompts import JUDGE_ANSWER_PREFIX, cot_answer_prefix, load_template

OPTIONS = ["A", "B"]
ORDERS = ("A/B", "B/A")
"""The two presentations of a pair: the original order, then the responses swapped."""

Prompt = str | Sequence[dict]


@dataclass(frozen=True)
class JudgePair:
    """A prompt and two responses to compare; ``key`` (optional) seeds the principle draw."""

    prompt: Prompt
    """A user message, or chat messages ending with the user turn both responses answer."""
    response_a: str
    response_b: str
    key: str | None = None
    """Stable identity of the pair; default: a hash of prompt and responses."""


PairLike = JudgePair | tuple[Prompt, str, str]


@dataclass
class Preference:
    """The judge's soft label for one pair, or the error that prevented it."""

    winner: Literal["A", "B", "tie"] | None
    """The preferred response; 'tie' when margin <= the judge's tie_margin; None on error."""
    p_a: float | None
    """Probability that response A is better, averaged over both orders (and the ensemble)."""
    p_a_first: float | None
    """That probability from the original order (A shown first) alone."""
    p_a_second: float | None
    """That probability from the swapped order (A shown second) alone."""
    consistent: bool | None
    """Both orders prefer the same response."""
    margin: float | None
    """|p_a - 0.5|."""
    principles: list[str]
    """Ids of the principles asked."""
    model: str
    error: str | None = None
    rationales: list[str] = field(default_factory=list)
    """CoT mode: the generated rationales, per principle the original order then the swapped."""
    usage: dict[str, int] = field(default_factory=dict)
    """Tokens the engine read (``prompt_tokens``: every order and principle, each prompt scored
    and, in CoT mode, generated from) and wrote (``completion_tokens``: the rationales)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass
class _Item:
    """One validated pair with its principles."""

    messages: list[dict]
    responses: tuple[str, str]
    principles: list[Principle]


def _check_pair(pair: Any, index: int) -> tuple[list[dict], str, str, str | None]:
    """(messages, response_a, response_b, key) of one pair; ValueError naming ``index``."""
    where = f"pair {index}"
    if isinstance(pair, JudgePair):
        prompt, a, b, key = pair.prompt, pair.response_a, pair.response_b, pair.key
    elif isinstance(pair, tuple | list) and len(pair) == 3:
        (prompt, a, b), key = pair, None
    else:
        raise ValueError(
            f"{where}: expected a (prompt, response_a, response_b) tuple or a JudgePair, "
            f"got {type(pair).__name__}"
            + (f" of {len(pair)}" if isinstance(pair, tuple | list) else "")
        )
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
        messages = [dict(m) if isinstance(m, dict) else m for m in prompt]
        if not messages:
            raise ValueError(f"{where}: the prompt is empty (no messages)")
        for j, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: prompt message {j}: expected {{'role': 'system'|'user'|'assistant', "
                    f"'content': str}}, got {m!r}"
                )
        if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise ValueError(f"{where}: the prompt must end with a non-empty user message")
    else:
        raise ValueError(
            f"{where}: the prompt must be a string or a list of messages, "
            f"got {type(prompt).__name__}"
        )
    for name, response in (("response_a", a), ("response_b", b)):
        if not isinstance(response, str):
            raise ValueError(f"{where}: {name} must be a string, got {type(response).__name__}")
        if not response.strip():
            raise ValueError(f"{where}: {name} is empty")
    if key is not None and not isinstance(key, str):
        raise ValueError(f"{where}: key must be a string, got {type(key).__name__}")
    return messages, a, b, key


def check_ensemble(constitution: Constitution, ensemble: int) -> None:
    """Raise ValueError unless ``constitution`` has ``ensemble`` (an integer >= 1) distinct
    principles with a judge question: the judge draws that many per pair."""
    pool = constitution.judge_principles
    if not pool:
        raise ValueError(
            f"constitution {constitution.name!r} has no principle with a judge question"
        )
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be an integer >= 1, got {ensemble!r}")
    if ensemble > len(pool):
        raise ValueError(
            f"ensemble={ensemble} needs that many distinct judge principles; constitution "
            f"{constitution.name!r} has {len(pool)}"
        )


class _PairJudge:
    """What both judges share: the engine, constitution, template, principle draws, prompts."""

    def __init__(
        self,
        model: Engine | str | None,
        constitution: Constitution | str | Path,
        *,
        backend: str,
        engine_options: dict | None,
        template: str | Path,
        ensemble: int,
        seed: int,
        few_shot: bool,
    ):
        self.constitution = (
            constitution
            if isinstance(constitution, Constitution)
            else load_constitution(constitution)
        )
        check_ensemble(self.constitution, ensemble)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.template = load_template(template)
        self.ensemble = ensemble
        self.seed = seed
        self.few_shot = few_shot
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

    def close(self) -> None:
        """Close the engine if this judge built it."""
        if self._owns_engine:
            self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def principles_for(self, key: str) -> list[Principle]:
        """``ensemble`` distinct judge principles for a pair, drawn by weight without
        replacement from ``random.Random(seed_for(key, seed))``."""
        rng = random.Random(seed_for(key, self.seed))
        pool = list(self.constitution.judge_principles)
        chosen = []
        for _ in range(self.ensemble):
            [p] = rng.choices(pool, weights=[p.weight for p in pool])
            pool.remove(p)
            chosen.append(p)
        return chosen

    def _items(self, pairs: Sequence[PairLike]) -> list[_Item]:
        if isinstance(pairs, str | bytes | JudgePair) or not isinstance(pairs, Sequence):
            raise ValueError(
                "pairs must be a list of (prompt, response_a, response_b) or JudgePair"
            )
        items = []
        for i, pair in enumerate(pairs):
            messages, a, b, key = _check_pair(pair, i)
            if key is None:
                key = record_key(prompt=messages, response_a=a, response_b=b)
            items.append(_Item(messages, (a, b), self.principles_for(key)))
        return items

    def _render(self, item: _Item, principle: Principle, swapped: bool) -> list[dict]:
        first, second = item.responses[::-1] if swapped else item.responses
        return self.template.render(
            system=self.constitution.system_prompt,
            examples=self.constitution.judge_shots(principle.judge) if self.few_shot else [],
            conversation=item.messages,
            question=principle.judge,
            response_a=first,
            response_b=second,
        )

    def _requests(self, items: list[_Item]) -> list[tuple[int, Principle, bool]]:
        """(item, principle, swapped) of every request: per item, per principle, both orders."""
        return [
            (i, p, swapped)
            for i, item in enumerate(items)
            for p in item.principles
            for swapped in (False, True)
        ]

    def describe(self) -> dict[str, Any]:
        """What a run manifest or record key records about this judge."""
        return {
            "judge": type(self).__name__,
            "engine": self.engine.describe(),
            "constitution": self.constitution.name,
            "constitution_version": self.constitution.version,
            "template": str(self.template.path),
            "template_text": self.template.source,
            "ensemble": self.ensemble,
            "seed": self.seed,
            "few_shot": self.few_shot,
        }


class Judge(_PairJudge):
    """The multiple-choice log-prob judge (see the module docstring for the method)."""

    def __init__(
        self,
        model: Engine | str | None = None,
        constitution: Constitution | str | Path = "harmless",
        *,
        backend: str = "auto",
        engine_options: dict | None = None,
        template: str | Path | None = None,
        ensemble: int = 1,
        seed: int = 0,
        cot: bool = False,
        cot_max_tokens: int = 192,
        clamp: tuple[float, float] | None = (0.4, 0.6),
        tie_margin: float = 0.0,
        few_shot: bool = True,
    ):
        """
        Args:
            model: an Engine, or a model spec (``smollm2-135m``, a folder, an HF id) for which
                the judge builds an engine with ``create_engine(backend, model, **engine_options)``
                and closes it on ``close()``.
            constitution: a Constitution, a shipped name or a path.
            template: default ``judge_cot`` with ``cot``, else ``judge_mc``.
            ensemble: distinct principles asked per pair, their probabilities averaged.
            seed: the judge's seed; with the pair it fixes each pair's principles.
            cot: write a rationale first (greedy, up to ``cot_max_tokens``), then score.
            clamp: CoT only: the band each order's probability is clamped into, symmetric about
                0.5 so that position debiasing stays exact; None: no clamp.
            tie_margin: a margin |p_a - 0.5| at or below this is a tie.
            few_shot: show the constitution's judge exemplars (judge_mc only).
        """
        super().__init__(
            model,
            constitution,
            backend=backend,
            engine_options=engine_options,
            template=template or ("judge_cot" if cot else "judge_mc"),
            ensemble=ensemble,
            seed=seed,
            few_shot=few_shot,
        )
        if clamp is not None:
            lo, hi = clamp
            if not (0 <= lo < 0.5 < hi <= 1 and abs(lo + hi - 1) < 1e-12):
                raise ValueError(
                    "clamp must be a band symmetric about 0.5, such as (0.4, 0.6), or None; "
                    f"got {clamp!r}"
                )
        if not 0 <= tie_margin < 0.5:
            raise ValueError(f"tie_margin must be in [0, 0.5), got {tie_margin!r}")
        if not isinstance(cot_max_tokens, int) or cot_max_tokens < 1:
            raise ValueError(f"cot_max_tokens must be an integer >= 1, got {cot_max_tokens!r}")
        self.cot = cot
        self.cot_max_tokens = cot_max_tokens
        self.clamp = clamp
        self.tie_margin = tie_margin

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "cot": self.cot,
            "cot_max_tokens": self.cot_max_tokens if self.cot else None,
            "clamp": list(self.clamp) if self.cot and self.clamp else None,
            "tie_margin": self.tie_margin,
        }

    def compare(self, prompt: Prompt, response_a: str, response_b: str) -> Preference:
        """Judge one pair: which of ``response_a`` and ``response_b`` better answers ``prompt``."""
        return self.label([(prompt, response_a, response_b)])[0]

    def label(self, pairs: Sequence[PairLike], *, progress: bool | str = False) -> list[Preference]:
        """Judge every pair in one batch; ValueError naming the pair index for a malformed one.

        ``pairs``: ``(prompt, response_a, response_b)`` tuples or JudgePairs; a prompt is a
        string or chat messages ending with a user turn.
        """
        items = self._items(pairs)
        requests = self._requests(items)
        conversations = [self._render(items[i], p, swapped) for i, p, swapped in requests]
        failures: dict[int, str] = {}
        rationales: list[str] = [""] * len(requests)
        read, written = [0] * len(requests), [0] * len(requests)
        if self.cot:
            label = f"{progress} rationales" if isinstance(progress, str) else progress
            done = self.engine.generate(
                conversations, Sampling(max_tokens=self.cot_max_tokens), progress=label
            )
            for r, completion in enumerate(done):
                read[r] += completion.prompt_tokens
                written[r] += completion.completion_tokens
                if completion.ok:
                    rationales[r] = completion.text
                else:
                    failures[r] = f"rationale failed: {completion.error}"
            todo = [r for r in range(len(requests)) if r not in failures]
            prefixes = [cot_answer_prefix(rationales[r]) for r in todo]
        else:
            todo, prefixes = list(range(len(requests))), JUDGE_ANSWER_PREFIX
        scores: dict[int, OptionScores] = dict(
            zip(
                todo,
                self.engine.score(
                    [conversations[r] for r in todo], OPTIONS, prefixes=prefixes, progress=progress
                ),
                strict=True,
            )
        )
        first_slot: list[float | None] = [None] * len(requests)
        for r, s in scores.items():
            read[r] += s.prompt_tokens
            if not s.ok:
                failures[r] = s.error
                continue
            try:
                p = s.probs()[0]
            except RuntimeError as e:
                failures[r] = str(e)
                continue
            if self.cot and self.clamp is not None:
                p = min(max(p, self.clamp[0]), self.clamp[1])
            first_slot[r] = p

        out = []
        start = 0
        for item in items:
            rows = range(start, start + 2 * len(item.principles))
            start = rows.stop
            ids = [p.id for p in item.principles]
            texts = [rationales[r] for r in rows] if self.cot else []
            usage = {
                "prompt_tokens": sum(read[r] for r in rows),
                "completion_tokens": sum(written[r] for r in rows),
            }
            failed = [r for r in rows if r in failures]
            if failed:
                _, principle, swapped = requests[failed[0]]
                error = f"order {ORDERS[swapped]}, principle {principle.id}: {failures[failed[0]]}"
                out.append(
                    Preference(*[None] * 6, ids, self.engine.model_name, error, texts, usage)
                )
                continue
            p_first = fmean(first_slot[r] for r in rows if not requests[r][2])
            q = fmean(first_slot[r] for r in rows if requests[r][2])
            p_a = 0.5 + (p_first - q) / 2
            margin = abs(p_a - 0.5)
            winner = "tie" if margin <= self.tie_margin else ("A" if p_a > 0.5 else "B")
            out.append(
                Preference(
                    winner=winner,
                    p_a=p_a,
                    p_a_first=p_first,
                    p_a_second=1 - q,
                    consistent=(p_first - 0.5) * (0.5 - q) > 0,
                    margin=margin,
                    principles=ids,
                    model=self.engine.model_name,
                    rationales=texts,
                    usage=usage,
                )
            )
        return out


# ---- the naive generative baseline ---------------------------------------------------------------

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
        super().__init__(
            model,
            constitution,
            backend=backend,
            engine_options=engine_options,
            template=template,
            ensemble=1,
            seed=seed,
            few_shot=few_shot,
        )
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


__all__ = [
    "GenerativeJudge",
    "GenerativeVerdict",
    "Judge",
    "JudgePair",
    "Preference",
    "check_ensemble",
    "parse_verdict",
]
