"""The run directory's layout (cai.layout): the paths every module takes from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai.layout import RunLayout, legacy_run_dir, shard_file, stage_file


def test_the_paths_of_a_run_and_of_its_rounds():
    run = RunLayout(Path("/r"))
    assert (run.manifest, run.stages, run.stage("judge")) == (
        Path("/r/manifest.json"),
        Path("/r/stages"),
        Path("/r/stages/judge.jsonl"),
    )
    assert run.stage("judge", (2, 4)) == Path("/r/stages/judge.shard-2-of-4.jsonl")
    assert (run.lock(), run.lock((2, 4))) == (Path("/r/.lock"), Path("/r/.lock.shard-2-of-4"))
    assert (run.sft, run.revision_pairs, run.preferences()) == (
        Path("/r/sft"),
        Path("/r/revision_pairs"),
        Path("/r/preferences"),
    )
    assert run.preferences(2) == Path("/r/rounds/2/preferences")
    assert (run.model("sft"), run.model("dpo", 3)) == (
        Path("/r/models/sft"),
        Path("/r/rounds/3/dpo"),
    )
    assert (run.eval_results, run.report_html, run.plots) == (
        Path("/r/eval/results.json"),
        Path("/r/report.html"),
        Path("/r/report"),
    )
    assert run.relative(run.model("dpo", 1)) == "<run>/rounds/1/dpo"
    assert legacy_run_dir("/r/models/sft") == Path("/r")


def test_round_models_lists_the_rounds_that_have_the_folder(tmp_path):
    run = RunLayout(tmp_path)
    for r in (2, 10):
        run.model("dpo", r).mkdir(parents=True)
    (tmp_path / "rounds" / "x" / "dpo").mkdir(parents=True)  # not a round
    assert run.round_models("dpo") == {2: run.model("dpo", 2), 10: run.model("dpo", 10)}


def test_shard_file_names_read_back():
    assert shard_file(stage_file("eval_compare", (3, 8))) == ("eval_compare", (3, 8))
    assert shard_file(stage_file("judge")) is None
    with pytest.raises(ValueError, match="stage name"):
        stage_file("../x")
