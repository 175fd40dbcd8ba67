"""The run directory as the pipeline uses it, with a fake engine: one process per run directory
(refused before any model loads), a deleted manifest, and operating-system errors (a full disk,
a refused connection) that end in one line and exit code 3 instead of a traceback."""

from __future__ import annotations

import errno
import json
import logging
import socket

import pytest
from fakes import TextEngine
from test_pipeline import records, write_prompts, write_recipe

import cai.pipeline.run as run_module
from cai import cli
from cai import store as store_module
from cai.pipeline.__main__ import main
from cai.pipeline.recipe import load_recipe
from cai.pipeline.run import Runner
from cai.store import RunStoreError


def test_a_second_run_on_the_same_directory_is_refused_before_it_loads_a_model(
    tmp_path, monkeypatch
):
    recipe = load_recipe(write_recipe(tmp_path, write_prompts(tmp_path / "p.jsonl", ["a?"])))
    run_dir = tmp_path / "run"
    loaded = []
    monkeypatch.setattr(run_module, "create_engine", lambda *a, **k: loaded.append(k) or None)
    outcome = {}

    class FirstRun(TextEngine):
        def generate(self, conversations, sampling=None, *, prefixes=None, progress=False):
            if not outcome:  # while the first run is busy, a second one starts on its directory
                manifest = (run_dir / "manifest.json").read_bytes()
                with pytest.raises(RunStoreError) as refused:
                    Runner(recipe, run_dir).run()
                outcome["message"] = str(refused.value)
                outcome["manifest untouched"] = (run_dir / "manifest.json").read_bytes() == manifest
            return super().generate(conversations, sampling, prefixes=prefixes, progress=progress)

    Runner(recipe, run_dir, engine=FirstRun()).run()
    assert loaded == []  # the second run loaded no model
    assert outcome["manifest untouched"]
    assert str(run_dir) in outcome["message"] and "another process" in outcome["message"]
    # The lock goes with the run: the next run on the directory goes ahead.
    engine = TextEngine()
    Runner(recipe, run_dir, engine=engine).run()
    assert engine.batches == []
    # Shards of one run directory are separate processes by design: each has its own lock.
    store = store_module.RunStore(run_dir)
    with store.lock((2, 2)):
        Runner(recipe, run_dir, shard=(1, 2), engine=TextEngine()).run()
    with store.lock((1, 2)), pytest.raises(RunStoreError, match=r"in use for shard 1/2"):
        Runner(recipe, run_dir, shard=(1, 2), engine=TextEngine()).run()


def test_a_deleted_manifest_is_reported_and_checked_against_the_records(tmp_path, caplog):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a?", "b?"])
    path = write_recipe(tmp_path, prompts)
    run_dir = tmp_path / "run"
    Runner(load_recipe(path), run_dir, engine=TextEngine()).run()
    manifest = run_dir / "manifest.json"

    # The same recipe: a warning, then a resume with nothing redone and a new manifest.
    manifest.unlink()
    engine = TextEngine()
    with caplog.at_level(logging.WARNING):
        Runner(load_recipe(path), run_dir, engine=engine).run()
    assert engine.batches == []
    assert f"{manifest} is missing" in caplog.text and "cannot check" in caplog.text
    assert json.loads(manifest.read_text())["config"]["name"] == "test"

    # A changed recipe: the records were made with other settings, so it is refused.
    manifest.unlink()
    changed = write_recipe(tmp_path, prompts, max_tokens=7)
    with pytest.raises(RunStoreError, match=r"other settings.*--run-dir.*--force") as info:
        Runner(load_recipe(changed), run_dir, engine=TextEngine())
    assert str(run_dir / "stages" / "generate.jsonl") in str(info.value)
    assert not manifest.exists()
    Runner(load_recipe(changed), run_dir, engine=TextEngine(), force=True).run()
    assert len(records(run_dir, "generate")) == 4


def _full_disk(monkeypatch):
    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "write", write)


def test_a_full_disk_ends_in_one_line_and_exit_3(tmp_path, capsys, monkeypatch):
    path = write_recipe(tmp_path, write_prompts(tmp_path / "p.jsonl", ["a?"]))
    monkeypatch.setattr(run_module, "create_engine", lambda *a, **k: TextEngine())
    _full_disk(monkeypatch)
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 3
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert str(tmp_path / "run" / "stages" / "generate.jsonl") in line
    assert "No space left on device" in line and "Free space" in line and "resumes" in line


def test_a_refused_connection_ends_in_one_line_and_exit_3(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_recipe(tmp_path, write_prompts(tmp_path / "p.jsonl", ["a?"]))
    text = path.read_text().replace(
        "  backend: hf\n  dtype: float32\n",
        f"  backend: openai\n  options: {{base_url: 'http://127.0.0.1:{port}/v1', "
        "max_retries: 0}\n",
    )
    path.write_text(text)
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"127.0.0.1:{port}" in line and "server" in line
    assert "Traceback" not in err


def test_cai_command_os_errors_end_in_one_line_and_exit_3(tmp_path, capsys, monkeypatch):
    import cai.report.sections

    def denied(run_dir):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "report.html"))

    monkeypatch.setattr(cai.report.sections, "write_report", denied)
    assert cli.main(["report", str(tmp_path)]) == 3
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and str(tmp_path / "report.html") in line
    assert "Permission denied" in line and "Check the permissions" in line
