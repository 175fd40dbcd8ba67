"""``cai judge eval | label``: a judge against labelled pairs, and labelling a file of pairs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cai.config import ConfigError
from cai.constitution import (
    load_constitution,
)
from cai.data import DataError, check_limit
from cai.engine import BACKENDS, create_engine
from cai.judge.agreement import side_by_side
from cai.judge.generative import GenerativeJudge
from cai.judge.judge import Judge
from cai.judge.pointwise import DEFAULT_LENGTH_COEF, fit_length_coef
from cai.judge.routing import VERDICTS, InputGuard
from cai.judge.settings import CALIBRATIONS, MODES, JudgeSettings
from cai.layout import DATA_FILE, DATASET, STAGES, RunLayout
from cai.models import DEFAULT_MODEL
from cai.pairs import LabelledPair, load_pairs
from cai.prompts import JUDGE_ANSWER_PREFIX
from cai.store import RunStoreError

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


def _width(name: str) -> int:
    """A per-category column's width: 22, or its name's and two spaces (a routed variant's)."""
    return max(22, len(name) + 2)


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
            f"{'':<26}{'pairs':>8}" + "".join(f"{n:>{_width(n)}}" for n in names),
        ]
        for category, row in by.items():
            lines.append(
                f"{category:<26}{row['pairs']:>8}"
                + "".join(f"{_cell(row[n]):>{_width(n)}}" for n in names)
            )
    guard = result.get("guard")
    if guard:
        shares = ", ".join(f"{c} {_cell(v)}" for c, v in guard.get("by_category", {}).items())
        lines += [
            "",
            f"routing guard {guard['folder']}: {_cell(guard['flagged'])} of the prompts flagged"
            + (f" ({shares})" if shares else ""),
        ]
    return "\n".join(lines)


