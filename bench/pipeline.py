"""Pipeline overhead: the critique-revise stage against the bare engine fed the same requests;
with ``--executor ray``, the same recipe in-process against engine replicas on Ray.

    python bench/pipeline.py [--prompts 16] [--rounds 2] [--max-tokens 64] [--backend auto]
    python bench/pipeline.py --executor ray [--replicas 2] [--num-cpus 1] [--ray-address ADDR]

The stage runs through the real runner (templates, principle sampling, record keys, the run
store with its fsyncs, cleaning, export) while a thin wrapper records every batch it sends the
engine. The recorded batches are then replayed through the same engine, timed alone. Greedy
decoding makes both do the same token work. Prints a table, then one JSON line whose
``pipeline_over_engine`` is the ratio of wall times (goal: at most 1.10).

``--executor ray`` runs the recipe (generate and critique-revise) on one in-process engine and
on ``--replicas`` Ray replicas, each engine built and warmed before its runs (``--repeats``
alternating runs each, the fastest kept), and prints one JSON line with ``ray_over_local`` (the
in-process wall time over Ray's: above 1, Ray has the higher throughput), whether both wrote
the same records, and Ray's start-up cost
(``ray_init_s``: starting or joining Ray; ``replicas_start_s``: every replica's model loaded).
On one machine the replicas share its cores with each other: 2 one-CPU replicas on 2 cores do
the work of one engine with 2 threads, plus Ray's transfers and the pieces' smaller batches.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from cai.engine import Engine, Sampling, create_engine
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner

RECIPE = """
name: bench
model: smollm2-135m
constitution: harmless
sources:
  - {{path: red_team, limit: {half}}}
  - {{path: helpful, limit: {half}}}
stages:
  generate: {{max_tokens: {max_tokens}}}
  critique_revise: {{rounds: {rounds}, max_tokens: {max_tokens}}}
"""


class Recording(Engine):
    """Passes calls to ``inner`` and keeps each generate batch's arguments."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.backend, self.model_name = inner.backend, inner.model_name
        self.batches: list[tuple[list, list, object]] = []

    def generate(self, conversations, sampling=Sampling(), *, prefixes=None, progress=False):
        self.batches.append((list(conversations), sampling, prefixes))
        return self.inner.generate(conversations, sampling, prefixes=prefixes, progress=progress)

    def score(self, conversations, options, *, prefixes=None, progress=False):
        return self.inner.score(conversations, options, prefixes=prefixes, progress=progress)

    def describe(self):
        return self.inner.describe()


