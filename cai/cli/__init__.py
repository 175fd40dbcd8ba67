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
    cai train classifier --config FILE [--set ...]      an input or output guard classifier
    cai judge eval --data FILE [--model SPEC] [--backend B] [--constitution NAME] [--limit N]
        [--ensemble K] [--cot]            the judge's agreement with labelled preference pairs
    cai judge label --data FILE --out DIR [judge options]   label pairs: TRL preference records
    cai serve [--model SPEC] [--reward-model DIR] [--host H] [--port P] [--api-key KEY]
                                          the judge as an HTTP reward service (cai.serve.service)
    cai eval --model NAME=SPEC [--model NAME=SPEC ...] [--config FILE] [--out DIR]
                                          models side by side on held-out prompts (cai.eval.run)
    cai report RUN_DIR                    report.md / report.html of a pipeline run (cai.report.sections)
    cai review RUN_DIR [--annotator NAME] [--sample margin] [--limit N]
                                          label judged pairs blind on a local page (cai.review)
    cai review stats RUN_DIR              human-judge agreement, kappa, reliability by margin
    cai review export RUN_DIR --out FILE  the human labels as preference pairs
    cai classify eval --guard DIR --data FILE [--zero-shot]
                                          a guard on labelled prompts (cai.classify.evaluate)

Each command group is added by one small ``add_<group>`` function that registers its
subcommands; the handler set with ``set_defaults(run=...)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cai.cli.classify import add_classify
from cai.cli.constitution import add_constitution
from cai.cli.eval import add_eval, add_report
from cai.cli.judge import add_judge
from cai.cli.review import add_review
from cai.cli.serve import add_serve
from cai.cli.train import add_train
from cai.exit_codes import SYSTEM, os_error_line

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_constitution,
    add_judge,
    add_train,
    add_eval,
    add_report,
    add_serve,
    add_review,
    add_classify,
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
