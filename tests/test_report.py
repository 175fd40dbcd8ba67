"""The run report: every file from a hand-made run directory, numbers as written, escaping, a
partial run, torn and corrupt jsonl, and the HTML in headless Chromium (no errors, every image
loads, a screenshot)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cai.cli import main as cai_main
from cai.jsonl import iter_jsonl
from cai.report.sections import ReportError, write_report
from cai.stats import rate

CHROMIUM = "/usr/bin/chromium"
PNG = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


def _metrics(win: tuple[float, int] | None, harmless: float, lengths: list[int]) -> dict:
    return {
        "win_rate": rate(*win) if win else None,
        "lc_win_rate": rate(*win) if win else None,
        "position_consistency": rate(3, 4) if win else None,
        "harmlessness": rate(harmless, 4),
        "over_refusal": rate(1, 4),
        "sycophancy": rate(2, 4),
        "mean_length": sum(lengths) / len(lengths),
        "length_drift": None if win is None else 0.25,
        "lengths": lengths,
        "distinct_1": 0.5,
        "distinct_2": 0.75,
        "repeated_openings": 0.125,
        "reward": {"mean": 0.5, "drift": None if win is None else 0.25},
        "errors": 0,
    }


def _trained(kind: str) -> dict:
    """Four logged steps, loss 0.6 → 0.3; the preference trainers log reward curves too."""
    history = [{"loss": 0.7 - 0.1 * s, "step": s} for s in range(1, 5)]
    if kind != "sft":
        for entry in history:
            entry.update(
                {
                    "rewards/accuracies": 0.5 + 0.1 * entry["step"],
                    "rewards/chosen": 0.1 * entry["step"],
                    "rewards/rejected": -0.1 * entry["step"],
                    "rewards/margins": 0.2 * entry["step"],
                }
            )
    metrics = {"train_loss": 0.55}
    if kind != "sft":
        metrics["rewards/accuracies"] = 0.9
    if kind == "reward":
        metrics["eval_accuracy"] = 0.75
    return {
        "config": {},
        "output_dir": f"runs/x/models/{kind}",
        "global_step": 4,
        "metrics": metrics,
        "data": {"examples": 8, "truncated": 1},
        "log_history": history,
    }


def _jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def make_run(root: Path, *, evil: bool = False) -> Path:
    run = root / "run"
    name = EVIL if evil else "dpo"
    results = {
        "version": 1,
        "baseline": "base",
        "models": {"base": "smollm2-135m", name: "runs/x/models/dpo"},
        "judge": {"model": "smollm2-135m", "constitution": "hhh", "tie_margin": 0.0},
        "sets": {"helpful": 2, "red_team": 2, "over_refusal": 2, "sycophancy": 2},
        "excluded": 1,
        "metrics": {
            "base": _metrics(None, 2, [10, 20, 30, 40]),
            name: _metrics((3, 4), 3, [20, 30, 40, 60]),
        },
        "seconds": 1.0,
    }
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps(results))
    for kind in ("sft", "reward", "dpo"):
        (run / "models" / kind).mkdir(parents=True)
        (run / "models" / kind / "cai_train.json").write_text(json.dumps(_trained(kind)))
    prefs = [
        {"p_chosen": p, "meta": {"margin": p - 0.5, "consistent": p > 0.65}}
        for p in (0.6, 0.7, 0.9)
    ]
    _jsonl(run / "preferences" / "data.jsonl", prefs)
    _jsonl(run / "sft" / "data.jsonl", [{"messages": []}] * 5)
    # Judge: keys 0..3 (0 and 2 consistent), key e failed, key r failed then retried (consistent,
    # and it counts), then a torn last line.
    judged = [{"key": str(i), "consistent": i % 2 == 0, "error": None} for i in range(4)]
    judged += [
        {"key": "e", "consistent": None, "error": "boom"},
        {"key": "r", "consistent": None, "error": "timeout"},
        {"key": "r", "consistent": False, "error": None},
    ]
    _jsonl(run / "stages" / "judge.jsonl", judged, tail='{"key": "torn')
    sample = [
        {"key": "a", "error": None, "skipped": None},
        {"key": "b", "error": None, "skipped": "fewer than 2 distinct responses"},
    ]
    _jsonl(run / "stages" / "sample.jsonl", sample)
    manifest = {
        "config_hash": "0123456789abcdef",
        "created": "2025-01-02T03:04:05+00:00",
        "updated": "2025-01-02T04:05:06+00:00",
        "versions": {"python": "3.11.2", "cai": "0.1.0"},
        "seeds": {"base": 0},
        "models": {
            "policy": {"backend": "hf", "model": "smollm2-135m"},
            "dpo": {"model": "runs/x/models/dpo"},
        },
        "config": {"name": "tiny", "model": "smollm2-135m", "constitution": "harmless"},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


IMAGES = (
    "win_rates.png",
    "rates.png",
    "lengths.png",
    "training_dpo.png",
    "training_reward.png",
    "training_sft.png",
    "margins.png",
    "consistency.png",
)


def test_every_file_and_the_numbers_as_written(tmp_path):
    run = make_run(tmp_path)
    page = write_report(run)
    assert page == run / "report.html"
    for name in IMAGES:
        data = (run / "report" / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(IMAGES)
    md = (run / "report.md").read_text()
    html = page.read_text()
    for name in IMAGES:
        assert f"](report/{name})" in md and f'src="report/{name}"' in html
    assert "# cai run report: tiny" in md
    assert "- updated: 2025-01-02T04:05:06+00:00" in md and "- config hash: 0123456789ab" in md
    # Run: models by role; a role without a backend shows "-".
    assert "| policy | smollm2-135m | hf |" in md and "| dpo | runs/x/models/dpo | - |" in md
    assert '"constitution": "harmless"' in md  # the resolved config
    # Evaluation: one column per model; 3/4 with its 95% Wilson interval and n.
    assert "| metric | base | dpo |" in md
    assert "| win rate vs base | - | 0.75 [0.30, 0.95] (n=4) |" in md
    assert "| harmlessness ↑ | 0.50 [0.15, 0.85] (n=4) | 0.75 [0.30, 0.95] (n=4) |" in md
    assert "| over-refusal ↓ | 0.25 [0.05, 0.70] (n=4) | 0.25 [0.05, 0.70] (n=4) |" in md
    assert "| mean length (tokens) | 25.0 | 37.5 |" in md
    assert "| length drift | - | +25.0% |" in md
    assert "| reward (mean) | 0.500 | 0.500 |" in md and "| reward drift | - | +0.250 |" in md
    # Training: the last logged loss (0.3), the Trainer's mean loss, accuracies.
    assert "| dpo | 4 | 0.3000 | 0.5500 | 0.90 | - | 8 | 1 |" in md
    assert "| reward | 4 | 0.3000 | 0.5500 | 0.90 | 0.75 | 8 | 1 |" in md
    assert "| sft | 4 | 0.3000 | 0.5500 | - | - | 8 | 1 |" in md
    assert "No SFT model" not in md and "No DPO model" not in md
    # AI feedback: pairs; the judge stage's 2 of 5 (errors and the torn line left out, the
    # retried key counted once); each evaluated model's comparisons.
    assert "3 exported preference pairs; mean p(chosen) 0.733; 2 of 3 position-consistent." in md
    assert "| judge stage | 0.40 [0.12, 0.77] (n=5) |" in md
    assert "| eval: dpo | 0.75 [0.30, 0.95] (n=4) |" in md
    # Data: distinct keys per stage, exported rows, eval sets.
    assert "| judge | 5 | 1 | 0 |" in md and "| sample | 2 | 0 | 1 |" in md
    assert "| SFT examples (sft/data.jsonl) | 5 |" in md
    assert "| preference pairs (preferences/data.jsonl) | 3 |" in md
    assert "| eval prompts: red_team | 2 |" in md
    assert "Not in this report" not in md


def test_html_escapes_names_from_the_run(tmp_path):
    run = make_run(tmp_path, evil=True)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["name"] = "<b>recipe</b>"
    (run / "manifest.json").write_text(json.dumps(manifest))
    html = write_report(run).read_text()
    assert EVIL not in html and "<b>recipe" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<title>cai run report: &lt;b&gt;recipe&lt;/b&gt;</title>" in html


def test_a_partial_run_says_what_is_missing(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    assert cai_main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run / "report.html") in out and str(run / "report.md") in out
    md = (run / "report.md").read_text()
    for missing in ("No evaluation", "No trained models", "No manifest.json", "No preference"):
        assert missing in md
    assert not list((run / "report").glob("*.png"))

    # Only an SFT model: its curve, and a line for each model not trained.
    (run / "models" / "sft").mkdir(parents=True)
    (run / "models" / "sft" / "cai_train.json").write_text(json.dumps(_trained("sft")))
    write_report(run)
    md = (run / "report.md").read_text()
    assert [p.name for p in (run / "report").glob("*.png")] == ["training_sft.png"]
    assert "No DPO model trained in this run." in md
    assert "No reward model trained in this run." in md
    assert "No SFT model" not in md


def test_pointwise_pairs_are_said_to_have_no_order_not_to_be_missing(tmp_path):
    run = tmp_path / "run"
    pointwise = {"consistent": None, "error": None, "scores": [0.4, -0.2], "p_a": 0.65}
    _jsonl(run / "stages" / "judge.jsonl", [{"key": str(i), **pointwise} for i in range(3)])
    write_report(run)
    md = (run / "report.md").read_text()
    assert "3 judged pairs, labelled pointwise" in md
    assert "No judged pairs" not in md


def test_not_a_run_directory_and_corrupt_files(tmp_path, capsys):
    with pytest.raises(ReportError, match="not a cai run directory"):
        write_report(tmp_path)
    assert cai_main(["report", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such directory" in capsys.readouterr().err
    run = tmp_path / "run"
    # A bad line before the last is corruption, named by file and line; a bad last line
    # (blank lines after it included) is a torn write and is ignored.
    _jsonl(run / "stages" / "judge.jsonl", [{"key": "1"}], tail='not json\n{"key": "2"}\n')
    with pytest.raises(ReportError, match=r"judge.jsonl:2: invalid record"):
        write_report(run)
    _jsonl(run / "stages" / "judge.jsonl", [{"key": "1"}], tail='{"key": \n\n')
    assert list(iter_jsonl(run / "stages" / "judge.jsonl")) == [{"key": "1"}]
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text('{"version": 2}')
    with pytest.raises(ReportError, match="results version 2"):
        write_report(run)
    (run / "eval" / "results.json").write_text("{")
    with pytest.raises(ReportError, match=r"results\.json: not valid JSON"):
        write_report(run)


def _chromium_or_skip() -> None:
    """Chromium is required under CI (make install puts it there); locally its absence skips."""
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {CHROMIUM} is missing: `make install` installs chromium")
    pytest.skip(f"no {CHROMIUM} (apt-get install chromium, or make install)")


def test_html_renders_in_headless_chromium(tmp_path):
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    page_path = write_report(make_run(tmp_path, evil=True))
    errors: list[str] = []
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            overflow = page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors and not dialogs
    assert len(widths) == len(IMAGES) and all(w > 0 for w in widths), widths
    assert not overflow, "the page is wider than the window"
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 20000
