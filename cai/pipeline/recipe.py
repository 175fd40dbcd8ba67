"""Recipes: the typed YAML that a ``python -m cai.pipeline run`` job follows.

A recipe names the model and engine, the constitution, the prompt sources and the stages with
their parameters. Unknown keys and wrong types raise with the file and line; ``--set key=value``
overrides any field before validation (``--set stages.critique_revise.rounds=2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, make_dataclass
from pathlib import Path
from typing import Any, Literal

from cai.config import ConfigError, FieldError, LineDict, doc, from_data, load_yaml, set_dotted
from cai.engine import check_dtype, check_prefix_reuse
from cai.engine.ray import check_address, replica_gpus
from cai.pipeline import online
from cai.pipeline.online import OnlineConfig
from cai.pipeline.stage import Stage
from cai.pipeline.stages import STAGES


@dataclass
class RayConfig:
    """Where the engine replicas run with ``engine.executor: ray`` (``cai.engine.ray``)."""

    address: str | None = doc(
        "HOST:PORT of a running Ray cluster's head (ray start --head), ray://HOST:PORT or auto; "
        "null: RAY_ADDRESS where set, else a local Ray on this machine",
        None,
    )
    replicas: int = doc("engine replicas, each a Ray actor holding the model", 1)
    num_cpus: float = doc("CPUs per replica (its torch threads, too)", 1)
    num_gpus: float | None = doc(
        "GPUs per replica; null: tensor_parallel_size of a vllm engine where set, else 1 "
        "where the cluster has GPUs and the backend is vllm or auto, else 0",
        None,
    )

    def validate(self) -> None:
        try:
            check_address(self.address)
        except ValueError as e:
            raise FieldError("address", str(e)) from None
        if self.replicas < 1:
            raise FieldError("replicas", f"must be >= 1 (got {self.replicas})")
        if self.num_cpus <= 0:
            raise FieldError("num_cpus", f"must be > 0 (got {self.num_cpus})")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise FieldError("num_gpus", f"must be >= 0 (got {self.num_gpus})")


@dataclass
class EngineConfig:
    backend: Literal["auto", "hf", "vllm", "openai"] = doc("engine backend", "auto")
    dtype: str = doc("auto, float32, bfloat16 or float16", "auto")
    max_model_len: int | None = doc("context length cap (tokens); none: the model's", None)
    options: dict[str, Any] = doc("extra backend options (e.g. base_url for openai)", factory=dict)
    executor: Literal["local", "ray"] = doc(
        "where engines run: local (in this process) or ray (replicas on a Ray cluster); "
        "not part of the run's config: switching resumes the same run",
        "local",
    )
    ray: RayConfig = doc("the Ray replicas (executor: ray)", factory=RayConfig)
    prefix_reuse: bool = doc(
        "compute a prompt prefix that requests share once (hf: per micro-batch; vllm: prefix "
        "caching; openai: the server decides); not part of the run's config: switching resumes "
        "the same run with the same records",
        True,
    )

    def validate(self) -> None:
        check_dtype(self.backend, self.dtype)
        check_prefix_reuse(self.backend, self.prefix_reuse)
        for name in ("dtype", "max_model_len", "prefix_reuse"):
            if name in self.options:
                raise ValueError(f"options.{name}: set engine.{name} instead (a field of its own)")
        if "enable_prefix_caching" in self.options:
            raise ValueError("options.enable_prefix_caching: set engine.prefix_reuse instead")
        replica_gpus(self.backend, self.options, self.ray.num_gpus)  # GPUs given once


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


@dataclass
class Recipe:
    name: str = doc("the run's name; runs/<name> by default")
    sources: list[SourceConfig] = doc("prompt sources, concatenated in order")
    stages: Any = doc("the stages to run, in pipeline order")
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
    online: OnlineConfig | None = doc(
        "online RLAIF: sample → judge → train_dpo once per round, each round on the policy the "
        "round before trained (cai.pipeline.online)",
        None,
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
        if self.online is not None:
            online.check_recipe(self.stages)
        for stage, _ in self.stages.present():
            if stage.check_recipe is not None:
                stage.check_recipe(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StageOptions:
    """The recipe's ``stages:``: one field per stage of the list it was made from (None: the
    recipe does not run that stage)."""

    STAGES: tuple[Stage, ...] = ()

    def present(self) -> list[tuple[Stage, Any]]:
        """(stage, its options) of each stage the recipe runs, in pipeline order."""
        return [
            (s, getattr(self, s.name)) for s in self.STAGES if getattr(self, s.name) is not None
        ]

    def validate(self) -> None:
        names = {s.name for s, _ in self.present()}
        for stage, _ in self.present():
            for need in stage.needs:
                if need not in names:
                    raise ValueError(
                        stage.needs_message or f"{stage.name} needs a {need} stage before it"
                    )
        starters = [s.name for s in self.STAGES if s.starts]
        if not names & set(starters):
            raise ValueError(
                f"a recipe needs at least one of the stages that make records: {', '.join(starters)}"
            )


def stage_options(stages: Sequence[Stage]) -> type[StageOptions]:
    """The typed ``stages:`` section of a recipe that may run ``stages``."""
    fields = [(s.name, s.options | None, doc(s.doc, None)) for s in stages]
    return make_dataclass(
        "Stages", fields, bases=(StageOptions,), namespace={"STAGES": tuple(stages)}
    )


def recipe_class(stages: Sequence[Stage]) -> type[Recipe]:
    """``Recipe`` whose ``stages:`` holds the fields of ``stages``."""
    section = stage_options(stages)
    return make_dataclass(
        "Recipe",
        [("stages", section, doc("the stages to run, in pipeline order"))],
        bases=(Recipe,),
    )


def load_recipe(
    path: str | Path, overrides: list[str] = (), stages: Sequence[Stage] = STAGES
) -> Recipe:
    """Load a recipe file that may run ``stages`` (default: the pipeline's), apply
    ``key=value`` overrides, validate. Raises ConfigError."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys (name, sources, stages, ...)")
    for assignment in overrides:
        set_dotted(data, assignment)
    if not isinstance(data, LineDict):
        data = LineDict(data)
    recipe = from_data(recipe_class(stages), data, source=str(path))
    for stage, _ in recipe.stages.present():
        if stage.check_options is not None:
            stage.check_options(data, str(path))
    return recipe
