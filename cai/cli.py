"""The ``cai`` command.

    cai constitution check FILE...        validate constitutions (paths or shipped names)
    cai constitution show FILE            list a constitution's principles and exemplars
    cai constitution convert --anthropic CritiqueRevisionInstructions.json
        [--judge RLMadisonInstructions.json] -o OUT.yaml
    cai constitution convert --huggingface constitution.json -o OUT.yaml
    cai train sft --config FILE [--set key=value ...]   supervised fine-tuning (cai.train.sft)
    cai train dpo --config FILE [--set key=value ...]   preference training (cai.train.dpo)
    cai train reward --config FILE [--set key=value ...]  a Bradley-Terry reward model
    cai train grpo --config FILE [--set key=value ...]  GRPO with the judge as the reward
    cai judge eval --data FILE [--model SPEC] [--backend B] [--constitution NAME] [--limit N]
        [--ensemble K] [--cot]            the judge's agreement with labelled preference pairs
    cai judge label --data FILE --out DIR [judge options]   label pairs: TRL preference records
    cai serve [--model SPEC] [--reward-model DIR] [--host H] [--port P] [--api-key KEY]
                                          the judge as an HTTP reward service (cai.serve.service)
    cai eval --model NAME=SPEC [--model NAME=SPEC ...] [--config FILE] [--out DIR]
                                          models side by side on held-out prompts (cai.eval.run)
    cai report RUN_DIR                    report.md / report.html of a pipeline run (cai.report.sections)

Each command group is added by one small ``add_<group>`` function that registers its
subcommands; the handler set with ``set_defaults(run=...)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai.config import ConfigError, from_data, load_yaml, set_dotted
from cai.constitution import (
    Constitution,
    Message,
    check_pointwise,
    dump_constitution,
    from_anthropic,
    from_huggingface,
    load_constitution,
)
from cai.data import DataError, check_limit
from cai.engine import BACKENDS, Engine, create_engine
from cai.exit_codes import SYSTEM, os_error_line
from cai.judge.agreement import side_by_side
from cai.judge.generative import GenerativeJudge
from cai.judge.judge import Judge
from cai.judge.pointwise import DEFAULT_LENGTH_COEF, fit_length_coef
from cai.judge.settings import CALIBRATIONS, MODES
from cai.layout import DATA_FILE, DATASET, EVAL_RESULTS, STAGES, RunLayout
from cai.models import DEFAULT_MODEL
from cai.pairs import LabelledPair, load_pairs
from cai.store import RunStoreError


class _NoEngine(Engine):
    """Stands in for the model while judge settings are checked, before the model loads."""

    backend, model_name = "none", "none"

    def generate(self, *args: Any, **kwargs: Any) -> list:
        raise RuntimeError("no engine: settings check only")

    score = generate


def _summary(c: Constitution) -> str:
    examples = len(c.critique_examples) + len(c.judge_examples)
    return (
        f"{c.name} ({len(c.principles)} principles, {len(c.judge_principles)} judge questions, "
        f"{sum(p.score_question is not None for p in c.principles)} score questions, "
        f"{examples} examples)"
    )


def _constitution_check(args: argparse.Namespace) -> int:
    failed = False
    for file in args.files:
        try:
            c = load_constitution(file)
            if args.pointwise:
                check_pointwise(c)
        except (ConfigError, FileNotFoundError) as e:
            for problem in str(e).splitlines():
                print(f"error: {problem}", file=sys.stderr)
            failed = True
        else:
            print(f"ok: {_summary(c)}")
    return 1 if failed else 0


def _wrap(text: str, indent: str) -> str:
    lines = [
        textwrap.fill(part, width=100, initial_indent=indent, subsequent_indent=indent)
        if part.strip()
        else ""
        for part in text.splitlines()
    ]
    return "\n".join(lines)


def _turns(conversation: tuple[Message, ...], indent: str) -> list[str]:
    return [_wrap(f"{turn.role}: {turn.content}", indent) for turn in conversation]


def _constitution_show(args: argparse.Namespace) -> int:
    try:
        c = load_constitution(args.file)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = [f"{c.name} (version {c.version})", _wrap(c.description, "  ")]
    if c.system_prompt is not None:
        out += ["", "system prompt:", _wrap(c.system_prompt, "  ")]
    out += [
        "",
        f"principles ({len(c.principles)}, {len(c.judge_principles)} with judge questions):",
    ]
    for p in c.principles:
        tags = ", ".join(p.tags)
        out.append(f"  {p.id}  weight {p.weight:g}" + (f"  [{tags}]" if tags else ""))
        for label, text in (("critique", p.critique), ("revision", p.revision), ("judge", p.judge)):
            if text is not None:
                out.append(_wrap(f"{label}: {text}", "    "))
    out += ["", f"critique examples ({len(c.critique_examples)}):"]
    for i, ex in enumerate(c.critique_examples, 1):
        out.append(f"  {i}. principle {ex.principle}")
        out += _turns(ex.conversation, "    ")
        out += [
            _wrap(f"critique: {ex.critique}", "    "),
            _wrap(f"revision: {ex.revision}", "    "),
        ]
    out += ["", f"judge examples ({len(c.judge_examples)}):"]
    for i, ex in enumerate(c.judge_examples, 1):
        out.append(
            f"  {i}. principle {ex.principle or '(the question asked)'}, better: {ex.better}"
        )
        out += _turns(ex.conversation, "    ")
        out += [_wrap(f"(A) {ex.response_a}", "    "), _wrap(f"(B) {ex.response_b}", "    ")]
    print("\n".join(out))
    return 0


def _constitution_convert(args: argparse.Namespace) -> int:
    if args.judge is not None and args.anthropic is None:
        print("error: --judge goes with --anthropic", file=sys.stderr)
        return 1
    try:
        if args.anthropic is not None:
            c = from_anthropic(args.anthropic, args.judge)
        else:
            c = from_huggingface(args.huggingface)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        Path(args.output).write_text(dump_constitution(c), encoding="utf-8")
    except OSError as e:
        print(f"error: {args.output}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {_summary(c)}")
    return 0


def add_constitution(commands: argparse._SubParsersAction) -> None:
    """``cai constitution check | show | convert``."""
    group = commands.add_parser("constitution", help="check, show and convert constitutions")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    check = sub.add_parser("check", help="validate constitution files (paths or shipped names)")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument(
        "--pointwise",
        action="store_true",
        help="also require a score_question on every judge principle (the pointwise judge)",
    )
    check.set_defaults(run=_constitution_check)

    show = sub.add_parser("show", help="list a constitution's principles and exemplars")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(run=_constitution_show)

    convert = sub.add_parser(
        "convert", help="convert Anthropic's or Hugging Face's constitution JSON to YAML"
    )
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--anthropic", metavar="CR.json", help="CritiqueRevisionInstructions.json layout"
    )
    source.add_argument(
        "--huggingface", metavar="FILE", help='{"constitutions": ..., "system_chat": ...} layout'
    )
    convert.add_argument(
        "--judge", metavar="RL.json", help="with --anthropic: RLMadisonInstructions.json layout"
    )
    convert.add_argument("-o", "--output", required=True, metavar="OUT.yaml")
    convert.set_defaults(run=_constitution_convert)


_JUDGE_COLUMNS = [
    ("accuracy", "accuracy"),
    ("shorter better", "accuracy_shorter_better"),
    ("first order", "accuracy_first_order"),
    ("consistent", "consistent"),
    ("Brier", "brier"),
    ("ECE", "ece"),
    ("longer wins", "longer_wins"),
    ("errors", "errors"),
    ("pairs/s", "pairs_per_s"),
]


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _judge_table(result: dict) -> str:
    """The human-readable summary of ``cai.judge.agreement.side_by_side``'s result: a row per
    judge variant; per category, each variant's accuracy."""
    lines = [
        f"judge eval: {result['pairs']} pairs ({result['shorter_better']} with the shorter "
        f"response better), {result['model']} ({result['backend']}), constitution "
        f"{result['constitution']}, ensemble {result['ensemble']}",
        "",
        f"{'':<26}" + "".join(f"{label:>15}" for label, _ in _JUDGE_COLUMNS),
    ]
    for name, row in result["modes"].items():
        row = {**row, "longer_wins": (row.get("length_bias") or {}).get("longer_wins")}
        lines.append(f"{name:<26}" + "".join(f"{_cell(row.get(k)):>15}" for _, k in _JUDGE_COLUMNS))
    by = result.get("by_category")
    if by:
        names = [n for n in result["modes"] if n != "generative"]
        lines += [
            "",
            "accuracy by category",
            f"{'':<26}{'pairs':>8}" + "".join(f"{n:>22}" for n in names),
        ]
        for category, row in by.items():
            lines.append(
                f"{category:<26}{row['pairs']:>8}" + "".join(f"{_cell(row[n]):>22}" for n in names)
            )
    return "\n".join(lines)


