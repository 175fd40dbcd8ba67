"""The stage contract: what a stage of a recipe declares, once, in its own module.

A stage module defines its options (a typed dataclass, validated when the recipe loads) and one
``Stage``: its name (the recipe key under ``stages:`` and the run-store file), what it needs,
how it plans (``--dry-run`` lines with request counts), how it runs, and the models it uses or
produces, and whether it runs once or per round (``per_round``). ``cai.pipeline.stages.STAGES``
lists the stages in the order they run; the recipe's ``stages:`` fields, their validation, the
plan, the manifest's models, the online rounds' schedule (``cai.pipeline.online``), the summary
table and the error-rate check all come from that list. A stage sees the run through a
``StageContext`` value (a new one per round) and reports what it produced to ``RunResult``.
docs/guides/write-a-stage.md walks through one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

from cai.config import ConfigError, LineDict, from_data
from cai.engine import Completion, Engine, Sampling
from cai.keys import seed_for
from cai.layout import RunLayout
from cai.record_loop import run_records

if TYPE_CHECKING:
    from cai.data import PromptRecord
    from cai.keys import Shard
    from cai.record_loop import BatchCall, Executor, StageTally
    from cai.store import RunStore

T = TypeVar("T")


class PipelineError(Exception):
    """A run that cannot start or continue; the message says what to do."""


@dataclass
class RunResult:
    """What a run did and produced: the summary table and the exit status read it."""

    stages: list[StageTally] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    """What the stages produced, by name (``sft``, ``preferences``, ``train_dpo``, ``evaluation``,
    ...; a later round's replaces the round before's), as each stage declares it (:meth:`add`)."""
    lines: list[str] = field(default_factory=list)
    """The summary table's lines about the outputs, in the order they were produced."""
    report: Path | None = None
    """``<run>/report.html`` when the recipe trains or evaluates."""
    failed: list[str] = field(default_factory=list)

    def add(self, name: str, path: Path, line: str) -> Path:
        """Record an output of a stage and the summary line that reports it; returns ``path``."""
        self.outputs[name] = path
        self.lines.append(line)
        return path


class Engines(Protocol):
    """The run's engines: built once per model spec, closed when no later stage needs them."""

    def engine_for(self, model: str) -> Engine: ...

    def release_engines(self, keep: Collection[str] = ()) -> None: ...


@dataclass(frozen=True)
class StageContext:
    """What a stage may use of the run: a value the runner makes, and for each online round a
    new one (``dataclasses.replace(ctx, round=r, prompts=...)``); a stage never changes it, but
    adds to its ``outputs`` and ``result``."""

    recipe: Any
    """The recipe (``cai.pipeline.recipe.Recipe``); ``recipe.stages.<name>`` are the options."""
    layout: RunLayout
    """The run directory's paths (``cai.layout``)."""
    store: RunStore
    shard: Shard | None
    prompts: list[PromptRecord]
    """The recipe's prompts after ``--limit`` and in this shard (in a round: the round's)."""
    source_keys: frozenset[str]
    """Every prompt key of the recipe's sources (before ``--limit`` and sharding)."""
    out: TextIO
    executor: Executor
    engines: Engines
    outputs: dict[str, Any]
    """Stage name → what it left for later stages (responses, samples, ...)."""
    prepared: dict[str, Any]
    """Stage name → what its ``prepare`` loaded (a constitution, a config)."""
    result: RunResult
    round: int | None = None
    """The round being run, from 1, for a stage declared ``per_round``; None otherwise."""
    rounds: int = 0
    """How many rounds the recipe runs (its ``online:`` block); 0: none."""

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    def engine_for(self, model: str) -> Engine:
        """The engine of a model spec, built once."""
        return self.engines.engine_for(model)

    def release_engines(self, keep: Collection[str] = ()) -> None:
        """Close the engines of models not in ``keep``."""
        self.engines.release_engines(keep)

    def round_key(self) -> dict[str, int]:
        """The record-key (and record) part of the round: nothing outside the rounds, so that
        keys stay what they were."""
        return {} if self.round is None else {"round": self.round}


def _no_models(ctx: StageContext) -> dict[str, str]:
    return {}


