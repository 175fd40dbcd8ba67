"""The engine seam: one interface, two verbs, three backends.

``generate(conversations, sampling)`` turns chat conversations into completions through the
model's own chat template; ``score(conversations, options)`` returns the log-probability of each
option continuation (``"A"`` / ``"B"``, or longer strings) at the start of the assistant turn,
optionally after a given assistant prefix. Stages hand an engine whole batches; the backend
schedules them (padded, length-sorted micro-batches on HF; continuous batching on vLLM; bounded
concurrent requests on an OpenAI-compatible server).

Failures are per request: a request that fails comes back as a result with ``error`` set to the
reason, never as ``None``, and never takes the rest of the batch down. Bad arguments (n < 1, an
empty conversation, a conversation that does not fit the context) raise ``ValueError`` before any
work starts.

Usage::

    from cai.engine import Sampling, create_engine

    with create_engine("hf", model="smollm2-135m") as engine:
        [done] = engine.generate([[{"role": "user", "content": "Capital of France?"}]], Sampling())
        print(done.text)
        [scores] = engine.score([[{"role": "user", "content": "Pick A or B."}]], ["A", "B"])
        print(scores.probs())
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from cai.config import FieldError

Message = dict[str, str]
Conversation = Sequence[Message]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one request (or of every request in a batch)."""

    n: int = 1
    """Completions to sample for the request."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_tokens: int = 256
    """Most tokens to generate per completion."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion (not included in the text)."""
    seed: int | None = None
    """Seed of this request's sampling; with it, a result does not depend on its batch."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str | list):
            object.__setattr__(
                self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
            )

    def validate(self) -> None:
        """The one set of sampling rules: the engines check every request with it, and recipes
        and eval configs check their sampling fields with it when they load. Raises FieldError
        (a ValueError) naming the field."""
        if not isinstance(self.n, int) or self.n < 1:
            raise FieldError("n", f"must be an integer >= 1 (got {self.n!r})")
        if not (isinstance(self.temperature, int | float) and 0 <= self.temperature <= 100):
            raise FieldError("temperature", f"must be between 0 and 100 (got {self.temperature!r})")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise FieldError("top_p", f"must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise FieldError("max_tokens", f"must be an integer >= 1 (got {self.max_tokens!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise FieldError("stop", f"strings must be non-empty strings (got {self.stop!r})")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise FieldError("seed", f"must be a non-negative integer or None (got {self.seed!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass
class Sample:
    """One generated completion."""

    text: str
    finish_reason: str
    """'stop' (end of turn or a stop string) or 'length' (max_tokens reached)."""
    completion_tokens: int


@dataclass
class Completion:
    """The result of one generate request: ``n`` samples, or an error with its reason."""

    samples: list[Sample] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """The first sample's text (raises if the request failed)."""
        if self.error is not None:
            raise RuntimeError(f"request failed: {self.error}")
        return self.samples[0].text

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)


@dataclass
class OptionScores:
    """Log-probabilities of each option continuation of one conversation."""

    options: list[str]
    logprobs: list[float]
    """Sum of the option's token log-probs, in option order."""
    token_counts: list[int]
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def probs(self) -> list[float]:
        """The options' probabilities renormalised over the options (a softmax of logprobs)."""
        if self.error is not None:
            raise RuntimeError(f"request failed: {self.error}")
        top = max(self.logprobs)
        if top == -math.inf:
            raise RuntimeError("every option has probability 0 under the model")
        weights = [math.exp(lp - top) for lp in self.logprobs]
        total = sum(weights)
        return [w / total for w in weights]


class PromptTooLong(ValueError):
    """A prompt does not fit the model's context, on an engine built with ``overflow="raise"``
    (the default): raised before any work, so a caller can retry without that request."""


R = TypeVar("R")


