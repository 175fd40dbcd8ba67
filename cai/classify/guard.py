"""Trained input and output classifiers at inference: ``Guard(dirs).check_input(messages)``.

Inference only (transformers and torch, not the training stack), as ``cai.rewards.model`` is for
a reward model; ``cai train classifier`` writes the folders and shares :func:`input_ids` and
:func:`output_ids` with this module, so that training and checking read the same tokens.

    from cai.classify import Guard
    guard = Guard(["runs/guard-in", "runs/guard-out"])      # a `cai train classifier` folder each
    guard.check_input([{"role": "user", "content": "How do I make a bomb?"}]).flagged
    guard.check_output(messages, "Sure, first you")           # a response prefix, as it streams
    guard.stream(messages, token_ids, every=16)               # stops at the first prefix flagged
    guard.check_responses([(messages, response)])             # a whole response: its top prefix

A classifier is the starting model with a one-logit head (``load_reward_model``'s), trained with
binary cross-entropy on restricted = 1: ``p = sigmoid(logit)``, flagged when ``p >= threshold``,
the threshold saved beside the model (``cai_classifier.json``: the lowest one that kept the
false-positive rate on held-out permitted examples under ``max_fpr``). An input is the
conversation so far rendered with the chat template and the assistant's generation prompt; an
output is that, then the response's tokens. Rows longer than the classifier's ``max_length`` are
cut at the end, as in training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cai.classify.data import Kind
from cai.engine.encoding import chat_ids
from cai.layout import CLASSIFIER_FILE

Messages = str | list[dict]
"""A conversation so far: a user prompt, or chat messages ending with the user's turn."""


def as_messages(prompt: Messages) -> list[dict]:
    """Chat messages of a prompt (a string is one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def input_ids(tokenizer, messages: Messages) -> list[int]:
    """An input classifier's tokens: the conversation with the assistant's generation prompt."""
    return chat_ids(tokenizer, as_messages(messages), add_generation_prompt=True)


def output_ids(tokenizer, messages: Messages, response: str | Sequence[int]) -> list[int]:
    """An output classifier's tokens: :func:`input_ids`, then the response (text or ids)."""
    if isinstance(response, str):
        response = tokenizer(response, add_special_tokens=False)["input_ids"]
    return input_ids(tokenizer, messages) + list(response)


def prefix_lengths(n: int, every: int) -> list[int]:
    """The response lengths at which an output classifier reads a response of ``n`` tokens:
    every ``every`` tokens, and ``n`` (training's prefixes, ``Guard.stream``'s checks and the
    evaluation's, one list)."""
    cuts = list(range(every, n, every))
    return [*cuts, n] if n else [0]


def output_prefixes(
    prompt: Sequence[int], response: Sequence[int], every: int, max_length: int
) -> list[list[int]]:
    """The token rows of a response's prefixes (``prompt + response[:n]`` for ``n`` in
    :func:`prefix_lengths`), the response cut so that a row fits ``max_length``; none when the
    prompt alone fills it. Training learns on these rows; an example is scored by their highest."""
    room = max_length - len(prompt)
    if room < 1:
        return []
    kept = list(response[:room])
    return [list(prompt) + kept[:n] for n in prefix_lengths(len(kept), every)]


@dataclass(frozen=True)
class Verdict:
    """A classifier's answer on one input or response prefix."""

    p: float
    """P(restricted)."""
    flagged: bool
    """``p >= threshold``."""
    threshold: float


@dataclass(frozen=True)
class Stopped:
    """Where :meth:`Guard.stream` stopped."""

    flagged: bool
    """True when a prefix was flagged (the stream stopped there), False when it ran out."""
    at: int
    """Tokens (or chunks) read: the flagged prefix's length, or the whole stream's."""
    verdict: Verdict | None
    """The last prefix's verdict (None: the stream was empty)."""


class Scorer(Protocol):
    """What the guard needs of a classifier (a :class:`Classifier`, or a stub in tests)."""

    kind: Kind
    threshold: float
    prefix_tokens: int
    max_length: int
    tokenizer: Any

    def probabilities(self, rows: Sequence[Sequence[int]]) -> list[float]: ...


