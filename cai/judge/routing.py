"""A judge routed by an input classifier (issue 30): the principle asked follows the classifier's
verdict on the conversation, so that a restricted request is judged by a safety question and a
permitted one by a helpfulness question.

    JudgeSettings("hhh", mode="pointwise", guard="runs/guard-in", load_guard=Guard,
                  route={"restricted": ["harmless"], "permitted": ["balanced"]})

``guard`` is a ``cai train classifier`` folder of kind ``input``; ``route`` maps each verdict
(:data:`VERDICTS`) to the principle ids drawn from for it, in place of the whole pool (pairwise:
per pair; pointwise: per prompt, as without routing). The verdicts come from a :class:`Router`:
one batched ``check_inputs`` per call for the conversations it has not seen, each verdict kept
(by the prompt's record key), and the classifier loaded on the first verdict needed and released
by ``close`` (the verdicts stay).

The judge package sits below ``cai.classify`` (which loads models through ``cai.rewards``), so
it never imports a classifier: whoever builds routed settings passes ``load_guard``, a function
of the folder that returns the loaded classifier (``cai.classify.Guard``), imported only then,
so a judge without a guard pays no torch import.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cai.keys import record_key
from cai.layout import CLASSIFIER_FILE

RESTRICTED, PERMITTED = "restricted", "permitted"
VERDICTS: tuple[str, ...] = (RESTRICTED, PERMITTED)
"""The keys of ``route``: the input classifier flags a conversation (restricted) or not."""


class InputGuard(Protocol):
    """What routing needs of a classifier (``cai.classify.Guard``, or a stub in tests)."""

    def check_inputs(self, prompts: Sequence[list[dict]]) -> Sequence[Any]:
        """One verdict per conversation, each with a boolean ``flagged``."""
        ...

    def close(self) -> None: ...


def check_route(route: Any) -> dict[str, list[str]]:
    """``route`` as {verdict: [principle ids]}, both verdicts and nothing else, each a non-empty
    list of ids (the constitution checks them: ``JudgeSettings``). ValueError naming it."""
    if not isinstance(route, Mapping):
        raise ValueError(
            f"route must map restricted and permitted to lists of principle ids, got {route!r}"
        )
    unknown = sorted(str(k) for k in route if k not in VERDICTS)
    missing = [v for v in VERDICTS if v not in route]
    if unknown or missing:
        raise ValueError(
            f"route must name exactly {' and '.join(VERDICTS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    out = {}
    for verdict in VERDICTS:
        ids = route[verdict]
        if (
            isinstance(ids, str | bytes)
            or not isinstance(ids, Sequence)
            or not ids
            or not all(isinstance(i, str) and i for i in ids)
        ):
            raise ValueError(
                f"route.{verdict} must be a non-empty list of principle ids, got {ids!r}"
            )
        out[verdict] = list(ids)
    return out


def check_guard(folder: Any) -> str:
    """``folder`` if it is an input classifier's folder (``cai train classifier``, kind input),
    read without loading it; ValueError naming ``guard``."""
    if not isinstance(folder, str | Path) or not str(folder):
        raise ValueError(f"guard must be a classifier folder, got {folder!r}")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"guard: {folder} is not a folder (train one with `cai train classifier`)")
    info_file = path / CLASSIFIER_FILE
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"guard: {folder} has no {CLASSIFIER_FILE}: not a `cai train classifier` folder"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"guard: {info_file}: unreadable ({e})") from None
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind != "input":
        raise ValueError(
            f"guard: {folder} is {'an' if kind == 'output' else 'a'} {kind or 'unknown'} "
            "classifier; routing reads the conversation, so it needs an input classifier "
            "(kind: input)"
        )
    return str(folder)


def check_routing(guard: Any, route: Any, principles: Any) -> None:
    """The routing settings' checks that need no constitution: ``guard`` and ``route`` go
    together, ``route`` replaces ``principles``, and each is well formed. ValueError naming
    the setting."""
    if (guard is None) != (route is None):
        given, needed = ("guard", "route") if route is None else ("route", "guard")
        raise ValueError(
            f"{needed} must be set with {given}: the input classifier's verdict (guard) picks "
            "the principles (route)"
        )
    if route is None:
        return
    if principles is not None:
        raise ValueError(
            "principles and route: a routed judge draws from route's lists; leave principles unset"
        )
    check_route(route)
    check_guard(guard)


class Router:
    """The input classifier's verdict on each conversation: ``restricted`` or ``permitted``.
    Each call classifies the conversations it has not seen in one batched ``check_inputs``; a
    verdict is kept (by the prompt's record key, the last ``cache_size``), and the classifier is
    loaded (``load(folder)``) on the first verdict needed."""

    def __init__(self, folder: str, load: Callable[[str], InputGuard], *, cache_size: int = 65536):
        self.folder = folder
        self._load = load
        self._guard: InputGuard | None = None
        self._verdicts: OrderedDict[str, str] = OrderedDict()
        self.cache_size = cache_size
        self.calls = 0
        """``check_inputs`` calls made (one per call with anything new)."""
        self.loads = 0
        """Times the classifier was loaded."""

    def verdicts(self, prompts: Sequence[list[dict]]) -> list[str]:
        """The verdict of each conversation (chat messages ending with the user's turn)."""
        keys = [record_key(prompt=m) for m in prompts]
        known = {k: self._verdicts[k] for k in keys if k in self._verdicts}
        todo: dict[str, list[dict]] = {}
        for k, m in zip(keys, prompts, strict=True):
            if k not in known and k not in todo:
                todo[k] = m
        if todo:
            if self._guard is None:
                self._guard = self._load(self.folder)
                self.loads += 1
            checked = list(self._guard.check_inputs(list(todo.values())))
            self.calls += 1
            if len(checked) != len(todo):
                raise RuntimeError(
                    f"guard {self.folder}: {len(checked)} verdicts for {len(todo)} conversations"
                )
            for k, v in zip(todo, checked, strict=True):
                known[k] = RESTRICTED if v.flagged else PERMITTED
                self._verdicts[k] = known[k]
                self._verdicts.move_to_end(k)
            while len(self._verdicts) > self.cache_size:
                self._verdicts.popitem(last=False)
        return [known[k] for k in keys]

    def close(self) -> None:
        """Release the classifier (the verdicts stay; a new conversation loads it again)."""
        if self._guard is not None:
            self._guard.close()
            self._guard = None


__all__ = [
    "PERMITTED",
    "RESTRICTED",
    "VERDICTS",
    "InputGuard",
    "Router",
    "check_guard",
    "check_route",
    "check_routing",
]