def write_recipe(folder: Path, args: argparse.Namespace) -> tuple[Path, int]:
    path = folder / "bench.yaml"
    half = max(1, args.prompts // 2)
    path.write_text(RECIPE.format(half=half, rounds=args.rounds, max_tokens=args.max_tokens))
    return path, half * 2


def stage_records(run_dir: Path) -> dict[str, list[str]]:
    return {
        stage: sorted((run_dir / "stages" / f"{stage}.jsonl").read_text().splitlines())
        for stage in ("generate", "critique_revise")
    }


def compare_executors(args: argparse.Namespace) -> None:
    """The same recipe on one in-process engine and on Ray replicas; one JSON line."""
    from cai.engine.ray import replicated, start, stop

    load = os.getloadavg()[0]  # other processes' work slows the 2-thread engine most
    warm = [[{"role": "user", "content": "Warm up."}]] * (2 * args.replicas)
    local = create_engine(args.backend, model="smollm2-135m")
    local.generate(warm[:1], Sampling(max_tokens=8))
    ray_init = start(args.ray_address)
    replicas = replicated(
        args.backend, "smollm2-135m", replicas=args.replicas, num_cpus=args.num_cpus
    )
    replicas.generate(warm, Sampling(max_tokens=8))  # a piece on every replica
    executors = (("in-process", local), (f"ray ({args.replicas} replicas)", replicas))
    best: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, prompts = write_recipe(Path(tmp), args)
        # Alternating runs, the fastest of each kept: load from other processes hits both alike.
        for repeat in range(args.repeats):
            for name, engine in executors:
                run_dir = Path(tmp) / f"{name.split()[0]}-{repeat}"
                result = Runner(load_recipe(path), run_dir, engine=engine).run()
                wall = sum(stage.seconds for stage in result.stages)
                tokens = sum(stage.completion_tokens for stage in result.stages)
                requests = sum(stage.requests for stage in result.stages)
                row = (name, wall, tokens, requests, stage_records(run_dir))
                if name not in best or wall < best[name][1]:
                    best[name] = row
    rows = [best[name] for name, _ in executors]
    described = local.describe()
    local.close()
    replicas.close()
    stop()
    (_, local_wall, local_tokens, requests, local_records), ray_row = rows
    _, ray_wall, ray_tokens, _, ray_records = ray_row
    print(
        f"\ngenerate + critique-revise: {prompts} prompts × {args.rounds} rounds, {requests} "
        f"requests, greedy, up to {args.max_tokens} tokens ({described['backend']})\n"
    )
    print(f"{'executor':<22}{'wall s':>9}{'gen tok':>9}{'gen tok/s':>11}")
    for name, wall, tokens, _, _ in rows:
        print(f"{name:<22}{wall:>9.1f}{tokens:>9}{tokens / wall:>11.1f}")
    print(f"ray start-up: ray.init {ray_init:.1f} s, replicas {replicas.start_seconds:.1f} s\n")
    print(
        json.dumps(
            {
                "bench": "pipeline_executors",
                "backend": described["backend"],
                "prompts": prompts,
                "rounds": args.rounds,
                "requests": requests,
                "replicas": args.replicas,
                "num_cpus_per_replica": args.num_cpus,
                "repeats": args.repeats,
                "local_s": round(local_wall, 2),
                "ray_s": round(ray_wall, 2),
                "ray_over_local": round(local_wall / ray_wall, 3),
                "same_records": local_records == ray_records,
                "same_tokens": local_tokens == ray_tokens,
                "ray_init_s": round(ray_init, 2),
                "replicas_start_s": round(replicas.start_seconds, 2),
                "load_average_before": round(load, 2),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--replicas", type=int, default=2, help="Ray replicas (--executor ray)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per Ray replica")
    parser.add_argument("--ray-address", help="a running Ray cluster (default: a local Ray)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs per executor (--executor ray)"
    )
    args = parser.parse_args()
    if args.executor == "ray":
        compare_executors(args)
        return

    engine = create_engine(args.backend, model="smollm2-135m")
    engine.generate([[{"role": "user", "content": "Warm up."}]], Sampling(max_tokens=8))
    recording = Recording(engine)
    with tempfile.TemporaryDirectory() as tmp:
        path, prompts = write_recipe(Path(tmp), args)
        half = prompts // 2
        recipe = load_recipe(path)
        result = Runner(recipe, Path(tmp) / "run", engine=recording).run()
    stage = next(s for s in result.stages if s.name == "critique_revise")
    requests = recording.batches[1:]  # the first batch is the generate stage

    start = time.perf_counter()
    replay_tokens = 0
    for conversations, sampling, prefixes in requests:
        done = engine.generate(conversations, sampling, prefixes=prefixes)
        replay_tokens += sum(c.completion_tokens for c in done if c.ok)
    engine_wall = time.perf_counter() - start
    engine.close()

    count = sum(len(b[0]) for b in requests)
    print(
        f"\ncritique-revise: {half * 2} prompts × {args.rounds} rounds = {count} requests, "
        f"greedy, up to {args.max_tokens} tokens ({engine.describe()['backend']})\n"
    )
    print(f"{'path':<26}{'wall s':>9}{'gen tok':>9}{'gen tok/s':>11}")
    rows = [
        ("pipeline (runner + store)", stage.seconds, stage.completion_tokens),
        ("bare engine, same batches", engine_wall, replay_tokens),
    ]
    for name, wall, tokens in rows:
        print(f"{name:<26}{wall:>9.1f}{tokens:>9}{tokens / wall:>11.1f}")
    print(
        json.dumps(
            {
                "bench": "pipeline",
                "backend": engine.describe()["backend"],
                "prompts": half * 2,
                "rounds": args.rounds,
                "requests": count,
                "pipeline_s": round(stage.seconds, 2),
                "engine_s": round(engine_wall, 2),
                "same_tokens": replay_tokens == stage.completion_tokens,
                "pipeline_over_engine": round(stage.seconds / engine_wall, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
