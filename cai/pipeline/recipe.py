"""Recipes: the typed YAML that a ``python -m cai.pipeline run`` job follows.

A recipe names the model and engine, the constitution, the prompt sources and the stages with
their parameters. Unknown keys and wrong types raise with the file and line; ``--set key=value``
overrides any field before validation (``--set stages.critique_revise.rounds=2``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from cai.config import ConfigError, FieldError, LineDict, doc, from_data, load_yaml, set_dotted
from cai.engine.base import Sampling

T = TypeVar("T")


@dataclass
class EngineConfig:
    backend: Literal["auto", "hf", "vllm", "openai"] = doc("engine backend", "auto")
    dtype: str = doc("auto, float32, bfloat16 or float16", "auto")
    max_model_len: int | None = doc("context length cap (tokens); none: the model's", None)
    options: dict[str, Any] = doc("extra backend options (e.g. base_url for openai)", factory=dict)


@dataclass
class SourceConfig:
    path: str = doc("a file, folder, shipped set name (red_team, helpful, ...) or hub id")
    format: Literal["jsonl", "json", "parquet", "datasets", "hub"] | None = doc(
        "force a format", None
    )
    prompt_field: str | None = doc("field holding a plain prompt string", None)
    messages_field: str | None = doc("field holding chat messages", None)
    hh_mode: Literal["first_turn", "full_context"] = doc(
        "HH-RLHF transcripts: which turns", "first_turn"
    )
    split: str = doc("split of a datasets folder or hub set", "train")
    limit: int | None = doc("take the first N records of this source", None)
    duplicates: Literal["error", "drop"] = doc(
        "records with equal content: raise or keep the first", "error"
    )

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (got {self.limit})")


def _check_sampling(stage: GenerateStage | CritiqueReviseStage | SampleStage) -> None:
    """The engine's own checks of a stage's sampling fields, when the recipe loads: a bad value
    fails before any model loads or record is written (cai.config names the field and line)."""
    Sampling(
        max_tokens=stage.max_tokens, temperature=stage.temperature, top_p=stage.top_p
    ).validate()


@dataclass
class GenerateStage:
    max_tokens: int = doc("most new tokens per response", 256)
    temperature: float = doc("0 is greedy", 0.0)
    top_p: float = doc("nucleus sampling", 1.0)

    def validate(self) -> None:
        _check_sampling(self)


@dataclass
class CritiqueReviseStage:
    rounds: int = doc("critique→revision rounds (the paper uses 4)", 4)
    constitution: str | None = doc("constitution for this stage; none: the recipe's", None)
    critique_template: str = doc("template for the critique request", "critique")
    revise_template: str = doc("template for the revision request", "revise")
    few_shot: bool = doc("include the constitution's critique exemplars", True)
    max_tokens: int = doc("most tokens of a critique and of a revision", 256)
    temperature: float = doc("0 is greedy", 0.0)
    top_p: float = doc("nucleus sampling", 1.0)
    export: Literal["last", "all"] = doc(
        "SFT examples from the last revision or from every round", "last"
    )
    export_pairs: bool = doc(
        "also export <run>/revision_pairs/: final revision chosen over the initial response", False
    )

    def validate(self) -> None:
        if self.rounds < 1:
            raise FieldError("rounds", f"must be >= 1 (got {self.rounds})")
        _check_sampling(self)


@dataclass
class SampleStage:
    k: int = doc("responses sampled per prompt (>= 2); identical ones are dropped", 4)
    temperature: float = doc("sampling temperature, > 0 (greedy samples would all be equal)", 0.8)
    top_p: float = doc("nucleus sampling", 1.0)
    max_tokens: int = doc("most new tokens per response", 256)
    model: str | None = doc(
        "policy model spec for sampling (e.g. an SFT output folder); none: the recipe's", None
    )

    def validate(self) -> None:
        if self.k < 2:
            raise ValueError(
                f"k must be >= 2: a preference pair needs two responses (got {self.k})"
            )
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0: greedy samples of one prompt are identical "
                f"(got {self.temperature})"
            )
        _check_sampling(self)


@dataclass
class JudgeStage:
    constitution: str | None = doc("constitution for the judge; none: the recipe's", None)
    pairs: Literal["all", "best_worst"] = doc(
        "all: every pair of distinct responses; best_worst: judge all pairs, export one pair per "
        "prompt (best vs worst by mean win probability)",
        "all",
    )
    ensemble: int = doc("distinct principles asked per pair, their probabilities averaged", 1)
    cot: bool = doc("write a rationale before the answer (slower; probabilities clamped)", False)
    cot_max_tokens: int = doc("most tokens of a CoT rationale", 192)
    clamp: list[float] | None = doc(
        "CoT only: the band each order's probability is clamped into; none: no clamp",
        factory=lambda: [0.4, 0.6],
    )
    tie_margin: float = doc("|p - 0.5| at or below this is a tie (never exported)", 0.0)
    min_margin: float = doc(
        "export only pairs with |p - 0.5| >= this; the rest stay in the run store", 0.0
    )
    few_shot: bool = doc("show the constitution's judge exemplars", True)
    model: str | None = doc("judge model spec; none: the recipe's model (its engine reused)", None)

    def validate(self) -> None:
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1 (got {self.ensemble})")
        if self.cot_max_tokens < 1:
            raise FieldError("cot_max_tokens", f"must be >= 1 (got {self.cot_max_tokens})")
        if self.clamp is not None:
            if len(self.clamp) != 2:
                raise ValueError(f"clamp must be [low, high] or null (got {self.clamp})")
            lo, hi = self.clamp
            if not (0 <= lo < 0.5 < hi <= 1 and abs(lo + hi - 1) < 1e-9):
                raise ValueError(
                    f"clamp must be a band symmetric about 0.5, such as [0.4, 0.6] (got {self.clamp})"
                )
        for name in ("tie_margin", "min_margin"):
            value = getattr(self, name)
            if not 0 <= value < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5) (got {value})")


@dataclass
class Stages:
    generate: GenerateStage | None = doc("initial responses from the policy model", None)
    critique_revise: CritiqueReviseStage | None = doc("SL-CAI critique→revision rounds", None)
    sample: SampleStage | None = doc("K responses per prompt for preference pairs", None)
    judge: JudgeStage | None = doc("RL-CAI: AI-judged preferences over the sampled pairs", None)
    train_sft: dict[str, Any] | None = doc(
        "SFT on the exported revisions → <run>/models/sft: cai.train.sft.SFTConfig fields "
        "(max_steps, batch_size, lora, ...) but data/output_dir/model; {} for the defaults",
        None,
    )
    train_reward: dict[str, Any] | None = doc(
        "a Bradley-Terry reward model on the judged pairs → <run>/models/reward, from the SFT "
        "model if one is trained: cai.train.reward.RewardConfig fields; {} for the defaults",
        None,
    )
    train_dpo: dict[str, Any] | None = doc(
        "DPO on the judged pairs → <run>/models/dpo, from the SFT model if one is trained: "
        "cai.train.dpo.DPOConfig fields (loss, beta, max_steps, ...); {} for the defaults",
        None,
    )
    evaluate: dict[str, Any] | None = doc(
        "held-out comparison of the base model and each trained one → <run>/eval/: "
        "cai.evaluate.EvalConfig fields (sets, max_tokens, judge_model, ...); {} for the defaults",
        None,
    )

    def validate(self) -> None:
        if self.critique_revise is not None and self.generate is None:
            raise ValueError("critique_revise needs a generate stage before it")
        if self.judge is not None and self.sample is None:
            raise ValueError("judge needs a sample stage before it")
        if self.generate is None and self.sample is None:
            raise ValueError("a recipe needs at least a generate or a sample stage")
        if self.train_sft is not None and self.critique_revise is None:
            raise ValueError("train_sft trains on the revisions: it needs a critique_revise stage")
        for kind in ("train_reward", "train_dpo"):
            if getattr(self, kind) is not None and self.judge is None:
                raise ValueError(f"{kind} trains on judged pairs: it needs a judge stage")


@dataclass
class Recipe:
    name: str = doc("the run's name; runs/<name> by default")
    sources: list[SourceConfig] = doc("prompt sources, concatenated in order")
    stages: Stages = doc("the stages to run, in pipeline order")
    description: str = doc("what the recipe is for", "")
    model: str = doc(
        "policy model spec (smollm2-135m, a folder, a .gguf file, a hub id)", "smollm2-135m"
    )
    engine: EngineConfig = doc("generation engine", factory=EngineConfig)
    constitution: str = doc("constitution name or path", "harmless")
    seed: int = doc("base seed; every record's seed derives from it and the record key", 0)
    chunk_size: int = doc("records per engine batch; a kill loses at most one chunk's work", 512)
    max_error_rate: float = doc(
        "exit non-zero when a stage's share of error records passes this", 0.05
    )

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty name without '/' (got {self.name!r})")
        if not self.sources:
            raise ValueError("sources must list at least one prompt source")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (got {self.chunk_size})")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be between 0 and 1 (got {self.max_error_rate})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_config(
    cls: type[T],
    stage: str,
    options: dict,
    set_by_pipeline: dict[str, Any],
    *,
    source: str,
    why: str,
) -> T:
    """``cls`` built from a stage's free-form ``options`` (a trainer or eval config) plus the
    fields the pipeline fills in itself, which the recipe must not set: errors name the recipe
    line when ``options`` came from YAML."""
    where = f"stages.{stage}"
    lines = getattr(options, "key_lines", {})
    for name in set_by_pipeline:
        if name in options:
            loc = f"{source}:{lines.get(name) or getattr(options, 'line', 0) or '?'}"
            raise ConfigError(f"{loc}: {where}.{name}: set by the pipeline ({why}); remove it")
    merged = LineDict(options)
    merged.line = getattr(options, "line", 0)
    merged.key_lines = dict(lines)
    merged.key_sources = dict(getattr(options, "key_sources", {}))
    merged.update(set_by_pipeline)
    return from_data(cls, merged, source=source, where=where)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file, apply ``key=value`` overrides, validate. Raises ConfigError."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys (name, sources, stages, ...)")
    for assignment in overrides:
        set_dotted(data, assignment)
    if not isinstance(data, LineDict):
        data = LineDict(data)
    recipe = from_data(Recipe, data, source=str(path))
    stages = recipe.stages
    if any(getattr(stages, k) is not None for k in ("train_sft", "train_reward", "train_dpo")):
        from cai.pipeline import training  # imports the trainers (torch): only when needed

        training.check_options(data, str(path))
    if stages.evaluate is not None:
        from cai.pipeline import evaluation

        evaluation.check_options(data, str(path))
    return recipe
