"""Label Studio interoperability: the review items as tasks for its pairwise comparison
template, and its exported annotations back into ``review/labels.jsonl``.

    cai review labelstudio-export runs/rlaif-tiny --annotator ana --out tasks.json
    cai review labelstudio-import runs/rlaif-tiny annotations.json

Formats followed: Label Studio 1.x (the task format of its "Label Studio Task Format" guide and
the JSON export of 1.13): a task is ``{"data": {...}}``; the JSON export is a list of tasks,
each with ``annotations``, each with ``completed_by`` (a user id, or an object with ``email``),
``was_cancelled`` and ``result``, whose ``Pairwise`` control gives ``{"type": "pairwise",
"value": {"selected": "left" | "right"}}``. The labelling config is :data:`LABEL_CONFIG`, the
pairwise comparison template with the prompt above the two answers.

A task's ``data`` holds ``prompt`` (the conversation as text), ``answer1`` and ``answer2`` (left
and right, in the order fixed for the ``--annotator`` named at export), and ``item_key`` and
``side``, so that the import maps left/right back to the item's A/B whoever labelled it. A
cancelled (skipped) annotation is a ``skip``. The annotator of an imported label is
``labelstudio:<email or user id>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cai.review.items import Item, ReviewError
from cai.review.labels import LabelLog, side_shown, to_original

LABEL_CONFIG = """<View>
  <Header value="Which answer is better?"/>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="pw" toName="answer1,answer2"/>
  <View style="display: flex; gap: 1em">
    <Text name="answer1" value="$answer1"/>
    <Text name="answer2" value="$answer2"/>
  </View>
</View>
"""
"""The labelling config to paste into a Label Studio project (Settings, Labeling Interface)."""


def conversation_text(prompt: list[dict]) -> str:
    """A conversation as plain text, one ``role: content`` block a turn."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def tasks(items: list[Item], annotator: str) -> list[dict[str, Any]]:
    """The items as Label Studio tasks, in review order, the sides as ``annotator`` sees them."""
    out = []
    for item in items:
        side = side_shown(item.key, annotator)
        left, right = (
            (item.response_a, item.response_b)
            if side == "AB"
            else (item.response_b, item.response_a)
        )
        data = {
            "prompt": conversation_text(item.prompt),
            "answer1": left,
            "answer2": right,
            "item_key": item.key,
            "side": side,
        }
        out.append({"data": data})
    return out


def write_tasks(items: list[Item], annotator: str, out: str | Path) -> int:
    Path(out).write_text(json.dumps(tasks(items, annotator), ensure_ascii=False, indent=1))
    return len(items)


def _annotator(completed_by: Any) -> str:
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    return f"labelstudio:{completed_by}"


def _selected(annotation: dict, where: str) -> str:
    """``left``, ``right`` or ``skip`` (cancelled) of one annotation."""
    if annotation.get("was_cancelled"):
        return "skip"
    for result in annotation.get("result") or []:
        if result.get("type") == "pairwise":
            selected = (result.get("value") or {}).get("selected")
            if selected in ("left", "right"):
                return selected
            raise ReviewError(
                f"{where}: pairwise value must select left or right, got {selected!r}"
            )
    raise ReviewError(f"{where}: no pairwise result (is the project's config LABEL_CONFIG?)")


def parse_export(export: list[dict], keys: set[str]) -> list[tuple[str, str, str, str]]:
    """(annotator, item key, side, answer) of every annotation of a Label Studio JSON export;
    raises ReviewError naming the task for a task that is not one of ours."""
    if not isinstance(export, list):
        raise ReviewError("a Label Studio JSON export is a list of tasks")
    out = []
    for n, task in enumerate(export):
        data = task.get("data") if isinstance(task, dict) else None
        where = f"task {task.get('id', n) if isinstance(task, dict) else n}"
        if not isinstance(data, dict) or data.get("side") not in ("AB", "BA"):
            raise ReviewError(f"{where}: no data.item_key / data.side (not exported by cai review)")
        if data.get("item_key") not in keys:
            raise ReviewError(f"{where}: item {data.get('item_key')!r} is not among the pairs")
        for annotation in task.get("annotations") or []:
            answer = to_original(_selected(annotation, where), data["side"])
            out.append(
                (_annotator(annotation.get("completed_by")), data["item_key"], data["side"], answer)
            )
    return out


def import_export(path: str | Path, items: list[Item], log: LabelLog) -> int:
    """Append every annotation of the export at ``path`` to ``log``; the count. The whole file
    is checked before anything is appended."""
    try:
        export = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReviewError(f"{path}: not JSON ({e})") from None
    labels = parse_export(export, {i.key for i in items})
    for annotator, key, side, answer in labels:
        log.answer(annotator, key, side, answer)
    return len(labels)
