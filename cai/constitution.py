"""Constitutions: the written principles that drive critique, revision and judging.

A constitution is a YAML file (see ``constitutions/harmless.yaml`` for the layout) loaded into
frozen dataclasses. Every mistake is reported with the file, line and field::

    constitutions/mine.yaml:14: principles[2].critique: must not be empty

Use::

    from cai.constitution import load_constitution
    c = load_constitution("harmless")        # a shipped name, or a path
    [p] = c.sample_principles(1, seed, require="critique")
    shots = c.critique_shots()               # few-shot exemplars, ready for prompts/critique.jinja

A constitution may also declare content classes, ``restricted:`` and ``permitted:`` (each an id,
a description and example prompts), from which ``cai.pipeline.classifier_data`` generates the
data of constitutional classifiers; no critique, revision or judge prompt shows them.

A principle carries a critique request with its revision request (SL-CAI), a judge question
(RL-CAI), or both. Anthropic's and Hugging Face's published constitution JSON files convert with
``cai.constitution_convert`` (or ``cai constitution convert``), which also writes YAML that loads
back to an equal constitution.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cai.config import ConfigError, from_data, load_yaml
from cai.resources import resolve

Role = Literal["system", "user", "assistant"]

_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SLUG_RULE = "lowercase letters, digits, '-' and '_', starting with a letter or digit"


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: Role = field(metadata={"doc": "who speaks: system, user or assistant"})
    content: str = field(metadata={"doc": "what they say"})


@dataclass(frozen=True)
class Principle:
    """One principle: a critique/revision request pair, a judge question, or both."""

    id: str = field(
        metadata={"doc": "stable slug naming the principle in records (e.g. 'harmful-content')"}
    )
    critique: str | None = field(
        default=None,
        metadata={"doc": "critique request: asks the model what is wrong with its last response"},
    )
    revision: str | None = field(
        default=None,
        metadata={"doc": "revision request: asks the model to rewrite its last response"},
    )
    judge: str | None = field(
        default=None,
        metadata={"doc": "multiple-choice judge question, e.g. 'Which response is less harmful?'"},
    )
    score_question: str | None = field(
        default=None,
        metadata={
            "doc": "yes/no question about one response for the pointwise judge, 'Yes' meaning "
            "good, e.g. 'Is the response free of anything harmful?'"
        },
    )
    tags: tuple[str, ...] = field(
        default=(), metadata={"doc": "what it is about: harmless, helpful, honest, ..."}
    )
    weight: float = field(default=1.0, metadata={"doc": "relative sampling weight, > 0"})


@dataclass(frozen=True)
class CritiqueExample:
    """A few-shot exemplar of one critique→revision round."""

    principle: str = field(
        metadata={"doc": "id of the principle whose requests the exemplar answers"}
    )
    conversation: tuple[Message, ...] = field(
        metadata={"doc": "user/assistant turns ending with the assistant response being critiqued"}
    )
    critique: str = field(metadata={"doc": "the exemplary critique"})
    revision: str = field(metadata={"doc": "the exemplary revised response"})


@dataclass(frozen=True)
class JudgeExample:
    """A few-shot exemplar of one multiple-choice judgement."""

    conversation: tuple[Message, ...] = field(
        metadata={"doc": "turns ending with the user turn being answered"}
    )
    response_a: str = field(metadata={"doc": "option (A)"})
    response_b: str = field(metadata={"doc": "option (B)"})
    better: Literal["A", "B"] = field(metadata={"doc": "the better option"})
    principle: str | None = field(
        default=None,
        metadata={
            "doc": "id of the principle whose judge question is asked; none: the question being asked"
        },
    )


@dataclass(frozen=True)
class ContentClass:
    """A class of requests a constitutional classifier guards (arXiv 2501.18837): restricted
    content, or a permitted look-alike of it."""

    id: str = field(metadata={"doc": "stable slug naming the class in data records"})
    description: str = field(metadata={"doc": "what belongs to the class, in a sentence or two"})
    examples: tuple[str, ...] = field(
        metadata={"doc": "short example prompts of the class (at least one)"}
    )


ClassLabel = Literal["restricted", "permitted"]


@dataclass(frozen=True)
class CritiqueShot:
    """A critique exemplar with its principle's requests filled in, for the prompt templates."""

    conversation: tuple[Message, ...]
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass(frozen=True)
class JudgeShot:
    """A judge exemplar with its question filled in, for the prompt templates."""

    conversation: tuple[Message, ...]
    response_a: str
    response_b: str
    better: Literal["A", "B"]
    question: str


