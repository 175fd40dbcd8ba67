"""People's labels: ``<run>/review/labels.jsonl`` (or ``--out DIR/labels.jsonl``), appended one
answer a line as it is given, never rewritten.

    {"annotator": "ana", "key": "<item key>", "side": "BA", "answer": "A", "time": "..."}

``side`` is the order shown: ``AB`` put response A on the left, ``BA`` response B. ``answer`` is
in the item's own A/B terms (``A``, ``B``, ``tie`` or ``skip``), whatever the side, or ``undo``:
that annotator's latest live answer for ``key`` no longer counts. Each line is written with
flush and fsync before the answer is acknowledged, so a killed server loses at most the answer
in flight; reading ignores a torn last line (``cai.jsonl``'s rule), and the next append first
cuts it off. Several annotators share one file; each one's next item is the first in review
order without a live answer of theirs.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cai.jsonl import encode_line, fsync_dir, iter_jsonl
from cai.keys import seed_for
from cai.layout import LABELS_FILE

ANSWERS = ("A", "B", "tie", "skip")
UNDO = "undo"
SIDES = ("AB", "BA")


def side_shown(key: str, annotator: str) -> str:
    """The order ``annotator`` sees item ``key`` in: random over items, fixed per (item,
    annotator), so a reload shows the same order and a position bias averages out."""
    return SIDES[seed_for(f"review:{annotator}:{key}") % 2]


def to_original(choice: str, side: str) -> str:
    """``left`` / ``right`` (or tie, skip) as shown in ``side`` order → the item's A/B terms."""
    if choice in ("tie", "skip"):
        return choice
    if choice not in ("left", "right") or side not in SIDES:
        raise ValueError(f"cannot map {choice!r} shown as {side!r}")
    return side[0] if choice == "left" else side[1]


def to_shown(answer: str, side: str) -> str:
    """The inverse of :func:`to_original`: ``A`` / ``B`` → ``left`` / ``right``."""
    if answer in ("tie", "skip"):
        return answer
    return "left" if side[0] == answer else "right"


def labels_path(folder: str | Path) -> Path:
    return Path(folder) / LABELS_FILE


def read_labels(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a labels file in order (none if it does not exist); a torn last line is
    ignored, a bad line elsewhere raises cai.jsonl.JsonlError naming it."""
    path = Path(path)
    return list(iter_jsonl(path)) if path.is_file() else []


def live_labels(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(annotator, item key) → the answer that counts: each one's latest answer for the item
    that no later ``undo`` took back (an undo takes back the latest live one)."""
    history: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        slot = (record["annotator"], record["key"])
        if record["answer"] == UNDO:
            if history[slot]:
                history[slot].pop()
        else:
            history[slot].append(record)
    return {slot: answers[-1] for slot, answers in history.items() if answers}


def _cut_torn_line(path: Path) -> None:
    """Drop a torn last line (a process killed mid-append), so the next line starts clean."""
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


class LabelLog:
    """The labels file of one review folder: answers appended durably, and what is live now.
    Thread-safe within a process (the page's requests run in threads)."""

    def __init__(self, folder: str | Path):
        self.path = labels_path(folder)
        self._lock = threading.RLock()
        self.records = read_labels(self.path)
        if self.path.is_file():
            _cut_torn_line(self.path)

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(encode_line(record))
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.path.parent)
        self.records.append(record)
        return record

    def answer(self, annotator: str, key: str, side: str, answer: str) -> dict[str, Any]:
        """Append one answer (in the item's A/B terms) and return its record."""
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
        if side not in SIDES:
            raise ValueError(f"side must be AB or BA, got {side!r}")
        record = {"annotator": annotator, "key": key, "side": side, "answer": answer}
        with self._lock:
            return self._append({**record, "time": _now()})

    def undo(self, annotator: str) -> dict[str, Any] | None:
        """Take back ``annotator``'s latest live answer (an appended ``undo``); None if none."""
        with self._lock:
            live = self.live()
            mine = [r for r in self.records if (annotator, r["key"]) in live]
            mine = [r for r in mine if r is live[(annotator, r["key"])]]
            if not mine:
                return None
            last = mine[-1]
            record = {"annotator": annotator, "key": last["key"], "side": last["side"]}
            self._append({**record, "answer": UNDO, "time": _now()})
            return last

    def live(self) -> dict[tuple[str, str], dict[str, Any]]:
        with self._lock:
            return live_labels(self.records)

    def next_index(self, annotator: str, keys: list[str]) -> int:
        """The index in ``keys`` (review order) of ``annotator``'s first item without a live
        answer; ``len(keys)`` when every one has one."""
        live = self.live()
        return next((n for n, k in enumerate(keys) if (annotator, k) not in live), len(keys))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
