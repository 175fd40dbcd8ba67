"""Engine throughput: the same chat workload through each local backend, side by side.

    python bench/engine.py [--requests 128] [--max-tokens 64] [--backends hf,hf-bf16,vllm]

Prompts are the shipped helpful and benign sets (cycled to --requests), greedy, up to
--max-tokens new tokens each. Start-up (model load, vLLM's compile and warm-up) is timed apart
from the workload. Prints a table, then one JSON line whose ``vllm_over_hf`` is the ratio of
generated tokens/s (vLLM over HF at the default dtype).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from cai.engine import Sampling, create_engine
from cai.resources import resolve

VARIANTS = {
    "hf": ("hf", {"dtype": "auto"}),
    "hf-fp32": ("hf", {"dtype": "float32"}),
    "hf-bf16": ("hf", {"dtype": "bfloat16"}),
    "vllm": ("vllm", {"dtype": "auto"}),
}


def workload(count: int) -> list[list[dict]]:
    prompts = []
    for name in ("helpful", "edgy_benign"):
        with open(resolve("data", name), encoding="utf-8") as f:
            prompts += [json.loads(line)["prompt"] for line in f if line.strip()]
    return [
        [{"role": "user", "content": p}] for p in itertools.islice(itertools.cycle(prompts), count)
    ]


def run(variant: str, conversations, sampling) -> dict:
    backend, options = VARIANTS[variant]
    start = time.perf_counter()
    engine = create_engine(backend, **options)
    startup = time.perf_counter() - start
    try:
        start = time.perf_counter()
        results = engine.generate(conversations, sampling, progress=variant)
        wall = time.perf_counter() - start
        dtype = engine.describe().get("dtype")
    finally:
        engine.close()
    failed = sum(not r.ok for r in results)
    tokens = sum(r.completion_tokens for r in results if r.ok)
    return {
        "variant": variant,
        "dtype": dtype,
        "startup_s": startup,
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "failed": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backends", default="hf,hf-bf16,vllm", help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    conversations = workload(args.requests)
    sampling = Sampling(max_tokens=args.max_tokens)
    rows = [run(v, conversations, sampling) for v in args.backends.split(",")]

    print(f"\n{args.requests} chat requests, greedy, up to {args.max_tokens} new tokens each\n")
    print(
        f"{'backend':<10}{'dtype':<10}{'startup s':>10}{'wall s':>9}{'req/s':>8}{'gen tok/s':>11}{'failed':>8}"
    )
    for r in rows:
        print(
            f"{r['variant']:<10}{r['dtype']:<10}{r['startup_s']:>10.1f}{r['wall_s']:>9.1f}"
            f"{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>11.1f}{r['failed']:>8}"
        )
    by = {r["variant"]: r for r in rows}
    line = {
        "bench": "engine",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        **{f"{r['variant']}_tokens_per_s": round(r["tokens_per_s"], 1) for r in rows},
    }
    if "vllm" in by and "hf" in by:
        line["vllm_over_hf"] = round(by["vllm"]["tokens_per_s"] / by["hf"]["tokens_per_s"], 3)
    if "hf-bf16" in by and "hf" in by:
        line["hf_bf16_over_hf"] = round(by["hf-bf16"]["tokens_per_s"] / by["hf"]["tokens_per_s"], 3)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
