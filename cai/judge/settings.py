"""What defines a judge's labels, without its engine: ``JudgeSettings`` (constitution, template,
mode, principle draws, CoT, calibration, length control, routing by an input classifier) and the
checks of each setting. Every judge of cai (the pipeline's judge stage, the evaluation's
comparisons, ``cai judge ...`` and ``cai serve``) is one of these settings on an engine."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cai.constitution import Constitution, Principle, check_pointwise, load_constitution
from cai.judge.pair import JudgePair, PairLike, _Item, check_pair
from cai.judge.pointwise import score_shots
from cai.judge.routing import InputGuard, Router, check_route, check_routing
from cai.keys import record_key, seed_for
from cai.prompts import Template, load_template


def judge_pool(
    constitution: Constitution, principles: Sequence[str] | None = None
) -> tuple[Principle, ...]:
    """The principles a judge draws from: those with a judge question, or only the ``principles``
    named (ValueError for an unknown id or one without a judge question)."""
    if principles is None:
        return constitution.judge_principles
    if isinstance(principles, str) or not principles:
        raise ValueError(f"principles must be a non-empty list of ids, got {principles!r}")
    pool = []
    for pid in principles:
        try:
            p = constitution.principle(pid)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if p.judge is None:
            raise ValueError(f"principle {pid!r} of {constitution.name!r} has no judge question")
        if p not in pool:
            pool.append(p)
    return tuple(pool)


def check_ensemble(
    constitution: Constitution, ensemble: int, principles: Sequence[str] | None = None
) -> None:
    """Raise ValueError unless ``constitution`` has ``ensemble`` (an integer >= 1) distinct
    principles with a judge question (among ``principles``, when named): the judge draws that
    many per pair."""
    pool = judge_pool(constitution, principles)
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


Mode = Literal["pairwise", "pointwise"]
MODES: tuple[str, ...] = ("pairwise", "pointwise")
Calibration = Literal["none", "batch", "contextual"]
CALIBRATIONS: tuple[str, ...] = ("none", "batch", "contextual")
CONTENT_FREE = "N/A"
"""The content-free response of contextual calibration (arXiv 2102.09690)."""


CLAMP_TOLERANCE = 1e-9
"""How far low + high of a clamp band may be from 1 (float noise of a band written in YAML)."""


def check_clamp(clamp: Sequence[float] | None) -> None:
    """A CoT clamp band: [low, high] symmetric about 0.5, so that position debiasing stays exact,
    or None (no clamp). Raises ValueError."""
    if clamp is None:
        return
    if len(clamp) != 2:
        raise ValueError(f"clamp must be [low, high] or null (got {list(clamp)})")
    lo, hi = clamp
    if not (0 <= lo < 0.5 < hi <= 1 and abs(lo + hi - 1) < CLAMP_TOLERANCE):
        raise ValueError(
            f"clamp must be a band symmetric about 0.5, such as [0.4, 0.6], or null (got {list(clamp)})"
        )


def check_margin(name: str, value: float) -> None:
    """A margin on |p - 0.5| (``tie_margin``, ``min_margin``, ``grade_margin``): in [0, 0.5)."""
    if not 0 <= value < 0.5:
        raise ValueError(f"{name} must be in [0, 0.5) (got {value!r})")


def default_template(mode: str, cot: bool = False) -> str:
    """The shipped template a judge of ``mode`` uses: ``judge_score`` (pointwise), ``judge_cot``
    (pairwise with a rationale) or ``judge_mc``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "pointwise":
        if cot:
            raise ValueError("cot applies to the pairwise judge; the pointwise judge scores")
        return "judge_score"
    return "judge_cot" if cot else "judge_mc"


