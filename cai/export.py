"""Writing datasets for trainers: ``write_jsonl`` (atomic) and ``export_dataset``, which writes
``data.jsonl`` and a ``datasets`` folder (``datasets.load_from_disk``) that TRL and the built-in
trainers read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from cai.data import DataError, _checked_messages, _kind
from cai.jsonl import write_atomic
from cai.layout import DATA_FILE, DATASET
from cai.pairs import _probability


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Write one JSON object per line, atomically: a reader (or a crash) never sees a partial file.

    The lines go to a temporary file beside ``path`` that replaces it only once complete; on any
    error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)

    def write(f: IO[bytes]) -> None:
        for index, record in enumerate(records):
            try:
                line = json.dumps(record, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}: record {index} cannot be written as JSON: {e}") from e
            f.write((line + "\n").encode())

    write_atomic(path, write)


def export_dataset(records: list[dict], out_dir: str | Path) -> None:
    """Write SFT or preference records as ``out_dir/data.jsonl`` and ``out_dir/dataset/``.

    All records must have one format:

    - SFT: ``{"messages": [...], "meta": {...}}``, the messages ending with an assistant turn;
    - preference: ``{"prompt": [...], "chosen": [assistant message], "rejected": [assistant
      message], "p_chosen": float, "meta": {...}}``.

    ``meta`` may be left out (it becomes ``{}``). ``data.jsonl`` keeps ``meta`` as an object. The
    ``datasets`` folder (read it with ``datasets.load_from_disk``) stores it as the JSON string
    column ``meta_json`` instead, because Arrow needs one schema for every row and metadata keys
    and value types vary between records; :func:`load_prompts` / :func:`load_pairs` decode it.
    Both outputs are replaced atomically; a failed export leaves an earlier one as it was.
    """
    import datasets

    rows = _export_rows(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=".export."))
    try:
        arrow_rows = [
            {**{k: v for k, v in row.items() if k != "meta"}, "meta_json": _meta_json(row, i)}
            for i, row in enumerate(rows)
        ]
        datasets.Dataset.from_list(arrow_rows).save_to_disk(str(scratch / DATASET))
        write_jsonl(rows, out / DATA_FILE)
        # A folder cannot be replaced in one rename: move the old one aside first.
        if (out / DATASET).exists():
            os.replace(out / DATASET, scratch / "old")
        os.replace(scratch / DATASET, out / DATASET)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _export_rows(records: list[dict]) -> list[dict]:
    """Checked copies of the records, with their keys in a fixed order and ``meta`` filled in."""
    if not records:
        raise DataError("export_dataset: no records to export")
    sft_keys, pref_keys = ("messages",), ("prompt", "chosen", "rejected", "p_chosen")
    first = records[0]
    keys = sft_keys if isinstance(first, dict) and "messages" in first else pref_keys
    rows = []
    for index, record in enumerate(records):
        where = f"records[{index}]"
        expected = {*keys, "meta"}
        if not isinstance(record, dict) or not set(keys) <= record.keys() <= expected:
            found = sorted(record) if isinstance(record, dict) else _kind(record)
            raise DataError(
                f"{where}: expected {'an SFT' if keys == sft_keys else 'a preference'} record "
                f"like records[0], with keys {sorted(expected)} (meta optional), found {found}; "
                "put extra fields in meta"
            )
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"{where}: meta must be an object, found {_kind(meta)}")
        if keys == sft_keys:
            messages = _export_messages(record["messages"], where, "messages")
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: SFT messages must end with an assistant turn")
            rows.append({"messages": messages, "meta": meta})
            continue
        prompt = _export_messages(record["prompt"], where, "prompt")
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: prompt must end with a user turn")
        responses = {}
        for name in ("chosen", "rejected"):
            messages = _export_messages(record[name], where, name)
            if len(messages) != 1 or messages[0]["role"] != "assistant":
                raise DataError(f"{where}: {name} must be a list of one assistant message")
            responses[name] = messages
        p_chosen = _probability(record["p_chosen"], where)
        rows.append({"prompt": prompt, **responses, "p_chosen": p_chosen, "meta": meta})
    return rows


def _export_messages(value: Any, where: str, field: str) -> list[dict]:
    """Checked messages with exactly role and content, so every row has the same Arrow type."""
    for index, message in enumerate(value if isinstance(value, list) else []):
        if isinstance(message, dict) and message.keys() - {"role", "content"}:
            raise DataError(
                f"{where}: {field}[{index}]: a message must have only the keys role and content, "
                f"found {sorted(message)}"
            )
    return _checked_messages(value, where, field)


def _meta_json(row: dict, index: int) -> str:
    try:
        return json.dumps(row["meta"], sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DataError(f"records[{index}]: meta cannot be written as JSON: {e}") from e
