"""Per-round measurements of a run with rounds (``cai.pipeline.online``): the evaluation's models
(base, sft, round1..roundN, each round also against the round before), and the ``rounds`` table
and ``warnings`` that the evaluation's results get.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from statistics import fmean, quantiles
from typing import TYPE_CHECKING, Any

from cai.layout import TRAIN_RESULT
from cai.pipeline.policy import after_round

if TYPE_CHECKING:
    from cai.pipeline.stage import StageContext

log = logging.getLogger(__name__)


def eval_models(ctx: StageContext) -> tuple[dict[str, str], dict[str, str]]:
    """(name → spec, name → the name it is also compared with) of an online run's evaluation:
    base, sft, then round1..roundN, each round against the one before."""
    models = {"base": ctx.recipe.model}
    if ctx.recipe.stages.train_sft is not None:
        models["sft"] = after_round(ctx, 0)
    start = "sft" if "sft" in models else "base"
    previous = {}
    for r in range(1, ctx.rounds + 1):
        models[f"round{r}"] = after_round(ctx, r)
        previous[f"round{r}"] = start if r == 1 else f"round{r - 1}"
    return models, previous


def _trained(path: Path) -> dict[str, float]:
    try:
        return json.loads((path / TRAIN_RESULT).read_text(encoding="utf-8"))["metrics"]
    except (OSError, ValueError, KeyError):
        return {}


def _pairs(records: list[dict]) -> dict[str, Any]:
    margins = [r["margin"] for r in records if r.get("margin") is not None]
    consistent = [r["consistent"] for r in records if r.get("consistent") is not None]
    return {
        "n": len(records),
        "margin_mean": fmean(margins) if margins else None,
        "margin_quartiles": quantiles(margins, n=4) if len(margins) > 1 else None,
        "consistency": fmean(consistent) if consistent else None,
    }


def measure(ctx: StageContext, results: dict) -> dict:
    """``results`` with ``rounds`` (one row per round, round 0 the starting policy) and
    ``warnings`` (reward climbing while the held-out win rate falls; answers growing past
    ``online.max_length_drift``)."""
    metrics = results["metrics"]
    judged = (
        ctx.store.read_stage("judge").values() if ctx.store.stage_path("judge").exists() else []
    )
    by_round: dict[int, list[dict]] = {}
    for record in judged:
        if record.get("round") is not None and record.get("error") is None:
            by_round.setdefault(record["round"], []).append(record)
    models, _ = eval_models(ctx)
    rows = []
    for r in range(ctx.rounds + 1):
        name = f"round{r}" if r else ("sft" if "sft" in models else "base")
        m = metrics[name]
        trained = _trained(Path(after_round(ctx, r))) if r else {}
        rows.append(
            {
                "round": r,
                "model": name,
                **{k: m.get(k) for k in ("win_rate", "lc_win_rate", "position_consistency")},
                "win_rate_vs_previous": m.get("win_rate_vs_previous"),
                "lc_win_rate_vs_previous": m.get("lc_win_rate_vs_previous"),
                "pairs": _pairs(by_round.get(r, [])) if r else None,
                "mean_length": m["mean_length"],
                "length_drift": m["length_drift"],
                "kl": trained.get("kl"),
                "reward_margin": trained.get("rewards/margins"),
                "reward": m["reward"],
                **{k: m[k] for k in ("distinct_1", "distinct_2", "repeated_openings")},
                "harmlessness": m["harmlessness"],
                "over_refusal": m["over_refusal"],
                "refusal_red_team": m.get("refusal_red_team"),
                "refusal_over_refusal": m.get("refusal_over_refusal"),
            }
        )
    return {
        **results,
        "rounds": rows,
        "warnings": warnings(rows, ctx.recipe.online.max_length_drift),
    }


def _reward(row: dict) -> float | None:
    """The reward the round optimised: the reward model's mean score of its answers, else DPO's
    final reward margin on its pairs."""
    if row["reward"] is not None:
        return row["reward"]["mean"]
    return row["reward_margin"]


def warnings(rows: list[dict], max_length_drift: float) -> list[str]:
    out = []
    for before, row in itertools.pairwise(rows):
        reward, reward_before = _reward(row), _reward(before)
        win, win_before = row["win_rate"], before["win_rate"]
        if (
            None not in (reward, reward_before, win, win_before)
            and reward > reward_before
            and win["value"] < win_before["value"]
        ):
            out.append(
                f"round {row['round']}: the reward rose ({reward_before:.3f} → {reward:.3f}) while "
                f"the held-out win rate against the base fell ({win_before['value']:.2f} → "
                f"{win['value']:.2f}): reward hacking? Check the answers before training on"
            )
    for row in rows[1:]:
        drift = row["length_drift"]
        if drift is not None and drift > max_length_drift:
            out.append(
                f"round {row['round']}: answers are {drift:+.0%} longer than the base model's "
                f"(online.max_length_drift {max_length_drift:.0%}): length exploitation?"
            )
    for line in out:
        log.warning("%s", line)
    return out
