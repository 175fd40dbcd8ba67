"""Prefix reuse: the critique and the judge workloads with reuse on and off, side by side.

    python bench/prefix.py [--backend hf|vllm] [--prompts 16] [--max-tokens 64] [--repeats 2]

The quickstart's prompts (red-team and helpful, alternating) get greedy initial responses (not
timed). The critique workload is one critique → revision round over them (``CritiqueReviser``,
the harmless constitution's few-shot exemplars, greedy, up to --max-tokens per step); the judge
workload labels the pairs (initial response, revision) with the multiple-choice log-prob judge,
both orders. Both run on the same requests with reuse on and off (the HF engine's
``prefix_reuse``; vLLM's prefix caching, an engine of each), each ``--repeats`` times, the
fastest run counting. Before each timed run the prefixes an engine keeps between calls are
emptied and one warm-up request runs on a prompt that is not measured: each run starts where a
stage's second chunk would (its exemplars kept), never with its own requests cached. On HF both
engines are loaded and the runs alternate (on, off, then off, on), so that a change in the
machine's load falls on both arms.

On HF the table also gives the floor: the time with reuse less the time spent computing the
shared prefixes, that is the prefill of the unshared tokens alone (and, for the critique
workload, the decoding). Prints a table, then one JSON line whose ``<workload>_prefix_reuse_speedup``
is the wall time without reuse over the time with it; ``identical`` says whether reuse left the
critiques and revisions unchanged and the judge's probabilities within 1e-4.
"""

from __future__ import annotations

import argparse
import json
import time

from cai.constitution import load_constitution
from cai.critique import CritiqueReviser, RoundInput
from cai.engine import Sampling, create_engine
from cai.judge import Judge
from cai.keys import record_key
from cai.resources import resolve

TOLERANCE = 1e-4
WARM_RESPONSE = "I can help with that. Here is a short, careful answer to your question."


def quickstart_prompts(count: int) -> list[str]:
    sets = []
    for name in ("red_team", "helpful"):
        with open(resolve("data", name), encoding="utf-8") as f:
            sets.append([json.loads(line)["prompt"] for line in f if line.strip()])
    mixed = [p for pair in zip(*sets, strict=False) for p in pair]
    return mixed[:count]


class SharedPrefixTimer:
    """Time an HF engine spends computing shared prefixes: its prefix forwards are the ones
    without an attention mask (one prefix, nothing padded)."""

    def __init__(self, engine):
        self.seconds = 0.0
        forward = engine.model.forward

        def timed(*args, **kwargs):
            if kwargs.get("attention_mask") is not None:
                return forward(*args, **kwargs)
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        engine.model.forward = timed


class Arm:
    """One engine (reuse on or off) with the critique reviser and the judge over it."""

    def __init__(
        self, args, reuse: bool, prompts: list[str], responses: list[str] | None, warm_up: str
    ):
        options = {"enforce_eager": True} if args.backend == "vllm" else {}
        self.args, self.reuse = args, reuse
        self.engine = create_engine(
            args.backend, model=args.model, dtype=args.dtype, prefix_reuse=reuse, **options
        )
        sampling = Sampling(max_tokens=args.max_tokens)
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        if responses is None:
            responses = [c.text for c in self.engine.generate(conversations, sampling)]
        self.prompts, self.responses = prompts, responses
        constitution = load_constitution("harmless")
        self.reviser = CritiqueReviser(self.engine, constitution, sampling=sampling)
        self.judge = Judge(self.engine, constitution)
        self.items = []
        for p, conversation, response in zip(prompts, conversations, responses, strict=True):
            key = record_key(bench="prefix", prompt=p)
            self.items.append(
                RoundInput(key, conversation, response, self.reviser.principle_for(key))
            )
        # The warm-up prompt is none of the measured ones: what an earlier chunk of the stage
        # would have left in a prefix cache (its exemplars), and no more.
        self.warm_item = RoundInput(
            record_key(bench="prefix-warm-up"),
            [{"role": "user", "content": warm_up}],
            WARM_RESPONSE,
            self.reviser.principle_for(record_key(bench="prefix-warm-up")),
        )
        self.warm_pair = (warm_up, WARM_RESPONSE, WARM_RESPONSE + " That is all I know.")
        self.timer = SharedPrefixTimer(self.engine) if args.backend == "hf" else None
        self.dtype = self.engine.describe().get("dtype")
        self.best: dict[str, dict] = {}
        self.rounds: list = []
        self.p_a: list = []
        self.prompt_tokens = 0

    def reset(self, workload: str) -> None:
        """Empty the prefix caches kept between calls, then run the warm-up request of
        ``workload``: each timed run starts where a stage's second chunk would, never with the
        measured requests themselves kept from a run before."""
        if self.args.backend == "hf":
            self.engine.prefix_cache.entries.clear()
        elif self.reuse:
            self.engine.llm.reset_prefix_cache()
        if workload == "critique":
            self.reviser.run_round([self.warm_item])
        else:
            self.judge.label([self.warm_pair])

    def measure(self, workload: str) -> None:
        """Run ``workload`` once (after :meth:`reset`); keep the fastest run's wall time (and
        its floor)."""
        self.reset(workload)
        shared_before = self.timer.seconds if self.timer else 0.0
        start = time.perf_counter()
        if workload == "critique":
            self.rounds = self.reviser.run_round(self.items)
            self.prompt_tokens = sum(r.usage.get("prompt_tokens", 0) for r in self.rounds)
        else:
            pairs = [
                (p, r.response, r.revision) for p, r in zip(self.prompts, self.rounds, strict=True)
            ]
            self.p_a = [p.p_a for p in self.judge.label(pairs)]
        wall = time.perf_counter() - start
        got = {"wall_s": wall}
        if self.timer:
            got["floor_s"] = wall - (self.timer.seconds - shared_before)
        if workload not in self.best or wall < self.best[workload]["wall_s"]:
            self.best[workload] = got

    def close(self) -> None:
        self.engine.close()


