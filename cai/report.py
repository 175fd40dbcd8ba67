"""The run report: ``<run>/report.md`` and ``<run>/report.html`` with matplotlib plots in
``<run>/report/``. ``cai report RUN_DIR``, or at the end of a pipeline run that trains or
evaluates.

It reads whatever the run has (each input is optional, and the report says what is missing):
``manifest.json``, ``eval/results.json`` (cai.evaluate), ``models/*/cai_train.json`` (the
trainers' curves and metrics), ``preferences/data.jsonl`` (the margins of the exported pairs)
and ``stages/judge.jsonl`` (the judge's position consistency). The HTML page is self-contained
apart from the PNGs beside it (relative paths), so it opens from disk in any browser. Every
string that comes from the run (model names, paths, the recipe name) is escaped.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.evaluate import GRADERS, format_rate

PLOTS_DIR = "report"
RATES = tuple(GRADERS)  # harmlessness, over_refusal, sycophancy
CURVES = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


class ReportError(ValueError):
    """The folder is not a run directory, or one of its files is unreadable."""


@dataclass
class Inputs:
    manifest: dict | None = None
    results: dict | None = None
    trained: dict[str, dict] = field(default_factory=dict)
    preferences: list[dict] = field(default_factory=list)
    judged: list[dict] = field(default_factory=list)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e}); restore or delete it") from e


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if number == len(lines):
                break  # torn last line
            raise ReportError(f"{path}:{number}: not valid JSON ({e})") from e
    return out


def read_inputs(run_dir: Path) -> Inputs:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory")
    markers = ("manifest.json", "eval/results.json", "models", "stages")
    if not any((run_dir / m).exists() for m in markers):
        raise ReportError(
            f"{run_dir}: not a cai run directory (no manifest.json, stages/, models/ or "
            "eval/results.json); give the folder a pipeline run wrote, such as runs/<name>"
        )
    inputs = Inputs(
        manifest=_read_json(run_dir / "manifest.json"),
        results=_read_json(run_dir / "eval" / "results.json"),
        preferences=_read_jsonl(run_dir / "preferences" / "data.jsonl"),
        judged=[r for r in _read_jsonl(run_dir / "stages" / "judge.jsonl") if not r.get("error")],
    )
    for folder in sorted((run_dir / "models").glob("*/cai_train.json")):
        inputs.trained[folder.parent.name] = _read_json(folder)
    return inputs


# ---- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _error_bars(values: list[dict]) -> tuple[list[float], list[list[float]]]:
    centre = [v["value"] for v in values]
    return centre, [
        [max(0.0, v["value"] - v["low"]) for v in values],
        [max(0.0, v["high"] - v["value"]) for v in values],
    ]


def _grouped_bars(ax, groups: list[str], series: dict[str, list[dict | None]]) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + i * width - 0.4 + width / 2 for g in range(len(groups))]
        shown = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if not shown:
            continue
        centre, err = _error_bars([v for _, v in shown])
        ax.bar([x for x, _ in shown], centre, width, yerr=err, capsize=4, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)


def plot_win_rates(results: dict, path: Path) -> bool:
    names = [n for n, m in results["metrics"].items() if m["win_rate"] is not None]
    if not names:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _grouped_bars(
        ax,
        names,
        {
            "win rate": [results["metrics"][n]["win_rate"] for n in names],
            "length-controlled": [results["metrics"][n]["lc_win_rate"] for n in names],
        },
    )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(f"against {results['baseline']}")
    ax.set_title("Win rate (judge, both orders), 95% intervals")
    _save(fig, path)
    return True


def plot_rates(results: dict, path: Path) -> bool:
    names = list(results["metrics"])
    present = [r for r in RATES if any(results["metrics"][n][r] for n in names)]
    if not present:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    _grouped_bars(ax, present, {n: [results["metrics"][n][r] for r in present] for n in names})
    ax.set_title("Rates per model (harmless ↑, over-refusal ↓, sycophancy ↓), 95% intervals")
    _save(fig, path)
    return True


def plot_lengths(results: dict, path: Path) -> bool:
    lengths = {n: m["lengths"] for n, m in results["metrics"].items() if m["lengths"]}
    if not lengths:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max(max(v) for v in lengths.values())
    bins = [i * max(1, math.ceil((top + 1) / 20)) for i in range(21)]
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.5, label=name)
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel("answers")
    ax.set_title("Answer lengths per model")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_margins(preferences: list[dict], path: Path) -> bool:
    values = [r["p_chosen"] for r in preferences if r.get("p_chosen") is not None]
    if not values:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=[0.5 + i * 0.025 for i in range(21)], color="#4c72b0")
    ax.set_xlabel("p(chosen) of the exported pairs")
    ax.set_ylabel("pairs")
    ax.set_title("Preference margins")
    _save(fig, path)
    return True


def consistency(inputs: Inputs) -> dict[str, dict]:
    """Position consistency per source: the judge stage, and each evaluated model."""
    from cai.evaluate import position_consistency

    out = {}
    judged = position_consistency([r.get("consistent") for r in inputs.judged])
    if judged:
        out["judge stage"] = judged
    if inputs.results:
        for name, m in inputs.results["metrics"].items():
            if m["position_consistency"]:
                out[f"eval: {name}"] = m["position_consistency"]
    return out


def plot_consistency(values: dict[str, dict], path: Path) -> bool:
    if not values:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    _grouped_bars(ax, list(values), {"consistent": list(values.values())})
    ax.set_title("Judge position consistency (both orders agree), 95% intervals")
    _save(fig, path)
    return True


def plot_training(name: str, record: dict, path: Path) -> bool:
    history = record.get("log_history") or []
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    if not losses:
        return False
    curves = [c for c in CURVES if any(c in e for e in history)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(9 if curves else 5, 3.2))
    axes = axes if curves else [axes]
    axes[0].plot(*zip(*losses, strict=True), marker="o", markersize=3)
    axes[0].set_xlabel("step")
    axes[0].set_title(f"{name}: loss")
    for curve in curves:
        points = [(e["step"], e[curve]) for e in history if curve in e and "step" in e]
        axes[1].plot(*zip(*points, strict=True), marker="o", markersize=3, label=curve)
    if curves:
        axes[1].set_xlabel("step")
        axes[1].set_title(f"{name}: rewards")
        axes[1].legend(fontsize=7)
    _save(fig, path)
    return True


# ---- the documents -------------------------------------------------------------------------------


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: list[list[str]] | None = None
    images: list[tuple[str, str]] = field(default_factory=list)
    """(file name in report/, caption)."""


def _results_sections(inputs: Inputs, plots: Path, notes: list[str]) -> list[Section]:
    results = inputs.results
    if results is None:
        notes.append("No evaluation: the recipe has no `evaluate` stage, or it has not run yet.")
        return []
    metrics = results["metrics"]
    table = [
        [
            "model",
            "win rate",
            "LC win rate",
            *(r.replace("_", "-") for r in RATES),
            "mean length",
            "drift",
            "distinct-2",
            "rep. openings",
            "reward",
            "errors",
        ]
    ]
    for name, m in metrics.items():
        table.append(
            [
                name,
                format_rate(m["win_rate"]),
                format_rate(m["lc_win_rate"]),
                *(format_rate(m[r]) for r in RATES),
                f"{m['mean_length']:.1f}",
                "-" if m["length_drift"] is None else f"{m['length_drift']:+.1%}",
                f"{m['distinct_2']:.2f}",
                f"{m['repeated_openings']:.2f}",
                "-" if m["reward"] is None else f"{m['reward']['mean']:.3f}",
                str(m["errors"]),
            ]
        )
    sets = ", ".join(f"{k} {v}" for k, v in results["sets"].items())
    section = Section(
        "Evaluation",
        [
            f"Held-out prompts: {sets} ({results['excluded']} training prompts excluded). "
            f"Baseline: {results['baseline']}; judge {results['judge']['model']} with the "
            f"{results['judge']['constitution']} constitution. Rates are shown as value "
            "[95% interval]; n per rate is in results.json.",
            "Models: " + "; ".join(f"{n} = {spec}" for n, spec in results["models"].items()),
        ],
        table,
    )
    for file, caption, draw in (
        ("win_rates.png", "Win rates against the baseline", plot_win_rates),
        ("rates.png", "Harmlessness, over-refusal and sycophancy", plot_rates),
        ("lengths.png", "Answer lengths", plot_lengths),
    ):
        if draw(results, plots / file):
            section.images.append((file, caption))
        else:
            section.paragraphs.append(f"No data for: {caption.lower()}.")
    return [section]


def _training_section(inputs: Inputs, plots: Path, notes: list[str]) -> list[Section]:
    if not inputs.trained:
        notes.append("No trained models (models/*/cai_train.json): no training curves.")
        return []
    table = [["model", "steps", "final loss", "reward accuracy", "held-out accuracy", "examples"]]
    section = Section("Training", table=table)
    for name, record in inputs.trained.items():
        metrics = record.get("metrics", {})
        accuracy = metrics.get("rewards/accuracies")
        held = metrics.get("eval_accuracy")
        table.append(
            [
                name,
                str(record.get("global_step", "-")),
                f"{metrics['train_loss']:.4f}" if "train_loss" in metrics else "-",
                "-" if accuracy is None else f"{accuracy:.2f}",
                "-" if held is None else f"{held:.2f}",
                str(record.get("data", {}).get("examples", "-")),
            ]
        )
        file = f"training_{name}.png"
        if plot_training(name, record, plots / file):
            section.images.append((file, f"{name}: loss and reward curves"))
    for missing in sorted({"sft", "reward", "dpo"} - set(inputs.trained)):
        section.paragraphs.append(f"No {missing} model trained in this run.")
    return [section]


def _judge_section(inputs: Inputs, plots: Path, notes: list[str]) -> list[Section]:
    section = Section("AI feedback")
    if inputs.preferences:
        ps = [r["p_chosen"] for r in inputs.preferences if r.get("p_chosen") is not None]
        section.paragraphs.append(
            f"{len(inputs.preferences)} exported preference pairs; mean p(chosen) "
            f"{sum(ps) / len(ps):.3f}."
            if ps
            else f"{len(inputs.preferences)} exported preference pairs."
        )
        if plot_margins(inputs.preferences, plots / "margins.png"):
            section.images.append(("margins.png", "Preference margins"))
    else:
        notes.append("No preference pairs (preferences/data.jsonl): no margin histogram.")
    values = consistency(inputs)
    if values:
        section.table = [["judged by", "position consistency"]] + [
            [k, format_rate(v)] for k, v in values.items()
        ]
        if plot_consistency(values, plots / "consistency.png"):
            section.images.append(("consistency.png", "Judge position consistency"))
    else:
        notes.append("No judged pairs: no position-consistency figure.")
    return [section] if section.paragraphs or section.table or section.images else []


def build_sections(inputs: Inputs, plots: Path) -> tuple[list[Section], list[str]]:
    notes: list[str] = []
    sections = [
        *_results_sections(inputs, plots, notes),
        *_training_section(inputs, plots, notes),
        *_judge_section(inputs, plots, notes),
    ]
    return sections, notes


def _title(inputs: Inputs, run_dir: Path) -> str:
    config = (inputs.manifest or {}).get("config", {})
    return f"cai run report: {config.get('name') or run_dir.name}"


def render_markdown(title: str, meta: list[str], sections: list[Section], notes: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", *(f"- {m}" for m in meta), ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for p in s.paragraphs:
            lines += [p, ""]
        if s.table:
            lines.append("| " + " | ".join(cell(c) for c in s.table[0]) + " |")
            lines.append("|" + "---|" * len(s.table[0]))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in s.table[1:]]
            lines.append("")
        for file, caption in s.images:
            lines += [f"![{caption}]({PLOTS_DIR}/{file})", ""]
    if notes:
        lines += ["## Not in this report", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222;
       padding: 0 1rem; }
h1 { border-bottom: 2px solid #4c72b0; padding-bottom: .3rem; }
h2 { margin-top: 2rem; color: #2b4f81; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; white-space: nowrap; }
th { background: #eef2f8; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85rem; color: #555; }
.meta { color: #555; font-size: .9rem; }
"""


