"""Merging the shards of a run that ran in separate run directories (one per machine).

python -m cai.pipeline merge runs/a runs/b --out runs/merged
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from cai.keys import Shard
from cai.layout import shard_file
from cai.stage_files import merge_shard_files
from cai.store import RunStore, RunStoreError, config_hash

log = logging.getLogger(__name__)


def merge_runs(
    run_dirs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> RunStore:
    """Merge shards that ran in separate run directories (one per machine) into ``out_dir``.

    Every run must have a manifest with the same config hash. For each stage, the shard files of
    all runs are merged into ``out_dir/stages/<stage>.jsonl`` as by :meth:`RunStore.merge_shards`;
    unsharded stage files in the inputs are skipped with a warning. ``out_dir`` gets the first
    run's manifest plus ``merged_from``, and can then be read, summarised or resumed as one run.

    Raises:
        RunStoreError: a run has no manifest; config hashes differ; a shard file is in two runs;
            or any error of :meth:`RunStore.merge_shards`.
    """
    runs = [RunStore(d) for d in run_dirs]
    if not runs:
        raise RunStoreError("merge_runs() needs at least one run directory")
    manifests = []
    for run in runs:
        manifest = run.read_manifest()
        if manifest is None:
            raise RunStoreError(f"{run.manifest_path} does not exist: is {run.run_dir} a run dir?")
        manifests.append(manifest)
    hashes = {config_hash(m["config"]) for m in manifests}
    if len(hashes) > 1:
        listing = "\n".join(
            f"  {r.run_dir}: {config_hash(m['config'])[:12]}"
            for r, m in zip(runs, manifests, strict=True)
        )
        raise RunStoreError(
            "cannot merge runs made with different configs (config_hash):\n" + listing + "\n"
            "Only shards of one config merge; re-run the odd ones with the same recipe and --set."
        )
    target = RunStore(out_dir)
    target.check_manifest(manifests[0]["config"])
    by_stage: dict[str, dict[Shard, Path]] = {}
    for run in runs:
        for path in run.stage_files():
            found = shard_file(path.name)
            if found is None:
                log.warning("%s is not a shard file; merge_runs() skips it", path)
                continue
            stage, shard = found
            files = by_stage.setdefault(stage, {})
            if shard in files:
                raise RunStoreError(
                    f"shard {shard[0]}/{shard[1]} of stage {stage!r} is in two runs: "
                    f"{files[shard]} and {path}. Keep one of them."
                )
            files[shard] = path
    for stage, files in sorted(by_stage.items()):
        merge_shard_files(stage, files, target.stage_path(stage))
    manifest = dict(manifests[0])
    manifest["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    manifest["merged_from"] = [str(run.run_dir) for run in runs]
    target._write_manifest(manifest)
    return target