def measure_all(args, prompts: list[str], warm_up: str) -> tuple[Arm, Arm]:
    """Both arms over the same requests. HF: both engines loaded, the runs alternating (on, off,
    then off, on, ...) so that a change in the machine's load falls on both; vLLM: one engine
    at a time (each reserves its share of memory)."""
    workloads = ("critique", "judge")
    if args.backend == "hf":
        on = Arm(args, True, prompts, None, warm_up)
        off = Arm(args, False, prompts, on.responses, warm_up)
        for workload in workloads:
            for rep in range(args.repeats):
                for arm in (on, off) if rep % 2 == 0 else (off, on):
                    arm.measure(workload)
        on.close(), off.close()
        return on, off
    arms = []
    for reuse in (True, False):
        arm = Arm(args, reuse, prompts, arms[0].responses if arms else None, warm_up)
        try:
            for workload in workloads:
                for _ in range(args.repeats):
                    arm.measure(workload)
        finally:
            arm.close()
        arms.append(arm)
    return arms[0], arms[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--model", default=None, help="model spec (default: smollm2-135m)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm (the fastest counts)")
    args = parser.parse_args()
    *prompts, warm_up = quickstart_prompts(args.prompts + 1)
    on, off = measure_all(args, prompts, warm_up)
    identical = {
        "critique": [r.to_dict() for r in on.rounds] == [r.to_dict() for r in off.rounds],
        "judge": all(abs(a - b) <= TOLERANCE for a, b in zip(on.p_a, off.p_a, strict=True)),
    }

    print(
        f"\n{len(prompts)} prompts, {args.backend} ({on.dtype}); critique: one critique → "
        f"revision round, up to {args.max_tokens} tokens each; judge: {len(prompts)} pairs, "
        f"both orders; the fastest of {args.repeats} runs\n"
    )
    print(f"{'workload':<10}{'off s':>9}{'on s':>9}{'speedup':>9}{'floor s':>9}{'identical':>11}")
    line = {"bench": "prefix", "backend": args.backend, "dtype": on.dtype}
    line.update(prompts=len(prompts), max_tokens=args.max_tokens)
    for workload in ("critique", "judge"):
        a, b = off.best[workload], on.best[workload]
        speedup = a["wall_s"] / b["wall_s"]
        floor = f"{b['floor_s']:>9.1f}" if "floor_s" in b else f"{'-':>9}"
        print(
            f"{workload:<10}{a['wall_s']:>9.1f}{b['wall_s']:>9.1f}{speedup:>9.2f}{floor}"
            f"{identical[workload]!s:>11}"
        )
        line[f"{workload}_off_s"] = round(a["wall_s"], 2)
        line[f"{workload}_on_s"] = round(b["wall_s"], 2)
        if "floor_s" in b:
            line[f"{workload}_floor_s"] = round(b["floor_s"], 2)
        line[f"{workload}_prefix_reuse_speedup"] = round(speedup, 3)
        line[f"{workload}_identical"] = identical[workload]
    line["repeats"] = args.repeats
    line["critique_prompt_tokens"] = on.prompt_tokens
    print(json.dumps(line))


if __name__ == "__main__":
    main()
