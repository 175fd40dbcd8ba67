"""``cai review``: people label judged pairs blind on a local page; what their labels say about
the judge; the labels as preference pairs; Label Studio tasks and annotations (``cai.review``).

    cai review RUN_DIR [--data PAIRS] [--annotator NAME] [--sample random|margin|stratified]
        [--limit N] [--seed S] [--out DIR] [--host 127.0.0.1] [--port P] [--api-key KEY]
    cai review stats RUN_DIR [--labels DIR]
    cai review export RUN_DIR --out FILE [--labels DIR]
    cai review labelstudio-export RUN_DIR --out TASKS.json [--annotator NAME]
    cai review labelstudio-import RUN_DIR EXPORT.json [--labels DIR]

One parser takes every form (a first word ``stats``, ``export``, ... names the action; any other
is the run directory), because argparse cannot give a command both a positional and
subcommands. Bad input is one ``error:`` line and exit 1 (as every ``cai`` command), before any server starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cai.data import DataError
from cai.jsonl import JsonlError
from cai.layout import RunLayout

ACTIONS = ("stats", "export", "labelstudio-export", "labelstudio-import")


def _labels_folder(args: argparse.Namespace, run_dir: str | None, flag: str) -> Path:
    folder = getattr(args, flag)
    if folder is not None:
        return Path(folder)
    if run_dir is None:
        raise ValueError(f"give --{flag} DIR: with --data alone there is no run to keep labels in")
    return RunLayout(Path(run_dir)).review


def _items(args: argparse.Namespace, run_dir: str | None):
    from cai.review.items import load_items, sample

    items = load_items(run_dir, args.data)
    return sample(items, args.sample, args.limit, args.seed)


def _stats(args, run_dir, rest) -> int:
    from cai.review.labels import labels_path, read_labels
    from cai.review.stats import format_table, review_stats

    items = _items(args, run_dir)
    records = read_labels(labels_path(_labels_folder(args, run_dir, "labels")))
    stats = review_stats(items, records)
    print(format_table(stats))
    print(json.dumps(stats, allow_nan=False))
    return 0


def _export(args, run_dir, rest) -> int:
    from cai.review.labels import labels_path, read_labels
    from cai.review.preferences import export_labels

    if args.out is None:
        raise ValueError("cai review export needs --out FILE")
    records = read_labels(labels_path(_labels_folder(args, run_dir, "labels")))
    result = export_labels(_items(args, run_dir), records, args.out)
    print(f"{args.out}: {result.rows} pairs ({result.split} left out: people split evenly)")
    return 0


def _ls_export(args, run_dir, rest) -> int:
    from cai.review.labelstudio import write_tasks

    if args.out is None:
        raise ValueError("cai review labelstudio-export needs --out TASKS.json")
    n = write_tasks(_items(args, run_dir), args.annotator, args.out)
    print(f"{args.out}: {n} Label Studio tasks (config: cai.review.labelstudio.LABEL_CONFIG)")
    return 0


def _ls_import(args, run_dir, rest) -> int:
    from cai.review.labels import LabelLog
    from cai.review.labelstudio import import_export

    if len(rest) != 1:
        raise ValueError("cai review labelstudio-import RUN_DIR EXPORT.json")
    log = LabelLog(_labels_folder(args, run_dir, "labels"))
    n = import_export(rest[0], _items(args, run_dir), log)
    print(f"{log.path}: {n} labels imported")
    return 0


def _page(args, run_dir, rest) -> int:
    from cai.review.app import ReviewSession, bind_or_fail, run_page
    from cai.review.labels import LabelLog

    log = LabelLog(_labels_folder(args, run_dir, "out"))
    session = ReviewSession(_items(args, run_dir), log, args.annotator, args.api_key or None)
    sock = bind_or_fail(args.host, args.port)
    done = log.next_index(args.annotator, session.keys)
    print(
        f"cai review: http://{args.host}:{args.port}/ ({len(session.items)} pairs, "
        f"{args.annotator} has {done} done; labels in {log.path}); Ctrl-C stops",
        flush=True,
    )
    run_page(session, sock)
    return 0


def _review(args: argparse.Namespace) -> int:
    words = list(args.target)
    action = words.pop(0) if words and words[0] in ACTIONS else None
    run = {"stats": _stats, "export": _export}
    run |= {"labelstudio-export": _ls_export, "labelstudio-import": _ls_import}
    handler = run.get(action, _page)
    run_dir = words.pop(0) if words else None
    if action != "labelstudio-import" and words:
        print(f"error: unexpected arguments {words}", file=sys.stderr)
        return 1  # cai's exit code for a command failing on its input (cai.exit_codes)
    try:
        return handler(args, run_dir, words)
    except (DataError, JsonlError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def add_review(commands: argparse._SubParsersAction) -> None:
    """``cai review``."""
    review = commands.add_parser(
        "review",
        help="label judged pairs blind on a local page; human-judge agreement; export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\nOne parser")[0],
    )
    review.add_argument("target", nargs="*", metavar="[ACTION] RUN_DIR", help="see above")
    review.add_argument("--data", metavar="PAIRS", help="review a pairs file (or label dir)")
    review.add_argument(
        "--annotator", default=os.environ.get("USER") or "anonymous", help="who labels"
    )
    review.add_argument("--sample", default="random", help="random, margin or stratified")
    review.add_argument("--limit", type=int, help="review at most N pairs")
    review.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    review.add_argument("--out", help="the page: labels folder; export: the pairs file")
    review.add_argument("--labels", help="labels folder (default RUN_DIR/review)")
    review.add_argument("--host", default="127.0.0.1", help="interface (default: this machine)")
    review.add_argument("--port", type=int, default=8765, help="TCP port of the page")
    review.add_argument(
        "--api-key",
        default=os.environ.get("CAI_API_KEY"),
        metavar="KEY",
        help="require ?key=KEY on the page's URL (default: $CAI_API_KEY)",
    )
    review.set_defaults(run=_review)
