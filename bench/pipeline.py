"""Pipeline overhead: the critique-revise stage against the bare engine fed the same requests.

    python bench/pipeline.py [--prompts 16] [--rounds 2] [--max-tokens 64] [--backend auto]

The stage runs through the real runner (templates, principle sampling, record keys, the run
store with its fsyncs, cleaning, export) while a thin wrapper records every batch it sends the
engine. The recorded batches are then replayed through the same engine, timed alone. Greedy
decoding makes both do the same token work. Prints a table, then one JSON line whose
``pipeline_over_engine`` is the ratio of wall times (goal: at most 1.10).
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    engine = create_engine(args.backend, model="smollm2-135m")
    engine.generate([[{"role": "user", "content": "Warm up."}]], Sampling(max_tokens=8))
    recording = Recording(engine)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        half = max(1, args.prompts // 2)
        path.write_text(RECIPE.format(half=half, rounds=args.rounds, max_tokens=args.max_tokens))
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
