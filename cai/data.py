"""Prompt sources and the record shapes they come in (preference pairs: ``cai.pairs``; writing
datasets: ``cai.export``).

Reading::

    from cai.data import load_prompts
    from cai.pairs import load_pairs

    prompts = load_prompts("red_team")  # a shipped set: data/red_team.jsonl
    prompts = load_prompts("mine.parquet", prompt_field="question", limit=500)
    prompts = load_prompts("Anthropic/hh-rlhf", hh_mode="full_context", duplicates="drop")
    pairs = load_pairs("runs/x/preferences.jsonl")

A source is a path (``.jsonl``, ``.json``, ``.parquet``, or a folder written by
``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``), the name of a shipped set in
``data/``, or a Hugging Face hub id (read with ``datasets.load_dataset(id, split=split)``).
``format=`` (one of :data:`FORMATS`) overrides the guess from the extension.

Prompt records come in three shapes, detected per record (``prompt_field`` / ``messages_field``
force one):

- ``messages``: OpenAI chat messages. A trailing assistant turn is the old answer: it is dropped
  and its text kept in ``meta["reference"]``. What remains must end with a user turn.
- a prompt string, from the first of ``prompt``, ``instruction``, ``question``, ``text`` that the
  record has (Alpaca's ``input``, when not empty, is appended to ``instruction`` after a blank
  line). A ``prompt`` that is a list is read as messages (TRL's conversational format).
- an Anthropic HH-RLHF transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), in any of the
  prompt fields or in ``transcript`` / ``chosen`` (``chosen`` may also be a message list: a whole
  conversation). ``hh_mode="first_turn"`` keeps the first Human turn; ``"full_context"`` keeps
  every turn up to the last Human one. The answer after the kept turns goes to
  ``meta["reference"]``.

A record's key is its ``id`` (as str) when it has one, else a short sha256 of its messages: stable
across loads and equal for equal content. Every other field goes to ``meta``; a ``meta`` object, or
the ``meta_json`` string that :func:`cai.export.export_dataset` writes, is merged into it.

Every problem raises :class:`DataError` (``FileNotFoundError`` for a missing source) naming the
file and the line (``path:12``) or index (``path[12]``). Nothing is skipped but blank jsonl lines.

Writing (``cai.export``): ``write_jsonl`` (atomic) and ``export_dataset``, which writes
``data.jsonl`` and a ``datasets`` folder in the formats TRL's SFTTrainer / DPOTrainer read unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from cai.engine.base import ROLES
from cai.resources import resolve, shipped_dir, shipped_names

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "json", "parquet", "datasets", "hub")
"""Values of ``format=``: a file type, a ``save_to_disk`` folder, or a hub id."""
PROMPT_FIELDS = ("prompt", "instruction", "question", "text")
"""Fields read as the prompt string, in this order of preference."""
HH_MODES = ("first_turn", "full_context")
KEY_HEX_CHARS = 16
"""Length of a content-hash key: 64 bits, ample for any data set we will see."""

_EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ANSWER = "\n\nAssistant:"


class DataError(ValueError):
    """A prompt or preference source, or records to export, are malformed or unreadable."""


@dataclass(frozen=True)
class PromptRecord:
    """One conversation to respond to."""

    key: str
    """Stable identity: the source's ``id`` (as str), else a hash of ``messages``."""
    messages: list[dict]
    """Chat messages (``{"role", "content"}``) ending with a user turn."""
    source: str
    """Where it came from: ``path:line`` (jsonl) or ``path[index]``."""
    meta: dict
    """The record's other fields (``category``, ``reference``, ...)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptRecord:
        return cls(**_fields_of(cls, data))


def _fields_of(cls: type, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = names - data.keys(), data.keys() - names
    if missing or unknown:
        raise DataError(
            f"{cls.__name__}.from_dict: missing {sorted(missing)}, unknown {sorted(unknown)}; "
            f"expected exactly {sorted(names)}"
        )
    return {name: data[name] for name in names}


# --- reading -------------------------------------------------------------------------------------


def load_prompts(
    source: str | Path,
    *,
    format: str | None = None,
    prompt_field: str | None = None,
    messages_field: str | None = None,
    hh_mode: Literal["first_turn", "full_context"] = "first_turn",
    split: str = "train",
    limit: int | None = None,
    duplicates: Literal["error", "drop"] = "error",
) -> list[PromptRecord]:
    """Read prompts from a file, folder, shipped set or hub id (see the module docstring).

    Args:
        source: a path, a shipped set name (``red_team``, ...) or a hub id.
        format: one of FORMATS; default: from the extension (a folder is ``datasets``).
        prompt_field: read this field as the prompt string (plain or HH transcript).
        messages_field: read this field as chat messages.
        hh_mode: ``first_turn`` or ``full_context``, for HH-RLHF transcripts.
        split: the split of a hub data set or a saved ``DatasetDict``.
        limit: read at most this many records (from the start).
        duplicates: records without ``id`` whose messages equal an earlier record's would share
            its key: ``error`` raises, ``drop`` keeps the first (and logs how many it dropped).
            Duplicate ``id``s always raise.

    Raises:
        FileNotFoundError: no such file, shipped set or hub data set.
        DataError: a record is malformed or the source is empty or unreadable.
    """
    if prompt_field is not None and messages_field is not None:
        raise ValueError("give prompt_field or messages_field, not both")
    if hh_mode not in HH_MODES:
        raise ValueError(f"hh_mode={hh_mode!r}; expected one of {HH_MODES}")
    rows = _open(source, format, split, limit, duplicates)
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    dropped = 0
    for where, row in rows:
        messages, reference, used = _prompt_messages(
            _as_object(row, where), where, prompt_field, messages_field, hh_mode
        )
        record_id = _record_id(row, where)
        key = record_id if record_id is not None else _hash_key(messages)
        if _is_duplicate(key, record_id, where, seen, duplicates, "messages"):
            dropped += 1
            continue
        meta = _meta(row, used, where)
        if reference:
            meta["reference"] = reference
        records.append(PromptRecord(key, messages, _portable(where), meta))
    return _nonempty(records, dropped, source)


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


def read_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, dict]]:
    """The records of a source as ``(where, record)``, ``where`` being ``path:line`` or
    ``path[index]``: the one reader of every data file (prompts, pairs, the trainers' data), so
    that bad bytes, bad JSON and non-object rows get the same error naming the file and line."""
    return (
        (where, _as_object(row, where)) for where, row in _open(source, None, split, None, "error")
    )


def check_messages(value: Any, where: str, field: str = "messages") -> list[dict]:
    """Chat messages reduced to role and content: roles system (first only), user, assistant;
    string contents; user and system text not empty. Raises DataError naming ``where``."""
    return _checked_messages(value, where, field)


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
    """(format, path or hub id) for a source; see the module docstring for the order."""
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


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
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


# --- record shapes -------------------------------------------------------------------------------


def _prompt_messages(
    row: dict,
    where: str,
    prompt_field: str | None,
    messages_field: str | None,
    hh_mode: str,
) -> tuple[list[dict], str | None, set[str]]:
    """(messages ending with a user turn, the answer that followed them or None, fields used)."""
    if messages_field is not None:
        value = _required(row, messages_field, where)
        return (*_from_messages(value, where, messages_field), {messages_field})
    if prompt_field is not None:
        value = _required(row, prompt_field, where)
        if not isinstance(value, str):
            raise DataError(
                f"{where}: {prompt_field} must be a string, found {_kind(value)}; "
                f"for chat messages pass messages_field={prompt_field!r}"
            )
        return (*_from_text(value, where, prompt_field, hh_mode), {prompt_field})
    if row.get("messages") is not None:
        return (*_from_messages(row["messages"], where, "messages"), {"messages"})
    for name in PROMPT_FIELDS:
        value = row.get(name)
        if value is None:
            continue
        if name == "prompt" and isinstance(value, list):
            return (*_from_messages(value, where, name), {name})
        if not isinstance(value, str):
            raise DataError(f"{where}: {name} must be a string, found {_kind(value)}")
        if name == "instruction" and isinstance(row.get("input"), str):
            # Alpaca: the instruction's input is part of the prompt, not metadata
            if row["input"].strip():
                value = f"{value}\n\n{row['input']}"
            return (*_from_text(value, where, name, hh_mode), {name, "input"})
        return (*_from_text(value, where, name, hh_mode), {name})
    for name in ("transcript", "chosen"):
        value = row.get(name)
        if isinstance(value, str) and _is_hh(value):
            return (*_from_text(value, where, name, hh_mode), {name})
        if name == "chosen" and isinstance(value, list):
            return (*_from_messages(value, where, name), {name})
    null = [name for name, value in row.items() if value is None]
    raise DataError(
        f"{where}: no prompt found; the record has fields {sorted(row)}"
        + (f" (null: {sorted(null)})" if null else "")
        + "; accepted: messages (chat messages), prompt / instruction / question / text "
        "(a string, or an HH-RLHF transcript), transcript / chosen (an HH-RLHF transcript). "
        "Name another field with prompt_field= or messages_field="
    )


def _from_messages(value: Any, where: str, field: str) -> tuple[list[dict], str | None]:
    messages = _checked_messages(value, where, field)
    reference = None
    if messages[-1]["role"] == "assistant":
        reference = messages.pop()["content"]
    if not messages or messages[-1]["role"] != "user":
        ends = messages[-1]["role"] if messages else "nothing"
        raise DataError(
            f"{where}: {field} must end with a user turn, after dropping one final assistant "
            f"answer; it ends with {ends}"
        )
    return messages, reference


def _from_text(text: str, where: str, field: str, hh_mode: str) -> tuple[list[dict], str | None]:
    if _is_hh(text):
        return _from_hh(text, where, field, hh_mode)
    if not text.strip():
        raise DataError(f"{where}: {field} is empty; every record needs prompt text")
    return [{"role": "user", "content": text}], None


def _checked_messages(value: Any, where: str, field: str) -> list[dict]:
    """Chat messages reduced to role and content. User and system text must not be empty."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {field} must be a non-empty list of chat messages "
            f'({{"role": ..., "content": ...}}), found {_kind(value)}'
        )
    messages = []
    for index, message in enumerate(value):
        at = f"{where}: {field}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f'{at}: expected {{"role": ..., "content": ...}}, found {_kind(message)}'
                + (f" with keys {sorted(message)}" if isinstance(message, dict) else "")
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and index > 0:
            raise DataError(f"{at}: a system message may only come first")
        if not isinstance(content, str):
            raise DataError(f"{at}: content must be a string, found {_kind(content)}")
        if role != "assistant" and not content.strip():
            raise DataError(f"{at}: empty {role} content")
        messages.append({"role": role, "content": content})
    return messages


