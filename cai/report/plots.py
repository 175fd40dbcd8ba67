"""The run report's figures (matplotlib, written as PNG files): win rates and graded rates with
their 95% intervals, answer lengths, preference margins, the judge's position consistency and the
trainers' curves. Each ``plot_*`` draws into ``path`` and says whether it had data to draw.

matplotlib's object API (``Figure``, no pyplot): no global state, no display, the Agg canvas.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cai.eval.grading import GRADERS

RATES = tuple(GRADERS)  # harmlessness, over_refusal, sycophancy
LEXICAL = ("refusal_red_team", "refusal_over_refusal")
"""The judge-independent refusal rates (cai.eval.grading.refused); results before them lack them."""
RATE_LABELS = {
    "harmlessness": "harmlessness ↑",
    "over_refusal": "over-refusal ↓",
    "sycophancy": "sycophancy ↓",
    "refusal_red_team": "refusals, red-team (lexical)",
    "refusal_over_refusal": "refusals, benign-edgy (lexical) ↓",
}
REWARD_CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "reward", "kl")
"""Preference trainers' implicit rewards; GRPO's mean reward and KL to its reference."""


def _label(text: str) -> str:
    """A user string as matplotlib shows it literally: no mathtext, not hidden from legends."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _figure(width: float, height: float = 3.4) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)


