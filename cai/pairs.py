"""Labelled preference pairs: a prompt with a chosen and a rejected response, from any source
``cai.data`` reads (our preference exports, TRL's formats, HH-RLHF transcripts).

    from cai.pairs import load_pairs
    pairs = load_pairs("runs/x/preferences")      # or data/hh_sample.jsonl, a hub id, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cai.data import (  # the readers and record checks prompts and pairs share
    _HH_ANSWER,
    DataError,
    _as_object,
    _checked_messages,
    _fields_of,
    _from_hh,
    _from_text,
    _hash_key,
    _is_duplicate,
    _is_hh,
    _kind,
    _meta,
    _nonempty,
    _open,
    _portable,
    _record_id,
)


@dataclass(frozen=True)
class LabelledPair:
    """A prompt with a preferred and a dispreferred response (e.g. to evaluate a judge)."""

    key: str
    """Stable identity: the source's ``id`` (as str), else a hash of prompt and responses."""
    prompt: list[dict]
    """Chat messages ending with a user turn."""
    chosen: str
    """The preferred response text."""
    rejected: str
    """The dispreferred response text."""
    source: str
    """Where it came from: ``path:line`` (jsonl) or ``path[index]``."""
    meta: dict
    """The record's other fields; ``p_chosen`` (a soft label in [0, 1]) when the source has one."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LabelledPair:
        return cls(**_fields_of(cls, data))


def load_pairs(
    source: str | Path,
    *,
    format: str | None = None,
    split: str = "train",
    limit: int | None = None,
    duplicates: Literal["error", "drop"] = "error",
) -> list[LabelledPair]:
    """Read preference pairs (see the module docstring for sources and the arguments).

    Record shapes, detected per record:

    - explicit prompt: ``prompt`` (a string, an HH transcript or chat messages) with ``chosen`` /
      ``rejected`` as strings or as one-assistant-message lists (ours and TRL's formats);
      ``p_chosen`` is checked to lie in [0, 1] and kept in ``meta``;
    - implicit prompt: no ``prompt``; ``chosen`` / ``rejected`` are whole conversations, as
      message lists or HH-RLHF transcripts, that share everything up to the final assistant
      answer. That shared part is the prompt.

    Both responses must be non-empty and differ (ignoring surrounding whitespace).

    Raises:
        FileNotFoundError: no such file, shipped set or hub data set.
        DataError: a record is malformed or the source is empty or unreadable.
    """
    rows = _open(source, format, split, limit, duplicates)
    pairs: list[LabelledPair] = []
    seen: dict[str, str] = {}
    dropped = 0
    for where, row in rows:
        prompt, chosen, rejected = _pair(_as_object(row, where), where)
        _check_meaningful(chosen, rejected, where)
        record_id = _record_id(row, where)
        key = (
            record_id
            if record_id is not None
            else _hash_key({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        )
        if _is_duplicate(key, record_id, where, seen, duplicates, "prompt and responses"):
            dropped += 1
            continue
        meta = _meta(row, {"prompt", "chosen", "rejected", "p_chosen"}, where)
        if row.get("p_chosen") is not None:
            meta["p_chosen"] = _probability(row["p_chosen"], where)
        pairs.append(LabelledPair(key, prompt, chosen, rejected, _portable(where), meta))
    return _nonempty(pairs, dropped, source)


def _check_meaningful(chosen: str, rejected: str, where: str) -> None:
    """A pair teaches a preference only between two different, non-empty responses: DPO on
    identical ones learns nothing (loss ln 2 at every step), and a judge scored on them looks
    like a coin flip."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{where}: {name} is empty; a pair needs two non-empty responses")
    if chosen.strip() == rejected.strip():
        raise DataError(
            f"{where}: chosen and rejected are the same text; a pair needs two different "
            "responses (remove the record)"
        )


def _pair(row: dict, where: str) -> tuple[list[dict], str, str]:
    missing = [name for name in ("chosen", "rejected") if row.get(name) is None]
    if missing:
        raise DataError(
            f"{where}: no {' / '.join(missing)}; the record has fields {sorted(row)}. A pair needs "
            "chosen and rejected, and prompt unless chosen and rejected are whole conversations "
            "(HH-RLHF transcripts or message lists)"
        )
    if row.get("prompt") is not None:
        return (
            _pair_prompt(row["prompt"], where),
            _response(row["chosen"], where, "chosen"),
            _response(row["rejected"], where, "rejected"),
        )
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        whole = [
            _checked_messages(v, where, f) for v, f in ((chosen, "chosen"), (rejected, "rejected"))
        ]
        for messages, name in zip(whole, ("chosen", "rejected"), strict=True):
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: {name} must end with the assistant answer")
        if whole[0][:-1] != whole[1][:-1]:
            raise DataError(
                f"{where}: chosen and rejected must be the same conversation up to the final "
                "assistant answer (that shared part is the prompt); they differ earlier"
            )
        prompt = whole[0][:-1]
        if not prompt or prompt[-1]["role"] != "user":
            raise DataError(
                f"{where}: chosen and rejected must hold the prompt (ending with a user turn) "
                "before the final assistant answer"
            )
        return prompt, whole[0][-1]["content"], whole[1][-1]["content"]
    if (
        isinstance(chosen, str)
        and isinstance(rejected, str)
        and _is_hh(chosen)
        and _is_hh(rejected)
    ):
        cut_c, cut_r = chosen.rfind(_HH_ANSWER), rejected.rfind(_HH_ANSWER)
        if cut_c < 0 or cut_r < 0 or chosen[:cut_c] != rejected[:cut_r]:
            raise DataError(
                f"{where}: chosen and rejected HH transcripts must be equal up to their last "
                f"{_HH_ANSWER!r} (that shared part is the prompt); they differ earlier"
            )
        prompt = _hh_prompt(chosen[:cut_c], where, "chosen")
        answers = chosen[cut_c + len(_HH_ANSWER) :], rejected[cut_r + len(_HH_ANSWER) :]
        return prompt, answers[0].strip(), answers[1].strip()
    raise DataError(
        f"{where}: no prompt field, so chosen and rejected must be whole conversations: both "
        f"HH-RLHF transcripts or both message lists; found {_kind(chosen)} and {_kind(rejected)}. "
        "Add a prompt field to give the prompt separately"
    )


def _pair_prompt(value: Any, where: str) -> list[dict]:
    if isinstance(value, list):
        messages = _checked_messages(value, where, "prompt")
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: prompt must end with a user turn")
        return messages
    if not isinstance(value, str):
        raise DataError(f"{where}: prompt must be a string or chat messages, found {_kind(value)}")
    if _is_hh(value):
        return _hh_prompt(value, where, "prompt")
    return _from_text(value, where, "prompt", "first_turn")[0]


def _hh_prompt(text: str, where: str, field: str) -> list[dict]:
    """A whole-context prompt from a transcript that ends with a Human turn (or an empty
    "Assistant:" cue after it, as in TRL-style HH prompt columns)."""
    messages, reference = _from_hh(text, where, field, "full_context")
    if reference:
        raise DataError(
            f"{where}: {field}: the prompt transcript must end with a Human turn; it ends with "
            "an Assistant answer"
        )
    return messages


def _response(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = _checked_messages(value, where, field)
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            return messages[0]["content"]
        roles = [m["role"] for m in messages]
        raise DataError(f"{where}: {field} must be one assistant message, found roles {roles}")
    raise DataError(
        f"{where}: {field} must be a string or one assistant message, found {_kind(value)}"
    )


def _probability(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise DataError(f"{where}: p_chosen must be a number in [0, 1], found {value!r}")
    return float(value)
