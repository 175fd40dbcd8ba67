"""Online RLAIF: rounds of sample → label → DPO, each round on the policy the round before trained.

    online:
      rounds: 2              # round r samples from round r-1's policy (round 1: the SFT model)
      prompts: 8             # fresh prompts per round (seeded order); none: an equal share each
      reuse_prompts: false   # true: every round samples the same prompts
      reference: sft         # DPO's reference: sft (a fixed anchor) or previous (the round before)
      labels: judge          # judge, or reward_model: round 1's judged pairs train the reward
                             # model (train_reward), which labels the pairs of later rounds

With an ``online:`` block, the stages ``sample``, ``judge``, ``train_reward`` (round 1 only) and
``train_dpo`` run once per round, in that order, after the stages before them (generate,
critique_revise, train_sft) and before ``evaluate``. Their records share the stage files, and carry
their round in their keys and in a ``round`` field; round r's outputs go to
``<run>/rounds/<r>/`` (``preferences/``, ``dpo/``). A killed run resumes inside the round where it
stopped: a finished round's records are found done and its DPO model's marker matches, so nothing
of it is redone. The evaluation compares ``base``, ``sft`` and each round's policy (``round1``,
...), each round against the base and against the round before, and ``eval/results.json`` gets
a ``rounds`` table and warnings (``cai.pipeline.online_eval``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cai.config import doc

if TYPE_CHECKING:
    from cai.data import PromptRecord
    from cai.pipeline.stage import StageContext

ROUND_STAGES = ("sample", "judge", "train_reward", "train_dpo")
"""The stages an online recipe runs once per round (``train_reward`` in round 1 only)."""


@dataclass
class OnlineConfig:
    rounds: int = doc("rounds of sample → label → DPO (>= 1)", 2)
    prompts: int | None = doc(
        "fresh prompts each round samples (the sources' prompts in a seeded order, no prompt in "
        "two rounds); none: the prompts shared equally",
        None,
    )
    reuse_prompts: bool = doc("every round samples the same prompts (all of them)", False)
    reference: Literal["sft", "previous"] = doc(
        "DPO's reference model: sft (the SFT model, else the recipe's: a fixed KL anchor) or "
        "previous (the policy the round starts from)",
        "sft",
    )
    labels: Literal["judge", "reward_model"] = doc(
        "who labels the pairs: the judge every round, or the reward model that train_reward "
        "trains on round 1's judged pairs (rounds 2 on)",
        "judge",
    )
    max_length_drift: float = doc(
        "warn when a round's answers are longer than the base model's by more than this share", 0.5
    )

    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1 (got {self.rounds})")
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"prompts must be >= 1 (got {self.prompts})")
        if self.reuse_prompts and self.prompts is not None:
            raise ValueError("prompts and reuse_prompts: true exclude each other; drop one")
        if self.max_length_drift <= 0:
            raise ValueError(f"max_length_drift must be > 0 (got {self.max_length_drift})")


def check_recipe(online: OnlineConfig, stages: Any) -> None:
    """What an online recipe's ``stages:`` must hold (called when the recipe loads)."""
    for name in ("sample", "judge", "train_dpo"):
        if getattr(stages, name, None) is None:
            raise ValueError(
                f"online: the rounds run sample → judge → train_dpo; add a {name} stage"
            )
    if getattr(stages, "train_grpo", None) is not None:
        raise ValueError("online: train_grpo does not run in rounds; use it in a recipe of its own")
    if online.labels == "reward_model" and getattr(stages, "train_reward", None) is None:
        raise ValueError(
            "online.labels: reward_model needs a train_reward stage (round 1 trains it)"
        )
    dpo = stages.train_dpo
    if isinstance(dpo, dict) and "ref_model" in dpo:
        raise ValueError(
            "stages.train_dpo.ref_model: an online recipe sets the reference with "
            "online.reference (sft or previous); remove it"
        )
    if stages.sample.model is not None:
        raise ValueError(
            "stages.sample.model: an online recipe samples from each round's policy; remove it"
        )


def round_prompts(
    prompts: Sequence[PromptRecord], online: OnlineConfig, seed: int = 0
) -> list[list[PromptRecord]]:
    """The prompts of each round: all of them every round (``reuse_prompts``), else fresh ones
    taken in a seeded order that mixes the sources (a prompt's place depends only on its key and
    the seed, so the rounds of a resumed run get the same prompts)."""
    if online.reuse_prompts:
        return [list(prompts)] * online.rounds

    def place(prompt: PromptRecord) -> str:
        return hashlib.sha256(f"round-order:{seed}:{prompt.key}".encode()).hexdigest()

    prompts = sorted(prompts, key=place)
    per_round = online.prompts or len(prompts) // online.rounds
    needed = per_round * online.rounds
    if per_round < 1 or needed > len(prompts):
        from cai.pipeline.stage import PipelineError

        raise PipelineError(
            f"online: {online.rounds} rounds × {max(per_round, 1)} fresh prompts need "
            f"{max(needed, online.rounds)} prompts, and the sources give {len(prompts)} (after "
            "--limit): add sources, lower online.prompts or online.rounds, or set "
            "online.reuse_prompts: true"
        )
    return [list(prompts[r * per_round : (r + 1) * per_round]) for r in range(online.rounds)]


def round_dir(runner: StageContext, r: int) -> Path:
    return runner.run_dir / "rounds" / str(r)


def preferences_dir(runner: StageContext, r: int | None) -> Path:
    """Where the judge exports the pairs: ``<run>/preferences``, in round r
    ``<run>/rounds/<r>/preferences``."""
    return runner.run_dir / "preferences" if r is None else round_dir(runner, r) / "preferences"


def current_round(runner: StageContext) -> int | None:
    return getattr(runner, "round", None)


def round_key(runner: StageContext) -> dict[str, int]:
    """The record-key part of the round (nothing outside rounds: keys stay what they were)."""
    r = current_round(runner)
    return {} if r is None else {"round": r}


@contextmanager
def in_round(runner: Any, r: int | None) -> Iterator[None]:
    """``runner.round`` and ``runner.prompts`` set to round ``r``'s (None: outside the rounds)."""
    before = runner.round, runner.prompts
    runner.round = r
    if r is not None:
        runner.prompts = runner.round_prompts[r - 1]
    try:
        yield
    finally:
        runner.round, runner.prompts = before


def schedule(stages: Sequence[Any], online: OnlineConfig | None) -> list[tuple[Any, int | None]]:
    """(stage, round) in the order they run: the round stages once per round, between the stages
    before them and after them."""
    if online is None:
        return [(stage, None) for stage in stages]
    names = [s.name for s in stages]
    first = min(names.index(n) for n in ROUND_STAGES if n in names)
    last = max(names.index(n) for n in ROUND_STAGES if n in names)
    out: list[tuple[Any, int | None]] = [(s, None) for s in stages[:first]]
    for r in range(1, online.rounds + 1):
        out += [
            (s, r) for s in stages[first : last + 1] if not (s.name == "train_reward" and r > 1)
        ]
    return out + [(s, None) for s in stages[last + 1 :]]
