"""``cai train sft | dpo | reward | grpo | classifier`` (``cai.train``), and the ``--set`` flag it shares with ``cai eval``."""

from __future__ import annotations

import argparse
import importlib
import sys

from cai.config import ConfigError, from_data, load_yaml, set_dotted
from cai.data import DataError

TRAINERS = {
    "sft": (
        "cai.train.sft",
        "SFTConfig",
        "supervised fine-tuning on the assistant turns of conversations",
    ),
    "dpo": (
        "cai.train.dpo",
        "DPOConfig",
        "preference training on pairs (dpo, soft_dpo, ipo, hinge, kto, orpo, simpo)",
    ),
    "reward": (
        "cai.train.reward",
        "RewardConfig",
        "a Bradley-Terry reward model on pairs, with held-out accuracy",
    ),
    "grpo": (
        "cai.train.grpo",
        "GRPOConfig",
        "GRPO on prompts, the constitution judge's group-wise win rate as the reward",
    ),
    "classifier": (
        "cai.train.classifier",
        "ClassifierConfig",
        "an input or output guard classifier, with its threshold at max_fpr",
    ),
}
"""``cai train KIND``: the trainer's module, its config class (the ``--config`` file's keys) and
the command's help; the module's ``train_<KIND>`` trains."""


def _train(args: argparse.Namespace) -> int:
    # Imported here: the trainers load transformers' Trainer, which other commands do not need.
    module_name, config_name, _ = TRAINERS[args.action]
    module = importlib.import_module(module_name)
    Config, train = getattr(module, config_name), getattr(module, f"train_{args.action}")
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
    """``cai train sft | dpo | reward | grpo | classifier``."""
    group = commands.add_parser(
        "train", help="the built-in SFT, DPO, reward-model, GRPO and guard-classifier trainers"
    )
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, (_, _, help) in TRAINERS.items():
        command = sub.add_parser(name, help=help)
        command.add_argument("--config", required=True, metavar="FILE", help="trainer YAML")
        _add_set(command, "max_steps=10")
        command.set_defaults(run=_train)
