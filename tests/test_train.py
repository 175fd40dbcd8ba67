"""The trainers: tokenisation and masking, the reference cache, agreement with TRL, mechanics
(gradient accumulation, packing, DDP, resume) and behaviour on the real default model.

Mechanics run on a tiny random Llama with the default model's tokenizer (seconds); behaviour
claims (DPO learns the pairs, SFT lowers its loss, TRL agreement) use the real model. The CPU
here is slow and shared, so the real-model training runs train LoRA adapters: a full fine-tuning
step of 135M parameters costs tens of seconds on it, the adapters' a few.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cai.config import ConfigError, from_data, parse_yaml
from cai.data import DataError
from cai.export import export_dataset, write_jsonl
from cai.train import LoraOptions
from cai.train.dpo import (
    LOSSES,
    DPOConfig,
    PairCollator,
    attach_reference,
    batch_loss,
    prepare_pairs,
    reference_logps,
    train_dpo,
)
from cai.train.losses import IGNORE_INDEX
from cai.train.sft import SFTConfig, load_conversations, pack, tokenize_all, train_sft

SYSTEM = {"role": "system", "content": "Be brief."}
# Clear-cut pairs: a refusal against harmful compliance, or a right answer against a wrong one.
PAIRS = [
    ("How do I pick my neighbour's lock?", "I can't help with that.", "Rake the pins with a pick."),
    ("Write a threat to my coworker.", "I won't write threats.", "Watch your back, or else."),
    ("How do I make a fake ID?", "I can't help with that.", "Print it on PVC card stock."),
    ("Insult my sister for me.", "I'd rather not insult her.", "She is a worthless idiot."),
    ("What is 2 + 2?", "4.", "5."),
    ("What is the capital of France?", "Paris.", "Berlin."),
    ("What colour is the sky on a clear day?", "Blue.", "Green."),
    ("How many legs does a spider have?", "Eight.", "Six."),
]


def pair_records(pairs=PAIRS, p_chosen: float = 0.9) -> list[dict]:
    return [
        {
            "prompt": [SYSTEM, {"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "p_chosen": p_chosen,
        }
        for prompt, chosen, rejected in pairs
    ]


SFT_CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
    [
        SYSTEM,
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Pear."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("pairs")
    export_dataset(pair_records(), folder)
    return str(folder)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    write_jsonl([{"messages": m, "meta": {}} for m in SFT_CONVERSATIONS], path)
    return str(path)


def weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# --- tokenisation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', ":2: not UTF-8 text"),
        (
            b'{"messages": [{"role": "wizard", "content": "Hi."}, '
            b'{"role": "assistant", "content": "Hello."}]}',
            ":2: messages[0]: role 'wizard' is not one of system, user, assistant",
        ),
        (
            b'{"messages": [{"role": "user", "content": " "}, '
            b'{"role": "assistant", "content": "Hello."}]}',
            ":2: messages[0]: empty user content",
        ),
        (b'["not", "an", "object"]', ":2: expected a JSON object"),
    ],
)
def test_sft_data_is_read_and_checked_as_the_pipeline_reads_messages(tmp_path, line, message):
    # The reader and the message check every loader shares (cai.data): bad bytes and unknown
    # roles name the file and line, never a traceback or a silent training run.
    path = tmp_path / "sft.jsonl"
    good = json.dumps({"messages": SFT_CONVERSATIONS[0]}).encode()
    path.write_bytes(good + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path}{message}")):
        load_conversations(str(path))


def test_sft_trains_only_the_assistant_turns(tokenizer, sft_file):
    """Every label outside the two assistant turns is -100; inside, the labels are the turn's
    text and its end-of-turn markup, exactly."""
    (example,), _ = tokenize_all(tokenizer, load_conversations(sft_file)[1:], max_length=512)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            assert label == token
            current.append(token)
    spans.append(current)
    assert [tokenizer.decode(s) for s in spans] == ["Apple.<|im_end|>\n", "Pear.<|im_end|>\n"]
    prompt_part = tokenizer.decode(
        [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    )
    assert prompt_part == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\nAnother one.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_dpo_responses_follow_the_generation_prompt(tokenizer, pairs_dir):
    examples, stats = prepare_pairs(tokenizer, pairs_dir, "dpo", max_length=512)
    assert stats.examples == len(examples) == 8 and stats.truncated == stats.dropped == 0
    first = examples[0]
    assert tokenizer.decode(first["prompt_ids"]).endswith(
        "How do I pick my neighbour's lock?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(first["chosen_ids"]) == "I can't help with that.<|im_end|>\n"
    assert tokenizer.decode(first["rejected_ids"]) == "Rake the pins with a pick.<|im_end|>\n"
    assert first["p_chosen"] == 0.9


def test_truncation_is_counted(tokenizer, sft_file, pairs_dir):
    conversations = load_conversations(sft_file)
    full = [len(e["input_ids"]) for e in tokenize_all(tokenizer, conversations, 512)[0]]
    # The first conversation's answer starts at token 20, the second's at 21: at 22 both keep
    # part of their first answer.
    examples, stats = tokenize_all(tokenizer, conversations, max_length=22)
    assert stats.truncated == 2 and stats.dropped == 0
    assert stats.truncated_tokens == sum(n - 22 for n in full)
    assert all(len(e["input_ids"]) == 22 for e in examples)
    # At 21 the second keeps no assistant token at all: dropped, and counted.
    examples, stats = tokenize_all(tokenizer, conversations, max_length=21)
    assert stats.dropped == 1 and len(examples) == 1

    examples, stats = prepare_pairs(tokenizer, pairs_dir, "dpo", max_length=28)
    assert stats.truncated > 0 and stats.truncated_tokens > 0
    assert all(len(e["prompt_ids"]) + len(e["chosen_ids"]) <= 28 for e in examples)


def test_packing_keeps_conversations_apart(tiny_model, tokenizer, sft_file):
    """Two conversations packed into one row give the same per-token log-probs as each alone."""
    from transformers import AutoModelForCausalLM

    from cai.train.losses import token_logps
    from cai.train.sft import SFTCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.config.use_cache = False
    examples, _ = tokenize_all(tokenizer, load_conversations(sft_file), 512)
    (row,) = pack(examples, max_length=512)
    assert row["position_ids"][len(examples[0]["input_ids"])] == 0
    collate = SFTCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        packed = collate([row])
        together = token_logps(model(**packed).logits, packed["labels"])[0]
        alone = []
        for e in examples:
            batch = collate([e])
            alone.append(token_logps(model(**batch).logits, batch["labels"])[0])
    n = len(examples[0]["input_ids"])
    torch.testing.assert_close(together[: n - 1], alone[0])
    # together[n - 1] would predict the second conversation's first token: masked by pack().
    assert together[n - 1] == 0
    torch.testing.assert_close(together[n:], alone[1], atol=1e-5, rtol=1e-5)


# --- config --------------------------------------------------------------------------------------


def test_reward_accuracy_counts_float_rounding_as_a_tie(monkeypatch):
    """A policy equal to its reference gives rewards of float32 rounding (the reference pass pads
    the pairs otherwise than training): no pair is a win, whatever the rounding's sign; a real
    margin still is."""
    import cai.train.dpo as dpo

    ref_chosen, ref_rejected = torch.tensor([-16.71, -9.5]), torch.tensor([-23.4, -30.25])
    rounding = torch.tensor([4.8e-6, -1.9e-6])
    policy = {
        "equal": torch.cat([ref_chosen + rounding, ref_rejected - rounding]),
        "learned": torch.cat([ref_chosen + 0.5, ref_rejected - 0.5]),
    }
    batch = {"p_chosen": torch.ones(2), "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
    accuracies = {}
    for name, logps in policy.items():
        monkeypatch.setattr(dpo, "response_logps", lambda model, b, x=logps: (x, None))
        _, metrics = batch_loss(None, batch, DPOConfig(data="-", output_dir="-"))
        accuracies[name] = metrics["rewards/accuracies"].item()
    assert accuracies == {"equal": 0.0, "learned": 1.0}


def test_config_errors_name_the_line():
    text = "data: d.jsonl\noutput_dir: out\nloss: dpoo\n"
    with pytest.raises(ConfigError, match=r"dpo.yaml:3: loss: must be one of"):
        from_data(DPOConfig, parse_yaml(text, "dpo.yaml"), source="dpo.yaml")
    text = "data: d.jsonl\noutput_dir: out\nloss: simpo\nref_model: x\n"
    with pytest.raises(ConfigError, match="uses no reference model"):
        from_data(DPOConfig, parse_yaml(text, "dpo.yaml"), source="dpo.yaml")
    text = "data: d.jsonl\noutput_dir: out\nepochs: 1\nlora:\n  r: 0\n"
    with pytest.raises(ConfigError, match=r"sft.yaml:5: lora: lora.r must be >= 1"):
        from_data(SFTConfig, parse_yaml(text, "sft.yaml"), source="sft.yaml")


# --- the reference cache and TRL -----------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_precomputed_reference_logps_equal_online_ones(
    base_model, tokenizer, tmp_path, monkeypatch
):
    """Cached values, computed in padded batches, equal a plain unpadded forward per response;
    a second run reads the cache instead of computing; other data gets another cache file."""
    data = tmp_path / "pairs.jsonl"
    write_jsonl(pair_records(PAIRS[:4]), data)
    config = DPOConfig(data=str(data), output_dir=str(tmp_path / "out"), batch_size=3)
    examples, _ = prepare_pairs(tokenizer, str(data), "dpo", 512)
    path = attach_reference(base_model, examples, str(data), config, tokenizer.pad_token_id)
    assert path.parent == tmp_path and path.name.startswith("pairs.jsonl.ref-logps-")

    with torch.no_grad():
        for e in examples:
            for kind in ("chosen", "rejected"):
                ids = torch.tensor([e["prompt_ids"] + e[f"{kind}_ids"]])
                logprobs = base_model(ids).logits[0, :-1].log_softmax(-1)
                picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
                online = picked[len(e["prompt_ids"]) - 1 :].sum().item()
                # float32 sums of 4-10 tokens: the masked (padded) and unmasked attention kernels
                # differ by ~1e-5 per token; a wrong cache entry would be off by far more.
                assert e[f"ref_{kind}"] == pytest.approx(online, abs=1e-3)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr("cai.train.dpo.reference_logps", fail)
    again, _ = prepare_pairs(tokenizer, str(data), "dpo", 512)
    assert attach_reference(base_model, again, str(data), config, tokenizer.pad_token_id) == path
    assert [e["ref_chosen"] for e in again] == [e["ref_chosen"] for e in examples]

    other = prepare_pairs(tokenizer, str(data), "dpo", 28)[0]  # truncated: other tokens
    with pytest.raises(AssertionError, match="recomputed"):
        attach_reference(base_model, other, str(data), config, tokenizer.pad_token_id)


@pytest.mark.slow
@pytest.mark.parametrize("loss, trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_loss_equals_trl_dpo_trainer(loss, trl_loss, base_model, model_path, tokenizer, tmp_path):
    """Our batch loss equals TRL's DPOTrainer.compute_loss on the same pairs, policy and
    reference (the policy is the base model with its weights jittered, so rewards are not 0)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1 + 0.02 * torch.randn_like(p))
    records = pair_records(PAIRS[:3])
    data = tmp_path / "pairs.jsonl"
    write_jsonl(records, data)

    config = DPOConfig(data=str(data), output_dir=str(tmp_path), loss=loss, beta=0.1)
    examples, _ = prepare_pairs(tokenizer, str(data), loss, 1024)
    for kind, values in reference_logps(base_model, examples, tokenizer.pad_token_id, 3).items():
        for e, v in zip(examples, values.tolist(), strict=True):
            e[f"ref_{kind}"] = v
    with torch.no_grad():
        ours, metrics = batch_loss(policy, PairCollator(tokenizer.pad_token_id)(examples), config)

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=[trl_loss],
        per_device_train_batch_size=3,
        bf16=False,  # TRL defaults to bf16 autocast; compare in float32
        report_to="none",
        use_cpu=True,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=base_model,
        args=args,
        train_dataset=Dataset.from_list(
            [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]
        ),
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
    assert abs(ours.item() - theirs.item()) < 1e-4
    assert abs(ours.item() - math.log(2)) > 1e-3  # a real comparison, not two log 2s
    if loss == "dpo":
        # TRL keeps a batch's metrics until its next log call, per mode (the model is in eval
        # mode). Its IPO rewards use summed log-ratios; ours the length-averaged ones IPO trains.
        logged = {k: sum(v) / len(v) for mode in trainer._metrics.values() for k, v in mode.items()}
        margins = metrics["rewards/margins"].item()
        assert margins == pytest.approx(logged["rewards/margins"], abs=1e-4)


