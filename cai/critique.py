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

**What a record's key holds of the constitution** (:func:`text_key`). The prompts render from the
constitution only :func:`prompt_parts`: its system prompt, its critique exemplars (with
``few_shot``) and the principle's critique and revision requests. A record key names the
constitution and the principle (``name``, ``id``) and, where those parts are not what the shipped
constitution of that name rendered for that principle (:data:`SHIPPED`, digests of every shipped
constitution's parts when they joined the key), a digest of them. So editing a request, an
exemplar or the system prompt critiques again exactly the records whose prompts held it, while
stores written before, with the shipped text, keep their keys.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cai.constitution import Constitution, Principle
from cai.engine import Engine, Sampling
from cai.keys import digest, seed_for
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


def prompt_parts(
    constitution: Constitution, principle: Principle, few_shot: bool
) -> dict[str, Any]:
    """The template variables of ``principle``'s critique and revision prompts that come from
    the constitution: the system prompt, the critique exemplars (with ``few_shot``; each shows
    its own principle's requests) and the principle's critique and revision requests. With the
    templates' text they are everything the prompts hold besides the conversation and the
    critique written, so the record key holds them (:func:`text_key`)."""
    return {
        "system": constitution.system_prompt,
        "examples": constitution.critique_shots() if few_shot else [],
        "critique_request": principle.critique,
        "revision_request": principle.revision,
    }


def _variables(constitution: Constitution, few_shot: bool, item: RoundInput) -> dict:
    # The data's own system turn would land mid-prompt after the exemplars; the critique
    # concerns the user/assistant exchange, so it is left out here (the SFT record keeps it).
    turns = [m for m in item.prompt if m["role"] != "system"]
    return {
        **prompt_parts(constitution, item.principle, few_shot),
        "conversation": [*turns, {"role": "assistant", "content": item.response}],
    }


def parts_digest(constitution: Constitution, principle: Principle, few_shot: bool) -> str:
    """A digest of :func:`prompt_parts`."""
    return digest(prompt_parts(constitution, principle, few_shot))


def _shipped_entry(constitution: Constitution, principle: Principle, few_shot: bool) -> str:
    return digest(
        [constitution.name, principle.id, parts_digest(constitution, principle, few_shot)]
    )


def is_shipped(constitution: Constitution, principle: Principle, few_shot: bool) -> bool:
    """Whether ``principle``'s prompt parts are what the shipped constitution of the same name
    rendered when they joined the key (so keys written before then hold them already)."""
    return _shipped_entry(constitution, principle, few_shot) in SHIPPED


def text_key(constitution: Constitution, principle: Principle, few_shot: bool) -> dict[str, str]:
    """The record-key part that names the text ``principle``'s prompts render from the
    constitution, beside its ``name`` and the principle's ``id``: nothing where
    :func:`is_shipped`, else ``{"rendered": parts_digest}``."""
    if is_shipped(constitution, principle, few_shot):
        return {}
    return {"rendered": parts_digest(constitution, principle, few_shot)}


def load_templates(
    constitution: Constitution, critique_template: str, revise_template: str, few_shot: bool
) -> tuple[Template, Template]:
    """The critique and revise templates, each rendered once with a fixture conversation, so
    that a template that cannot render fails here, before a model loads or a record is written
    (``TemplateError`` naming the template)."""
    if not constitution.critique_principles:
        raise ValueError(f"constitution {constitution.name!r} has no critique/revision principles")
    critique, revise = load_template(critique_template), load_template(revise_template)
    fixture = RoundInput(
        "fixture",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
        "Hi.",
        constitution.critique_principles[0],
    )
    variables = _variables(constitution, few_shot, fixture)
    critique.render(**variables)
    revise.render(**variables, critique="A critique.")
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
        self.few_shot = few_shot
        self.sampling = sampling
        self.seed = seed

    def principle_for(self, key: str) -> Principle:
        """The principle of one conversation's round (:func:`critique_principle`)."""
        return critique_principle(self.constitution, key, self.seed)

    def _variables(self, item: RoundInput) -> dict:
        return _variables(self.constitution, self.few_shot, item)

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
                    **self._variables(items[i]), critique=results[i].critique
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


SHIPPED: frozenset[str] = frozenset(
    {
        "0039f8c18e2c222b",
        "02c14e77cd71cdf1",
        "0301081cccad6ad8",
        "047b79043ab7852b",
        "08745eb593821f22",
        "093117e28be6e3ff",
        "0da7bb44209e00da",
        "1be7872ff60ec53f",
        "1d55b15ae1319b71",
        "1f09167bca2ead35",
        "1f8b33f309e86b78",
        "21a3897f96efdc3b",
        "233287f71b6140f9",
        "25d429f0514f085f",
        "297fd41ad902bfc8",
        "2a51be2585b7a9a2",
        "2fa13d7a26b81177",
        "30b5595b45565a61",
        "39fb901b1022d6da",
        "3c70a348c4cc81fd",
        "43818a2c8dcdd49b",
        "4399166d90cc13a2",
        "43aadae11c4ab50c",
        "491dd89b884af5af",
        "4ed3d5080f2b88fb",
        "52562d652ba3f7ac",
        "5ca044cd3d9a693b",
        "5de943cb0dd81858",
        "68cf14dedfd5fa59",
        "6b001b9050c78969",
        "6c8aed7c5d3200a6",
        "6ca50d94c0da0479",
        "6e8ca4df1d128964",
        "72341f1e04da2e1e",
        "7905ed2f1a2ad076",
        "7bd6da7c75b1a68d",
        "800af2ebd6ac1abc",
        "8142932fb560074f",
        "81e8d89ad28a2c33",
        "8a9fc77d2c88fd66",
        "8b37b84cebe46ee1",
        "8b8c0b8ca6551752",
        "905ab3e4ca3366ce",
        "91faf62a8fb6e33c",
        "94f535012f0b599c",
        "965fb1e62db9e266",
        "9666e0a46f4d905c",
        "9ae5a475dfe19871",
        "9eada8d356871b65",
        "a3bd0c5baf694278",
        "af5cd328f4f1adf5",
        "afb56f867e15b10d",
        "b057710b7b37401d",
        "b26473e3e297a459",
        "b5bd92f55b8d6a8f",
        "b6c9d817aeeab874",
        "bb31631f3c6e6d20",
        "bb90c550e37eae1c",
        "c1f5e4bc809ec441",
        "c30b0edce0cb6965",
        "c594aea833bee8f4",
        "c63c77dae2fa720a",
        "c721be730af64f1f",
        "c79fa170b44372cb",
        "cbfa08722d13f198",
        "d304a5b103378eb7",
        "d3d598fca1afafa3",
        "d4044ecb53001c13",
        "d8fb2c403c5caa6a",
        "dc121f5567726a47",
        "dec9274d7639699b",
        "efadf1f353bee605",
        "f389f29fe1fc854c",
        "f650cb7078ef09dd",
        "f7e26072c75f4fd5",
        "ffde5ff534d61871",
    }
)
"""Entries (:func:`_shipped_entry`) of every shipped constitution's critique principles, with and
without exemplars, as shipped when the prompt text joined the key."""
