"""The run report: ``<run>/report.md`` and ``<run>/report.html`` with matplotlib plots in
``<run>/report/`` (drawn by cai.plots). ``cai report RUN_DIR``, or at the end of a pipeline run that
trains or evaluates.

It reads whatever the run has (each input is optional, and the report says what is missing):
``manifest.json`` (recipe, models by role, times), ``eval/results.json`` (cai.evaluate),
``models/*/cai_train.json`` (the trainers' curves and metrics), ``preferences/data.jsonl`` (the
judged pairs' p(chosen)), ``stages/*.jsonl`` (record counts; the judge stage's position
consistency) and the exported datasets (counts). The HTML page is self-contained apart from the
PNGs beside it (relative paths), so it opens from disk in any browser. Every string that comes
from the run (model names, paths, the recipe name) is escaped.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cai.evaluate import METRICS, format_rate
from cai.jsonl import JsonlError, iter_jsonl
from cai.plots import (
    RATE_LABELS,
    RATES,
    plot_consistency,
    plot_lengths,
    plot_margins,
    plot_rates,
    plot_rounds,
    plot_training,
    plot_win_rates,
)
from cai.stats import position_consistency
from cai.store import RunStore, RunStoreError

PLOTS_DIR = "report"
DATASETS = (
    ("sft", "SFT examples"),
    ("revision_pairs", "revision pairs"),
    ("preferences", "preference pairs"),
)


class ReportError(ValueError):
    """The folder is not a run directory, or one of its files is unreadable."""


@dataclass
class StageCount:
    """Distinct record keys of one stage file."""

    done: int = 0
    failed: int = 0
    """Keys with only error records (a re-run retries them)."""
    skipped: int = 0
    """Done records that say why they were skipped (a sample with < 2 distinct responses)."""


@dataclass
class Inputs:
    """What a run directory holds; every part may be missing."""

    manifest: dict | None = None
    results: dict | None = None
    trained: dict[str, dict] = field(default_factory=dict)
    """Model folder name -> its cai_train.json."""
    preferences: list[dict] = field(default_factory=list)
    judged: list[dict] = field(default_factory=list)
    """The judge stage's records without an error (latest per key)."""
    stages: dict[str, StageCount] = field(default_factory=dict)
    datasets: dict[str, int] = field(default_factory=dict)
    """Exported folder name -> rows in its data.jsonl."""


# ---- reading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e}); restore or delete it") from e
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _stage_counts(store: RunStore) -> dict[str, StageCount]:
    return {
        name: StageCount(
            done=counts["records"] - counts["errors"],
            failed=counts["errors"],
            skipped=counts["skipped"],
        )
        for name, counts in store.summary().items()
    }


def _rows(path: Path) -> list[dict]:
    try:
        return list(iter_jsonl(path))
    except JsonlError as e:
        raise ReportError(str(e)) from e


def _check_results(results: dict, path: Path) -> None:
    if results.get("version") != 1:
        raise ReportError(
            f"{path}: results version {results.get('version')!r}; this cai reads version 1 "
            "(re-run the evaluate stage)"
        )
    for key in ("baseline", "models", "judge", "sets", "excluded", "metrics"):
        if key not in results:
            raise ReportError(f"{path}: no {key!r} key; re-run the evaluate stage")
    for name, metrics in results["metrics"].items():
        missing = [k for k in METRICS if k not in metrics]
        if missing:
            raise ReportError(f"{path}: model {name!r} has no {', '.join(missing)}")