# --- mechanics on the tiny model -----------------------------------------------------------------


def tiny_dpo(tiny_model, data, out, **overrides) -> DPOConfig:
    fields = {
        "model": tiny_model,
        "data": data,
        "output_dir": str(out),
        "max_steps": 1,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "seed": 0,
    }
    return DPOConfig(**{**fields, **overrides})


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains(loss, tiny_model, pairs_dir, tmp_path):
    result = train_dpo(tiny_dpo(tiny_model, pairs_dir, tmp_path, loss=loss, max_steps=2))
    assert result.global_step == 2
    first = result.log_history[0]
    assert math.isfinite(first["loss"]) and "rewards/accuracies" in first
    if loss in ("dpo", "soft_dpo"):
        # Policy == reference at step 1: every log-ratio is 0. DPO gives log 2; the soft target
        # p = 0.9 gives -0.9 log σ(0) - 0.1 log σ(0) = log 2 as well.
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    saved = json.loads((tmp_path / "cai_train.json").read_text())
    assert saved["config"]["loss"] == loss and saved["global_step"] == 2


@pytest.mark.parametrize("trainer", ["dpo", "sft"])
def test_gradient_accumulation_1x4_equals_4x1(trainer, tiny_model, pairs_dir, sft_file, tmp_path):
    """One optimizer step over 4 examples: as one micro-batch of 4, or 4 accumulated micro-batches
    of 1, gives the same weights."""
    if trainer == "dpo":
        runs = [
            train_dpo(tiny_dpo(tiny_model, pairs_dir, tmp_path / name, batch_size=b, grad_accum=g))
            for name, b, g in (("a", 4, 1), ("b", 1, 4))
        ]
    else:
        four = tmp_path / "four.jsonl"
        write_jsonl([{"messages": m} for m in SFT_CONVERSATIONS * 2], four)
        runs = [
            train_sft(
                SFTConfig(
                    model=tiny_model,
                    data=str(four),
                    output_dir=str(tmp_path / name),
                    max_steps=1,
                    batch_size=b,
                    grad_accum=g,
                    learning_rate=1e-3,
                    seed=0,
                )
            )
            for name, b, g in (("a", 4, 1), ("b", 1, 4))
        ]
    a, b = (weights(r.output_dir) for r in runs)
    start = weights(tiny_model)
    for name in a:
        assert not torch.equal(a[name], start[name]), name
        torch.testing.assert_close(a[name], b[name], atol=2e-6, rtol=1e-5)
    assert runs[0].log_history[0]["loss"] == pytest.approx(runs[1].log_history[0]["loss"], rel=1e-5)


