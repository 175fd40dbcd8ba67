"""DPO training throughput: our trainer against TRL's DPOTrainer, same data, model and settings.

    python bench/train.py [--model smollm2-135m] [--pairs 32] [--steps 8] [--batch-size 4]
        [--max-length 256] [--bf16] [--lora] [--gradient-checkpointing]

The pairs are built from the shipped ``helpful`` prompts (a short helpful answer against a short
dismissive one). Each trainer runs in its own subprocess, so peak memory is its own: peak
resident memory on the CPU, peak allocated CUDA memory on a GPU. Both precompute the reference
log-probs before training; that pass is timed apart from the training loop (samples/s counts
pairs per second of ``trainer.train()``; total s adds loading and the reference pass). The loss
of the last step shows that both trained alike. TRL's own defaults (bf16, gradient checkpointing)
are overridden by the flags given. Prints a table, then one JSON line whose ``cai_over_trl`` is
the ratio of training samples/s (ours over TRL's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cai.export import write_jsonl
from cai.resources import resolve

CHOSEN = "Happy to help. Here is a short, clear answer to your question, step by step."
REJECTED = "Figure it out yourself; I am not going to answer that."


def make_pairs(count: int, path: Path) -> None:
    with open(resolve("data", "helpful"), encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    records = [
        {
            "id": i,
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": CHOSEN}],
            "rejected": [{"role": "assistant", "content": REJECTED}],
            "p_chosen": 1.0,
        }
        for i, prompt in enumerate(itertools.islice(itertools.cycle(prompts), count))
    ]
    write_jsonl(records, path)


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_cai(args, data: Path, out: Path) -> dict:
    from cai.train import LoraOptions
    from cai.train.dpo import DPOConfig, train_dpo

    config = DPOConfig(
        model=args.model,
        data=str(data),
        output_dir=str(out),
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=1e-6,
        bf16=args.bf16,
        logging_steps=1,
        gradient_checkpointing=args.gradient_checkpointing,
        resume=False,
        lora=LoraOptions() if args.lora else None,
    )
    start = time.perf_counter()
    result = train_dpo(config)
    total = time.perf_counter() - start
    train_s = result.metrics["train_runtime"]
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    return {"train_s": train_s, "total_s": total, "final_loss": losses[-1]}


def run_trl(args, data: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from cai.models import resolve_model

    start = time.perf_counter()
    path = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    config = DPOConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=1e-6,
        beta=0.1,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        precompute_ref_log_probs=True,
        logging_steps=1,
        # TRL turns these on by default; the comparison runs both trainers with the same settings.
        gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    output = trainer.train()
    total = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": output.metrics["train_runtime"], "total_s": total, "final_loss": losses[-1]}


def worker(args) -> None:
    data, out = Path(args.data), Path(args.out)
    row = (run_cai if args.worker == "cai" else run_trl)(args, data, out)
    row["samples_per_s"] = args.steps * args.batch_size / row["train_s"]
    row["peak_mem_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(row))


def spawn(name: str, args, data: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--data", str(data), "--out", str(out)]
    for flag in ("model", "steps", "batch_size", "max_length"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag in ("bf16", "lora", "gradient_checkpointing"):
        command += [f"--{flag.replace('_', '-')}"] * getattr(args, flag)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return {"trainer": name, **json.loads(line[len("RESULT ") :])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--worker", choices=["cai", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        make_pairs(args.pairs, data)
        rows = [spawn(name, args, data, Path(tmp) / name) for name in ("cai", "trl")]

    setting = (
        f"{args.model}, {args.steps} steps × {args.batch_size} pairs, max_length "
        f"{args.max_length}, {'bf16' if args.bf16 else 'fp32'}{', LoRA' if args.lora else ''}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
    )
    print(f"\nDPO training, {setting}\n")
    print(
        f"{'trainer':<9}{'train s':>9}{'total s':>9}{'samples/s':>11}{'peak MB':>10}{'last loss':>11}"
    )
    for r in rows:
        print(
            f"{r['trainer']:<9}{r['train_s']:>9.1f}{r['total_s']:>9.1f}{r['samples_per_s']:>11.2f}"
            f"{r['peak_mem_mb']:>10.0f}{r['final_loss']:>11.4f}"
        )
    cai, trl = rows
    print(
        json.dumps(
            {
                "bench": "train",
                "model": args.model,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "bf16": args.bf16,
                "lora": args.lora,
                "gradient_checkpointing": args.gradient_checkpointing,
                "cai_samples_per_s": round(cai["samples_per_s"], 3),
                "trl_samples_per_s": round(trl["samples_per_s"], 3),
                "cai_peak_mem_mb": round(cai["peak_mem_mb"]),
                "trl_peak_mem_mb": round(trl["peak_mem_mb"]),
                "cai_over_trl": round(cai["samples_per_s"] / trl["samples_per_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
