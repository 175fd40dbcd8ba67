"""The run report: ``<run>/report.md`` and ``<run>/report.html`` with matplotlib plots in
``<run>/report/`` (drawn by cai.report.plots). ``cai report RUN_DIR``, or at the end of a pipeline run that
trains or evaluates.

It reads whatever the run has (each input is optional, and the report says what is missing):
``manifest.json`` (recipe, models by role, times), ``eval/results.json`` (cai.eval.run),
``models/*/cai_train.json`` (the trainers' curves and metrics), ``preferences/data.jsonl`` (the
judged pairs' p(chosen)), ``stages/*.jsonl`` (record counts; the judge stage's position
consistency), the exported datasets (counts) and ``review/labels.jsonl`` (people's labels of
judged pairs, ``cai review``: the human audit). The HTML page is self-contained apart from the
PNGs beside it (relative paths), so it opens from disk in any browser. Every string that comes
from the run (model names, paths, the recipe name) is escaped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cai.eval.metrics import METRICS, format_rate
from cai.jsonl import JsonlError, iter_jsonl
from cai.layout import DATA_FILE, EXPORTS, TRAIN_RESULT, RunLayout
from cai.report.plots import (
    LEXICAL,
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
from cai.report.render import Image, Section, render_html, render_markdown
from cai.stats import position_consistency
from cai.store import RunStore, RunStoreError

DATASETS = tuple(zip(EXPORTS, ("SFT examples", "revision pairs", "preference pairs"), strict=True))
"""The export folders (``cai.layout``) the report counts, with what they hold."""
NAMES = RunLayout(Path())
"""The layout's names relative to a run (for the report's notes)."""


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
    audit: dict | None = None
    """``cai review stats`` of the run's people's labels, when it has any."""


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
        missing = [k for k in METRICS if k not in metrics and k not in LEXICAL]
        if missing:
            raise ReportError(f"{path}: model {name!r} has no {', '.join(missing)}")


def read_inputs(run_dir: str | Path) -> Inputs:
    """Everything the report shows from ``run_dir``; raises ReportError for a folder that is not
    a run directory or an unreadable file."""
    run = RunLayout(Path(run_dir))
    if not run.root.is_dir():
        raise ReportError(f"{run.root}: no such directory")
    markers = (run.manifest, run.eval_results, run.models, run.stages)
    if not any(m.exists() for m in markers):
        raise ReportError(
            f"{run.root}: not a cai run directory (no "
            f"{', '.join(m.relative_to(run.root).as_posix() for m in markers)}); "
            "give the folder a pipeline run wrote, such as runs/<name>"
        )
    inputs = Inputs(manifest=_read_json(run.manifest))
    inputs.results = _read_json(run.eval_results)
    if inputs.results is not None:
        _check_results(inputs.results, run.eval_results)
    for path in sorted(run.models.glob(f"*/{TRAIN_RESULT}")):
        inputs.trained[path.parent.name] = _read_json(path)
    for r, folder in sorted(run.round_models("dpo").items()):  # an online run's DPO rounds
        if (folder / TRAIN_RESULT).is_file():
            inputs.trained[f"round{r} dpo"] = _read_json(folder / TRAIN_RESULT)
    # Stage files are read by the run store's rules (a torn last line dropped, the first done
    # record of a key kept), so the report counts what a resumed run would find.
    store = RunStore(run.root)
    try:
        inputs.stages = _stage_counts(store)
        if store.stage_path("judge").is_file():
            judged = store.read_stage("judge").values()
            inputs.judged = [r for r in judged if r.get("error") is None]
    except RunStoreError as e:
        raise ReportError(str(e)) from e
    inputs.audit = _audit(run)
    for folder, _ in DATASETS:
        path = run.export(folder) / DATA_FILE
        if path.is_file():
            rows = _rows(path)
            inputs.datasets[folder] = len(rows)
            if folder == "preferences":
                inputs.preferences = rows
    return inputs


def _audit(run: RunLayout) -> dict | None:
    """The review statistics of the run's labels file, if it has one."""
    if not run.review_labels.is_file():
        return None
    from cai.review import ReviewError, load_items, read_labels, review_stats

    try:
        return review_stats(load_items(run.root), read_labels(run.review_labels))
    except (ReviewError, JsonlError) as e:
        raise ReportError(f"{run.review_labels}: {e}") from e


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