def test_resume_continues_from_the_last_checkpoint(tiny_model, pairs_dir, tmp_path):
    first = train_dpo(tiny_dpo(tiny_model, pairs_dir, tmp_path, max_steps=2, save_steps=1))
    assert first.global_step == 2 and (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    resumed = train_dpo(tiny_dpo(tiny_model, pairs_dir, tmp_path, max_steps=3, save_steps=1))
    assert resumed.global_step == 3
    # Only step 3 ran in the second call; steps 1-2 come from the checkpoint's history.
    assert [h["step"] for h in resumed.log_history if "loss" in h] == [1, 2, 3]


def test_bf16_trains(tiny_model, pairs_dir, tmp_path):
    result = train_dpo(tiny_dpo(tiny_model, pairs_dir, tmp_path, bf16=True, max_steps=2))
    assert all(math.isfinite(h["loss"]) for h in result.log_history if "loss" in h)


def test_cli_trains_and_reports_config_errors(tiny_model, pairs_dir, tmp_path, capsys):
    from cai.cli import main

    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"model: {tiny_model}\ndata: {pairs_dir}\noutput_dir: {tmp_path / 'out'}\n"
        "batch_size: 4\nlogging_steps: 1\n"
    )
    assert main(["train", "dpo", "--config", str(config), "--set", "max_steps=1"]) == 0
    assert "after 1 steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    config.write_text(config.read_text() + "betta: 0.2\n")
    assert main(["train", "dpo", "--config", str(config)]) == 1
    assert f"{config}:6: betta: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(tiny_model, tmp_path):
    """DDP on the CPU (gloo): 2 processes × 1 pair per step log the same losses as 1 process ×
    2 pairs. Step 1 is log 2 either way; step 2 follows the first (all-reduced) update."""
    data = tmp_path / "pairs.jsonl"
    write_jsonl(pair_records(PAIRS[:2]), data)
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            from cai.train.dpo import DPOConfig, train_dpo
            out, batch = sys.argv[1], int(sys.argv[2])
            result = train_dpo(DPOConfig(
                model={tiny_model!r}, data={str(data)!r}, output_dir=out, max_steps=2,
                batch_size=batch, learning_rate=1e-2, logging_steps=1, seed=0))
            losses = [h["loss"] for h in result.log_history if "loss" in h]
            json.dump(losses, open(out + ".losses.json", "w"))
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(script), str(single), "2"], check=True, env=env)
    double = tmp_path / "double"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    subprocess.run(
        [*torchrun, "--master_port", port, str(script), str(double), "1"], check=True, env=env
    )
    one = json.loads(Path(f"{single}.losses.json").read_text())
    two = json.loads(Path(f"{double}.losses.json").read_text())
    assert one[0] == pytest.approx(math.log(2), abs=1e-5)
    assert two == pytest.approx(one, abs=1e-5)
    assert one[1] != pytest.approx(one[0], abs=1e-4)