def every_round(r: int) -> bool:
    """``Stage.per_round`` of a stage that runs in every round."""
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe."""

    name: str
    """The recipe key (``stages.<name>``), the run-store file and the summary row."""
    doc: str
    """One line: what the stage makes (the recipe field's documentation)."""
    options: Any
    """The options type: a dataclass (``{}`` in the recipe gives its defaults), or
    ``dict[str, Any]`` for options another config class types (a trainer's, the evaluation's),
    which ``check_options`` then builds once to check them with the recipe's lines."""
    run: Callable[[StageContext, StageTally], None]
    """Does the work; counts into the tally; leaves what later stages read in
    ``ctx.outputs[name]`` and what the run produced in ``ctx.result``."""
    plan: Callable[[StageContext], list[str]]
    """The ``--dry-run`` lines: requests left, records done, where outputs go."""
    needs: tuple[str, ...] = ()
    """Stages the recipe must also have (earlier in the list)."""
    needs_message: str = ""
    """The error when a needed stage is missing; default "<name> needs a <need> stage before it"."""
    starts: bool = False
    """Makes records from the recipe's prompts: a recipe needs at least one such stage."""
    check_options: Callable[[Any, str], None] | None = None
    """Checks the options further when the recipe loads (``recipe data, source path``), for
    checks that need more than the options type (a trainer's own config class)."""
    prepare: Callable[[StageContext], Any] | None = None
    """Checks and loads what the stage needs before any work (constitutions, templates); the
    value is kept in ``ctx.prepared[name]``."""
    models: Callable[[StageContext], dict[str, str]] = _no_models
    """Role → model spec of the models the stage uses or produces (the manifest's ``models``;
    an engine no later stage uses is closed before the next stage)."""
    in_shard: bool = True
    """Runs under ``--shard k/n``; False for stages over the whole run (training, evaluation)."""
    ends_with_report: bool = False
    """A run with this stage writes the run report (``<run>/report.html``) at the end."""
    prompt_key: Callable[[StageContext, PromptRecord], str] | None = None
    """For a stage that makes one record per prompt: the key a prompt's record gets. When the
    manifest is missing, the runner checks the first such stage's records against it."""
    per_round: Callable[[int], bool] | None = None
    """None: the stage runs once. Else, in a recipe with rounds (an ``online:`` block), it runs
    in each round r where ``per_round(r)`` holds (:func:`every_round`), with that round's context
    (``ctx.round``, the round's ``ctx.prompts``); the rounds run after the stages before the
    first such stage, and the stages after them run once the rounds are done. In a recipe
    without rounds, it runs once."""
    check_recipe: Callable[[Any], None] | None = None
    """Checks of the whole recipe that concern this stage (it has rounds, another stage is
    missing): raises ValueError, reported with the recipe's file and line when it loads."""


def stage_records(
    ctx: StageContext,
    stage: str,
    items: Sequence[T],
    *,
    key: Callable[[T], str],
    call: BatchCall,
    tally: StageTally,
    label: str,
    requests: Callable[[dict], int] = lambda record: 1,
) -> dict[str, dict]:
    """The record loop (``cai.record_loop.run_records``) over the run's store and shard, in
    ``chunk_size`` batches on the run's executor."""
    return run_records(
        ctx.store,
        stage,
        items,
        key=key,
        call=call,
        tally=tally,
        shard=ctx.shard,
        batch_size=ctx.recipe.chunk_size,
        label=label,
        requests=requests,
        executor=ctx.executor,
    )


def generate_seeded(
    ctx: StageContext,
    model: str,
    prompts: Sequence[PromptRecord],
    keys: dict[str, str],
    sampling: Sampling,
    progress: str | bool,
) -> list[tuple[PromptRecord, int, Completion]]:
    """One generate call for ``prompts``, each sampled with the seed of its record key
    (``keys[prompt.key]``): (prompt, seed, completion) in order."""
    seeds = [seed_for(keys[p.key], ctx.recipe.seed) for p in prompts]
    params = [replace(sampling, seed=seed) for seed in seeds]
    engine = ctx.engine_for(model)
    done = engine.generate([p.messages for p in prompts], params, progress=progress)
    return list(zip(prompts, seeds, done, strict=True))


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
    }


def check_sampling(options: Any) -> None:
    """The engine's own checks (``Sampling.validate``) of a stage's ``max_tokens``,
    ``temperature`` and ``top_p`` options, when the recipe loads: a bad value fails before any
    model loads or record is written (cai.config names the field and line, or its ``--set``)."""
    Sampling(
        max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p
    ).validate()


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
