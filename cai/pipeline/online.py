"""Online RLAIF: rounds of sample → label → DPO, each round on the policy the round before trained.

    online:
      rounds: 2              # round r samples from round r-1's policy (round 1: the SFT model)
      prompts: 8             # fresh prompts per round (seeded order); none: an equal share each
      reuse_prompts: false   # true: every round samples the same prompts
      reference: sft         # DPO's reference: sft (a fixed anchor) or previous (the round before)
      labels: judge          # judge, or reward_model: round 1's judged pairs train the reward
                             # model (train_reward), which labels the pairs of later rounds

The stages declare whether they run per round (``Stage.per_round``: the sample, judge and
train_dpo stages in every round, train_reward in round 1 only); this module builds the schedule
from those declarations alone, and gives each round a context of its own
(``replace(ctx, round=r, prompts=...)``). Records of the rounds share the stage files, and carry
their round in their keys and in a ``round`` field; round r's outputs go to ``<run>/rounds/<r>/``
(``cai.layout``). A killed run resumes inside the round where it stopped: a finished round's
records are found done and its trained model's marker matches, so nothing of it is redone. The
evaluation compares each round's policy (``cai.pipeline.online_eval``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from cai.config import doc
from cai.pipeline.stage import PipelineError

if TYPE_CHECKING:
    from cai.data import PromptRecord
    from cai.pipeline.stage import Stage, StageContext


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


def check_recipe(stages: Any) -> None:
    """An online recipe has stages that run per round (what each needs is its own check)."""
    if not any(stage.per_round for stage, _ in stages.present()):
        names = ", ".join(s.name for s in stages.STAGES if s.per_round)
        raise ValueError(
            f"online: the rounds repeat the stages that run per round ({names}); add them"
        )


def check_shard(shard: tuple[int, int] | None) -> None:
    """An online recipe runs whole: PipelineError under ``--shard``."""
    if shard is not None:
        raise PipelineError(
            "online: a round trains before the next one samples, so an online recipe "
            "runs whole; drop --shard (engine.executor: ray spreads the work instead)"
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
        raise PipelineError(
            f"online: {online.rounds} rounds × {max(per_round, 1)} fresh prompts need "
            f"{max(needed, online.rounds)} prompts, and the sources give {len(prompts)} (after "
            "--limit): add sources, lower online.prompts or online.rounds, or set "
            "online.reuse_prompts: true"
        )
    return [list(prompts[r * per_round : (r + 1) * per_round]) for r in range(online.rounds)]


def schedule(
    stages: Sequence[Stage], online: OnlineConfig | None
) -> list[tuple[Stage, int | None]]:
    """(stage, round) in the order they run: the stages declared ``per_round`` once in each round
    they run in, after the stages before the first of them, and before the other stages."""
    if online is None or not any(s.per_round for s in stages):
        return [(stage, None) for stage in stages]
    first = next(n for n, s in enumerate(stages) if s.per_round)
    out: list[tuple[Stage, int | None]] = [(s, None) for s in stages[:first]]
    for r in range(1, online.rounds + 1):
        out += [(s, r) for s in stages[first:] if s.per_round and s.per_round(r)]
    return out + [(s, None) for s in stages[first:] if not s.per_round]


@dataclass(frozen=True)
class Schedule:
    """A run's stages in the order they run, with their rounds, and each round's prompts: what
    the runner follows."""

    steps: list[tuple[Stage, int | None]]
    """(stage, round or None) in the order they run."""
    prompts: list[list[PromptRecord]]
    """Each round's prompts; none without rounds."""

    @property
    def rounds(self) -> int:
        return len(self.prompts)

    def context(self, ctx: StageContext, r: int | None) -> StageContext:
        """The context of round ``r``: a new value with the round and its prompts; ``ctx`` itself
        outside the rounds (None)."""
        return ctx if r is None else replace(ctx, round=r, prompts=list(self.prompts[r - 1]))

    def starts(self, n: int) -> str | None:
        """The plan's line when step ``n`` starts a round, else None."""
        r = self.steps[n][1]
        if r is None or (n and self.steps[n - 1][1] == r):
            return None
        return f"round {r} of {self.rounds}: {len(self.prompts[r - 1])} prompts"

    @staticmethod
    def name(name: str, r: int | None, first: int | None = None) -> str:
        """A stage's name (its summary row) or a model's role (the manifest) in round ``r``:
        with `` r<round>`` but outside the rounds and in round ``first``."""
        return name if r is None or r == first else f"{name} r{r}"


def build(
    recipe: Any, stages: Sequence[Stage], prompts: Sequence[PromptRecord], shard: Any
) -> Schedule:
    """The schedule of ``recipe``'s ``stages`` over ``prompts`` (after ``--limit``)."""
    if recipe.online is None:
        return Schedule(schedule(stages, None), [])
    check_shard(shard)
    return Schedule(
        schedule(stages, recipe.online), round_prompts(prompts, recipe.online, recipe.seed)
    )