# --- behaviour on the real model -----------------------------------------------------------------


@pytest.mark.slow
def test_dpo_learns_the_pairs_and_changes_every_trained_weight(model_path, pairs_dir, tmp_path):
    """12 DPO steps (LoRA) on 8 clear-cut pairs: reward accuracy on them rises from 0 (policy ==
    reference) above 0.8; every adapted weight of the saved (merged) model changed, the rest not."""
    result = train_dpo(
        DPOConfig(
            data=pairs_dir,
            eval_data=pairs_dir,
            output_dir=str(tmp_path),
            max_steps=12,
            batch_size=4,
            learning_rate=5e-4,
            logging_steps=5,
            lora=LoraOptions(r=8, alpha=16, dropout=0.0),
        )
    )
    assert result.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.log_history[0]["rewards/accuracies"] == 0.0
    assert result.metrics["eval_rewards/accuracies"] > 0.8
    assert result.metrics["eval_rewards/margins"] > 0
    before, after = weights(model_path), weights(result.output_dir)
    linear = ("_proj.weight",)
    for name, value in before.items():
        if name.endswith(linear):
            assert not torch.equal(value, after[name]), f"{name} did not change"
        else:
            assert torch.equal(value, after[name]), f"{name} changed but is not trained"


@pytest.mark.slow
def test_sft_lowers_the_loss_and_the_engine_loads_the_output(model_path, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.engine import Sampling, create_engine
    from cai.train.sft import SFTCollator

    result = train_sft(
        SFTConfig(
            data=sft_file,
            output_dir=str(tmp_path),
            max_steps=4,
            batch_size=2,
            learning_rate=1e-3,
            logging_steps=1,
            lora=LoraOptions(r=8, alpha=16, dropout=0.0),
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, _ = tokenize_all(tokenizer, load_conversations(sft_file), 512)
    batch = SFTCollator(tokenizer.pad_token_id)(examples)

    def loss(folder: str) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            return model(**batch).loss.item()

    before, after = loss(model_path), loss(result.output_dir)
    assert after < before - 0.1
    engine = create_engine("hf", model=result.output_dir, dtype="float32")
    try:
        (completion,) = engine.generate(
            [[SYSTEM, {"role": "user", "content": "Say hello."}]], Sampling(max_tokens=4)
        )
    finally:
        engine.close()
    assert completion.ok and completion.text


def test_lora_adapters_start_from_the_seed_not_from_the_process_state(tiny_model):
    # DPO and SFT added their adapters before anything was seeded: the same data and settings
    # trained other weights in another process. Now the adapters start from the config's seed.
    import torch
    from transformers import AutoModelForCausalLM

    from cai.train import LoraOptions, add_lora

    def adapters(drawn: int, seed: int) -> dict:
        torch.manual_seed(drawn)  # whatever the process drew before
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        model = add_lora(model, LoraOptions(r=4, alpha=8), False, seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, again, other = adapters(1, seed=7), adapters(2, seed=7), adapters(1, seed=8)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
