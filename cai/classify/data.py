"""Labelled guard examples: the one reader of classifier data, for training and evaluation.

One JSON object a line::

    {"prompt": str | [chat messages], "label": "restricted" | "permitted",
     "class"?: str, "response"?: str}

A record with ``response`` is an output example (the conversation so far, then the response the
output guard reads as it streams); one without is an input example (the conversation so far,
ending with the user's turn). The pipeline's export (``cai.pipeline.classifier_data``) is read
as it is: its ``group`` (a class's seed example with its styles, look-alikes and augmentations,
or one seed-set category) is kept, so that the trainer holds out whole groups (``cai.train.classifier.split_examples``); its other descriptive
fields (``style``, ``kind``, ``augment``, ``response_kind``) are accepted and ignored; any other
field is refused. Errors name the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cai.data import DataError, check_messages, read_rows

LABELS = {"restricted": 1, "permitted": 0}
"""A record's label → the classifier's target (restricted is the positive class)."""
EXPORT_FIELDS = {"style", "kind", "augment", "group", "response_kind"}
"""What the ``class_prompts`` / ``class_completions`` export adds to a record (only ``group`` is
used)."""
FIELDS = {"prompt", "label", "class", "response", *EXPORT_FIELDS}
Kind = Literal["input", "output"]


@dataclass(frozen=True)
class Example:
    """One labelled example."""

    messages: list[dict]
    """The conversation so far, ending with the user's turn."""
    label: int
    """1 restricted, 0 permitted."""
    cls: str | None
    """The constitution class it belongs to (``class``), for per-class reports."""
    response: str | None
    """The response (output examples only)."""
    where: str
    """``file:line``."""
    group: str | None = None
    """The export's ``group``: examples of one group are held out together (None: its own)."""

    @property
    def kind(self) -> Kind:
        return "input" if self.response is None else "output"


def _example(row: dict, where: str) -> Example:
    unknown = set(row) - FIELDS
    if unknown:
        raise DataError(f"{where}: unknown fields {sorted(unknown)}; accepted: {sorted(FIELDS)}")
    if "prompt" not in row:
        raise DataError(f"{where}: no prompt (a string or chat messages)")
    prompt: Any = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: prompt is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = check_messages(prompt, where, "prompt")
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: prompt must end with a user turn (the conversation so far)")
    label = row.get("label")
    if label not in LABELS:
        raise DataError(f"{where}: label must be 'restricted' or 'permitted', got {label!r}")
    cls = row.get("class")
    if cls is not None and not isinstance(cls, str | int):
        raise DataError(f"{where}: class must be a string, got {type(cls).__name__}")
    response = row.get("response")
    if response is not None and (not isinstance(response, str) or not response.strip()):
        raise DataError(f"{where}: response must be a non-empty string")
    group = row.get("group")
    if group is not None and not isinstance(group, str | int):
        raise DataError(f"{where}: group must be a string, got {type(group).__name__}")
    return Example(
        messages,
        LABELS[label],
        None if cls is None else str(cls),
        response,
        where,
        None if group is None else str(group),
    )


def load_examples(path: str | Path) -> list[Example]:
    """Every example of a jsonl file (or datasets folder), checked; DataError names file:line."""
    examples = [_example(row, where) for where, row in read_rows(path)]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


__all__ = ["EXPORT_FIELDS", "LABELS", "Example", "Kind", "load_examples"]