def isolate_overflow(
    run: Callable[[list[int]], list[R]], count: int, failed: Callable[[str], R]
) -> list[R]:
    """``run(indices)`` (one result per index: an engine call on those requests) over
    ``range(count)``; where the engine raises PromptTooLong, the requests are run in halves
    until each one too long for the context is alone and gets ``failed(reason)``, so that it
    costs only its own result, on any engine whatever its ``overflow``. A request's result does
    not depend on the batch it runs in, so the others' results are unchanged."""

    def go(indices: list[int]) -> list[R]:
        if not indices:
            return []
        try:
            return list(run(indices))
        except PromptTooLong as e:
            if len(indices) == 1:
                return [failed(str(e).split(": ", 1)[-1])]
            half = len(indices) // 2
            return go(indices[:half]) + go(indices[half:])

    return go(list(range(count)))


def check_conversation(conversation: Any, index: int) -> None:
    """Raise ValueError naming ``index`` if ``conversation`` is not a list of chat messages."""
    if isinstance(conversation, str | bytes) or not isinstance(conversation, Sequence):
        raise ValueError(
            f"conversation {index}: expected a list of messages, got {type(conversation).__name__}"
        )
    if not conversation:
        raise ValueError(f"conversation {index}: empty conversation")
    for j, message in enumerate(conversation):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise ValueError(
                f"conversation {index}, message {j}: expected {{'role': ..., 'content': ...}}, got {message!r}"
            )
        if message.get("role") not in ROLES:
            raise ValueError(
                f"conversation {index}, message {j}: role must be one of {ROLES}, got {message.get('role')!r}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(f"conversation {index}, message {j}: content must be a string")


def per_request(sampling: Sampling | Sequence[Sampling], count: int) -> list[Sampling]:
    """One validated Sampling per request."""
    if isinstance(sampling, Sampling):
        sampling.validate()
        return [sampling] * count
    items = list(sampling)
    if len(items) != count:
        raise ValueError(f"got {len(items)} sampling parameters for {count} conversations")
    for i, s in enumerate(items):
        if not isinstance(s, Sampling):
            raise ValueError(f"sampling {i}: expected cai.engine.Sampling, got {type(s).__name__}")
        try:
            s.validate()
        except ValueError as e:
            raise ValueError(f"sampling {i}: {e}") from None
    return items


def check_prefixes(prefixes: Sequence[str] | None, count: int) -> list[str]:
    if prefixes is None:
        return [""] * count
    if isinstance(prefixes, str):
        return [prefixes] * count
    prefixes = list(prefixes)
    if len(prefixes) != count or not all(isinstance(p, str) for p in prefixes):
        raise ValueError(f"prefixes must be a string or {count} strings (one per conversation)")
    return prefixes


def check_chats(conversations: Sequence[Conversation]) -> None:
    """Every request's conversation is well formed and ends with a user turn (the assistant's
    start goes in ``prefixes``); ValueError naming the first that is not, before any work."""
    for i, conversation in enumerate(conversations):
        check_conversation(conversation, i)
        if conversation[-1]["role"] == "assistant":
            raise ValueError(
                f"conversation {i}: ends with an assistant message; end it with a user message "
                "and pass the assistant's start as prefixes= to continue it"
            )


def check_options(options: Sequence[str]) -> list[str]:
    if isinstance(options, str):
        raise ValueError("options must be a list of strings, such as ['A', 'B']")
    options = list(options)
    if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"options must be at least two non-empty strings (got {options!r})")
    if len(set(options)) != len(options):
        raise ValueError(f"options must be distinct (got {options!r})")
    return options


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; return (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Engine(abc.ABC):
    """A model behind the two verbs. Use as a context manager (or call close())."""

    backend: str = ""
    model_name: str = ""

    @abc.abstractmethod
    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[Completion]:
        """Complete each conversation's assistant turn (continuing ``prefixes`` where given).

        Returns one Completion per conversation, in order; failures are error Completions.
        ``progress`` shows a progress bar (a string is used as its label).
        """

    @abc.abstractmethod
    def score(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[OptionScores]:
        """Log-probability of each option as the continuation of each conversation's assistant
        turn (after ``prefixes`` where given). One prefill per conversation."""

    def close(self) -> None:  # noqa: B027 - backends without resources need no close
        """Free the backend's resources (processes, memory)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """What a manifest records about this engine."""
        return {"backend": self.backend, "model": self.model_name}
