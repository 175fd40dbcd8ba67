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
``format=`` (one of :data:`FORMATS`) overrides the guess from the extension. Locating and
reading a source is ``cai.sources``; this module turns its rows into records.

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
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cai.engine.base import ROLES
from cai.sources import FORMATS as FORMATS  # re-exported: callers import these from cai.data
from cai.sources import DataError as DataError
from cai.sources import _kind, _open, _portable
from cai.sources import check_limit as check_limit

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "instruction", "question", "text")
"""Fields read as the prompt string, in this order of preference."""
HH_MODES = ("first_turn", "full_context")
KEY_HEX_CHARS = 16
"""Length of a content-hash key: 64 bits, ample for any data set we will see."""

_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ANSWER = "\n\nAssistant:"


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
