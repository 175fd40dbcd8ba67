"""Where records come from: a source (a file, a ``save_to_disk`` folder, a shipped set, a hub
id) located and read as ``(where, row)``, ``where`` naming the file and line (``path:12``) or
index (``path[12]``). ``cai.data`` and ``cai.pairs`` turn the rows into records.

jsonl is read a line at a time, each line at most :data:`MAX_LINE_BYTES`: a file that is not
jsonl (one huge line) fails on that line without being read whole into memory.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

from cai.resources import resolve, shipped_dir, shipped_names

FORMATS = ("jsonl", "json", "parquet", "datasets", "hub")
"""Values of ``format=``: a file type, a ``save_to_disk`` folder, or a hub id."""

MAX_LINE_BYTES = 64 * 2**20
"""The longest jsonl line (without its newline) a reader takes, in bytes: far above any record,
and low enough that a file that is not jsonl, gigabytes on one line, fails on reading its first
64 MiB rather than after holding all of it (twice: bytes and text) in memory."""

_EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DataError(ValueError):
    """A prompt or preference source, or records to export, are malformed or unreadable."""


def _portable(where: str) -> str:
    """``where`` (``path:line``) with a shipped set's path written ``data/<file>``: a record's
    source (which the exports carry, and so the trained models' data fingerprints) must not
    depend on the folder cai is installed or checked out in."""
    shipped = str(shipped_dir("data")) + os.sep
    return "data/" + where[len(shipped) :] if where.startswith(shipped) else where


def check_limit(limit: Any, name: str = "limit") -> None:
    """Raise ValueError unless ``limit`` is None or an integer >= 1: every ``--limit`` and
    ``limit=`` goes through here, since ``records[:limit]`` would read 0 as "none" (or, behind
    ``if limit``, as "all") and -1 as "all but the last"."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{name} must be >= 1 (got {limit!r})")


def _open(
    source: str | Path, format: str | None, split: str, limit: int | None, duplicates: str
) -> Iterator[tuple[str, Any]]:
    """Rows of the source as (where, row), located eagerly so a missing source raises here."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {FORMATS}")
    check_limit(limit)
    if duplicates not in ("error", "drop"):
        raise ValueError(f"duplicates={duplicates!r}; expected 'error' or 'drop'")
    kind, location = _locate(source, format)
    readers = {
        "jsonl": _jsonl_rows,
        "json": _json_rows,
        "parquet": _parquet_rows,
        "datasets": lambda path: _saved_rows(path, split),
        "hub": lambda name: _hub_rows(name, split),
    }
    return islice(readers[kind](location), limit)


def _locate(source: str | Path, format: str | None) -> tuple[str, Any]:
    """(format, path or hub id) for a source; see ``cai.data``'s docstring for the order."""
    if format == "hub":
        return "hub", str(source)
    path = Path(source).expanduser()
    shipped = shipped_names("data")
    if not path.exists() and format in (None, "jsonl") and source in shipped:
        path = resolve("data", source)
    if path.exists():
        return format or _guess_format(path), path
    # A near miss of a shipped name is a typo, not a hub id: say so instead of going online.
    name = Path(source).name
    near = difflib.get_close_matches(name, shipped, n=1, cutoff=0.8) if str(source) == name else []
    if (
        format is None
        and isinstance(source, str)
        and _HUB_ID.fullmatch(source)
        and path.suffix not in _EXTENSIONS
        and not near
    ):
        return "hub", source
    raise FileNotFoundError(
        f"{source}: no such file or folder, and no shipped data set of that name"
        + (f"; did you mean {near[0]!r}?" if near else "")
        + f" (shipped: {', '.join(shipped) or 'none'})"
    )


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    if path.suffix in _EXTENSIONS:
        return _EXTENSIONS[path.suffix]
    raise DataError(
        f"{path}: cannot tell the format from the extension {path.suffix!r}; "
        f"pass format= one of {FORMATS}"
    )


def _bounded_lines(f: BinaryIO) -> Iterator[bytes | None]:
    """The lines of ``f``, None for one over MAX_LINE_BYTES (after which reading stops): each
    read is bounded, where iterating a file reads a line whole however long it is."""
    limit = MAX_LINE_BYTES  # read per call: a test makes it small
    while raw := f.readline(limit + 1):
        if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
            yield None
            return
        yield raw


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    with f:
        for number, raw in enumerate(_bounded_lines(f), 1):
            where = f"{path}:{number}"
            if raw is None:
                raise DataError(
                    f"{where}: a line longer than {MAX_LINE_BYTES:,} bytes "
                    "(cai.sources.MAX_LINE_BYTES); a jsonl file holds one record per line, and no "
                    "record is that long: is this a jsonl file?"
                )
            try:
                # utf-8-sig: editors on Windows start files with a byte-order mark
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
                ) from e
            if not line.strip():
                continue
            try:
                row = json.loads(line.strip())
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: invalid JSON at column {e.colno}: {e.msg}; "
                    "each line must hold one JSON object"
                ) from e
            yield where, row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from e
    prefix = str(path)
    if isinstance(data, dict):
        lists = [name for name, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON list of records, or an object with exactly one list "
                f"field holding them; found an object with list fields {lists}"
            )
        prefix = f"{path}:{lists[0]}"
        data = data[lists[0]]
    elif not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found {_kind(data)}")
    for index, row in enumerate(data):
        yield f"{prefix}[{index}]", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from e
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path}[{index}]", row
            index += 1


def _saved_rows(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets  # imported here: it is slow to import and only some sources need it

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(
            f"{path}: not a folder written by datasets' save_to_disk; give the path of a "
            "jsonl, json or parquet file instead"
        ) from e
    where = str(path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r} (splits: {list(data)}); pass split=")
        data, where = data[split], f"{path}/{split}"
    for index, row in enumerate(data):
        yield f"{where}[{index}]", row


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        data = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # no connection, no such data set, no such split
        raise FileNotFoundError(
            f"{name}: not a local file or folder, not a shipped data set "
            f"(shipped: {', '.join(shipped_names('data')) or 'none'}), and loading it from the "
            f"Hugging Face hub failed: {e}. Check the path, or the hub id, split and network "
            "(HF_DATASETS_OFFLINE=1 allows only cached data sets)"
        ) from e
    for index, row in enumerate(data):
        yield f"{name}:{split}[{index}]", row


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")
