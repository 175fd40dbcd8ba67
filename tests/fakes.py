"""The fake engines the tests share: deterministic stand-ins for a model behind the engine seam.

- :class:`TextEngine`: one text per request from (conversation, seed); fails requests that say FAIL.
- :class:`PairEngine`: ``k`` samples per request, and a judge that prefers the shorter answer
  (pairwise and pointwise), with markers for the odd cases (FAIL, SAME, DUP, TIE, STUCK,
  BADJUDGE).
- :class:`ScriptedEngine`: option scores from a function of the conversation (a test states a
  judge's behaviour, a bias or a true preference, and checks the numbers the method must give).

``options_of`` reads the two options of a judged example back out of its rendered prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from cai.engine import Completion, Engine, OptionScores, Sample, Sampling
from cai.engine.base import check_prefixes

_OPTION = re.compile(r"^\(([AB])\) (.*)$", re.MULTILINE)


def options_of(conversation) -> dict[str, str]:
    """{"A": text, "B": text} of the last user message (the example being judged)."""
    return dict(_OPTION.findall(conversation[-1]["content"]))


class TextEngine(Engine):
    """Deterministic text from (conversation, seed); fails requests that mention FAIL."""

    backend = "fake"
    model_name = "fake"

    def __init__(self):
        self.batches: list[int] = []

    def generate(self, conversations, sampling=None, *, prefixes=None, progress=False):
        params = sampling if isinstance(sampling, list) else [sampling] * len(conversations)
        self.batches.append(len(conversations))
        out = []
        for conversation, p in zip(conversations, params, strict=True):
            text = json.dumps(conversation[-1]["content"]) + str(p.seed)
            if "FAIL" in json.dumps(conversation):
                out.append(Completion(prompt_tokens=5, error="fake failure"))
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()[:8]
            out.append(
                Completion([Sample(f"Revision: answer {digest}", "stop", 4)], prompt_tokens=10)
            )
        return out

    def score(self, conversations, options, *, prefixes=None, progress=False):
        raise NotImplementedError


class PairEngine(Engine):
    """Generates deterministic text from (conversation, seed, sample index); judges by length.

    Markers in a prompt: FAIL fails its generate requests; SAME makes every sample identical;
    DUP makes the first two samples identical; TIE gives samples of equal length; STUCK makes a
    revision repeat the response; BADJUDGE fails its score requests. Otherwise sample i is
    ``"x" * (i + 1) + " answer <digest>"``, so sample 0 is the shortest. ``score`` gives the
    first slot 0.5 + 0.05 × (len(B) - len(A)): shorter is better, by a margin of 0.05 per char.
    """

    backend = "fake"
    model_name = "fake"

    def __init__(self):
        self.generate_batches: list[int] = []
        self.score_batches: list[int] = []

    def generate(self, conversations, sampling=None, *, prefixes=None, progress=False):
        params = sampling if isinstance(sampling, list) else [sampling] * len(conversations)
        self.generate_batches.append(len(conversations))
        out = []
        for conversation, p in zip(conversations, params, strict=True):
            whole = json.dumps(conversation)
            if "FAIL" in whole:
                out.append(Completion(prompt_tokens=5, error="fake failure"))
                continue
            samples = []
            for i in range(p.n):
                text = json.dumps(conversation[-1]["content"]) + str(p.seed) + str(i)
                digest = hashlib.sha256(text.encode()).hexdigest()[:8]
                if "SAME" in whole or "STUCK" in whole:
                    text = "the same answer"
                elif "DUP" in whole:
                    text = "x" * (max(i, 1)) + f" answer {digest if i > 1 else 'dup'}"
                elif "TIE" in whole:
                    text = f"tie {chr(65 + i)} {digest}"
                else:
                    text = "x" * (i + 1) + f" answer {digest}"
                samples.append(Sample(text, "stop", 4))
            out.append(Completion(samples, prompt_tokens=10))
        return out

    def score(self, conversations, options, *, prefixes=None, progress=False):
        check_prefixes(prefixes, len(conversations))
        self.score_batches.append(len(conversations))
        out = []
        for conversation in conversations:
            if "BADJUDGE" in conversation[-1]["content"]:
                out.append(OptionScores(list(options), [], [], error="fake score failure"))
                continue
            if list(options) == ["Yes", "No"]:  # the pointwise judge: shorter scores higher
                text = conversation[-1]["content"]
                response = text[text.rindex("Assistant: ") :].split("\n\n")[0]
                p = min(max(0.9 - 0.02 * len(response), 0.05), 0.95)
                logprobs = [math.log(p), math.log(1 - p)]
                out.append(OptionScores(list(options), logprobs, [1, 1], prompt_tokens=10))
                continue
            shown = options_of(conversation)
            p = 0.5 + 0.05 * (len(shown["B"]) - len(shown["A"]))
            p = min(max(p, 0.05), 0.95)
            logprobs = [math.log(p), math.log(1 - p)]
            out.append(OptionScores(list(options), logprobs, [1, 1], prompt_tokens=10))
        return out


class ScriptedEngine(Engine):
    """Scores from ``slot_a(conversation, prefix)``: P(first slot), a (p_A, p_B) pair of
    unnormalised probabilities, or an error string. ``verdict`` is the generated text (or a
    function of the conversation; None makes an error Completion)."""

    backend = "fake"
    model_name = "fake-model"

    def __init__(self, slot_a=lambda conversation, prefix: 0.5, verdict="The answer is (A)."):
        self.slot_a = slot_a
        self.verdict = verdict
        self.score_calls: list[tuple[list, list[str]]] = []
        self.generate_calls: list[tuple[list, Sampling]] = []

    def score(self, conversations, options, *, prefixes=None, progress=False):
        prefixes = check_prefixes(prefixes, len(conversations))
        self.score_calls.append((list(conversations), prefixes))
        out = []
        for conversation, prefix in zip(conversations, prefixes, strict=True):
            p = self.slot_a(conversation, prefix)
            if isinstance(p, str):
                out.append(OptionScores(options, [], [], error=p))
            elif isinstance(p, tuple):  # unnormalised probabilities of A and B
                out.append(OptionScores(options, [math.log(x) for x in p], [1, 1]))
            else:
                out.append(OptionScores(options, [math.log(p), math.log(1 - p)], [1, 1]))
        return out

    def generate(self, conversations, sampling=Sampling(), *, prefixes=None, progress=False):
        self.generate_calls.append((list(conversations), sampling))
        out = []
        for conversation in conversations:
            text = self.verdict(conversation) if callable(self.verdict) else self.verdict
            if text is None:
                out.append(Completion(error="backend fell over"))
            else:
                out.append(Completion([Sample(text, "stop", 5)], prompt_tokens=10))
        return out
