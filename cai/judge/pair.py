"""The judge's inputs and outputs: a pair to compare (``JudgePair``, or a ``(prompt, a, b)``
tuple), its check (``check_pair``), and the soft label a judge returns (``Preference``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cai.constitution import Principle
from cai.engine.base import ROLES

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
    scores: list[float] | None = None
    """Pointwise mode: each response's score log P(Yes) - log P(No), mean over the principles
    (before length control); None in the pairwise mode."""
    usage: dict[str, int] = field(default_factory=dict)
    """Tokens the engine read (``prompt_tokens``: every order and principle, each prompt scored
    and, in CoT mode, generated from) and wrote (``completion_tokens``: the rationales)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.scores is None:  # pairwise records keep the fields they always had
            del out["scores"]
        return out


@dataclass
class _Item:
    """One validated pair with its principles."""

    messages: list[dict]
    responses: tuple[str, str]
    principles: list[Principle]


def check_pair(pair: Any, index: int) -> tuple[list[dict], str, str, str | None]:
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