def read_inputs(run_dir: str | Path) -> Inputs:
    """Everything the report shows from ``run_dir``; raises ReportError for a folder that is not
    a run directory or an unreadable file."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: no such directory")
    markers = ("manifest.json", "eval/results.json", "models", "stages")
    if not any((run / m).exists() for m in markers):
        raise ReportError(
            f"{run}: not a cai run directory (no manifest.json, stages/, models/ or "
            "eval/results.json); give the folder a pipeline run wrote, such as runs/<name>"
        )
    inputs = Inputs(manifest=_read_json(run / "manifest.json"))
    results_path = run / "eval" / "results.json"
    inputs.results = _read_json(results_path)
    if inputs.results is not None:
        _check_results(inputs.results, results_path)
    for path in sorted((run / "models").glob("*/cai_train.json")):
        inputs.trained[path.parent.name] = _read_json(path)
    rounds = [p for p in (run / "rounds").glob("*/dpo/cai_train.json") if p.parts[-3].isdigit()]
    for path in sorted(
        rounds, key=lambda p: int(p.parts[-3])
    ):  # an online run's DPO rounds (cai.pipeline.online)
        inputs.trained[f"round{path.parent.parent.name} dpo"] = _read_json(path)
    # Stage files are read by the run store's rules (a torn last line dropped, the first done
    # record of a key kept), so the report counts what a resumed run would find.
    store = RunStore(run)
    try:
        inputs.stages = _stage_counts(store)
        if store.stage_path("judge").is_file():
            judged = store.read_stage("judge").values()
            inputs.judged = [r for r in judged if r.get("error") is None]
    except RunStoreError as e:
        raise ReportError(str(e)) from e
    for folder, _ in DATASETS:
        path = run / folder / "data.jsonl"
        if path.is_file():
            rows = _rows(path)
            inputs.datasets[folder] = len(rows)
            if folder == "preferences":
                inputs.preferences = rows
    return inputs


# ---- the documents -------------------------------------------------------------------------------


def consistency(inputs: Inputs) -> dict[str, dict]:
    """Position consistency per source: the judge stage, and each evaluated model's
    comparisons with the baseline."""
    out = {}
    judged = position_consistency([r.get("consistent") for r in inputs.judged])
    if judged:
        out["judge stage"] = judged
    if inputs.results:
        for name, m in inputs.results["metrics"].items():
            if m["position_consistency"]:
                out[f"eval: {name}"] = m["position_consistency"]
    return out


@dataclass
class Image:
    file: str
    """File name in report/."""
    caption: str
    wide: bool = False
    """Takes the page's full width (the training figures)."""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[list[list[str]]] = field(default_factory=list)
    """Each table: a header row, then rows of cell text."""
    images: list[Image] = field(default_factory=list)
    code: str | None = None
    """Preformatted text shown folded (the resolved config)."""


def _rate(value: dict | None) -> str:
    """``0.55 [0.40, 0.69] (n=20)``, or ``-``."""
    return "-" if value is None else f"{format_rate(value)} (n={value['n']})"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _run_section(inputs: Inputs, notes: list[str]) -> list[Section]:
    manifest = inputs.manifest
    if manifest is None:
        notes.append("No manifest.json: the recipe, its models and versions are unknown.")
        return []
    section = Section("Run")
    models = manifest.get("models") or {}
    if models:
        rows = [["role", "model", "backend"]]
        for role, spec in models.items():
            spec = spec if isinstance(spec, dict) else {"model": spec}
            rows.append([role, str(spec.get("model", "-")), str(spec.get("backend", "-"))])
        section.tables.append(rows)
    versions = manifest.get("versions") or {}
    if versions:
        section.paragraphs.append(
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."
        )
    if manifest.get("config") is not None:
        section.code = json.dumps(manifest["config"], indent=2, ensure_ascii=False)
    return [section]


def _results_section(inputs: Inputs, plots: Path, notes: list[str]) -> list[Section]:
    results = inputs.results
    if results is None:
        notes.append(
            "No evaluation (eval/results.json): the recipe has no evaluate stage, or it has "
            "not run yet; no win rates, graded rates or answer lengths."
        )
        return []
    metrics = results["metrics"]
    names = list(metrics)
    baseline = results["baseline"]

    def row(label: str, cell) -> list[str]:
        return [label, *(cell(metrics[n]) for n in names)]

    def reward(m: dict, key: str, spec: str) -> str:
        return "-" if m["reward"] is None else _number(m["reward"][key], spec)

    table = [
        ["metric", *names],
        row(f"win rate vs {baseline}", lambda m: _rate(m["win_rate"])),
        row("length-controlled win rate", lambda m: _rate(m["lc_win_rate"])),
        row("position consistency", lambda m: _rate(m["position_consistency"])),
        *(row(RATE_LABELS[r], lambda m, r=r: _rate(m[r])) for r in RATES),
        row("mean length (tokens)", lambda m: f"{m['mean_length']:.1f}"),
        row("length drift", lambda m: _number(m["length_drift"], "+.1%")),
        row("distinct-1", lambda m: f"{m['distinct_1']:.3f}"),
        row("distinct-2", lambda m: f"{m['distinct_2']:.3f}"),
        row("repeated openings", lambda m: f"{m['repeated_openings']:.3f}"),
        row("reward (mean)", lambda m: reward(m, "mean", ".3f")),
        row("reward drift", lambda m: reward(m, "drift", "+.3f")),
        row("errors", lambda m: str(m["errors"])),
    ]
    judge = results["judge"]
    section = Section(
        "Evaluation",
        [
            "Models: " + "; ".join(f"{n} = {spec}" for n, spec in results["models"].items()) + ".",
            f"Baseline {baseline}; judge {judge['model']} with the {judge['constitution']} "
            f"constitution (tie margin {judge['tie_margin']}). Rates are value [95% Wilson "
            "interval] (n); ↑ higher is better, ↓ lower is better.",
        ],
        [table],
    )
    for file, caption, draw in (
        ("win_rates.png", "Win rates against the baseline", plot_win_rates),
        ("rates.png", "Harmlessness, over-refusal and sycophancy", plot_rates),
        ("lengths.png", "Answer lengths", plot_lengths),
    ):
        if draw(results, plots / file):
            section.images.append(Image(file, caption))
        elif file == "win_rates.png":
            section.paragraphs.append(f"No win-rate figure: no model besides {baseline}.")
        else:
            section.paragraphs.append(f"No figure of {caption.lower()}: no graded answers.")
    return [section]