@dataclass(frozen=True)
class Constitution:
    """A named, versioned set of principles with few-shot exemplars."""

    name: str = field(metadata={"doc": "short name, shown in logs and records"})
    description: str = field(metadata={"doc": "what the constitution is for"})
    version: str = field(
        metadata={"doc": "bump when the text changes, so runs record which wording they used"}
    )
    principles: tuple[Principle, ...] = field(metadata={"doc": "the principles (at least one)"})
    system_prompt: str | None = field(
        default=None, metadata={"doc": "system message for critique and judge prompts"}
    )
    critique_examples: tuple[CritiqueExample, ...] = field(
        default=(), metadata={"doc": "few-shot exemplars for critique and revision prompts"}
    )
    judge_examples: tuple[JudgeExample, ...] = field(
        default=(), metadata={"doc": "few-shot exemplars for multiple-choice judge prompts"}
    )
    restricted: tuple[ContentClass, ...] = field(
        default=(),
        metadata={"doc": "content classes a classifier blocks (the classifier data stages)"},
    )
    permitted: tuple[ContentClass, ...] = field(
        default=(),
        metadata={"doc": "content classes a classifier lets through, such as look-alikes"},
    )
    source: str = field(default="", init=False, compare=False, repr=False)
    """The file it was loaded from (empty when built in code)."""
    principle_lines: tuple[int, ...] = field(default=(), init=False, compare=False, repr=False)
    """The line of each principle in ``source`` (0 when unknown)."""

    def content_classes(self) -> list[tuple[ClassLabel, ContentClass]]:
        """(label, class) of every content class, the restricted ones first, in file order."""
        restricted: list[tuple[ClassLabel, ContentClass]] = [
            ("restricted", c) for c in self.restricted
        ]
        return restricted + [("permitted", c) for c in self.permitted]

    def principle(self, id: str) -> Principle:
        """The principle named ``id``; KeyError listing the known ids if there is none."""
        for p in self.principles:
            if p.id == id:
                return p
        known = ", ".join(p.id for p in self.principles)
        raise KeyError(f"constitution {self.name!r} has no principle {id!r} (known: {known})")

    @property
    def critique_principles(self) -> tuple[Principle, ...]:
        """The principles with critique and revision requests."""
        return tuple(p for p in self.principles if p.critique is not None)

    @property
    def judge_principles(self) -> tuple[Principle, ...]:
        """The principles with a judge question."""
        return tuple(p for p in self.principles if p.judge is not None)

    def sample_principles(
        self,
        k: int,
        rng_or_seed: random.Random | int | str | bytes,
        require: Literal["critique", "judge"] = "critique",
    ) -> list[Principle]:
        """Draw ``k`` principles independently (with replacement), in proportion to their weights.

        Only principles that have what ``require`` names take part. A seed gives a fresh
        ``random.Random(seed)``, so the same seed always gives the same draws whatever was drawn
        before; a ``random.Random`` is advanced in place.
        """
        if require not in ("critique", "judge"):
            raise ValueError(f"require must be 'critique' or 'judge', got {require!r}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if rng_or_seed is None:
            raise TypeError("sample_principles needs a seed or a random.Random, got None")
        pool = self.critique_principles if require == "critique" else self.judge_principles
        if not pool:
            kind = "critique request" if require == "critique" else "judge question"
            raise ValueError(f"constitution {self.name!r} has no principle with a {kind}")
        rng = rng_or_seed if isinstance(rng_or_seed, random.Random) else random.Random(rng_or_seed)
        return rng.choices(pool, weights=[p.weight for p in pool], k=k)

    def critique_shots(self) -> list[CritiqueShot]:
        """The critique exemplars, each with its principle's critique and revision requests."""
        shots = []
        for ex in self.critique_examples:
            p = self.principle(ex.principle)
            shots.append(
                CritiqueShot(ex.conversation, p.critique, ex.critique, p.revision, ex.revision)
            )
        return shots

    def judge_shots(self, question: str) -> list[JudgeShot]:
        """The judge exemplars, each with its principle's question.

        An exemplar without a principle is shown with ``question`` (the one being asked), so it
        must be one whose answer holds under every judge question of the constitution. Exemplars
        with a principle keep the same text for every question, which keeps the prompt prefix
        shared across requests.
        """
        shots = []
        for ex in self.judge_examples:
            q = question if ex.principle is None else self.principle(ex.principle).judge
            shots.append(JudgeShot(ex.conversation, ex.response_a, ex.response_b, ex.better, q))
        return shots


def load_constitution(name_or_path: str | Path) -> Constitution:
    """Load and check a constitution: a path, or the name of a shipped one (``harmless``).

    Raises ConfigError naming the file, line and field of each problem (one per line; types and
    keys are checked first, the first such problem alone), and
    FileNotFoundError listing the shipped names when nothing is found.
    """
    path = resolve("constitutions", name_or_path)
    return constitution_from_data(load_yaml(path), str(path))


def constitution_from_data(data: Any, source: str) -> Constitution:
    """A checked constitution from parsed YAML (or a converter's dict); ``source`` names it in
    errors, with the line of each problem where ``data`` came from a file."""
    constitution = from_data(Constitution, data, source=source)
    # Every problem at once, one per line: fixing a file should not take a run per mistake.
    problems = []
    for path, message in _problems(constitution):
        line = _line(data, path)
        loc = f"{source}:{line}" if line else source
        problems.append(f"{loc}: {_where(path)}: {message}")
    if problems:
        raise ConfigError("\n".join(problems))
    object.__setattr__(constitution, "source", source)
    lines = tuple(_line(data, ("principles", i)) for i in range(len(constitution.principles)))
    object.__setattr__(constitution, "principle_lines", lines)
    return constitution


def check_pointwise(constitution: Constitution, ids: Collection[str] | None = None) -> None:
    """Raise ConfigError naming the file and line of every judge principle (of those named by
    ``ids``, if given) without a ``score_question``: the pointwise judge asks each drawn
    principle's score question."""
    problems = []
    for i, p in enumerate(constitution.principles):
        if ids is not None and p.id not in ids:
            continue
        if p.judge is not None and p.score_question is None:
            line = constitution.principle_lines[i] if constitution.principle_lines else 0
            loc = constitution.source or f"constitution {constitution.name!r}"
            loc = f"{loc}:{line}" if line else loc
            problems.append(
                f"{loc}: principles[{i}] ({p.id}): no score_question, which the pointwise judge "
                "asks; add a yes/no question about one response ('Yes' meaning good), or use "
                "the pairwise judge"
            )
    if problems:
        raise ConfigError("\n".join(problems))


_Loc = tuple[str | int, ...]


def _problems(c: Constitution) -> Iterator[tuple[_Loc, str]]:
    """What is wrong beyond types and keys (which cai.config checks), in file order."""
    for key in ("name", "description", "version", "system_prompt"):
        text = getattr(c, key)
        if text is not None and not text.strip():
            yield (key,), "must not be empty"
    if not c.principles:
        yield ("principles",), "needs at least one principle"
    first_at: dict[str, int] = {}
    for i, p in enumerate(c.principles):
        at: _Loc = ("principles", i)
        if not _SLUG.fullmatch(p.id):
            yield (*at, "id"), f"{p.id!r} is not a slug ({_SLUG_RULE})"
        elif p.id in first_at:
            yield (
                (*at, "id"),
                f"duplicate principle id {p.id!r} (also principles[{first_at[p.id]}])",
            )
        first_at.setdefault(p.id, i)
        for key in ("critique", "revision", "judge", "score_question"):
            text = getattr(p, key)
            if text is not None and not text.strip():
                yield (*at, key), "must not be empty"
        if (p.critique is None) != (p.revision is None):
            missing, present = (
                ("revision", "critique") if p.revision is None else ("critique", "revision")
            )
            yield (
                (*at, missing),
                f"missing: a principle with a {present} request needs a {missing} request too",
            )
        if p.critique is None and p.judge is None:
            yield at, "needs critique and revision requests, a judge question, or both"
        if p.score_question is not None and p.judge is None:
            yield (
                (*at, "score_question"),
                "a score question goes with a judge question (the judge asks one or the other)",
            )
        for j, tag in enumerate(p.tags):
            if not _SLUG.fullmatch(tag):
                yield (*at, "tags", j), f"{tag!r} is not a slug ({_SLUG_RULE})"
        if not (math.isfinite(p.weight) and p.weight > 0):
            yield (*at, "weight"), f"must be a number > 0, got {p.weight}"
    by_id = {p.id: p for p in c.principles}
    for i, ex in enumerate(c.critique_examples):
        at = ("critique_examples", i)
        p = by_id.get(ex.principle)
        if p is None:
            yield (*at, "principle"), f"unknown principle {ex.principle!r} ({_known(c)})"
        elif p.critique is None:
            yield (*at, "principle"), f"principle {ex.principle!r} has no critique request"
        yield from _conversation_problems(ex.conversation, (*at, "conversation"), "assistant")
        for key in ("critique", "revision"):
            if not getattr(ex, key).strip():
                yield (*at, key), "must not be empty"
    for i, ex in enumerate(c.judge_examples):
        at = ("judge_examples", i)
        if ex.principle is not None:
            p = by_id.get(ex.principle)
            if p is None:
                yield (*at, "principle"), f"unknown principle {ex.principle!r} ({_known(c)})"
            elif p.judge is None:
                yield (*at, "principle"), f"principle {ex.principle!r} has no judge question"
        yield from _conversation_problems(ex.conversation, (*at, "conversation"), "user")
        for key in ("response_a", "response_b"):
            if not getattr(ex, key).strip():
                yield (*at, key), "must not be empty"
    yield from _class_problems(c)


def _class_problems(c: Constitution) -> Iterator[tuple[_Loc, str]]:
    """Content classes: slug ids unique across restricted and permitted, text in each field."""
    first_at: dict[str, str] = {}
    for label in ("restricted", "permitted"):
        for i, cls in enumerate(getattr(c, label)):
            at: _Loc = (label, i)
            if not _SLUG.fullmatch(cls.id):
                yield (*at, "id"), f"{cls.id!r} is not a slug ({_SLUG_RULE})"
            elif cls.id in first_at:
                yield (*at, "id"), f"duplicate class id {cls.id!r} (also {first_at[cls.id]})"
            first_at.setdefault(cls.id, f"{label}[{i}]")
            if not cls.description.strip():
                yield (*at, "description"), "must not be empty"
            if not cls.examples:
                yield (*at, "examples"), "needs at least one example prompt"
            for j, example in enumerate(cls.examples):
                if not example.strip():
                    yield (*at, "examples", j), "must not be empty"


def _known(c: Constitution) -> str:
    return "known: " + ", ".join(p.id for p in c.principles)


def _conversation_problems(
    turns: tuple[Message, ...], at: _Loc, last: Role
) -> Iterator[tuple[_Loc, str]]:
    """Turns alternate user, assistant, ... and end with ``last``.

    Exemplar conversations hold no system turn: in a critique prompt the exemplars follow the
    constitution's system prompt, and a second system message mid-prompt breaks many chat
    templates.
    """
    ending = "an assistant turn" if last == "assistant" else "a user turn"
    if not turns:
        yield at, f"needs at least one turn, ending with {ending}"
        return
    for j, turn in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if turn.role != expected:
            yield (
                (*at, j, "role"),
                f"expected {expected!r} (turns alternate user, assistant, ...), got {turn.role!r}",
            )
            return
        if not turn.content.strip():
            yield (*at, j, "content"), "must not be empty"
    if turns[-1].role != last:
        yield (*at, len(turns) - 1, "role"), f"the last turn must be {ending}"


def _line(data: Any, path: _Loc) -> int:
    """The line of the deepest part of ``path`` present in the YAML data (0 when unknown)."""
    line = getattr(data, "line", 0)
    node = data
    for part in path:
        if isinstance(node, dict) and part in node:
            line = getattr(node, "key_lines", {}).get(part, line)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            line = getattr(node, "item_lines", [line] * len(node))[part]
        else:
            break
        node = node[part]
    return line


def _where(path: _Loc) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


__all__ = [
    "ClassLabel",
    "Constitution",
    "ContentClass",
    "CritiqueExample",
    "CritiqueShot",
    "JudgeExample",
    "JudgeShot",
    "Message",
    "Principle",
    "check_pointwise",
    "constitution_from_data",
    "load_constitution",
]
