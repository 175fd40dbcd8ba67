"""``python -m cai.pipeline``: run recipes as resumable batch jobs, and merge shards.

    python -m cai.pipeline run pipelines/quickstart.yaml [--run-dir DIR] [--set key=value ...]
                               [--limit N] [--shard k/n] [--dry-run] [--force]
                               [--executor local|ray] [--ray-address HOST:PORT]
    python -m cai.pipeline merge RUN_DIR                  # shard files of one run directory
    python -m cai.pipeline merge RUN_DIR... --out DIR     # shards that ran in separate directories

A killed run resumes when the same command is run again. Exit codes (``cai.exit_codes``): 0 done;
1 a stage's share of error records passed the recipe's max_error_rate; 2 bad input (recipe,
sources, arguments; for --executor ray: no ray package, a local Ray that cannot start, replicas
that do not fit the cluster); 3 the operating system refused (disk full, permission denied,
connection refused, no Ray cluster at --ray-address): one line says what and where; fix it and
run the same command again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from cai.config import ConfigError
from cai.data import DataError, check_limit
from cai.exit_codes import BAD_INPUT, FAILED_RECORDS, SYSTEM, os_error_line
from cai.keys import parse_shard
from cai.merge import merge_runs
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import PipelineError, Runner, summary_table
from cai.prompts import TemplateError
from cai.resources import resolve
from cai.store import RunStore, RunStoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cai.pipeline", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a recipe")
    run.add_argument("recipe", help="recipe YAML, or the name of a shipped one (quickstart)")
    run.add_argument("--run-dir", help="where records go (default runs/<recipe name>)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. stages.critique_revise.rounds=2 (repeatable)",
    )
    run.add_argument("--limit", type=int, help="only the first N prompts")
    run.add_argument("--shard", help="k/n: only this shard of the prompts (1-based)")
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan and request counts; load no model"
    )
    run.add_argument(
        "--force", action="store_true", help="run even if the recipe changed since the run began"
    )
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="where engines run: in this process, or replicas on Ray (engine.executor)",
    )
    run.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="the Ray cluster to use (engine.ray.address; implies --executor ray)",
    )
    merge = sub.add_parser("merge", help="merge shard outputs")
    merge.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories whose shards to merge"
    )
    merge.add_argument("--out", help="output run directory (when merging several run directories)")
    return parser


def _executor(args: argparse.Namespace) -> list[str]:
    """``--executor`` and ``--ray-address`` as recipe overrides (checked like any ``--set``)."""
    if args.ray_address is not None and args.executor == "local":
        raise PipelineError("--ray-address needs the ray executor; drop --executor local")
    overrides = []
    if args.executor or args.ray_address is not None:
        overrides.append(f"engine.executor={args.executor or 'ray'}")
    if args.ray_address is not None:
        overrides.append(f"engine.ray.address={json.dumps(args.ray_address)}")
    return overrides


def _run(args: argparse.Namespace) -> int:
    check_limit(args.limit, "--limit")
    recipe = load_recipe(resolve("pipelines", args.recipe), args.overrides + _executor(args))
    shard = parse_shard(args.shard) if args.shard else None
    runner = Runner(recipe, args.run_dir, limit=args.limit, shard=shard, force=args.force)
    print(runner.plan(), file=sys.stderr)
    if args.dry_run:
        return 0
    start = time.perf_counter()
    result = runner.run()
    print(summary_table(result, time.perf_counter() - start), file=sys.stderr)
    for failure in result.failed:
        print(f"error: {failure}", file=sys.stderr)
    return FAILED_RECORDS if result.failed else 0


def _merge(args: argparse.Namespace) -> int:
    if args.out:
        merge_runs(args.run_dirs, args.out)
        print(f"merged {len(args.run_dirs)} run directories into {args.out}", file=sys.stderr)
        return 0
    if len(args.run_dirs) != 1:
        raise PipelineError("give one run directory, or several with --out DIR")
    store = RunStore(args.run_dirs[0])
    stages = store.shard_stages()
    if not stages:
        raise PipelineError(f"{args.run_dirs[0]}: no shard files to merge")
    for stage in stages:
        print(f"merged {stage}: {store.merge_shards(stage)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _merge(args)
    except (
        ConfigError,
        DataError,
        TemplateError,
        RunStoreError,
        PipelineError,
        FileNotFoundError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except OSError as e:  # after FileNotFoundError: a missing input file is bad input
        print(os_error_line(e), file=sys.stderr)
        return SYSTEM


if __name__ == "__main__":
    sys.exit(main())