def _is_hh(text: str) -> bool:
    """An HH-RLHF transcript: starts with a Human turn and (unless it starts exactly like the
    originals, with a blank line) has an Assistant turn, so a plain prompt beginning with
    "Human:" is not mistaken for one."""
    return text.startswith("\n\nHuman:") or (
        text.lstrip().startswith("Human:") and _HH_ANSWER in text
    )


def _hh_turns(text: str) -> list[tuple[str, str]]:
    """(role, stripped text) per turn; the text starts with "Human:" once left-stripped."""
    pieces = _HH_MARKER.split(text.lstrip())
    return [
        ("user" if speaker == "Human" else "assistant", content.strip())
        for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True)
    ]


def _from_hh(text: str, where: str, field: str, hh_mode: str) -> tuple[list[dict], str | None]:
    turns = _hh_turns(text)
    if hh_mode == "first_turn":
        kept = turns[:1]
    else:
        for number, (role, _) in enumerate(turns, 1):
            if role != ("user" if number % 2 else "assistant"):
                raise DataError(
                    f"{where}: {field}: HH transcript turn {number} is "
                    f"{'Human' if role == 'user' else 'Assistant'}; turns must alternate "
                    "Human / Assistant (use hh_mode='first_turn' to read only the first turn)"
                )
        last_human = max(i for i, (role, _) in enumerate(turns) if role == "user")
        kept = turns[: last_human + 1]
    for number, (role, content) in enumerate(kept, 1):
        if role == "user" and not content:
            raise DataError(f"{where}: {field}: HH transcript Human turn {number} is empty")
    after = turns[len(kept)] if len(turns) > len(kept) else None
    reference = after[1] if after and after[0] == "assistant" else None
    return [{"role": role, "content": content} for role, content in kept], reference


