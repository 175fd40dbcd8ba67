"""Model specs and the conversion cache: a killed conversion leaves nothing loadable behind, and
two processes converting at once both get the one complete folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.jsonl import umask_mode
from cai.models import ALIASES, cache_dir, resolve_model


def test_spec_kinds(tmp_path):
    assert resolve_model("org/some-model") == resolve_model("org/some-model")
    hub = resolve_model("org/some-model")
    assert not hub.is_local and hub.path == "org/some-model"
    with pytest.raises(FileNotFoundError, match="no such model file or folder"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=r"needs a config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    local = resolve_model(str(tmp_path))
    assert local.is_local and local.path == str(tmp_path.resolve())


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CAI_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "cai"


def _convert(gguf: Path, cache: Path) -> subprocess.Popen:
    code = f"from cai.models import resolve_model; print('PATH', resolve_model({str(gguf)!r}).path)"
    env = {**os.environ, "CAI_CACHE_DIR": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_and_concurrent_conversions(tmp_path, model_path):
    info = ALIASES["smollm2-135m"]
    gguf = cache_dir() / "downloads" / f"{info.package}-{info.version}" / info.member
    assert gguf.is_file(), "resolving the default model keeps its GGUF in the cache"
    cache = tmp_path / "cache"

    victim = _convert(gguf, cache)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cache / "models").glob(".*.lock")):
        time.sleep(0.1)
    time.sleep(3)  # well inside the conversion, which takes tens of seconds
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not [p for p in (cache / "models").iterdir() if not p.name.startswith(".")], (
        "a killed conversion must not leave a folder that looks complete"
    )

    first, second = _convert(gguf, cache), _convert(gguf, cache)
    outputs = [p.communicate(timeout=500)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    paths = {
        line.split(" ", 1)[1]
        for out in outputs
        for line in out.splitlines()
        if line.startswith("PATH ")
    }
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert sum("converting" in out for out in outputs) == 1, "only one process converts"
    assert {"config.json", "model.safetensors", "tokenizer.json", "cai-converted.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not list((cache / "models").glob(".*.tmp-*")), "leftovers of the killed run are cleared"
    # The folder gets the permissions the umask gives (not mkdtemp's 0700): a shared cache works.
    assert folder.stat().st_mode & 0o777 == umask_mode(0o777)

    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(model_path)
    for (name, a), (_, b) in zip(
        converted.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert a.equal(b), name