def _list(text: str, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if not items or bad:
        raise ValueError(f"{flag}: expected a comma-separated list of {', '.join(allowed or ())}")
    return items


def _principles(args: argparse.Namespace) -> list[str] | None:
    return None if args.principles is None else _list(args.principles, None, "--principles")


def _judge_variants(args: argparse.Namespace) -> dict[str, Callable[[Any], Judge]]:
    """Variant name → a Judge builder on a given engine, from --mode, --calibration and
    --length-coef (calibration applies to the pairwise mode, length control to the pointwise)."""
    modes = _list(args.mode, MODES, "--mode")
    calibrations = _list(args.calibration, CALIBRATIONS, "--calibration")
    try:
        coefs = [float(c) for c in _list(args.length_coef, None, "--length-coef")]
    except ValueError:
        raise ValueError("--length-coef: expected a comma-separated list of numbers") from None
    common = {
        "ensemble": args.ensemble,
        "seed": args.seed,
        "few_shot": not args.zero_shot,
        "principles": _principles(args),
    }
    variants: dict[str, Callable[[Any], Judge]] = {}
    constitution = load_constitution(args.constitution)
    for mode in modes:
        if mode == "pairwise":
            for cal in calibrations:
                name = (
                    "pairwise" + ("" if cal == "none" else f"+{cal}") + (" cot" if args.cot else "")
                )
                variants[name] = lambda e, cal=cal: Judge(
                    e, constitution, calibration=cal, cot=args.cot, **common
                )
        else:
            for coef in coefs:
                name = "pointwise" + (f" lc={coef:g}" if coef else "")
                variants[name] = lambda e, coef=coef: Judge(
                    e,
                    constitution,
                    mode="pointwise",
                    length_coef=coef,
                    temperature=args.temperature,
                    **common,
                )
    for build in variants.values():  # refuse bad settings before the model loads
        build(_NoEngine()).close()
    return variants


CHARS_PER_TOKEN_BOUND = 16
"""Text longer than this many characters per token of context is refused from its length
alone: no tokenizer's tokens run that long on average, and tokenizing 40 MB takes gigabytes."""


def _check_pair_lengths(pairs: list[LabelledPair], spec: str | None, backend: str) -> None:
    """Refuse, before the judge's model loads, a pair whose prompt and two responses together
    exceed the model's context in tokens: the judge shows both responses in one prompt, so such
    a pair could never be judged. An OpenAI-compatible server's model is checked by the server."""
    if backend == "openai":
        return
    from transformers import AutoConfig, AutoTokenizer

    from cai.models import resolve_model

    path = resolve_model(spec).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or 2048
    for pair in pairs:
        texts = [m["content"] for m in pair.prompt] + [pair.chosen, pair.rejected]
        chars = sum(len(t) for t in texts)
        if chars > CHARS_PER_TOKEN_BOUND * context:
            size = f"{chars:,} characters"
        else:
            tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
            if tokens <= context:
                continue
            size = f"{tokens:,} tokens"
        raise DataError(
            f"{pair.source}: the prompt and both responses are {size}, more than the judge "
            f"model's context of {context:,} tokens (the judge reads both in one prompt); "
            "shorten or remove the pair"
        )


def _add_judge_common(parser: argparse.ArgumentParser, constitution: str) -> None:
    """The judge options every judge command takes (the mode-specific ones come after)."""
    parser.add_argument(
        "--model", default=None, metavar="SPEC", help="judge model spec (default: smollm2-135m)"
    )
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument(
        "--dtype", default=None, help="engine dtype (hf, vllm): auto, float32, bfloat16, ..."
    )
    parser.add_argument(
        "--constitution",
        default=constitution,
        metavar="NAME",
        help=f"shipped name or path (default {constitution})",
    )
    parser.add_argument("--zero-shot", action="store_true", help="no exemplars in the prompts")
    parser.add_argument(
        "--principles", metavar="ID,...", help="ask only these principles (default: all)"
    )
    parser.add_argument(
        "--ensemble", type=int, default=1, metavar="K", help="principles averaged per pair"
    )
    parser.add_argument(
        "--cot", action="store_true", help="pairwise: chain-of-thought, clamped probabilities"
    )
    parser.add_argument("--seed", type=int, default=0, help="the judge's seed (principle draws)")


def add_judge_options(parser: argparse.ArgumentParser, *, constitution: str = "harmless") -> None:
    """The options that build one judge (``judge_from_args``), shared by the judge commands."""
    _add_judge_common(parser, constitution)
    parser.add_argument(
        "--mode",
        default="pairwise",
        choices=MODES,
        help="pairwise (both responses, both orders) or pointwise (each response scored alone)",
    )
    parser.add_argument(
        "--calibration", default="none", choices=CALIBRATIONS, help="pairwise: option-bias fix"
    )
    parser.add_argument(
        "--length-coef", type=float, default=0.0, help="pointwise: score less this × ln(chars)"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="pointwise: p = sigmoid(score diff / T)"
    )


def judge_from_args(args: argparse.Namespace) -> Judge:
    """The judge the command line asks for (``add_judge_options``); the one place a command
    builds it."""
    return Judge(
        args.model,
        args.constitution,
        backend=args.backend,
        engine_options={"dtype": args.dtype} if args.dtype else None,
        mode=args.mode,
        calibration=args.calibration,
        length_coef=args.length_coef,
        temperature=args.temperature,
        few_shot=not args.zero_shot,
        principles=_principles(args),
        ensemble=args.ensemble,
        seed=args.seed,
        cot=args.cot,
    )


def _pairs_and_judge(args: argparse.Namespace) -> tuple[list[LabelledPair], Judge]:
    """``--data`` (the first ``--limit`` pairs) and the judge, for ``cai judge label``."""
    check_limit(args.limit, "--limit")
    pairs = load_pairs(args.data, limit=args.limit)
    _check_pair_lengths(pairs, args.model, args.backend)
    return pairs, judge_from_args(args)


def _judge_eval(args: argparse.Namespace) -> int:
    try:
        check_limit(args.limit, "--limit")
        pairs = load_pairs(args.data, limit=args.limit)
        _check_pair_lengths(pairs, args.model, args.backend)
        variants = _judge_variants(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    options = {"dtype": args.dtype} if args.dtype else {}
    with create_engine(args.backend, model=args.model, **options) as engine:
        constitution = load_constitution(args.constitution)
        result = side_by_side(
            variants,
            engine,
            [(p.prompt, p.chosen, p.rejected) for p in pairs],
            categories=[p.meta.get("category") for p in pairs],
            generative=(lambda e: GenerativeJudge(e, constitution, seed=args.seed))
            if args.generative
            else None,
            progress=True,
        )
    scores = result.pop("pair_scores")
    result.update(constitution=args.constitution, ensemble=args.ensemble)
    print(_judge_table(result))
    if args.fit_length:
        fitted = {}
        for name, per_pair in scores.items():
            if name.startswith("pointwise") and " lc=" not in name:
                flat = [
                    (s, t)
                    for p, ss in zip(pairs, per_pair, strict=True)
                    if ss
                    for s, t in zip(ss, (p.chosen, p.rejected), strict=True)
                ]
                fitted[name] = fit_length_coef([s for s, _ in flat], [t for _, t in flat])
        result["fitted_length_coef"] = fitted
        for name, coef in fitted.items():
            print(f"{name}: length_coef fitted on these pairs = {coef:.4f}")
    print(json.dumps({"command": "judge eval", "data": str(args.data), **result}))
    return 0


def _judge_label(args: argparse.Namespace) -> int:
    from cai.judge.label import label_pairs

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        pairs, judge = _pairs_and_judge(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with judge:
        try:
            result = label_pairs(
                judge,
                pairs,
                args.out,
                model=args.model or DEFAULT_MODEL,
                batch_size=args.batch_size,
            )
        except (DataError, RunStoreError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    tally = result.tally
    print(
        f"judge label: {result.pairs} pairs ({tally.done_before} labelled before), "
        f"{result.exported} exported to {result.out / DATA_FILE}, {result.ties} ties, "
        f"{result.errors} errors"
    )
    if result.errors:
        print(
            f"error: {result.errors} pairs failed (see {RunLayout(result.out).stage('label')}); "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def add_judge(commands: argparse._SubParsersAction) -> None:
    """``cai judge eval | label``."""
    group = commands.add_parser("judge", help="evaluate the AI-feedback judge, label pairs")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    ev = sub.add_parser(
        "eval",
        help="agreement with labelled preference pairs, every judge mode side by side",
        description="Judge labelled pairs (the better response shown first in every other "
        "pair) with each judge variant on one loaded model, beside the 'longer wins' baseline "
        "and the naive generative judge; print a table, then one JSON line.",
    )
    ev.add_argument(
        "--data", required=True, metavar="FILE", help="preference pairs (cai.pairs.load_pairs)"
    )
    _add_judge_common(ev, "hhh")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="judge the first N pairs")
    ev.add_argument(
        "--mode", default="pairwise,pointwise", metavar="M,...", help="pairwise, pointwise or both"
    )
    ev.add_argument(
        "--calibration",
        default="none",
        metavar="C,...",
        help="pairwise: none, batch, contextual (a comma-separated list runs each)",
    )
    ev.add_argument(
        "--length-coef",
        default=f"0,{DEFAULT_LENGTH_COEF:g}",
        metavar="X,...",
        help="pointwise: length control coefficients to run (0: none)",
    )
    ev.add_argument(
        "--temperature", type=float, default=1.0, help="pointwise: p = sigmoid(score diff / T)"
    )
    ev.add_argument(
        "--fit-length",
        action="store_true",
        help="print the pointwise length_coef fitted on these pairs (use a length-balanced set)",
    )
    ev.add_argument(
        "--no-generative",
        dest="generative",
        action="store_false",
        help="leave out the naive generative judge (the slowest row)",
    )
    ev.set_defaults(run=_judge_eval)

    label = sub.add_parser(
        "label",
        help="label a file of response pairs: TRL preference records with p_chosen (resumable)",
        description="Judge each pair of a file (the formats `cai judge eval` reads; its "
        "chosen/rejected are only the two responses) and export the decided pairs in TRL's "
        "preference format with p_chosen. Records go to OUT/stages/label.jsonl as they are "
        "judged: run the same command again to resume or to retry failed pairs.",
    )
    label.add_argument("--data", required=True, metavar="FILE", help="pairs (cai.pairs.load_pairs)")
    label.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help=f"OUT/{DATA_FILE}, OUT/{DATASET}/, OUT/{STAGES}/",
    )
    add_judge_options(label)
    label.add_argument("--limit", type=int, default=None, metavar="N", help="the first N pairs")
    label.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="pairs per engine call (and write)"
    )
    label.set_defaults(run=_judge_label)


def _serve(args: argparse.Namespace) -> int:
    from cai.serve.app import serve
    from cai.serve.protocol import ServeOptions, check_options
    from cai.serve.service import Service

    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_items=args.max_items,
        max_body_bytes=int(args.max_body_mb * 2**20),
        api_key=args.api_key or None,
        against=args.against,
        num_generations=args.num_generations,
        centered=args.centered,
        mode=args.mode,
    )
    # The judge is served unless only a reward model is asked for.
    with_judge = args.model is not None or args.reward_model is None
    judge = reward_model = None
    try:
        check_options(options, judge=with_judge, reward_model=args.reward_model is not None)
        if with_judge:
            judge = judge_from_args(args)
        if args.reward_model is not None:
            from cai.rewards.model import RewardModel

            reward_model = RewardModel(args.reward_model)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        for loaded in (judge, reward_model):
            if loaded is not None:
                loaded.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    service = Service(judge, reward_model, options, reward_model_name=args.reward_model)
    if args.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        print(
            f"warning: serving on {args.host} without --api-key: whoever reaches this port can "
            "use the models; keep it on a private network",
            file=sys.stderr,
        )
    described = ", ".join(f"{k} {v}" for k, v in service.describe().items() if v is not None)
    print(
        f"cai serve: http://{args.host}:{args.port} ({described}); SIGTERM or Ctrl-C drains and stops",
        flush=True,
    )
    serve(service, args.host, args.port)
    return 0


def add_serve(commands: argparse._SubParsersAction) -> None:
    """``cai serve``."""
    serve = commands.add_parser(
        "serve",
        help="the judge and/or a reward model as an HTTP reward service for RL trainers",
        description="Load the judge (--model) and/or a trained reward model (--reward-model) "
        "once and serve /get_reward (OpenRLHF), /v1/reward (cai.rewards.RemoteReward), "
        "/v1/judge, /health and /metrics, batching all clients' requests together.",
    )
    add_judge_options(serve)
    serve.add_argument(
        "--reward-model", metavar="DIR", help="a `cai train reward` model (with or without --model)"
    )
    serve.add_argument(
        "--against",
        choices=("group", "reference", "score"),
        help="/get_reward's reward, and /v1/reward's default: against the prompt's group, "
        "against the reference (OpenRLHF's labels), or the reward model's raw score "
        "(default: reference with a judge, else score)",
    )
    serve.add_argument(
        "--num-generations", type=int, metavar="G", help="group size, with --against group"
    )
    serve.add_argument("--centered", action="store_true", help="rewards 2p - 1 in [-1, 1]")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("CAI_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $CAI_API_KEY, which ps does not show)",
    )
    serve.add_argument(
        "--max-batch", type=int, default=64, metavar="N", help="items per engine call"
    )
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, metavar="MS", help="wait for more items this long"
    )
    serve.add_argument(
        "--max-items", type=int, default=4096, metavar="N", help="items per request (else 413)"
    )
    serve.add_argument(
        "--max-queue", type=int, default=65536, metavar="N", help="items queued (else 503)"
    )
    serve.add_argument(
        "--max-body-mb", type=float, default=16.0, metavar="MB", help="request body (else 413)"
    )
    serve.set_defaults(run=_serve)