# --- keys and metadata ---------------------------------------------------------------------------


def _as_object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (one record), found {_kind(row)}")
    _check_text(row, where, "")
    return row


def _check_text(value: Any, where: str, field: str) -> None:
    """Refuse a lone surrogate (half of a UTF-16 pair, which a JSON escape such as \\ud800 can
    write) anywhere in a record: it has no UTF-8 form, so no tokenizer, jsonl file or Arrow
    column takes it, and one such prompt would fail every run after the model loads."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(
                    f"{where}: {field}: a lone surrogate {value[e.start]!r} at character "
                    f"{e.start} is not text (often a \\u escape cut from its pair); fix or remove it"
                ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where, f"a key of {field or 'the record'}")
            _check_text(item, where, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_text(item, where, f"{field}[{index}]")


def _required(row: dict, name: str, where: str) -> Any:
    if row.get(name) is None:
        raise DataError(f"{where}: no field {name!r}; the record has fields {sorted(row)}")
    return row[name]


def _record_id(row: dict, where: str) -> str | None:
    value = row.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise DataError(f"{where}: id must be a non-empty string or an integer, found {value!r}")
    return str(value)


def _hash_key(content: Any) -> str:
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def _is_duplicate(
    key: str, record_id: str | None, where: str, seen: dict[str, str], duplicates: str, what: str
) -> bool:
    """Record the key; True if the record must be dropped as a duplicate, raise if not allowed."""
    if key not in seen:
        seen[key] = where
        return False
    if record_id is not None:
        raise DataError(
            f"{where}: duplicate id {record_id!r} (also at {seen[key]}); ids must be unique"
        )
    if duplicates == "error":
        raise DataError(
            f"{where}: same {what} as {seen[key]}, so both would get key {key}; remove one, "
            "give the records distinct ids, or pass duplicates='drop' to keep the first"
        )
    return True


def _nonempty(records: list, dropped: int, source: str | Path) -> list:
    if not records:
        raise DataError(f"{source}: no records; the source is empty")
    if dropped:
        log.warning("%s: dropped %d duplicate records (duplicates='drop')", source, dropped)
    return records


def _meta(row: dict, used: set[str], where: str) -> dict:
    meta: dict = {}
    if isinstance(row.get("meta"), dict):
        meta.update(row["meta"])
    if isinstance(row.get("meta_json"), str):
        try:
            decoded = json.loads(row["meta_json"])
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: meta_json is not valid JSON ({e.msg})") from e
        if not isinstance(decoded, dict):
            raise DataError(f"{where}: meta_json must hold a JSON object, found {_kind(decoded)}")
        meta.update(decoded)
    skip = {*used, "id", "meta", "meta_json"}
    meta.update({name: value for name, value in row.items() if name not in skip})
    return meta


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")
