"""``cai serve``: the judge, a reward model and/or a guard as an HTTP service (``cai.serve``)."""

from __future__ import annotations

import argparse
import os
import sys

from cai.cli.judge import add_judge_options, judge_from_args
from cai.config import ConfigError

RECIPE_JUDGE = {
    "constitution": "hhh",
    "principles": "balanced",
    "zero_shot": True,
    "length_coef": 0.25,
}
"""The default judge: pipelines/rlaif-tiny.yaml's (pointwise, one general yes/no question, no
exemplars, length control), the best of the shipped judges on data/judge_dev.jsonl with the
135M model, and the one that scores each completion alone (no labels or groups needed)."""


def _default_judge(args: argparse.Namespace) -> None:
    """Fill the judge options not given: the recipe's judge in the pointwise mode, the judge
    commands' defaults in the pairwise mode (whose judge takes no length control)."""
    pointwise = args.mode == "pointwise"
    if args.constitution is None:
        args.constitution = "hhh" if pointwise else "harmless"
        if pointwise and args.principles is None and not args.route:
            args.principles = RECIPE_JUDGE["principles"]
    if args.length_coef is None:
        args.length_coef = RECIPE_JUDGE["length_coef"] if pointwise else 0.0
    if args.few_shot is None:
        args.zero_shot = args.zero_shot or pointwise
    else:
        args.zero_shot = not args.few_shot


def _serve(args: argparse.Namespace) -> int:
    from cai.serve.app import bind, serve
    from cai.serve.protocol import ServeOptions, check_options
    from cai.serve.service import Service

    _default_judge(args)
    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_items=args.max_items,
        max_pairs=args.max_pairs,
        max_body_bytes=int(args.max_body_mb * 2**20),
        read_timeout_s=args.read_timeout,
        api_key=args.api_key or None,
        against=args.against,
        num_generations=args.num_generations,
        centered=args.centered,
    )
    # The judge is served unless only a reward model and/or a guard are asked for (a judge
    # routed by the guard's input classifier, --route, is asked for).
    with_judge = (
        args.model is not None or bool(args.route) or (args.reward_model is None and not args.guard)
    )
    judge = reward_model = guard = sock = None
    try:
        check_options(
            options,
            judge_mode=args.mode if with_judge else None,
            reward_model=args.reward_model is not None,
            guard=bool(args.guard),
        )
        try:  # before any model loads: a port in use fails at once
            sock = bind(args.host, args.port)
        except OSError as e:
            raise ValueError(
                f"cannot serve on {args.host}:{args.port}: {e.strerror or e}"
            ) from None
        if with_judge:
            judge = judge_from_args(args)
        if args.reward_model is not None:
            from cai.rewards.model import RewardModel

            reward_model = RewardModel(args.reward_model)
        if args.guard:
            from cai.classify import Guard

            guard = Guard(args.guard)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        for loaded in (judge, reward_model, guard, sock):
            if loaded is not None:
                loaded.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    service = Service(
        judge, reward_model, options, reward_model_name=args.reward_model, guard=guard
    )
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
    serve(service, args.host, args.port, sock=sock)
    return 0


def _help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Replace a shared judge option's help where ``cai serve``'s default differs."""
    for action in parser._actions:
        if action.dest == dest:
            action.help = text


def add_serve(commands: argparse._SubParsersAction) -> None:
    """``cai serve``."""
    serve = commands.add_parser(
        "serve",
        help="the judge and/or a reward model as an HTTP reward service for RL trainers",
        description="Load the judge (--model) and/or a trained reward model (--reward-model) "
        "once and serve /get_reward (OpenRLHF), /v1/reward (cai.rewards.RemoteReward), "
        "/v1/judge, /health and /metrics, batching all clients' requests together. The default "
        "judge is the CPU recipes' (pipelines/rlaif-tiny.yaml): --mode pointwise, constitution "
        "hhh, principle balanced, zero-shot, --length-coef 0.25; it scores each completion "
        "alone (--against score). --mode pairwise gives the judge commands' defaults "
        "(constitution harmless, all principles, few-shot).",
    )
    add_judge_options(serve)
    serve.set_defaults(mode="pointwise", constitution=None, length_coef=None)
    _help(serve, "constitution", "shipped name or path (default: hhh pointwise, harmless pairwise)")
    _help(serve, "principles", "ask only these principles (default: balanced with hhh, else all)")
    _help(serve, "length_coef", "pointwise: score less this × ln(chars) (default 0.25)")
    _help(serve, "mode", "pointwise (default: each completion scored alone) or pairwise")
    serve.add_argument(
        "--few-shot",
        action="store_true",
        default=None,
        help="exemplars in the prompts (default: pairwise only)",
    )
    serve.add_argument(
        "--reward-model", metavar="DIR", help="a `cai train reward` model (with or without --model)"
    )
    serve.add_argument(
        "--guard",
        action="append",
        metavar="DIR",
        help="a `cai train classifier` folder served at /v1/classify (repeat: input and "
        "output); with --route, the input one also routes the judge's principles",
    )
    serve.add_argument(
        "--against",
        choices=("group", "reference", "score"),
        help="/get_reward's reward, and /v1/reward's default: against the prompt's group, "
        "against the reference (OpenRLHF's labels), or each completion's own score (the "
        "pointwise judge's, or the reward model's raw score) (default: reference with a "
        "pairwise judge, else score)",
    )
    serve.add_argument(
        "--num-generations", type=int, metavar="G", help="group size, with --against group"
    )
    serve.add_argument("--centered", action="store_true", help="rewards 2p - 1 in [-1, 1]")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("CAI_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $CAI_API_KEY, which ps does not show)",
    )
    _add_limits(serve)
    serve.set_defaults(run=_serve)


def _add_limits(serve: argparse.ArgumentParser) -> None:
    """The flags that bound the work: what each one counts, and the status past it."""
    serve.add_argument(
        "--max-batch",
        type=int,
        default=64,
        metavar="N",
        help="engine items (judge pairs, scored responses or conversations) per engine call",
    )
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, metavar="MS", help="wait for more items this long"
    )
    serve.add_argument(
        "--max-items",
        type=int,
        default=4096,
        metavar="N",
        help="completions (or /v1/judge pairs) in one request's body (else 413)",
    )
    serve.add_argument(
        "--max-pairs",
        type=int,
        default=16384,
        metavar="N",
        help="engine items one request needs: judge pairs, a group of G completions being "
        "G(G-1)/2 of them (else 413)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=65536,
        metavar="N",
        help="engine items (judge pairs) queued, all requests together (else 503, retryable); "
        "a request needing more than this alone gets 413",
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a client has to send its request body (else 408)",
    )
    serve.add_argument(
        "--max-body-mb", type=float, default=16.0, metavar="MB", help="request body (else 413)"
    )