def _train(args: argparse.Namespace) -> int:
    # Imported here: the trainers load transformers' Trainer, which other commands do not need.
    if args.action == "sft":
        from cai.train.sft import SFTConfig as Config
        from cai.train.sft import train_sft as train
    elif args.action == "reward":
        from cai.train.reward import RewardConfig as Config
        from cai.train.reward import train_reward as train
    elif args.action == "grpo":
        from cai.train.grpo import GRPOConfig as Config
        from cai.train.grpo import train_grpo as train
    else:
        from cai.train.dpo import DPOConfig as Config
        from cai.train.dpo import train_dpo as train
    try:
        data = load_yaml(args.config)
        for assignment in args.set:
            set_dotted(data, assignment)
        config = from_data(Config, data, source=args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        result = train(config)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    print(f"saved {result.output_dir} after {result.global_step} steps")
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    if result.data.truncated or result.data.dropped:
        print(
            f"  {result.data.truncated} of {result.data.examples} examples truncated "
            f"({result.data.truncated_tokens} tokens cut), {result.data.dropped} dropped"
        )
    return 0


def _add_set(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field (value parsed as YAML), e.g. --set {example}",
    )


def add_train(commands: argparse._SubParsersAction) -> None:
    """``cai train sft | dpo | reward | grpo``."""
    group = commands.add_parser(
        "train", help="the built-in SFT, DPO, reward-model and GRPO trainers"
    )
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help in (
        ("sft", "supervised fine-tuning on the assistant turns of conversations"),
        ("dpo", "preference training on pairs (dpo, soft_dpo, ipo, hinge, kto, orpo, simpo)"),
        ("reward", "a Bradley-Terry reward model on pairs, with held-out accuracy"),
        ("grpo", "GRPO on prompts, the constitution judge's group-wise win rate as the reward"),
    ):
        command = sub.add_parser(name, help=help)
        command.add_argument("--config", required=True, metavar="FILE", help="trainer YAML")
        _add_set(command, "max_steps=10")
        command.set_defaults(run=_train)


def _eval(args: argparse.Namespace) -> int:
    from cai.eval.config import EvalConfig
    from cai.eval.run import run_eval, summary_line, table

    try:
        check_limit(args.limit, "--limit")
        data = load_yaml(args.config) if args.config else {}
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: an eval config is a mapping (models, sets, ...)")
        models = dict(data.get("models") or {})
        for item in args.model:
            name, sep, spec = item.partition("=")
            if not sep or not name.strip() or not spec.strip():
                raise ConfigError(f"--model {item!r}: expected NAME=SPEC, e.g. base=smollm2-135m")
            models[name.strip()] = spec.strip()
        data["models"] = models
        for option in ("baseline", "judge_model", "backend", "dtype"):
            if getattr(args, option) is not None:
                data[option] = getattr(args, option)
        for assignment in args.set:
            set_dotted(data, assignment)
        config = from_data(EvalConfig, data, source=args.config or "cai eval")
        results = run_eval(config, args.out, limit=args.limit)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(results))
    print(f"results: {Path(args.out) / EVAL_RESULTS}")
    print(summary_line(results))
    return 0


