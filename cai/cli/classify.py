"""``cai classify eval``: a trained guard, or the zero-shot baseline, on labelled prompts
(``cai.classify.evaluate``); a table, then one JSON line.

    cai classify eval --guard DIR [--guard DIR] --data FILE
    cai classify eval --zero-shot [--model SPEC] [--backend B] --data FILE [--threshold 0]
"""

from __future__ import annotations

import argparse
import json
import sys

from cai.data import DataError
from cai.engine import BACKENDS


def _eval(args: argparse.Namespace) -> int:
    from cai.classify.data import load_examples
    from cai.classify.evaluate import guard_scores, report, table, zero_shot_scores

    if bool(args.guard) == args.zero_shot:
        print("error: give --guard DIR (a trained guard) or --zero-shot, not both", file=sys.stderr)
        return 1
    try:
        examples = load_examples(args.data)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.zero_shot:
        from cai.engine import create_engine

        examples = [e for e in examples if e.kind == "input"]
        if not examples:
            print(
                f"error: {args.data}: no input examples for the zero-shot baseline", file=sys.stderr
            )
            return 1
        options = {"dtype": args.dtype} if args.dtype else {}
        with create_engine(args.backend, model=args.model, **options) as engine:
            scores = zero_shot_scores(engine, examples)
        rows = report(examples, scores, {"input": args.threshold})
        header = {"guard": None, "zero_shot": args.model}
    else:
        from cai.classify import Guard

        try:
            guard = Guard(args.guard)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        examples = [e for e in examples if e.kind in guard.classifiers]
        if not examples:
            print(f"error: {args.data}: no examples of kind {guard.kinds}", file=sys.stderr)
            return 1
        with_threshold = {k: c.threshold for k, c in guard.classifiers.items()}
        rows = report(examples, guard_scores(guard, examples), with_threshold)
        guard.close()
        header = {"guard": args.guard, "zero_shot": None}
    print(table(rows))
    print(json.dumps({**header, "data": args.data, "rows": rows}))
    return 0


def add_classify(commands: argparse._SubParsersAction) -> None:
    """``cai classify eval``."""
    group = commands.add_parser("classify", help="constitutional classifiers (input/output guards)")
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    ev = sub.add_parser(
        "eval",
        help="a guard (or the zero-shot baseline) on labelled prompts: AUC, precision, recall, "
        "over-refusal, per class",
    )
    ev.add_argument("--data", required=True, metavar="FILE", help="labelled examples (jsonl)")
    ev.add_argument(
        "--guard", action="append", metavar="DIR", help="a `cai train classifier` folder (repeat)"
    )
    ev.add_argument(
        "--zero-shot",
        action="store_true",
        help="no trained guard: the model asked whether each request is harmful (log-odds Yes/No)",
    )
    ev.add_argument("--model", default="smollm2-135m", help="--zero-shot: the model spec")
    ev.add_argument("--backend", default="auto", choices=BACKENDS, help="--zero-shot: engine")
    ev.add_argument("--dtype", help="--zero-shot: engine dtype (float32, bfloat16, ...)")
    ev.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="--zero-shot: flag at log P(Yes) - log P(No) >= this (default 0)",
    )
    ev.set_defaults(run=_eval)
