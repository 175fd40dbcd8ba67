"""Record keys and seeds: what makes a run-store record the same record in every run.

A key is a hash of everything that defines a record (input key, stage, template text, principle,
model, sampling); a record's sampling seed derives from its key. Changing how a key is made
orphans every run store written before, so these functions stay as they are
(tests/test_store_fixture.py resumes a run written by an earlier cai with no engine request).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path, PurePath
from typing import Any

MARKER = "cai_pipeline.json"
"""The file in a pipeline-trained model folder that holds its revision (config and data hash)."""


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


def seed_for(key: str, base_seed: int = 0) -> int:
    """The sampling seed of one record: derived from ``key`` and the run's ``base_seed``.

    In ``[0, 2**63)``, so it fits a signed 64-bit int (torch generators, vLLM's ``seed``). Note that
    ``numpy.random.seed`` and ``transformers.set_seed`` need ``< 2**32``: reduce it there.
    """
    digest = hashlib.sha256(f"seed:{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def revision(model: str) -> str | None:
    """A pipeline-trained model folder's marker hash (config and data), else None: record keys
    of stages that use the model include it, so a retrained model never reuses old records."""
    marker = Path(model) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))["revision"]


def revision_key(model: str) -> dict[str, str]:
    """``{"model_revision": ...}`` for a model the pipeline trained, else ``{}``: record keys
    spread it in, so retraining a model makes new records while keys of runs that train nothing
    stay as they were."""
    value = revision(model)
    return {} if value is None else {"model_revision": value}