def _rounds_section(inputs: Inputs, plots: Path) -> list[Section]:
    rows = (inputs.results or {}).get("rounds")
    if not rows:
        return []

    def pairs(row: dict, key: str, spec: str) -> str:
        return "-" if not row["pairs"] else _number(row["pairs"][key], spec)

    def reward(row: dict) -> str:
        if row["reward"] is not None:
            return _number(row["reward"]["mean"], ".3f") + " (RM)"
        return _number(row["reward_margin"], ".3f") + " (DPO margin)"

    columns = {
        "round": lambda r: str(r["round"]),
        "model": lambda r: r["model"],
        "win vs base": lambda r: _rate(r["win_rate"]),
        "LC win vs base": lambda r: _rate(r["lc_win_rate"]),
        "win vs previous": lambda r: _rate(r["win_rate_vs_previous"]),
        "pairs": lambda r: pairs(r, "n", "d"),
        "judge margin": lambda r: pairs(r, "margin_mean", ".3f"),
        "judge consistency": lambda r: pairs(r, "consistency", ".2f"),
        "length drift": lambda r: _number(r["length_drift"], "+.1%"),
        "KL": lambda r: _number(r["kl"], ".4f"),
        "reward": reward,
        "distinct-2": lambda r: f"{r['distinct_2']:.3f}",
        "repeated openings": lambda r: f"{r['repeated_openings']:.3f}",
        RATE_LABELS["harmlessness"]: lambda r: _rate(r["harmlessness"]),
        RATE_LABELS["over_refusal"]: lambda r: _rate(r["over_refusal"]),
    }
    table = [list(columns), *([cell(row) for cell in columns.values()] for row in rows)]
    section = Section(
        "Online rounds",
        [
            "Each round samples from the policy the round before trained, labels the pairs and "
            "trains DPO (round 0: the starting policy). Win rates are on held-out prompts, both "
            "orders; KL is DPO's final mean log-ratio to its reference on the round's pairs.",
            *(f"Warning: {w}" for w in inputs.results.get("warnings", [])),
        ],
        [table],
    )
    if plot_rounds(rows, plots / "rounds.png"):
        section.images.append(Image("rounds.png", "Curves over rounds", wide=True))
    return [section]


def _training_section(inputs: Inputs, plots: Path, notes: list[str]) -> list[Section]:
    if not inputs.trained:
        notes.append("No trained models (models/*/cai_train.json): no training curves.")
        return []
    table = [
        [
            "model",
            "steps",
            "final loss",
            "mean loss",
            "reward accuracy",
            "held-out accuracy",
            "examples",
            "truncated",
        ]
    ]
    section = Section("Training", tables=[table])
    for name, record in inputs.trained.items():
        metrics = record.get("metrics") or {}
        data = record.get("data") or {}
        losses = [e["loss"] for e in record.get("log_history") or [] if "loss" in e]
        held = metrics.get("eval_accuracy", metrics.get("eval_rewards/accuracies"))
        table.append(
            [
                name,
                str(record.get("global_step", "-")),
                _number(losses[-1] if losses else metrics.get("loss"), ".4f"),
                _number(metrics.get("train_loss"), ".4f"),
                _number(metrics.get("rewards/accuracies"), ".2f"),
                _number(held, ".2f"),
                str(data.get("examples", "-")),
                str(data.get("truncated", "-")),
            ]
        )
        file = f"training_{name}.png"
        panels = plot_training(name, record, plots / file)
        if panels:
            curves = "loss" if panels == 1 else "loss and reward curves"
            section.images.append(Image(file, f"{name}: {curves}", wide=panels > 1))
        else:
            section.paragraphs.append(f"{name}: no logged loss, so no training curve.")
    untrained = [
        f"No {what} model trained in this run."
        for kind, what in (("sft", "SFT"), ("reward", "reward"), ("dpo", "DPO"))
        if not any(name == kind or name.endswith(f" {kind}") for name in inputs.trained)
    ]
    if untrained:
        section.paragraphs.append(" ".join(untrained))
    return [section]


