"""SL-CAI: batched critique → revision rounds (Constitutional AI, arXiv 2212.08073, section 3).

Each round, for every conversation at once: sample a principle (seeded per conversation and
round), ask the model to critique its current response against the principle's critique request,
then to revise the response following the revision request. The revision becomes the response
the next round critiques. Each round's critique requests for all conversations go to the engine
as one batch, then all revision requests as another.

Revisions are cleaned of echoed labels ("Revision:", "Sure, here is a revised response:");
an empty or unchanged revision is flagged, and an empty one does not replace the response.

    from cai.critique import CritiqueReviser, RoundInput
    constitution = load_constitution("harmless")
    principle = critique_principle(constitution, key)      # seeded by the record key
    reviser = CritiqueReviser(engine, constitution)
    [result] = reviser.run_round([RoundInput(key, prompt, response, principle)])

The pipeline's ``critique_revise`` stage (``cai.pipeline.critique_revise``) runs the rounds through
the run store, one record per conversation and round.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from cai.constitution import Constitution, Principle
from cai.engine import Engine, Sampling
from cai.keys import seed_for
from cai.prompts import Template, load_template

# Labels a small model tends to echo at the start of a revision. Applied repeatedly, so
# "Revision: Sure, here is the revised response: ..." loses both.
_LABELS = re.compile(
    r"""^\s*(?:
        (?:revised|rewritten|new|improved|final)?\s*(?:revision|response|answer|version)\s*(?:request)?\s*\d*\s*:
      | (?:sure|certainly|okay|ok|of\ course)[,!.]?\s+here(?:'s|\ is|\ are)\ (?:a|an|the|my)\s+
        (?:revised|rewritten|new|improved|updated|better)\ (?:version|response|answer)[^:\n]*[:.]
      | here(?:'s|\ is)\ (?:a|an|the|my)\s+(?:revised|rewritten|new|improved|updated|better)
        \ (?:version|response|answer)[^:\n]*:
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)


def clean_revision(text: str) -> str:
    """Strip echoed labels and surrounding quotes/whitespace from a generated revision."""
    text = text.strip()
    while True:
        stripped = _LABELS.sub("", text, count=1).strip()
        if stripped == text:
            break
        text = stripped
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def revision_flags(revision: str, previous: str) -> list[str]:
    """'empty' if the cleaned revision has no text; 'unchanged' if it repeats the response."""
    if not revision.strip():
        return ["empty"]
    return ["unchanged"] if _normalise(revision) == _normalise(previous) else []


@dataclass
class RoundInput:
    """One conversation entering a round."""

    key: str
    """Stable key of this (conversation, round); seeds derive from it."""
    prompt: list[dict]
    """The conversation up to the response (ends with a user turn)."""
    response: str
    """The response to critique: the initial one, or the previous round's revision."""
    principle: Principle


def next_response(record: dict) -> str:
    """A round's answer (a :class:`RoundResult`'s stored record): the response the next
    round critiques and the exports train on, the revision unless it came back empty."""
    return record["response"] if "empty" in record["flags"] else record["revision"]


@dataclass
class RoundResult:
    """What one round produced for one conversation (or the error that stopped it)."""

    principle: str
    response: str
    critique: str = ""
    raw_revision: str = ""
    revision: str = ""
    flags: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _variables(constitution: Constitution, examples: list, item: RoundInput) -> dict:
    # The data's own system turn would land mid-prompt after the exemplars; the critique
    # concerns the user/assistant exchange, so it is left out here (the SFT record keeps it).
    turns = [m for m in item.prompt if m["role"] != "system"]
    return {
        "system": constitution.system_prompt,
        "examples": examples,
        "conversation": [*turns, {"role": "assistant", "content": item.response}],
        "critique_request": item.principle.critique,
    }


def load_templates(
    constitution: Constitution, critique_template: str, revise_template: str, few_shot: bool
) -> tuple[Template, Template]:
    """The critique and revise templates, each rendered once with a fixture conversation, so
    that a template that cannot render fails here, before a model loads or a record is written
    (``TemplateError`` naming the template)."""
    if not constitution.critique_principles:
        raise ValueError(f"constitution {constitution.name!r} has no critique/revision principles")
    critique, revise = load_template(critique_template), load_template(revise_template)
    examples = constitution.critique_shots() if few_shot else []
    fixture = RoundInput(
        "fixture",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
        "Hi.",
        constitution.critique_principles[0],
    )
    variables = _variables(constitution, examples, fixture)
    critique.render(**variables)
    revise.render(**variables, critique="A critique.", revision_request="A request.")
    return critique, revise


def critique_principle(constitution: Constitution, key: str, seed: int = 0) -> Principle:
    """The principle of one conversation's round, sampled (by weight) from a seed of its key:
    what a record key needs, without an engine."""
    [principle] = constitution.sample_principles(
        1, random.Random(seed_for(key, seed)), require="critique"
    )
    return principle


def template_text(critique: Template, revise: Template) -> str:
    """The critique and revise templates' source text, part of every record key."""
    return critique.source + "\0" + revise.source


class CritiqueReviser:
    """Runs critique → revision rounds through an engine, a whole batch per step."""

    def __init__(
        self,
        engine: Engine,
        constitution: Constitution,
        *,
        critique_template: str = "critique",
        revise_template: str = "revise",
        few_shot: bool = True,
        sampling: Sampling = Sampling(max_tokens=256),
        seed: int = 0,
    ):
        self.engine = engine
        self.constitution = constitution
        self.critique_template, self.revise_template = load_templates(
            constitution, critique_template, revise_template, few_shot
        )
        self.examples = constitution.critique_shots() if few_shot else []
        self.sampling = sampling
        self.seed = seed

    def principle_for(self, key: str) -> Principle:
        """The principle of one conversation's round (:func:`critique_principle`)."""
        return critique_principle(self.constitution, key, self.seed)

    def _variables(self, item: RoundInput) -> dict:
        return _variables(self.constitution, self.examples, item)

    def run_round(
        self, items: Sequence[RoundInput], progress: str | bool = False
    ) -> list[RoundResult]:
        """One round for every item: a batch of critiques, then a batch of revisions."""
        label = f"{progress} critiques" if isinstance(progress, str) else progress
        critiques = self.engine.generate(
            [self.critique_template.render(**self._variables(it)) for it in items],
            [
                replace(self.sampling, seed=seed_for(it.key + "/critique", self.seed))
                for it in items
            ],
            progress=label,
        )
        results = []
        for it, done in zip(items, critiques, strict=True):
            result = RoundResult(principle=it.principle.id, response=it.response)
            if done.ok:
                result.critique = done.text.strip()
                result.usage = {
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                }
            else:
                result.error = f"critique failed: {done.error}"
            results.append(result)
        todo = [i for i, r in enumerate(results) if r.error is None]
        label = f"{progress} revisions" if isinstance(progress, str) else progress
        revisions = self.engine.generate(
            [
                self.revise_template.render(
                    **self._variables(items[i]),
                    critique=results[i].critique,
                    revision_request=items[i].principle.revision,
                )
                for i in todo
            ],
            [
                replace(self.sampling, seed=seed_for(items[i].key + "/revise", self.seed))
                for i in todo
            ],
            progress=label,
        )
        for i, done in zip(todo, revisions, strict=True):
            result = results[i]
            if not done.ok:
                result.error = f"revision failed: {done.error}"
                continue
            result.raw_revision = done.text
            result.revision = clean_revision(done.text)
            result.flags = revision_flags(result.revision, result.response)
            result.usage["prompt_tokens"] += done.prompt_tokens
            result.usage["completion_tokens"] += done.completion_tokens
        return results
