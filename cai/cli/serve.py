"""``cai serve``: the judge and/or a reward model as an HTTP reward service (``cai.serve``)."""

from __future__ import annotations

import argparse
import os
import sys

from cai.cli.judge import add_judge_options, judge_from_args
from cai.config import ConfigError


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
