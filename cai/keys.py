"""Record keys, seeds and shards: what makes a run-store record the same record in every run,
and which shard of a split run owns it.

A key is a hash of everything that defines a record (input key, stage, template text, principle,
model, sampling); a record's sampling seed derives from its key. Changing how a key is made
orphans every run store written before, so these functions stay as they are
(tests/test_store_fixture.py resumes a run written by an earlier cai with no engine request).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path, PurePath
from typing import Any

from cai.layout import PIPELINE_MARKER

Shard = tuple[int, int]
"""``(k, n)``: shard ``k`` of ``n``, 1-based as users write it (``--shard 1/4``)."""

MARKER = PIPELINE_MARKER
"""The file in a pipeline-trained model folder that holds its revision (a hash of its config, data
and starting model) and the settings it was trained with."""


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if isinstance(obj, PurePath):
        return obj.as_posix()
    raise TypeError(f"cannot hash a value of type {type(obj).__name__}: {obj!r}")


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII; so equal values give equal bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=jsonable
    ).encode()


def record_key(**parts: Any) -> str:
    """A stable key for a record: sha256 of the canonical JSON of ``parts``, 24 hex characters.

    Pass everything that defines the record's content: input key, stage name, template text,
    principle ids, model id, sampling params. Values may be JSON types, dataclasses (via
    ``asdict``), sets (sorted) and paths. The key is the same in every process and Python version.
    Floats and ints hash differently (``1`` vs ``1.0``); the typed config makes them consistent.

    Raises:
        ValueError: no parts were given.
        TypeError: a value is not JSON-able.
    """
    if not parts:
        raise ValueError("record_key() needs at least one part")
    return hashlib.sha256(canonical(parts)).hexdigest()[:24]


def digest(value: Any) -> str:
    """A short name (16 hex characters of sha256) of ``value``'s canonical JSON: how a key names
    the prompt text it was made with without holding it (``cai.judge.keys``,
    ``cai.critique.text_key``)."""
    return hashlib.sha256(canonical(value)).hexdigest()[:16]


def seed_for(key: str, base_seed: int = 0) -> int:
    """The sampling seed of one record: derived from ``key`` and the run's ``base_seed``.

    In ``[0, 2**63)``, so it fits a signed 64-bit int (torch generators, vLLM's ``seed``). Note that
    ``numpy.random.seed`` and ``transformers.set_seed`` need ``< 2**32``: reduce it there.
    """
    digest = hashlib.sha256(f"seed:{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _marker(model: str) -> dict[str, Any] | None:
    path = Path(model) / MARKER
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def revision(model: str) -> str | None:
    """A pipeline-trained model folder's revision (a hash of its config, data and starting
    model), else None."""
    marker = _marker(model)
    return None if marker is None else marker["revision"]


def model_key(field: str, model: str) -> dict[str, str]:
    """The record-key parts that name ``model`` under ``field``: ``{field: model}``, or for a
    model the pipeline trained what its marker says, written once when it was trained: its
    folder relative to its run (``<run>/rounds/1/dpo``) and its revision, a hash of what
    determines it (settings with paths relative to the run, the data it saw, whose labels are
    rounded so that float noise does not reach it, and its starting model's revision). A
    retrained model thus gets new records, while the same recipe in another run directory, or a
    moved or copied one, gets the same keys and seeds. Markers written before ``model_id``
    existed name the absolute folder they were trained into, as the keys of their runs did."""
    marker = _marker(model)
    if marker is None:
        return {field: model}
    return {field: model_name(model), "model_revision": marker["revision"]}


def model_name(model: str) -> str:
    """How keys and records name ``model``: a pipeline-trained model by its folder relative to
    its run (``<run>/rounds/1/dpo``, from its marker; see :func:`model_key`), any other by its
    spec. Records and exports that name models so are the same in any run directory."""
    marker = _marker(model)
    if marker is None:
        return model
    return marker.get("model_id") or marker["config"]["output_dir"]


def shard_of(key: str, n: int) -> int:
    """The shard (1-based, ``1..n``) that owns ``key`` when the work is split ``n`` ways."""
    if n < 1:
        raise ValueError(f"shard count must be at least 1, got {n}")
    digest = hashlib.sha256(f"shard:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def in_shard(key: str, shard: Shard | None) -> bool:
    """Whether ``key`` belongs to ``shard``; every key belongs to the whole run (``shard=None``)."""
    if shard is None:
        return True
    k, n = check_shard(shard)
    return shard_of(key, n) == k


def parse_shard(text: str) -> Shard:
    """Parse ``"k/n"`` (as in ``--shard 2/4``) into ``(k, n)`` with ``1 <= k <= n``.

    Raises:
        ValueError: with the expected form and the value given.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"--shard must look like k/n (e.g. 1/4), got {text!r}")
    return check_shard((int(match[1]), int(match[2])))


def check_shard(shard: Shard) -> Shard:
    k, n = shard
    if n < 1:
        raise ValueError(f"shard count n must be at least 1, got {k}/{n}")
    if not 1 <= k <= n:
        raise ValueError(f"shard k must be in 1..{n} (shards are numbered from 1), got {k}/{n}")
    return k, n