def check_fields(fields: Any) -> None:
    """The checks of a judge's settings that need no constitution (``fields``: anything with
    JudgeSettings' attributes, such as a recipe's judge stage with its neutral values filled
    in): JudgeSettings runs them first, and a recipe at load time, where an error can still name
    the file and line. Raises ValueError naming the setting."""
    default_template(fields.mode, fields.cot)  # checks mode and cot
    seed = fields.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        isinstance(fields.ensemble, bool)
        or not isinstance(fields.ensemble, int)
        or fields.ensemble < 1
    ):
        raise ValueError(f"ensemble must be an integer >= 1, got {fields.ensemble!r}")
    check_clamp(fields.clamp)
    check_margin("tie_margin", fields.tie_margin)
    n = fields.cot_max_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cot_max_tokens must be an integer >= 1, got {n!r}")
    if fields.calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {fields.calibration!r}")
    if fields.mode == "pointwise" and fields.calibration != "none":
        raise ValueError(
            "calibration applies to the pairwise judge: a pointwise label compares two "
            "scores of the same question, so a shared offset cancels already"
        )
    t, coef = fields.temperature, fields.length_coef
    if not (isinstance(t, int | float) and math.isfinite(t)) or t <= 0:
        raise ValueError(f"temperature must be a number > 0, got {t!r}")
    if not (isinstance(coef, int | float) and math.isfinite(coef)):
        raise ValueError(f"length_coef must be a finite number, got {coef!r}")
    if fields.mode == "pairwise" and (t != 1.0 or coef != 0.0):
        raise ValueError("temperature and length_coef apply to the pointwise judge")
    check_routing(getattr(fields, "guard", None), getattr(fields, "route", None), fields.principles)


def route_pools(
    constitution: Constitution, route: Mapping[str, Sequence[str]], ensemble: int, mode: str
) -> dict[str, tuple[Principle, ...]]:
    """Verdict → the principles a routed judge draws from for it: each of ``route``'s ids a
    judge principle of ``constitution`` (pointwise: with a score question), at least
    ``ensemble`` of them. ValueError naming ``route.<verdict>``."""
    pools = {}
    for verdict, ids in check_route(route).items():
        try:
            pool = judge_pool(constitution, ids)
            if mode == "pointwise":
                check_pointwise(constitution, [p.id for p in pool])
        except ValueError as e:
            raise ValueError(f"route.{verdict}: {e}") from None
        if isinstance(ensemble, int) and ensemble > len(pool):
            raise ValueError(
                f"route.{verdict}: ensemble={ensemble} needs that many distinct principles; "
                f"it lists {len(pool)}"
            )
        pools[verdict] = pool
    return pools


