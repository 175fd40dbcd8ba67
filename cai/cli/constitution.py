"""``cai constitution check | show | convert``: validate, list and convert constitutions."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from cai.config import ConfigError
from cai.constitution import (
    Constitution,
    Message,
    check_pointwise,
    load_constitution,
)
from cai.constitution_convert import dump_constitution, from_anthropic, from_huggingface


def _summary(c: Constitution) -> str:
    examples = len(c.critique_examples) + len(c.judge_examples)
    return (
        f"{c.name} ({len(c.principles)} principles, {len(c.judge_principles)} judge questions, "
        f"{sum(p.score_question is not None for p in c.principles)} score questions, "
        f"{examples} examples"
        + (
            f", {len(c.restricted)} restricted and {len(c.permitted)} permitted classes)"
            if c.restricted or c.permitted
            else ")"
        )
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
    for label in ("restricted", "permitted"):
        classes = getattr(c, label)
        out += ["", f"{label} classes ({len(classes)}):"]
        for cls in classes:
            out += [f"  {cls.id}", _wrap(cls.description, "    ")]
            out += [_wrap(f"- {example}", "      ") for example in cls.examples]
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
    check.add_argument(
        "files", nargs="+", metavar="FILE", help="constitution YAML paths or shipped names"
    )
    check.add_argument(
        "--pointwise",
        action="store_true",
        help="also require a score_question on every judge principle (the pointwise judge)",
    )
    check.set_defaults(run=_constitution_check)

    show = sub.add_parser(
        "show", help="list a constitution's principles, exemplars and content classes"
    )
    show.add_argument("file", metavar="FILE", help="a constitution YAML path or shipped name")
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
    convert.add_argument(
        "-o", "--output", required=True, metavar="OUT.yaml", help="the constitution YAML to write"
    )
    convert.set_defaults(run=_constitution_convert)