def add_eval(commands: argparse._SubParsersAction) -> None:
    """``cai eval``."""
    ev = commands.add_parser(
        "eval",
        help="compare models on held-out prompts: win rate, harmlessness, over-refusal, ...",
    )
    ev.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a model to evaluate (repeat; the first is the baseline unless --baseline)",
    )
    ev.add_argument("--config", metavar="FILE", help="an EvalConfig YAML (models, sets, ...)")
    ev.add_argument("--baseline", help="name of the model the others are compared with")
    ev.add_argument("--judge-model", dest="judge_model", metavar="SPEC", help="judge and graders")
    ev.add_argument("--backend", choices=BACKENDS, help="engine backend (default auto)")
    ev.add_argument("--dtype", help="engine dtype (float32, bfloat16, ...)")
    ev.add_argument("--limit", type=int, metavar="N", help="at most N prompts per set")
    ev.add_argument("--out", default="runs/eval", metavar="DIR", help="results (and records)")
    _add_set(ev, "max_tokens=64")
    ev.set_defaults(run=_eval)


def _report(args: argparse.Namespace) -> int:
    from cai.report.sections import ReportError, write_report

    try:
        html = write_report(args.run_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {html} and {html.with_suffix('.md')} (plots in {html.parent / 'report'})")
    return 0


def add_report(commands: argparse._SubParsersAction) -> None:
    """``cai report``."""
    report = commands.add_parser(
        "report",
        help=f"write {RunLayout(Path()).report_md} / {RunLayout(Path()).report_html} of a run",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline run directory")
    report.set_defaults(run=_report)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_constitution,
    add_judge,
    add_train,
    add_eval,
    add_report,
    add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``cai`` parser with every command group of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="cai", description="Constitutional AI / RLAIF: critique, revise, judge, train."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cai`` with ``argv`` (default: the command line); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the usage or --help; its 2 for bad arguments
        return 0 if e.code in (0, None) else 1  # is a command failing on its input: 1
    try:
        return args.run(args)
    except OSError as e:  # a full disk, a denied permission, a refused connection: not the input
        print(os_error_line(e), file=sys.stderr)
        return SYSTEM


if __name__ == "__main__":
    sys.exit(main())