def _list(text: str, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if not items or bad:
        raise ValueError(f"{flag}: expected a comma-separated list of {', '.join(allowed or ())}")
    return items


def _principles(args: argparse.Namespace) -> list[str] | None:
    return None if args.principles is None else _list(args.principles, None, "--principles")


def _route(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """``--route restricted=ID,... --route permitted=ID,...`` as JudgeSettings' ``route``."""
    given = getattr(args, "route", None)
    if not given:
        return None
    route: dict[str, list[str]] = {}
    for text in given:
        verdict, sep, ids = text.partition("=")
        verdict = verdict.strip()
        if not sep or verdict not in VERDICTS:
            raise ValueError(
                f"--route: expected VERDICT=ID[,ID...] with VERDICT one of {', '.join(VERDICTS)}, "
                f"got {text!r}"
            )
        if verdict in route:
            raise ValueError(f"--route: {verdict} given twice")
        route[verdict] = _list(ids, None, f"--route {verdict}")
    return route


def load_guard(folder: str) -> InputGuard:
    """The routing classifier, loaded when a routed judge needs its first verdict (torch is
    imported then, not when the command starts)."""
    from cai.classify import Guard

    return Guard(folder)


def _routing(args: argparse.Namespace) -> dict[str, Any]:
    """The routing fields of JudgeSettings from ``--guard`` and ``--route`` (none: no routing).
    ``cai serve``'s ``--guard`` lists the served classifiers: the input one among them routes."""
    route, guard = _route(args), getattr(args, "guard", None)
    if isinstance(guard, list):  # cai serve: route with its input classifier, if asked
        guard = _input_folder(guard) if route is not None else None
    if guard is None and route is None:
        return {}
    return {"guard": guard, "route": route, "load_guard": load_guard}


def _input_folder(folders: list[str]) -> str | None:
    """The folder of an input classifier among ``folders`` (None: none is one)."""
    from cai.layout import CLASSIFIER_FILE

    for folder in folders:
        try:
            info = json.loads((Path(folder) / CLASSIFIER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("kind") == "input":
            return folder
    raise ValueError("--route: none of the --guard folders is an input classifier")


def _judge_variants(args: argparse.Namespace) -> dict[str, JudgeSettings]:
    """Variant name → its judge settings (checked, no model loaded), from --mode, --calibration
    and --length-coef (calibration applies to the pairwise mode, length control to the
    pointwise)."""
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
    variants: dict[str, JudgeSettings] = {}
    constitution = load_constitution(args.constitution)
    routing = _routing(args)
    for mode in modes:
        if mode == "pairwise":
            for cal in calibrations:
                name = (
                    "pairwise" + ("" if cal == "none" else f"+{cal}") + (" cot" if args.cot else "")
                )
                variants[name] = flag_settings(
                    constitution, calibration=cal, cot=args.cot, **common
                )
        else:
            for coef in coefs:
                name = "pointwise" + (f" lc={coef:g}" if coef else "")
                variants[name] = flag_settings(
                    constitution,
                    mode="pointwise",
                    length_coef=coef,
                    temperature=args.temperature,
                    **common,
                )
    if routing:  # each variant beside its routed twin (route in place of --principles)
        for name, settings in list(variants.items()):
            fields = {f: getattr(settings, f) for f in ROUTED_FROM}
            variants[f"{name} routed"] = flag_settings(
                constitution, **{**fields, "principles": None, **routing}
            )
    return variants


ROUTED_FROM = (
    "mode",
    "calibration",
    "cot",
    "length_coef",
    "temperature",
    "ensemble",
    "seed",
    "few_shot",
)
"""The settings a routed variant of ``cai judge eval`` takes from its unrouted twin."""


CHARS_PER_TOKEN_BOUND = 16
"""Text longer than this many characters per token of context is refused from its length
alone: no tokenizer's tokens run that long on average, and tokenizing 40 MB takes gigabytes."""


def _check_pair_lengths(
    pairs: list[LabelledPair],
    spec: str | None,
    backend: str,
    judge: JudgeSettings | None = None,
) -> None:
    """Refuse, before the judge's model loads, a pair whose prompt and two responses together
    exceed the model's context in tokens: the judge shows both responses in one prompt, so such
    a pair could never be judged. Given the (pairwise) ``judge``, also a pair whose judge
    prompt, its template wrapped around the pair, does not fit. An OpenAI-compatible server's
    model is checked by the server."""
    if backend == "openai":
        return
    from transformers import AutoConfig, AutoTokenizer

    from cai.models import resolve_model

    path = resolve_model(spec).path
    if judge is not None and judge.mode == "pairwise":
        judge.verdicts([p.prompt for p in pairs])  # routed: every verdict in one pass
    tokenizer = AutoTokenizer.from_pretrained(path)
    context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or 2048
    overheads: dict[str, int] = {}
    for pair in pairs:
        texts = [m["content"] for m in pair.prompt] + [pair.chosen, pair.rejected]
        chars = sum(len(t) for t in texts)
        tokens = None
        if chars <= CHARS_PER_TOKEN_BOUND * context:
            tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
            if tokens <= context:
                if judge is not None and judge.mode == "pairwise":
                    _check_judge_prompt(pair, tokens, judge, tokenizer, context, overheads)
                continue
        size = f"{chars:,} characters" if tokens is None else f"{tokens:,} tokens"
        raise DataError(
            f"{pair.source}: the prompt and both responses are {size}, more than the judge "
            f"model's context of {context:,} tokens (the judge reads both in one prompt); "
            "shorten or remove the pair"
        )


TEMPLATE_SLACK = 32
"""Tokens of leeway in the estimate of a judge prompt's length (its template's tokens plus the
pair's): where text meets template the tokens can merge differently. A pair within it of the
context is rendered and counted exactly."""


def _check_judge_prompt(
    pair: LabelledPair,
    tokens: int,
    judge: JudgeSettings,
    tokenizer: Any,
    context: int,
    overheads: dict[str, int],
) -> None:
    """Refuse ``pair`` (of ``tokens`` tokens of text) if a judge prompt for it, as the engine
    will encode it, plus the tokens it must then read or write, exceeds ``context``. Rendering
    every prompt would cost a template render and tokenization per pair, order and principle:
    most pairs are cleared by each principle's template length, counted once."""
    from cai.judge.pair import JudgePair, _Item

    def count(conversation: list[dict]) -> int:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        prefix = "" if judge.cot else JUDGE_ANSWER_PREFIX
        return len(tokenizer(text + prefix, add_special_tokens=False)["input_ids"])

    # CoT writes its rationale within the context; otherwise one option token follows.
    after = judge.cot_max_tokens if judge.cot else 1
    [item] = judge.items([JudgePair(pair.prompt, pair.chosen, pair.rejected, pair.key)])

    def render(item: _Item, principle: Any, swapped: bool) -> list[dict]:
        responses = item.responses[::-1] if swapped else item.responses
        return judge.render(principle.judge, item.messages, responses)

    for principle in item.principles:
        if principle.id not in overheads:
            blank = _Item([{"role": "user", "content": ""}], ("", ""), [principle])
            overheads[principle.id] = count(render(blank, principle, False))
        if tokens + overheads[principle.id] + after + TEMPLATE_SLACK <= context:
            continue
        longest = max(count(render(item, principle, swapped)) for swapped in (False, True))
        if longest + after > context:
            raise DataError(
                f"{pair.source}: the judge's prompt for this pair (principle {principle.id}) is "
                f"{longest:,} tokens with its template, plus {after:,} to "
                f"{'write' if judge.cot else 'read'}: more than the judge model's context of "
                f"{context:,} tokens; shorten or remove the pair"
            )


def _add_judge_common(parser: argparse.ArgumentParser, constitution: str) -> None:
    """The judge options every judge command takes (the mode-specific ones come after)."""
    parser.add_argument(
        "--model", default=None, metavar="SPEC", help="judge model spec (default: smollm2-135m)"
    )
    parser.add_argument(
        "--backend", default="auto", choices=BACKENDS, help="engine backend of the judge model"
    )
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
    parser.add_argument(
        "--route",
        action="append",
        metavar="VERDICT=ID,...",
        help="with an input classifier (--guard): the principles asked when it flags the "
        "prompt (restricted=ID,...) and when not (permitted=ID,...), in place of --principles; "
        "give both",
    )


def _add_guard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--guard",
        metavar="DIR",
        help="an input classifier (`cai train classifier`, kind input) whose verdict on each "
        "prompt picks the --route principles",
    )


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


FLAGS = {
    "guard": "--guard",
    "route": "--route",
    "constitution": "--constitution",
    "mode": "--mode",
    "ensemble": "--ensemble",
    "seed": "--seed",
    "cot": "--cot",
    "few_shot": "--zero-shot",
    "calibration": "--calibration",
    "temperature": "--temperature",
    "length_coef": "--length-coef",
    "principles": "--principles",
}
"""The judge commands' flag of each JudgeSettings field (what an error names)."""


def flag_settings(constitution: Any, **fields: Any) -> JudgeSettings:
    """JudgeSettings from the judge flags, checked there (the one validator); ValueError naming
    the flag at fault."""
    try:
        return JudgeSettings(constitution, **fields)
    except ValueError as e:
        message = str(e)
        named = [flag for field, flag in FLAGS.items() if message.startswith(field)]
        raise ValueError(f"{named[0]}: {message}" if named else message) from None


def settings_from_args(args: argparse.Namespace) -> JudgeSettings:
    """The judge settings the command line asks for (``add_judge_options``)."""
    return flag_settings(
        load_constitution(args.constitution),
        mode=args.mode,
        calibration=args.calibration,
        length_coef=args.length_coef,
        temperature=args.temperature,
        few_shot=not args.zero_shot,
        principles=_principles(args),
        ensemble=args.ensemble,
        seed=args.seed,
        cot=args.cot,
        **_routing(args),
    )


def judge_from_args(args: argparse.Namespace) -> Judge:
    """The judge the command line asks for (``add_judge_options``); the one place a command
    builds it. Its settings are checked before the model loads."""
    return Judge.from_settings(
        settings_from_args(args),
        args.model,
        backend=args.backend,
        engine_options={"dtype": args.dtype} if args.dtype else None,
    )


def _pairs_and_judge(args: argparse.Namespace) -> tuple[list[LabelledPair], Judge]:
    """``--data`` (the first ``--limit`` pairs) and the judge, for ``cai judge label``."""
    check_limit(args.limit, "--limit")
    pairs = load_pairs(args.data, limit=args.limit)
    # The judge's settings render its prompts before the model loads.
    settings = settings_from_args(args)
    _check_pair_lengths(pairs, args.model, args.backend, settings)
    return pairs, Judge.from_settings(
        settings,
        args.model,
        backend=args.backend,
        engine_options={"dtype": args.dtype} if args.dtype else None,
    )


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


_FAILED_SHOWN = 5
"""Failed pairs named on stderr by ``cai judge label``; the rest are in the stage's records."""


def _judge_label(args: argparse.Namespace) -> int:
    from cai.judge.label import check_out, label_pairs

    try:
        check_out(args.data, args.out)
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
        for source, key, error in result.failed[:_FAILED_SHOWN]:
            print(f"error: {source} (pair {key}): {error}", file=sys.stderr)
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
    _add_guard(ev)
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
    _add_guard(label)
    label.add_argument("--limit", type=int, default=None, metavar="N", help="the first N pairs")
    label.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="pairs per engine call (and write)"
    )
    label.set_defaults(run=_judge_label)
