"""The run report: every file from a hand-made run directory, numbers as written, escaping, a
partial run, and the HTML in headless Chromium (no errors, every image loads, a screenshot)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cai.cli import main as cai_main
from cai.evaluate import rate
from cai.report import ReportError, write_report

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
    history = [{"loss": 0.7 - 0.1 * s, "step": s} for s in range(1, 5)]
    if kind != "sft":
        for entry in history:
            entry.update({"rewards/accuracies": 0.5 + 0.1 * entry["step"], "rewards/margins": 0.1})
    metrics = {"train_loss": 0.55}
    if kind != "sft":
        metrics["rewards/accuracies"] = 0.9
    if kind == "reward":
        metrics["eval_accuracy"] = 0.75
    return {"config": {}, "global_step": 4, "metrics": metrics, "data": {"examples": 8}, "log_history": history}  # fmt: skip


def make_run(root: Path, *, evil: bool = False) -> Path:
    run = root / "run"
    (run / "eval").mkdir(parents=True)
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
    (run / "eval" / "results.json").write_text(json.dumps(results))
    for kind in ("sft", "reward", "dpo"):
        (run / "models" / kind).mkdir(parents=True)
        (run / "models" / kind / "cai_train.json").write_text(json.dumps(_trained(kind)))
    (run / "preferences").mkdir()
    rows = [{"p_chosen": p, "meta": {"margin": p - 0.5}} for p in (0.6, 0.7, 0.9)]
    (run / "preferences" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "stages").mkdir()
    judged = [{"key": str(i), "consistent": i % 2 == 0, "error": None} for i in range(4)]
    judged.append({"key": "e", "consistent": None, "error": "boom"})
    text = "".join(json.dumps(r) + "\n" for r in judged) + '{"key": "torn'
    (run / "stages" / "judge.jsonl").write_text(text)
    manifest = {"config": {"name": "tiny", "model": "smollm2-135m", "constitution": "harmless"}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


IMAGES = (
    "win_rates.png",
    "rates.png",
    "lengths.png",
    "margins.png",
    "consistency.png",
    "training_sft.png",
    "training_reward.png",
    "training_dpo.png",
)


def test_every_file_and_the_numbers_as_written(tmp_path):
    run = make_run(tmp_path)
    page = write_report(run)
    assert page == run / "report.html"
    for name in IMAGES:
        data = (run / "report" / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
    md = (run / "report.md").read_text()
    html = page.read_text()
    for name in IMAGES:
        assert f"](report/{name})" in md and f'src="report/{name}"' in html
    # Win rate 3/4 with its Wilson interval, drift, reward, held-out accuracy, pair counts.
    assert "| dpo | 0.75 [0.30, 0.95] | 0.75 [0.30, 0.95] |" in md
    assert "+25.0%" in md and "0.500" in md
    assert "| reward | 4 | 0.5500 | 0.90 | 0.75 | 8 |" in md
    assert "3 exported preference pairs; mean p(chosen) 0.733." in md
    # The judge stage: 2 of 4 consistent (the error record and the torn line left out).
    assert "| judge stage | 0.50 [0.15, 0.85] |" in md
    assert "# cai run report: tiny" in md


def test_html_escapes_names_from_the_run(tmp_path):
    html = write_report(make_run(tmp_path, evil=True)).read_text()
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_partial_run_says_what_is_missing(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    assert cai_main(["report", str(run)]) == 0
    assert "wrote" in capsys.readouterr().out
    md = (run / "report.md").read_text()
    assert "No evaluation" in md and "No trained models" in md and "No manifest.json" in md
    assert not list((run / "report").glob("*.png"))
    with pytest.raises(ReportError, match="not a cai run directory"):
        write_report(tmp_path / "run" / "stages")
    (run / "stages" / "judge.jsonl").write_text('{"key": 1}\nnot json\n{"key": 2}\n')
    with pytest.raises(ReportError, match=r"judge.jsonl:2: not valid JSON"):
        write_report(run)
    assert cai_main(["report", str(tmp_path / "nowhere")]) == 1


def _chromium_present() -> bool:
    present = Path(CHROMIUM).is_file() and shutil.which(CHROMIUM) is not None
    if not present and os.environ.get("CI"):
        raise RuntimeError(f"CI=true but {CHROMIUM} is missing: `make test` installs chromium")
    return present


@pytest.mark.skipif(not _chromium_present(), reason="no Chromium (local runs; CI installs it)")
def test_html_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    page_path = write_report(make_run(tmp_path))
    errors: list[str] = []
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
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors
    assert len(widths) == len(IMAGES) and all(w > 100 for w in widths)
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 20000
