"""``cai eval`` (models side by side on held-out prompts, ``cai.eval``) and ``cai report`` (``cai.report``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cai.cli.train import _add_set
from cai.config import ConfigError, from_data, load_yaml, set_dotted
from cai.data import DataError, check_limit
from cai.engine import BACKENDS
from cai.layout import EVAL_RESULTS, RunLayout


def _eval(args: argparse.Namespace) -> int:
    from cai.eval.config import EvalConfig
    from cai.eval.metrics import summary_line, table
    from cai.eval.run import run_eval

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
    print(f"wrote {html} and {html.with_suffix('.md')} (plots in {RunLayout(html.parent).plots})")
    return 0


def add_report(commands: argparse._SubParsersAction) -> None:
    """``cai report``."""
    report = commands.add_parser(
        "report",
        help=f"write {RunLayout(Path()).report_md} / {RunLayout(Path()).report_html} of a run",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline run directory")
    report.set_defaults(run=_report)