def render_html(title: str, meta: list[str], sections: list[Section], notes: list[str]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        '<ul class="meta">' + "".join(f"<li>{e(m)}</li>" for m in meta) + "</ul>",
    ]
    for s in sections:
        out.append(f"<section><h2>{e(s.title)}</h2>")
        out += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        if s.table:
            out.append("<table><thead><tr>")
            out += [f"<th>{e(c)}</th>" for c in s.table[0]]
            out.append("</tr></thead><tbody>")
            for row in s.table[1:]:
                out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
        for file, caption in s.images:
            out.append(
                f'<figure><img src="{PLOTS_DIR}/{e(file)}" alt="{e(caption)}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        out.append("</section>")
    if notes:
        out.append("<section><h2>Not in this report</h2><ul>")
        out += [f"<li>{e(n)}</li>" for n in notes]
        out.append("</ul></section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and the plots of ``run_dir``; returns the html path.

    Raises ReportError when ``run_dir`` is not a run directory or a file in it is unreadable.
    """
    run = Path(run_dir)
    inputs = read_inputs(run)
    plots = run / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    for old in plots.glob("*.png"):
        old.unlink()
    sections, notes = build_sections(inputs, plots)
    title = _title(inputs, run)
    manifest: dict[str, Any] = inputs.manifest or {}
    meta = [f"run directory: {run}"]
    if manifest:
        config = manifest.get("config", {})
        meta.append(
            f"model: {config.get('model', '-')}, constitution: {config.get('constitution', '-')}"
        )
        if manifest.get("updated") or manifest.get("created"):
            meta.append(f"updated: {manifest.get('updated') or manifest.get('created')}")
    else:
        notes.append("No manifest.json: the recipe and versions are unknown.")
    (run / "report.md").write_text(render_markdown(title, meta, sections, notes), encoding="utf-8")
    page = run / "report.html"
    page.write_text(render_html(title, meta, sections, notes), encoding="utf-8")
    return page


__all__ = ["ReportError", "read_inputs", "write_report"]