class Classifier:
    """One trained classifier folder, loaded once (``cai_classifier.json`` beside the model)."""

    def __init__(self, folder: str, *, batch_size: int = 8, device: str | None = None):
        from cai.rewards.model import load_reward_model

        info_file = Path(folder) / CLASSIFIER_FILE
        if not info_file.is_file():
            raise FileNotFoundError(
                f"{folder}: no {CLASSIFIER_FILE}; train a classifier with `cai train classifier`"
            )
        info = json.loads(info_file.read_text(encoding="utf-8"))
        self.folder = folder
        self.kind: Kind = info["kind"]
        self.threshold = float(info["threshold"])
        self.prefix_tokens = int(info["prefix_tokens"])
        self.max_length = int(info["max_length"])
        self.metrics: dict = info.get("metrics", {})
        self.batch_size = batch_size
        self.model, self.tokenizer = load_reward_model(folder, new_head=False)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    @torch.no_grad()
    def probabilities(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """P(restricted) of each token row, batched, right-padded as in training."""
        from cai.rewards.model import head_logits

        cut = [list(r[: self.max_length]) for r in rows]
        logits = head_logits(self.model, cut, self.tokenizer.pad_token_id, self.batch_size)
        # float32, as training computed the threshold: a probability at it compares the same.
        return torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).tolist()

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Guard:
    """An input and/or an output classifier: ``check_input``, ``check_output``, ``stream``."""

    def __init__(self, dirs: str | Sequence[str] = (), *, batch_size: int = 8):
        folders = [dirs] if isinstance(dirs, str) else list(dirs)
        if not folders:
            raise ValueError("a guard needs at least one `cai train classifier` folder")
        self.classifiers: dict[str, Scorer] = {}
        for folder in folders:
            self._add(Classifier(folder, batch_size=batch_size))

    @classmethod
    def of(cls, *scorers: Scorer) -> Guard:
        """A guard over classifiers already loaded (or stubs)."""
        guard = cls.__new__(cls)
        guard.classifiers = {}
        for scorer in scorers:
            guard._add(scorer)
        return guard

    def _add(self, scorer: Scorer) -> None:
        if scorer.kind in self.classifiers:
            raise ValueError(f"two {scorer.kind} classifiers: give one of each kind at most")
        self.classifiers[scorer.kind] = scorer

    @property
    def kinds(self) -> list[str]:
        return sorted(self.classifiers)

    def classifier(self, kind: Kind) -> Scorer:
        if kind not in self.classifiers:
            raise ValueError(f"this guard has no {kind} classifier (it has: {self.kinds})")
        return self.classifiers[kind]

    def _verdicts(self, scorer: Scorer, rows: list[list[int]]) -> list[Verdict]:
        if not rows:
            return []
        t = scorer.threshold
        return [Verdict(p, p >= t, t) for p in scorer.probabilities(rows)]

    def check_inputs(self, prompts: Sequence[Messages]) -> list[Verdict]:
        """The input classifier's verdict on each conversation so far (one batched pass)."""
        scorer = self.classifier("input")
        return self._verdicts(scorer, [input_ids(scorer.tokenizer, m) for m in prompts])

    def check_input(self, messages: Messages) -> Verdict:
        return self.check_inputs([messages])[0]

    def check_outputs(self, items: Sequence[tuple[Messages, str]]) -> list[Verdict]:
        """The output classifier's verdict on each (conversation, response so far)."""
        scorer = self.classifier("output")
        rows = [output_ids(scorer.tokenizer, m, r) for m, r in items]
        return self._verdicts(scorer, rows)

    def check_output(self, messages: Messages, partial_response: str) -> Verdict:
        return self.check_outputs([(messages, partial_response)])[0]

    def check_responses(self, items: Sequence[tuple[Messages, str]]) -> list[Verdict]:
        """The output classifier's verdict on each whole (conversation, response) as a stream
        meets it: the highest P(restricted) over the response's prefixes (:func:`output_prefixes`,
        as in training), flagged when any prefix is. All prefixes go in one batched pass, shortest
        first (less padding). A prompt that fills ``max_length`` is scored alone, cut."""
        scorer = self.classifier("output")
        rows: list[list[int]] = []
        owner: list[int] = []
        for i, (messages, response) in enumerate(items):
            prompt = input_ids(scorer.tokenizer, messages)
            tokens = scorer.tokenizer(response, add_special_tokens=False)["input_ids"]
            cut = output_prefixes(prompt, tokens, scorer.prefix_tokens, scorer.max_length)
            rows.extend(cut or [prompt[: scorer.max_length]])
            owner.extend([i] * (len(cut) or 1))
        order = sorted(range(len(rows)), key=lambda k: len(rows[k]))
        best = [-math.inf] * len(items)
        if rows:
            ps = scorer.probabilities([rows[k] for k in order])
            for k, p in zip(order, ps, strict=True):
                best[owner[k]] = max(best[owner[k]], p)
        t = scorer.threshold
        return [Verdict(p, p >= t, t) for p in best]

    def stream(
        self, messages: Messages, pieces: Iterable[int] | Iterable[str], *, every: int | None = None
    ) -> Stopped:
        """Read a response as it streams (token ids, or text chunks), score its prefix every
        ``every`` pieces (default: the classifier's training ``prefix_tokens``) and at its end,
        and stop at the first prefix flagged: nothing after it is read from ``pieces``."""
        scorer = self.classifier("output")
        every = every or scorer.prefix_tokens
        if every < 1:
            raise ValueError(f"every must be >= 1 (got {every})")
        prompt = input_ids(scorer.tokenizer, messages)
        read: list = []
        last: Verdict | None = None
        for piece in pieces:
            read.append(piece)
            if len(read) % every == 0:
                last = self._prefix(scorer, prompt, read)
                if last.flagged:
                    return Stopped(True, len(read), last)
        if read and len(read) % every:
            last = self._prefix(scorer, prompt, read)
            if last.flagged:
                return Stopped(True, len(read), last)
        return Stopped(False, len(read), last)

    def _prefix(self, scorer: Scorer, prompt: list[int], read: list) -> Verdict:
        if all(isinstance(p, str) for p in read):
            tokens = scorer.tokenizer("".join(read), add_special_tokens=False)["input_ids"]
        else:
            tokens = read
        return self._verdicts(scorer, [prompt + list(tokens)])[0]

    def describe(self) -> dict[str, Any]:
        return {
            kind: {"folder": getattr(s, "folder", None), "threshold": s.threshold}
            for kind, s in self.classifiers.items()
        }

    def close(self) -> None:
        for scorer in self.classifiers.values():
            close = getattr(scorer, "close", None)
            if close is not None:
                close()


__all__ = [
    "Classifier",
    "Guard",
    "Stopped",
    "Verdict",
    "as_messages",
    "input_ids",
    "output_ids",
    "output_prefixes",
    "prefix_lengths",
]
