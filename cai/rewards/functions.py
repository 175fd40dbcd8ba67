"""The judge and a trained reward model as reward functions for RL trainers (GRPO, PPO).

A reward function here is what TRL's ``GRPOTrainer`` takes in ``reward_funcs``: a callable
``(prompts, completions, **kwargs) -> list[float | None]`` with a ``__name__`` (the name TRL logs
the reward under, ``rewards/<name>/mean``). TRL 1.16 calls it once per generation batch with
``prompts`` and ``completions`` of equal length, each a string or, for a conversational dataset,
a list of chat messages (a completion is ``[{"role": "assistant", "content": ...}]``); every
other dataset column arrives as a keyword argument holding one value per completion, next to
TRL's own ``completion_ids``, ``trainer_state``, ``log_extra`` and ``log_metric``. A prompt's
``num_generations`` completions come consecutively. ``None`` is a reward TRL turns into NaN and
leaves out of its means: the value here of a pair the judge could not score (an engine error, or
a pair too long for the judge's context: it costs only its own reward, never the batch).

Two ways to turn a pairwise judge into a reward, for each completion ``c`` of a prompt ``x``:

``against="reference"``: ``r = P(c beats ref | x)``, the judge's win probability of ``c`` over
    the dataset's reference response (column ``reference`` by default), both orders averaged.
``against="group"``: ``r_i = mean_{j != i} P(c_i beats c_j | x)`` over the other completions of
    its group (the ``num_generations`` completions of one prompt). Each unordered pair is judged
    once, both orders averaged, so ``P(c_j beats c_i) = 1 - P(c_i beats c_j)`` exactly and a
    group's rewards sum to ``G / 2``. The whole batch is one ``judge.label`` call.

``centered=True`` maps ``r`` from [0, 1] to [-1, 1] (``2r - 1``). An empty completion (nothing
visible: only whitespace and zero-width characters, ``is_empty``) is not shown to the judge: it
loses to any non-empty response and ties with another empty one; the pointwise judge gives it 0.
``RewardModelReward`` does the same with a trained reward model's scores ``s``, where
a win probability is the Bradley-Terry ``sigmoid(s_c - s_other)`` (and ``against=None`` gives the
raw score ``s_c``).

    from cai.judge import Judge
    from cai.rewards import JudgeReward
    judge = Judge("smollm2-135m", constitution="harmless")
    reward = JudgeReward(judge, against="group", num_generations=4)
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], args=GRPOConfig(num_generations=4))

``verl_compute_score`` and ``openrlhf_reward_func`` wrap the same callable in verl's batched
``compute_score`` and OpenRLHF's ``reward_func`` signatures (docs/guides/rewards.md).
``RemoteReward`` is the same callable computed by a ``cai serve`` server (``cai.serve.service``), so that
many trainer workers share one loaded judge (docs/guides/serve.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypeVar

from cai.judge.judge import Judge
from cai.stats import sigmoid

Against = Literal["reference", "group"]
T = TypeVar("T")
R = TypeVar("R")


class Scorer(Protocol):
    """What ``RewardModelReward`` needs of a reward model (``cai.rewards.model.RewardModel``)."""

    def score(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[float | None]:
        """One score per conversation; None for one it cannot score (longer than its context)."""


def _messages(prompt: Any, index: int) -> list[dict]:
    """The chat messages of one prompt (a string is one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(
        f"prompt {index}: expected a string or a list of chat messages, got {type(prompt).__name__}"
    )


def _text(response: Any, what: str) -> str:
    """The text of a completion or reference: a string, or messages ending with the assistant's."""
    if isinstance(response, str):
        return response
    if (
        isinstance(response, Sequence)
        and response
        and isinstance(response[-1], dict)
        and response[-1].get("role") == "assistant"
        and isinstance(response[-1].get("content"), str)
    ):
        return response[-1]["content"]
    raise ValueError(
        f"{what}: expected a string or chat messages ending with an assistant message, "
        f"got {response!r:.200}"
    )


# Characters that render as nothing, beside whitespace: zero-width space, non-joiner and joiner,
# word joiner, BOM (zero-width no-break space), soft hyphen, combining grapheme joiner, Mongolian
# vowel separator, direction marks, embeddings, overrides and isolates, invisible math
# operators, and the Hangul fillers. A completion of only these reads as empty to a person,
# while a judge model sees tokens and may score them above a real answer.
_INVISIBLE = frozenset(
    "\u00ad\u034f\u115f\u1160\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c"
    "\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u3164\ufeff"
    "\uffa0"
)


def is_empty(text: str) -> bool:
    """True for a response with nothing visible: only whitespace and invisible characters.
    Such a response is never shown to the judge; it loses to any non-empty one."""
    return all(c.isspace() or c in _INVISIBLE for c in text)


class _PairwiseReward:
    """Shared by both rewards: input checks, the two modes, empty completions, centering."""

    def __init__(
        self,
        against: Against | None,
        num_generations: int | None,
        reference_key: str,
        centered: bool,
        name: str,
    ):
        if against not in ("reference", "group", None):
            raise ValueError(f"against must be 'reference' or 'group', got {against!r}")
        if against == "group":
            if (
                isinstance(num_generations, bool)
                or not isinstance(num_generations, int)
                or num_generations < 2
            ):
                raise ValueError(
                    "against='group' needs num_generations, the trainer's completions per prompt "
                    f"(an integer >= 2), got {num_generations!r}"
                )
        elif num_generations is not None:
            raise ValueError("num_generations applies only to against='group'")
        self.against = against
        self.num_generations = num_generations
        self.reference_key = reference_key
        self.centered = centered
        self.__name__ = name

    def _win_probs(self, pairs: list[tuple[list[dict], str, str]]) -> list[float | None]:
        """P(response a beats response b) of each (messages, a, b); both non-empty."""
        raise NotImplementedError

    def _pairwise(self, pairs: list[tuple[list[dict], str, str]]) -> list[float | None]:
        """``_win_probs`` in one call for the pairs where both sides are non-empty."""
        asked = [i for i, (_, a, b) in enumerate(pairs) if not is_empty(a) and not is_empty(b)]
        probs = dict(zip(asked, self._win_probs([pairs[i] for i in asked]), strict=True))
        out: list[float | None] = []
        for i, (_, a, b) in enumerate(pairs):
            if i in probs:
                out.append(probs[i])
            else:  # an empty response loses to a non-empty one and ties with another empty one
                out.append(0.5 if is_empty(a) and is_empty(b) else float(not is_empty(a)))
        return out

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        for name, value in (("prompts", prompts), ("completions", completions)):
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise ValueError(
                    f"{name} must be a list (one item per completion), got {type(value).__name__}"
                )
        if len(prompts) != len(completions):
            raise ValueError(
                f"{len(prompts)} prompts but {len(completions)} completions: expected one prompt "
                "per completion"
            )
        messages = [_messages(p, i) for i, p in enumerate(prompts)]
        texts = [_text(c, f"completion {i}") for i, c in enumerate(completions)]
        if self.against == "reference":
            rewards = self._against_reference(messages, texts, kwargs)
        elif self.against == "group":
            rewards = self._group(messages, texts)
        else:
            rewards = self._scores(messages, texts)
        if self.centered and self.against is not None:
            return [None if r is None else 2 * r - 1 for r in rewards]
        return rewards

    def _against_reference(
        self, messages: list[list[dict]], texts: list[str], kwargs: dict[str, Any]
    ) -> list[float | None]:
        refs = self._references(kwargs, len(texts))
        return self._pairwise([(m, t, r) for m, t, r in zip(messages, texts, refs, strict=True)])

    def _references(self, kwargs: dict[str, Any], count: int) -> list[str]:
        """The text of each completion's reference, from the column ``reference_key``."""
        if self.reference_key not in kwargs:
            columns = sorted(k for k in kwargs if k not in _TRAINER_KWARGS)
            raise ValueError(
                f"against='reference' needs the dataset column {self.reference_key!r} (the "
                f"reference response of each prompt); the columns given are {columns}"
            )
        references = kwargs[self.reference_key]
        if isinstance(references, str) or len(references) != count:
            raise ValueError(
                f"column {self.reference_key!r}: expected one reference per completion "
                f"({count}), got {references!r:.200}"
            )
        refs = [_text(r, f"{self.reference_key} {i}") for i, r in enumerate(references)]
        for i, ref in enumerate(refs):
            if is_empty(ref):
                raise ValueError(f"{self.reference_key} {i}: the reference response is empty")
        return refs

    def _group(self, messages: list[list[dict]], texts: list[str]) -> list[float | None]:
        g = self.num_generations
        assert g is not None
        if len(texts) % g:
            raise ValueError(
                f"{len(texts)} completions do not split into groups of num_generations={g}: "
                "group-wise rewards need each prompt's completions together in one call (with "
                "TRL, a per-device batch that is a multiple of num_generations)"
            )
        index: list[tuple[int, int]] = []
        pairs = []
        for start in range(0, len(texts), g):
            for i in range(start + 1, start + g):
                if messages[i] != messages[start]:
                    raise ValueError(
                        f"completions {start} and {i} are in one group of {g} but answer different "
                        "prompts: the trainer must pass each prompt's completions consecutively"
                    )
            for i in range(start, start + g):
                for j in range(i + 1, start + g):
                    index.append((i, j))
                    pairs.append((messages[i], texts[i], texts[j]))
        wins: list[list[float]] = [[] for _ in texts]
        for (i, j), p in zip(index, self._pairwise(pairs), strict=True):
            if p is not None:
                wins[i].append(p)
                wins[j].append(1 - p)
        return [sum(w) / len(w) if w else None for w in wins]

    def _scores(self, messages: list[list[dict]], texts: list[str]) -> list[float | None]:
        raise ValueError("against=None (the raw score) needs a reward model")


_TRAINER_KWARGS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


class JudgeReward(_PairwiseReward):
    """The constitution judge as a reward (see the module docstring): a win probability
    against the group or a reference, or, with the pointwise judge, each completion's own
    score."""

    def __init__(
        self,
        judge: Judge,
        *,
        against: Against | None = "group",
        mode: Literal["pairwise", "pointwise"] | None = None,
        num_generations: int | None = None,
        reference_key: str = "reference",
        centered: bool = False,
        name: str | None = None,
    ):
        """
        Args:
            judge: the judge, built by the caller (who closes it).
            against: ``"group"`` (the other completions of the prompt) or ``"reference"``; with
                the pointwise judge also None: each completion scored alone, the reward
                ``sigmoid(s')`` of its length-controlled score (no group or reference needed).
            mode: the judge's mode, stated (``JudgeReward(judge, mode="pointwise")``); None:
                whatever the judge is. A mode the judge is not raises.
            num_generations: the group size, the trainer's completions per prompt (group only).
            reference_key: the dataset column holding the reference response (reference only).
            centered: rewards in [-1, 1] (``2p - 1``) instead of probabilities in [0, 1].
            name: the name the trainer logs; default ``judge_group`` / ``judge_reference`` /
                ``judge_score``.
        """
        if mode is not None and mode != judge.mode:
            raise ValueError(
                f"mode={mode!r} but the judge is {judge.mode}: build it with Judge(..., "
                f"mode={mode!r})"
            )
        if mode == "pointwise" and against == "group" and num_generations is None:
            against = None  # JudgeReward(judge, mode="pointwise"): the score alone
        if against is None and judge.mode != "pointwise":
            raise ValueError(
                "against=None (each completion's own score) needs the pointwise judge; the "
                "pairwise judge rewards against 'group' or 'reference'"
            )
        super().__init__(
            against,
            num_generations,
            reference_key,
            centered,
            name or f"judge_{against or 'score'}",
        )
        self.judge = judge

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        rewards = super().__call__(prompts, completions, **kwargs)
        if self.centered and self.against is None:
            return [None if r is None else 2 * r - 1 for r in rewards]
        return rewards

    def _scores(self, messages: list[list[dict]], texts: list[str]) -> list[float | None]:
        """One score request per completion (and principle): sigmoid of its score; an empty
        completion gets 0 without being asked about."""
        asked = [i for i, t in enumerate(texts) if not is_empty(t)]

        def score(batch: list[tuple[list[dict], str]]) -> list[float | None]:
            return [
                None if s.adjusted is None else sigmoid(s.adjusted)
                for s in self.judge.score_responses(batch)
            ]

        scored = score([(messages[i], texts[i]) for i in asked]) if asked else []
        out: list[float | None] = [0.0] * len(texts)
        for i, r in zip(asked, scored, strict=True):
            out[i] = r
        return out

    def _win_probs(self, pairs: list[tuple[list[dict], str, str]]) -> list[float | None]:
        # A pair too long for the judge's context gets an error label (p_a None): its own
        # reward is None, the batch's others are judged (Judge isolates the overflow).
        return [pref.p_a for pref in self.judge.label(pairs)] if pairs else []


class RewardModelReward(_PairwiseReward):
    """A trained reward model's scores as a reward: raw (``against=None``), or the
    Bradley-Terry win probability ``sigmoid(s_c - s_other)`` against a reference or the group."""

    def __init__(
        self,
        model: Scorer,
        *,
        against: Against | None = None,
        num_generations: int | None = None,
        reference_key: str = "reference",
        centered: bool = False,
        name: str | None = None,
    ):
        super().__init__(
            against,
            num_generations,
            reference_key,
            centered,
            name or ("reward_model" if against is None else f"reward_model_{against}"),
        )
        self.model = model

    def _score(self, conversations: list[list[dict]]) -> list[float | None]:
        """Scores of distinct conversations, each scored once, in one batched call."""
        distinct: dict[str, list[dict]] = {}
        for c in conversations:
            distinct.setdefault(repr(c), c)
        scored = dict(zip(distinct, self.model.score(list(distinct.values())), strict=True))
        return [scored[repr(c)] for c in conversations]

    def _scores(self, messages: list[list[dict]], texts: list[str]) -> list[float | None]:
        return list(
            self._score(
                [
                    [*m, {"role": "assistant", "content": t}]
                    for m, t in zip(messages, texts, strict=True)
                ]
            )
        )

    def _win_probs(self, pairs: list[tuple[list[dict], str, str]]) -> list[float | None]:
        if not pairs:
            return []
        conversations = [
            [*m, {"role": "assistant", "content": r}] for m, a, b in pairs for r in (a, b)
        ]
        s = self._score(conversations)
        return [
            None if s[2 * k] is None or s[2 * k + 1] is None else sigmoid(s[2 * k] - s[2 * k + 1])
            for k in range(len(pairs))
        ]


__all__ = ["Against", "JudgeReward", "RewardModelReward", "Scorer", "is_empty"]