def _rate(value: dict | None) -> str:
    """``0.55 [0.40, 0.69] (n=20)``, or ``-``."""
    return "-" if value is None else f"{format_rate(value)} (n={value['n']})"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _run_section(inputs: Inputs, notes: list[str]) -> list[Section]:
    manifest = inputs.manifest
    if manifest is None:
        notes.append(f"No {NAMES.manifest}: the recipe, its models and versions are unknown.")
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
            f"No evaluation ({NAMES.eval_results}): the recipe has no evaluate stage, or it has "
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
        *(row(RATE_LABELS[r], lambda m, r=r: _rate(m.get(r))) for r in LEXICAL),
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
        RATE_LABELS["refusal_red_team"]: lambda r: _rate(r.get("refusal_red_team")),
        RATE_LABELS["refusal_over_refusal"]: lambda r: _rate(r.get("refusal_over_refusal")),
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
        notes.append(f"No trained models ({NAMES.models}/*/{TRAIN_RESULT}): no training curves.")
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
        notes.append(
            f"No preference pairs ({NAMES.preferences() / DATA_FILE}): no margin histogram."
        )
    values = consistency(inputs)
    if values:
        section.tables.append(
            [["judged by", "position consistency"]] + [[k, _rate(v)] for k, v in values.items()]
        )
        plot_consistency(values, plots / "consistency.png")
        section.images.append(Image("consistency.png", "Judge position consistency"))
    elif any(r.get("scores") is not None for r in inputs.judged):
        notes.append(
            f"{len(inputs.judged)} judged pairs, labelled pointwise (each response scored alone, "
            "no order shown): no position-consistency figure."
        )
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
            shown = NAMES.export(folder) / DATA_FILE
            datasets.append([f"{label} ({shown})", str(inputs.datasets[folder])])
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


def _audit_section(inputs: Inputs) -> list[Section]:
    """Human-judge agreement from ``cai review``'s labels: overall, per category, round and
    judge margin, and the length preference and inter-annotator agreement."""
    audit = inputs.audit
    if audit is None:
        return []
    section = Section("Human audit")
    answers = ", ".join(f"{k} {v}" for k, v in audit["answers"].items())
    section.paragraphs.append(
        f"{audit['labels']} labels ({answers}) by {', '.join(audit['annotators'])}; decided "
        "labels of pairs the judge decided count (`cai review stats`)."
    )

    def row(label: str, value: dict) -> list[str]:
        kappa = "n/a" if value["kappa"] is None else f"{value['kappa']:.2f}"
        return [label, format_rate(value) if value["n"] else "n/a", str(value["n"]), kappa]

    rows = [["pairs", "human-judge agreement", "n", "kappa"], row("all", audit["agreement"])]
    for title, name in (("category", "by_category"), ("round", "by_round")):
        rows += [row(f"{title} {k}", v) for k, v in audit[name].items()]
    rows += [row(f"judge margin {k}", v) for k, v in audit["by_margin"].items()]
    section.tables.append(rows)
    length = audit["length"]
    if length["pairs"]:
        section.paragraphs.append(
            f"The longer response was preferred by the judge in {length['judge_longer']:.2f} "
            f"and by people in {length['people_longer']:.2f} of {length['pairs']} labels."
        )
    if audit["inter_annotator"]:
        pairs = [["annotators", "agreement", "n", "kappa"]]
        pairs += [row(k, v) for k, v in audit["inter_annotator"].items()]
        section.tables.append(pairs)
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
        *_audit_section(inputs),
        *_data_section(inputs, notes),
    ]
    return sections, notes


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
    run = RunLayout(Path(run_dir))
    inputs = read_inputs(run.root)
    plots = run.plots
    plots.mkdir(exist_ok=True)
    for old in plots.glob("*.png"):
        old.unlink()
    sections, notes = build_sections(inputs, plots)
    title, meta = _header(inputs, run.root)
    run.report_md.write_text(render_markdown(title, meta, sections, notes), encoding="utf-8")
    page = run.report_html
    page.write_text(render_html(title, meta, sections, notes), encoding="utf-8")
    return page


__all__ = ["Inputs", "ReportError", "read_inputs", "write_report"]
