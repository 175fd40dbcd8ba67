"""An installed wheel finds the shipped constitutions, prompts, recipes and data sets."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_shipped_files(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("cai-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = (
        "from cai.resources import resolve, shipped_names\n"
        "for kind in ('constitutions', 'prompts', 'pipelines', 'data'):\n"
        "    print(kind, shipped_names(kind))\n"
        "print(resolve('constitutions', 'harmless'))\n"
        "from cai.constitution import load_constitution\n"
        "print(len(load_constitution('harmless').principles))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert f"{site}/cai/_shipped/constitutions/harmless.yaml" in out
    for name in ("harmless", "critique", "judge_mc", "quickstart", "red_team", "helpful"):
        assert f"'{name}'" in out
    assert out.strip().endswith("16")
