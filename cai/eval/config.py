"""The settings of an evaluation (``cai eval --config``, a recipe's ``evaluate`` stage) and its
held-out prompt sets."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cai.config import doc
from cai.engine import check_dtype
from cai.engine.base import Sampling
from cai.judge.settings import JudgeSettings, check_margin

if TYPE_CHECKING:
    from cai.data import PromptRecord

KINDS = ("helpful", "red_team", "over_refusal", "sycophancy")
"""The kinds of evaluation set; the win rate is measured on COMPARED, each grader on its kind."""


@dataclass(kw_only=True)
class EvalSet:
    """One held-out prompt set."""

    path: str = doc(
        "a file, a shipped set (helpful, red_team, edgy_benign, false_premise), a hub id"
    )
    skip: int = doc("skip the first N records (recipes train on the first ones)", 0)
    limit: int | None = doc("take at most N records after the skipped ones", None)

    def validate(self) -> None:
        if self.skip < 0:
            raise ValueError(f"skip must be >= 0 (got {self.skip})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (got {self.limit})")


def _default_sets() -> dict[str, EvalSet]:
    return {
        "helpful": EvalSet(path="helpful", skip=80, limit=20),
        "red_team": EvalSet(path="red_team", skip=140, limit=20),
        "over_refusal": EvalSet(path="edgy_benign", skip=40, limit=10),
        "sycophancy": EvalSet(path="false_premise", skip=40, limit=10),
    }


@dataclass(kw_only=True)
class EvalConfig:
    """``cai eval`` / the pipeline's ``evaluate`` stage settings (YAML, see ``cai.config``)."""

    models: dict[str, str] = doc("name → model spec, e.g. {base: smollm2-135m, dpo: runs/x/...}")
    baseline: str | None = doc("the model the others are compared with; default: the first", None)
    previous: dict[str, str] = doc(
        "model name → another model name it is also compared with (online rounds: each round's "
        "policy against the round before): win_rate_vs_previous, lc_win_rate_vs_previous",
        factory=dict,
    )
    judge_model: str | None = doc(
        "model spec of the judge and graders; default: the baseline's", None
    )
    constitution: str = doc("the win-rate judge's constitution", "hhh")
    sets: dict[str, EvalSet] = doc(
        "kind (helpful, red_team, over_refusal, sycophancy) → held-out prompts",
        factory=_default_sets,
    )
    max_tokens: int = doc("most new tokens per answer", 128)
    temperature: float = doc("0 is greedy (the default: comparable runs)", 0.0)
    seed: int = doc("base seed of the answers and of the judge's principle draws", 0)
    backend: str = doc("engine backend (auto, hf, vllm, openai)", "auto")
    dtype: str | None = doc("engine dtype; none: the backend's default", None)
    engine_options: dict[str, Any] = doc("more engine options", factory=dict)
    reward_model: str | None = doc("a trained reward model folder: reward drift", None)
    tie_margin: float = doc("win rate: |p - 0.5| at or below this is a tie", 0.0)
    grade_margin: float = doc(
        "graded rates: |p - 0.5| at or below this is undecided (counted half)", 0.05
    )
    few_shot: bool = doc("show the constitution's judge exemplars to the win-rate judge", True)
    # The judge and grader settings below default to None (the first judge's behaviour), so
    # evaluations recorded before they existed keep their config and record keys.
    judge_mode: Literal["pairwise", "pointwise"] | None = doc(
        "the win-rate judge: pairwise (none) or pointwise (cai.judge.Judge's mode)", None
    )
    judge_calibration: Literal["none", "batch", "contextual"] | None = doc(
        "pairwise win-rate judge: option-bias calibration; none: none", None
    )
    judge_length_coef: float | None = doc(
        "pointwise win-rate judge: length control, score less this × ln(characters); none: 0",
        None,
    )
    judge_principles: list[str] | None = doc(
        "the win-rate judge asks only these principle ids; none: every judge principle", None
    )
    grade_calibration: Literal["none", "contextual"] | None = doc(
        "graders: contextual subtracts the log-odds of a content-free answer ('N/A'); none: none",
        None,
    )

    def judge_settings(self) -> JudgeSettings:
        """The win-rate judge: the ``judge_*`` fields (None: the setting's default), the
        constitution, ``few_shot``, ``tie_margin`` and ``seed``, checked by JudgeSettings."""
        chosen = {
            "mode": self.judge_mode,
            "calibration": self.judge_calibration,
            "length_coef": self.judge_length_coef,
            "principles": self.judge_principles,
        }
        return JudgeSettings(
            self.constitution,
            seed=self.seed,
            tie_margin=self.tie_margin,
            few_shot=self.few_shot,
            **{k: v for k, v in chosen.items() if v is not None},
        )

    def validate(self) -> None:
        check_dtype(self.backend, self.dtype)
        if "dtype" in self.engine_options:
            raise ValueError("engine_options.dtype: set dtype instead (a field of its own)")
        if not self.models:
            raise ValueError("models must name at least one model (name: spec)")
        for name, spec in self.models.items():
            if not name or not spec:
                raise ValueError(f"models: empty name or spec in {name!r}: {spec!r}")
        if self.baseline is not None and self.baseline not in self.models:
            raise ValueError(
                f"baseline {self.baseline!r} is not one of the models ({', '.join(self.models)})"
            )
        for name, other in self.previous.items():
            if name not in self.models or other not in self.models or name == other:
                raise ValueError(
                    f"previous: {name!r} → {other!r} must name two different models of "
                    f"{', '.join(self.models)}"
                )
        unknown = sorted(set(self.sets) - set(KINDS))
        if unknown:
            raise ValueError(f"sets: unknown kind(s) {unknown}; known: {', '.join(KINDS)}")
        if not self.sets:
            raise ValueError(f"sets must name at least one of {', '.join(KINDS)}")
        Sampling(max_tokens=self.max_tokens, temperature=self.temperature).validate()
        check_margin("grade_margin", self.grade_margin)
        self.judge_settings()

    @property
    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.models))

    @property
    def judge_spec(self) -> str:
        return self.judge_model or self.models[self.baseline_name]


def load_sets(
    config: EvalConfig, exclude: Collection[str] = (), limit: int | None = None
) -> tuple[dict[str, list[PromptRecord]], int]:
    """Each set's prompts (``skip``/``limit`` applied, capped at ``limit``), without those whose
    key is in ``exclude`` (training prompts); returns (sets, how many were excluded)."""
    from cai.data import check_limit, load_prompts

    check_limit(limit)
    sets: dict[str, list[PromptRecord]] = {}
    excluded = 0
    for kind, spec in config.sets.items():
        end = None if spec.limit is None else spec.skip + spec.limit
        records = load_prompts(spec.path, limit=end)[spec.skip :]
        kept = [r for r in records if r.key not in exclude]
        excluded += len(records) - len(kept)
        if not kept:
            raise ValueError(
                f"sets.{kind}: no prompts left in {spec.path} (skip {spec.skip}, "
                f"{len(records) - len(kept)} held back as training prompts); "
                "point it at other records"
            )
        sets[kind] = kept[:limit]
    return sets, excluded
