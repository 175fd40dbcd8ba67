"""The run store: the durable state of a ``python -m cai.pipeline`` job under ``runs/<name>/``.

A batch job can be killed at any moment (SIGKILL, pre-emption, a power cut) and re-run with the same
command; this module is what makes that safe. Its files (``cai.layout`` names them)::

    runs/<name>/manifest.json                        resolved config, its hash, versions, seeds, models
    runs/<name>/stages/<stage>.jsonl                 one append-only record per line
    runs/<name>/stages/<stage>.shard-<k>-of-<n>.jsonl   the same, for ``--shard k/n``

Every record is a JSON object with a ``key`` (see :func:`record_key`). A key is *done* once a record
for it without an ``error`` is on disk; a resumed run writes only keys that are not done, so nothing
is lost and nothing is duplicated. How a stage file survives a crash, and why one process writes it,
is :mod:`cai.stage_files`'s; this module adds the manifest (a resumed run must have the same
config) and :meth:`RunStore.lock`, which a pipeline run holds (one per shard) from its start, so a
second one on the same directory is refused before it loads a model. Shard files are merged by
:meth:`RunStore.merge_shards` or :func:`cai.merge.merge_runs`.

Typical use by a stage::

    store = RunStore("runs/hh-sl")
    store.check_manifest(config)
    store.write_manifest(config, versions=..., seeds=..., models=...)
    with store.writer("critique", shard) as out:
        todo = [x for x in items if x.key not in out and in_shard(x.key, shard)]
        for batch in batches(todo):
            for record in run_batch(batch):
                out.write(record)
            out.flush()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cai.config import changed_fields
from cai.jsonl import write_atomic
from cai.keys import Shard, canonical, check_shard, jsonable
from cai.layout import STAGE_GLOB, RunLayout, shard_file, shard_glob, stage_name
from cai.stage_files import (
    RunStoreError,
    StageWriter,
    is_error,
    merge_shard_files,
    open_locked,
    read_records,
    scan_file,
    shard_files,
)


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a resolved config, unset (None) values left out."""
    return hashlib.sha256(canonical(_set_values(config))).hexdigest()