def _feedback_section(inputs: Inputs, plots: Path, notes: list[str]) -> list[Section]:
    section = Section("AI feedback")
    prefs = inputs.preferences
    if prefs:
        ps = [r["p_chosen"] for r in prefs if r.get("p_chosen") is not None]
        flags = [(r.get("meta") or {}).get("consistent") for r in prefs]
        flags = [f for f in flags if f is not None]
        text = f"{len(prefs)} exported preference pairs"
        if ps:
            text += f"; mean p(chosen) {sum(ps) / len(ps):.3f}"
        if flags:
            text += f"; {sum(flags)} of {len(flags)} position-consistent"
        section.paragraphs.append(text + ".")
        if plot_margins(prefs, plots / "margins.png"):
            section.images.append(Image("margins.png", "Preference margins"))
    else:
        notes.append("No preference pairs (preferences/data.jsonl): no margin histogram.")
    values = consistency(inputs)
    if values:
        section.tables.append(
            [["judged by", "position consistency"]] + [[k, _rate(v)] for k, v in values.items()]
        )
        plot_consistency(values, plots / "consistency.png")
        section.images.append(Image("consistency.png", "Judge position consistency"))
    else:
        notes.append(
            "No judged pairs (stages/judge.jsonl) and no evaluated comparisons: "
            "no position-consistency figure."
        )
    return [section] if section.paragraphs or section.tables else []


def _data_section(inputs: Inputs, notes: list[str]) -> list[Section]:
    section = Section("Data")
    if inputs.stages:
        rows = [["stage", "done", "failed", "skipped"]]
        for stage, count in inputs.stages.items():
            rows.append([stage, str(count.done), str(count.failed), str(count.skipped)])
        section.tables.append(rows)
    datasets = [["dataset", "rows"]]
    for folder, label in DATASETS:
        if folder in inputs.datasets:
            datasets.append([f"{label} ({folder}/data.jsonl)", str(inputs.datasets[folder])])
    if inputs.results:
        excluded = inputs.results["excluded"]
        datasets += [[f"eval prompts: {k}", str(v)] for k, v in inputs.results["sets"].items()]
        datasets.append(["eval prompts excluded (also training prompts)", str(excluded)])
    if len(datasets) > 1:
        section.tables.append(datasets)
    if not section.tables:
        notes.append("No stage records (stages/*.jsonl) and no exported datasets.")
        return []
    return [section]


def build_sections(inputs: Inputs, plots: Path) -> tuple[list[Section], list[str]]:
    """The report's sections (drawing their plots into ``plots``) and the notes on what is
    missing."""
    notes: list[str] = []
    sections = [
        *_run_section(inputs, notes),
        *_results_section(inputs, plots, notes),
        *_rounds_section(inputs, plots),
        *_training_section(inputs, plots, notes),
        *_feedback_section(inputs, plots, notes),
        *_data_section(inputs, notes),
    ]
    return sections, notes


def render_markdown(title: str, meta: list[str], sections: list[Section], notes: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", *(f"- {m}" for m in meta), ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for p in s.paragraphs:
            lines += [p, ""]
        for table in s.tables:
            lines.append("| " + " | ".join(cell(c) for c in table[0]) + " |")
            lines.append("|" + "---|" * len(table[0]))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table[1:]]
            lines.append("")
        for image in s.images:
            lines += [f"![{image.caption}]({PLOTS_DIR}/{image.file})", ""]
        if s.code is not None:
            lines += ["Resolved config:", "", "```json", s.code, "```", ""]
    if notes:
        lines += ["## Not in this report", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; }