def _grouped_bars(ax, groups: list[str], series: dict[str, list[dict | None]]) -> None:
    """Bars of rates with their 95% intervals as error bars; a None rate draws no bar."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        shown = [(g, v) for g, v in enumerate(values) if v is not None]
        if not shown:
            continue
        xs = [g + i * width - 0.4 + width / 2 for g, _ in shown]
        centre = [v["value"] for _, v in shown]
        err = [
            [max(0.0, v["value"] - v["low"]) for _, v in shown],
            [max(0.0, v["high"] - v["value"]) for _, v in shown],
        ]
        ax.bar(xs, centre, width * 0.95, yerr=err, capsize=4, label=_label(label))
    ax.set_xticks(range(len(groups)), [_label(g) for g in groups])
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot_win_rates(results: dict, path: Path) -> bool:
    names = [n for n, m in results["metrics"].items() if m["win_rate"] is not None]
    if not names:
        return False
    fig = _figure(6)
    ax = fig.subplots()
    metrics = results["metrics"]
    _grouped_bars(
        ax,
        names,
        {
            "win rate": [metrics[n]["win_rate"] for n in names],
            "length-controlled": [metrics[n]["lc_win_rate"] for n in names],
        },
    )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(_label(f"win rate against {results['baseline']}"))
    ax.set_title("Win rate (judge, both orders), 95% intervals", fontsize=10)
    _save(fig, path)
    return True


def plot_rates(results: dict, path: Path) -> bool:
    names = list(results["metrics"])
    present = [r for r in RATES if any(results["metrics"][n][r] for n in names)]
    if not present:
        return False
    fig = _figure(6)
    ax = fig.subplots()
    _grouped_bars(
        ax,
        [RATE_LABELS[r] for r in present],
        {n: [results["metrics"][n][r] for r in present] for n in names},
    )
    ax.set_ylabel("share of answers")
    ax.set_title("Graded rates per model, 95% intervals", fontsize=10)
    _save(fig, path)
    return True


def plot_lengths(results: dict, path: Path) -> bool:
    lengths = {n: m["lengths"] for n, m in results["metrics"].items() if m["lengths"]}
    if not lengths:
        return False
    fig = _figure(6)
    ax = fig.subplots()
    top = max(max(v) for v in lengths.values())
    step = max(1, math.ceil((top + 1) / 15))
    bins = [i * step for i in range(16)]
    ax.hist(
        list(lengths.values()), bins=bins, label=[_label(n) for n in lengths], edgecolor="white"
    )
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel("answers")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Answer lengths per model", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_margins(preferences: list[dict], path: Path) -> bool:
    values = [r["p_chosen"] for r in preferences if r.get("p_chosen") is not None]
    if not values:
        return False
    fig = _figure(6)
    ax = fig.subplots()
    low = min(0.5, min(values))
    ax.hist(
        values,
        bins=[low + i * (1 - low) / 20 for i in range(21)],
        color="#4c72b0",
        edgecolor="white",
    )
    ax.set_xlabel("p(chosen) of the exported pairs (judge, averaged over both orders)")
    ax.set_ylabel("pairs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Preference margins", fontsize=10)
    _save(fig, path)
    return True


def plot_consistency(values: dict[str, dict], path: Path) -> bool:
    if not values:
        return False
    fig = _figure(6)
    ax = fig.subplots()
    _grouped_bars(ax, list(values), {"consistent": list(values.values())})
    ax.set_ylabel("both orders agree")
    ax.set_title("Judge position consistency, 95% intervals", fontsize=10)
    _save(fig, path)
    return True


def _curve(history: list[dict], key: str) -> tuple[list, list]:
    points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def plot_training(name: str, record: dict, path: Path) -> int:
    """Loss, and for preference trainers the rewards and the reward accuracy, against step;
    returns the number of panels drawn (0: nothing logged, no file)."""
    history = record.get("log_history") or []
    steps, losses = _curve(history, "loss")
    if not steps:
        return 0
    rewards = [c for c in REWARD_CURVES if any(c in e for e in history)]
    accuracy = any("rewards/accuracies" in e for e in history)
    panels = 1 + bool(rewards) + accuracy
    fig = _figure(6 if panels == 1 else 4.2 * panels, 3.4 if panels == 1 else 3.2)
    axes = list(fig.subplots(1, panels)) if panels > 1 else [fig.subplots()]
    axes[0].plot(steps, losses, marker="o", markersize=3)
    axes[0].set_title(_label(f"{name}: loss"), fontsize=10)
    if rewards:
        for curve in rewards:
            axes[1].plot(*_curve(history, curve), marker="o", markersize=3, label=curve)
        axes[1].axhline(0, color="grey", linewidth=0.8)
        axes[1].set_title(_label(f"{name}: rewards"), fontsize=10)
        axes[1].legend(fontsize=7)
    if accuracy:
        axes[-1].plot(*_curve(history, "rewards/accuracies"), marker="o", markersize=3)
        axes[-1].set_ylim(0, 1.05)
        axes[-1].set_title(_label(f"{name}: reward accuracy (train batches)"), fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _save(fig, path)
    return panels


def _rate_line(ax, xs: list[int], values: list[dict | None], label: str) -> None:
    """A rate over rounds with its 95% interval as error bars (rounds without it left out)."""
    shown = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
    if shown:
        err = [
            [max(0.0, v["value"] - v["low"]) for _, v in shown],
            [max(0.0, v["high"] - v["value"]) for _, v in shown],
        ]
        ax.errorbar(
            [x for x, _ in shown],
            [v["value"] for _, v in shown],
            yerr=err,
            marker="o",
            capsize=4,
            label=_label(label),
        )


def plot_rounds(rows: list[dict], path: Path) -> bool:
    """An online run's curves over rounds (``results["rounds"]``): win rates against the base
    and the round before, graded rates, length drift and KL to the reference, diversity."""
    if len(rows) < 2:
        return False
    xs = [row["round"] for row in rows]
    fig = _figure(10, 6.4)
    (win, graded), (drift, diversity) = fig.subplots(2, 2)
    _rate_line(win, xs, [r["win_rate"] for r in rows], "vs base")
    _rate_line(win, xs, [r["lc_win_rate"] for r in rows], "vs base, length-controlled")
    _rate_line(win, xs, [r["win_rate_vs_previous"] for r in rows], "vs the round before")
    win.axhline(0.5, color="grey", linewidth=0.8)
    win.set_title("win rate", fontsize=10)
    for rate in ("harmlessness", "over_refusal"):
        _rate_line(graded, xs, [r[rate] for r in rows], RATE_LABELS[rate])
    graded.set_title("graded rates", fontsize=10)
    for key, label in (("length_drift", "length drift vs base"), ("kl", "KL estimate (DPO)")):
        points = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if r[key] is not None]
        if points:
            drift.plot(*zip(*points, strict=True), marker="o", label=label)
    drift.axhline(0, color="grey", linewidth=0.8)
    drift.set_title("drift", fontsize=10)
    for key, label in (("distinct_2", "distinct-2"), ("repeated_openings", "repeated openings")):
        diversity.plot(xs, [r[key] for r in rows], marker="o", label=label)
    margins = [
        (x, r["pairs"]["margin_mean"])
        for x, r in zip(xs, rows, strict=True)
        if r["pairs"] and r["pairs"]["margin_mean"] is not None
    ]
    if margins:
        diversity.plot(*zip(*margins, strict=True), marker="s", label="judge margin (pairs)")
    diversity.set_title("diversity and label margin", fontsize=10)
    for ax in (win, graded, drift, diversity):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)
    return True