def _set_values(value: Any) -> Any:
    """``value`` without the mapping entries whose value is None, at any depth: an unset field and
    a field that did not exist yet are the same setting, so a stage or an optional field added to
    cai (unset in every existing recipe) does not make existing runs look changed."""
    if isinstance(value, dict):
        return {k: _set_values(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_set_values(v) for v in value]
    return value


class RunStore:
    """One run directory: its manifest and its stage files."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.layout = RunLayout(Path(run_dir))
        self.run_dir = self.layout.root
        self.manifest_path = self.layout.manifest
        self.stages_dir = self.layout.stages

    def __repr__(self) -> str:
        return f"RunStore({str(self.run_dir)!r})"

    # -- manifest

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None if this run directory has none yet."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise RunStoreError(
                f"{self.manifest_path} is not valid JSON ({e}). It is written atomically, so it "
                "was edited by hand: restore it, or delete it to adopt the current config."
            ) from e
        if not isinstance(manifest, dict) or not {"config_hash", "config"} <= manifest.keys():
            raise RunStoreError(
                f"{self.manifest_path} lacks 'config_hash' or 'config': not a cai run manifest"
            )
        return manifest

    def check_manifest(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """Check that ``config`` may resume this run; return the existing manifest (None if new).

        Raises:
            RunStoreError: the manifest was written for a different config; names each changed
                field with its old and new value.
        """
        manifest = self.read_manifest()
        # Hashed anew from the stored config, not compared with the stored hash: manifests
        # written before unset values were left out of the hash still match.
        if manifest is None or config_hash(manifest["config"]) == config_hash(config):
            return manifest
        changed = changed_fields(_set_values(manifest["config"]), _set_values(config))
        raise RunStoreError(
            f"{self.manifest_path} was written for a different config; changed fields: "
            f"{', '.join(field for field, _, _ in changed) or '(none)'}\n"
            + "".join(f"  {field}: {old} -> {new}\n" for field, old, new in changed)
            + "Use a new --run-dir for the new config, or --force to reuse this one "
            "(records whose keys still match are kept; the rest are regenerated)."
        )

    def write_manifest(
        self,
        config: dict[str, Any],
        *,
        versions: dict[str, Any],
        seeds: dict[str, Any],
        models: dict[str, Any],
    ) -> dict[str, Any]:
        """Write ``manifest.json`` atomically; keeps ``created`` of an existing one. Returns it.

        ``config`` is the resolved config; all of it is hashed, so keep values that must not
        split a run (such as ``--shard``) out of it, or shards cannot be merged.
        """
        old = self.read_manifest()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        manifest = {
            "config_hash": config_hash(config),
            "created": old["created"] if old and "created" in old else now,
            "updated": now,
            "versions": versions,
            "seeds": seeds,
            "models": models,
            "config": config,
        }
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=2, ensure_ascii=False, default=jsonable) + "\n"
        write_atomic(self.manifest_path, lambda f: f.write(text.encode()))

    @contextlib.contextmanager
    def lock(self, shard: Shard | None = None) -> Iterator[None]:
        """Hold the run directory (one lock per shard, whose processes share it by design) for
        a whole run, so that a second process is refused before it loads a model or writes."""
        path = self.layout.lock(None if shard is None else check_shard(shard))
        try:
            fd = open_locked(path)
        except RunStoreError:
            which = "" if shard is None else f" for shard {shard[0]}/{shard[1]}"
            raise RunStoreError(
                f"{self.run_dir} is in use{which} by another process running this recipe. "
                "Wait for it to finish, or give this run its own --run-dir."
            ) from None
        try:
            yield
        finally:
            os.close(fd)  # releases the flock

    def remove_if_unused(self) -> None:
        """Remove the run directory if it holds nothing but lock files: a run refused before
        any work (Ray would not start) in a directory its lock created leaves nothing behind."""
        entries = list(self.run_dir.iterdir()) if self.run_dir.is_dir() else []
        if entries and all(RunLayout.is_lock(p) and p.is_file() for p in entries):
            for p in entries:
                p.unlink()
            self.run_dir.rmdir()

    # -- stages

    def stage_path(self, stage: str, shard: Shard | None = None) -> Path:
        """``stages/<stage>.jsonl``, or ``stages/<stage>.shard-<k>-of-<n>.jsonl`` for a shard."""
        return self.layout.stage(stage, None if shard is None else check_shard(shard))

    def read_stage(self, stage: str, shard: Shard | None = None) -> dict[str, dict[str, Any]]:
        """key -> record in file order (a done record, else the key's latest error record).

        Ignores a torn last line with a warning. Raises :class:`RunStoreError` for corruption.
        """
        return read_records(self.stage_path(stage, shard))

    def done_keys(self, stage: str, shard: Shard | None = None) -> set[str]:
        """Keys with a record without an error: the ones a resumed run skips."""
        return scan_file(self.stage_path(stage, shard), keep_records=False).done

    def writer(
        self,
        stage: str,
        shard: Shard | None = None,
        *,
        flush_every: int = 100,
        flush_seconds: float = 5.0,
        keep_records: bool = False,
    ) -> StageWriter:
        """Open the stage file for appending (locked; a torn last line is truncated); with
        ``keep_records`` the writer holds every key's record (``StageWriter.records``)."""
        return StageWriter(
            self.stage_path(stage, shard),
            shard,
            flush_every=flush_every,
            flush_seconds=flush_seconds,
            keep_records=keep_records,
        )

    def merge_shards(self, stage: str) -> Path:
        """Combine this run's ``<stage>.shard-*-of-<n>.jsonl`` into ``<stage>.jsonl`` atomically.

        Records are ordered by shard, then file order. Re-merging is safe: an existing
        ``<stage>.jsonl`` is replaced only if every done key it holds is in the shards.

        Raises:
            RunStoreError: no shard files; shards of different ``n``; a shard missing or still
                being written; a key in two shards.
        """
        files = shard_files(self.stages_dir, stage)
        if not files:
            raise RunStoreError(f"no shard files for stage {stage!r} in {self.stages_dir}")
        return merge_shard_files(stage, files, self.stage_path(stage))

    def stage_files(self) -> list[Path]:
        """All stage files (merged and shard files), sorted by name."""
        return sorted(self.stages_dir.glob(STAGE_GLOB))

    def shard_stages(self) -> list[str]:
        """The stages that have shard files, in name order."""
        found = (shard_file(p.name) for p in self.stages_dir.glob(shard_glob()))
        return sorted({f[0] for f in found if f is not None})

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per stage file (``critique``, ``critique.shard-1-of-4``, ...).

        ``records`` (keys), ``errors`` (keys whose record has a non-null ``error``), ``skipped``
        (done records that say why they were skipped) and the sums of
        ``usage.prompt_tokens`` / ``usage.completion_tokens`` / their total over the records.
        """
        out: dict[str, dict[str, int]] = {}
        for path in self.stage_files():
            counts = {
                "records": 0,
                "errors": 0,
                "skipped": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
            }
            for record in read_records(path).values():
                counts["records"] += 1
                counts["errors"] += is_error(record)
                counts["skipped"] += not is_error(record) and bool(record.get("skipped"))
                usage = record.get("usage")
                if isinstance(usage, dict):
                    for field in ("prompt_tokens", "completion_tokens"):
                        counts[field] += int(usage.get(field) or 0)
            counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
            out[stage_name(path)] = counts
        return out