header { background: #24476b; color: #fff; padding: 1.2rem 2rem .9rem; }
header h1 { margin: 0 0 .3rem; font-size: 1.6rem; font-weight: 600; }
header ul { margin: 0; padding: 0; list-style: none; font-size: .85rem; opacity: .9; }
header li { display: inline; margin-right: 1.4rem; }
nav { margin-top: .7rem; font-size: .9rem; }
nav a { color: #cfe0f5; margin-right: 1rem; text-decoration: none; }
main { max-width: 1160px; margin: 0 auto; padding: 1rem 2rem 3rem; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; margin: 1.2rem 0;
          padding: .4rem 1.4rem 1rem; }
h2 { color: #24476b; font-size: 1.25rem; border-bottom: 1px solid #e3e8ee; padding-bottom: .3rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .88rem; }
th, td { border: 1px solid #d8dee4; padding: .3rem .7rem; text-align: right; white-space: nowrap; }
th { background: #eef2f7; } tr:nth-child(even) td { background: #fafbfc; }
td:first-child, th:first-child, td.text { text-align: left; }
.figures { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 1rem; }
figure { margin: 0; } figure.wide { grid-column: 1 / -1; }
figure img { width: 100%; height: auto; border: 1px solid #e3e8ee; border-radius: 4px; }
figcaption { font-size: .82rem; color: #57606a; margin-top: .2rem; }
details { margin: .6rem 0; } summary { cursor: pointer; color: #24476b; }
pre { background: #f6f8fa; border: 1px solid #e3e8ee; padding: .7rem; overflow-x: auto;
      font-size: .8rem; }
.notes li { color: #57606a; }
"""


def _anchor(title: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in title.lower())


_NUMERIC = re.compile(r"^(-|[-+]?\d)")


def _cell(text: str) -> str:
    """A table cell: numbers (and the ``-`` placeholder) right-aligned, text left-aligned."""
    css = "" if _NUMERIC.match(text) else ' class="text"'
    return f"<td{css}>{html.escape(text)}</td>"


def render_html(title: str, meta: list[str], sections: list[Section], notes: list[str]) -> str:
    e = html.escape
    if notes:
        sections = [*sections, Section("Not in this report")]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1>",
        "<ul>" + "".join(f"<li>{e(m)}</li>" for m in meta) + "</ul>",
        "<nav>" + "".join(f'<a href="#{_anchor(s.title)}">{e(s.title)}</a>' for s in sections),
        "</nav></header><main>",
    ]
    for s in sections:
        out.append(f'<section id="{_anchor(s.title)}"><h2>{e(s.title)}</h2>')
        out += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        for table in s.tables:
            out.append('<div class="scroll"><table><thead><tr>')
            out += [f"<th>{e(c)}</th>" for c in table[0]]
            out.append("</tr></thead><tbody>")
            for row in table[1:]:
                out.append("<tr>" + "".join(_cell(c) for c in row) + "</tr>")
            out.append("</tbody></table></div>")
        if s.images:
            out.append('<div class="figures">')
            for image in s.images:
                out.append(
                    f'<figure class="{"wide" if image.wide else ""}">'
                    f'<img src="{PLOTS_DIR}/{e(image.file)}" alt="{e(image.caption)}">'
                    f"<figcaption>{e(image.caption)}</figcaption></figure>"
                )
            out.append("</div>")
        if s.code is not None:
            out.append(
                f"<details><summary>Resolved config</summary><pre>{e(s.code)}</pre></details>"
            )
        if s.title == "Not in this report":
            out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out)


def _header(inputs: Inputs, run: Path) -> tuple[str, list[str]]:
    manifest = inputs.manifest or {}
    config = manifest.get("config") or {}
    title = f"cai run report: {config.get('name') or run.name}"
    meta = [f"run directory: {run}"]
    if config:
        meta.append(f"model: {config.get('model', '-')}")
        meta.append(f"constitution: {config.get('constitution', '-')}")
    for key in ("created", "updated"):
        if manifest.get(key):
            meta.append(f"{key}: {manifest[key]}")
    if manifest.get("config_hash"):
        meta.append(f"config hash: {str(manifest['config_hash'])[:12]}")
    return title, meta


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
    title, meta = _header(inputs, run)
    (run / "report.md").write_text(render_markdown(title, meta, sections, notes), encoding="utf-8")
    page = run / "report.html"
    page.write_text(render_html(title, meta, sections, notes), encoding="utf-8")
    return page


__all__ = ["Inputs", "ReportError", "read_inputs", "write_report"]