@dataclass(frozen=True)
class JudgeSettings:
    """Everything that defines a judge's labels, without its engine: which principles a pair is
    asked about and what a label's record key holds are known before (or without) loading a
    model. Every judge of cai is one of these on an engine (``Judge(model, **fields)``), and this
    is the one place its settings are checked: ``ValueError`` naming the setting.

    Args:
        constitution: a Constitution, a shipped name or a path (loaded here).
        template: default ``judge_score`` in the pointwise mode, ``judge_cot`` with ``cot``,
            else ``judge_mc`` (a Template, a shipped name or a path).
        mode: ``pairwise`` (both responses in one multiple-choice prompt, both orders) or
            ``pointwise`` (each response scored alone with its principles' score questions).
        ensemble: distinct principles asked per pair (pointwise: per prompt), averaged.
        seed: the judge's seed; with the pair (pointwise: the prompt) it fixes the principles.
        cot: write a rationale first (greedy, up to ``cot_max_tokens``), then score.
        clamp: CoT only: the band each order's probability is clamped into, symmetric about
            0.5 so that position debiasing stays exact; None: no clamp.
        tie_margin: a margin |p_a - 0.5| at or below this is a tie.
        few_shot: show the constitution's judge exemplars.
        calibration: pairwise only: ``batch`` subtracts, per order, the batch's mean option
            log-odds before the softmax (arXiv 2309.17249); ``contextual`` subtracts the
            log-odds of the same question with both responses content-free ("N/A"), one
            extra request per prompt and principle (arXiv 2102.09690); ``none``.
        temperature: pointwise only: p_a = sigmoid((s_a - s_b) / temperature).
        length_coef: pointwise only: each score less ``length_coef * ln(characters)``.
        principles: draw only from these principle ids (default: every judge principle);
            becomes the ids of the pool, or None.
        guard: an input classifier's folder (``cai train classifier``, kind input); with
            ``route``, its verdict on a pair's conversation picks the principles
            (``cai.judge.routing``).
        route: {"restricted": [ids], "permitted": [ids]}: with ``guard``, a pair (pointwise: a
            prompt) is drawn from the list of its verdict instead of the pool; replaces
            ``principles``.
        load_guard: with ``guard``: the function that loads it (``cai.classify.Guard``), called
            on the first verdict needed; the judge package does not import classifiers.
    """

    constitution: Constitution | str | Path = "harmless"
    template: Template | str | Path | None = None
    mode: Mode = "pairwise"
    ensemble: int = 1
    seed: int = 0
    cot: bool = False
    cot_max_tokens: int = 192
    clamp: tuple[float, float] | None = (0.4, 0.6)
    tie_margin: float = 0.0
    few_shot: bool = True
    calibration: Calibration = "none"
    temperature: float = 1.0
    length_coef: float = 0.0
    principles: Sequence[str] | None = None
    guard: str | Path | None = None
    route: Mapping[str, Sequence[str]] | None = None
    load_guard: Callable[[str], InputGuard] | None = field(default=None, repr=False, compare=False)
    pool: tuple[Principle, ...] = field(init=False, repr=False, compare=False)
    routes: dict[str, tuple[Principle, ...]] | None = field(init=False, repr=False, compare=False)
    """Verdict → the principles drawn from for it (None: no routing)."""
    router: Router | None = field(init=False, repr=False, compare=False)
    """The input classifier's verdicts (None: no routing)."""

    def __post_init__(self) -> None:
        check_fields(self)
        constitution = (
            self.constitution
            if isinstance(self.constitution, Constitution)
            else load_constitution(self.constitution)
        )
        check_ensemble(constitution, self.ensemble, self.principles)
        pool = judge_pool(constitution, self.principles)
        routes = router = None
        if self.route is not None:
            routes = route_pools(constitution, self.route, self.ensemble, self.mode)
            pool = tuple(dict.fromkeys(p for ps in routes.values() for p in ps))
            if self.load_guard is None:
                raise ValueError(
                    "guard: a routed judge needs load_guard, the function that loads the "
                    "classifier (cai.classify.Guard)"
                )
            router = Router(str(self.guard), self.load_guard)
        template = self.template
        if not isinstance(template, Template):
            template = load_template(template or default_template(self.mode, self.cot))
        principles = None if self.principles is None else [p.id for p in pool]
        if self.mode == "pointwise" and routes is None:  # route_pools checked the routed ones
            check_pointwise(constitution, principles)
        for name, value in (
            ("constitution", constitution),
            ("template", template),
            ("principles", principles),
            ("pool", pool),
            ("temperature", float(self.temperature)),
            ("length_coef", float(self.length_coef)),
            ("guard", None if self.guard is None else str(self.guard)),
            (
                "route",
                None if routes is None else {v: [p.id for p in ps] for v, ps in routes.items()},
            ),
            ("routes", routes),
            ("router", router),
        ):
            object.__setattr__(self, name, value)

    def verdicts(self, prompts: Sequence[list[dict]]) -> list[str] | None:
        """The input classifier's verdict on each conversation (chat messages), in one batched
        pass for those not seen before; None without routing. Callers that will draw for many
        pairs one at a time (record keys) call this first with all their prompts."""
        return None if self.router is None else self.router.verdicts(prompts)

    def close(self) -> None:
        """Release the routing classifier, if loaded (its verdicts are kept)."""
        if self.router is not None:
            self.router.close()

    def principles_for(self, key: str, messages: list[dict] | None = None) -> list[Principle]:
        """``ensemble`` distinct judge principles for a pair (pointwise: a prompt), drawn by
        weight without replacement from ``random.Random(seed_for(key, seed))``: from the pool,
        or, routed, from the list of the verdict on ``messages`` (the conversation)."""
        if self.routes is None:
            return self._draw(key, self.pool)
        if messages is None:
            raise ValueError("a routed judge draws per conversation: pass its messages")
        [verdict] = self.verdicts([messages])  # type: ignore[misc]
        return self._draw(key, self.routes[verdict])

    def _draw(self, key: str, pool: Sequence[Principle]) -> list[Principle]:
        rng = random.Random(seed_for(key, self.seed))
        pool = list(pool)
        chosen = []
        for _ in range(self.ensemble):
            [p] = rng.choices(pool, weights=[p.weight for p in pool])
            pool.remove(p)
            chosen.append(p)
        return chosen

    def items(self, pairs: Sequence[PairLike], *, per_prompt: bool = False) -> list[_Item]:
        """The validated pairs with their principles, drawn per pair (its key) or, with
        ``per_prompt``, per prompt (every response of a prompt asked the same questions)."""
        if isinstance(pairs, str | bytes | JudgePair) or not isinstance(pairs, Sequence):
            raise ValueError(
                "pairs must be a list of (prompt, response_a, response_b) or JudgePair"
            )
        checked = []
        for i, pair in enumerate(pairs):
            messages, a, b, key = check_pair(pair, i)
            if per_prompt:
                key = record_key(prompt=messages)
            elif key is None:
                key = record_key(prompt=messages, response_a=a, response_b=b)
            checked.append((messages, a, b, key))
        verdicts = self.verdicts([c[0] for c in checked])  # routed: one batched pass
        pools = (
            [self.pool] * len(checked) if verdicts is None else [self.routes[v] for v in verdicts]
        )  # type: ignore[index]
        return [
            _Item(messages, (a, b), self._draw(key, pool))
            for (messages, a, b, key), pool in zip(checked, pools, strict=True)
        ]

    def principles_of(self, pair: PairLike) -> list[Principle]:
        """The principles this judge asks about ``pair``: drawn per pair (pairwise) or per
        prompt (pointwise)."""
        return self.items([pair], per_prompt=self.mode == "pointwise")[0].principles

    def question(self, principle: Principle) -> str:
        """The question ``principle`` is asked: its score question (pointwise) or its judge
        question (pairwise)."""
        return principle.score_question if self.mode == "pointwise" else principle.judge  # type: ignore[return-value]

    def prompt_parts(self, question: str) -> dict[str, Any]:
        """The template variables of a judge prompt asking ``question`` that do not come from
        the pair: the exemplars (with ``few_shot``), the question and, pairwise, the system
        prompt. With the template's text they are everything a prompt holds besides the pair,
        so the record key holds them (``cai.judge.keys``)."""
        if self.mode == "pointwise":
            examples = score_shots(self.constitution, question) if self.few_shot else []
            return {"examples": examples, "question": question}
        examples = self.constitution.judge_shots(question) if self.few_shot else []
        return {
            "system": self.constitution.system_prompt,
            "examples": examples,
            "question": question,
        }

    def render(
        self, question: str, conversation: list[dict], responses: Sequence[str]
    ) -> list[dict]:
        """The judge prompt asking ``question`` about ``responses`` to ``conversation``: one
        response scored alone (pointwise) or two in the order given (pairwise). Every prompt a
        judge of these settings sends is rendered here."""
        parts = self.prompt_parts(question)
        if self.mode == "pointwise":
            (response,) = responses
            return self.template.render(**parts, conversation=conversation, response=response)
        first, second = responses
        return self.template.render(
            **parts, conversation=conversation, response_a=first, response_b=second
        )

    def asked(self, pair: PairLike) -> list[list[str | None]]:
        """[id, question asked] of each principle asked about ``pair``: the judge question
        (pairwise) or the score question (pointwise), so that editing the wording re-judges."""
        return [[p.id, self.question(p)] for p in self.principles_of(pair)]

    def key_fields(self) -> dict[str, Any]:
        """The settings that define the labels, as a label record's key holds them (not the
        engine's runtime description)."""
        described = {
            "judge": "Judge",
            "constitution": self.constitution.name,
            "constitution_version": self.constitution.version,
            "template_text": self.template.source,
            "ensemble": self.ensemble,
            "seed": self.seed,
            "few_shot": self.few_shot,
            "cot": self.cot,
            "cot_max_tokens": self.cot_max_tokens if self.cot else None,
            "clamp": list(self.clamp) if self.cot and self.clamp else None,
            "tie_margin": self.tie_margin,
        }
        # Settings beyond the first judge's join the key only when used, so that pairwise records
        # written before them keep their keys.
        if self.mode == "pointwise":
            described.update(
                mode=self.mode, temperature=self.temperature, length_coef=self.length_coef
            )
        if self.calibration != "none":
            described["calibration"] = self.calibration
        if self.principles is not None:
            described["principles"] = self.principles
        # Routing (guard, route) joins no key: a key is a function of what determines the label
        # text, and the verdict only picks the principles, which the key holds already, each
        # with the question asked (cai.judge.keys). A retrained guard that flips a verdict
        # changes the principle and so the key (that pair is judged again); one that gives the
        # same verdict renders the same prompts, whose stored label is still right. Naming the
        # guard's folder or weights here would re-judge identical prompts and make a key depend
        # on where the guard was trained.
        return described
