"""Constitutions to and from other layouts: YAML a person would write (``dump_constitution``) and
the published constitution JSON files of Anthropic (``from_anthropic``) and Hugging Face
(``from_huggingface``), which ``cai constitution convert`` reads. A converted constitution goes
through the same checks as a loaded one (:func:`cai.constitution.constitution_from_data`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

from cai.config import ConfigError, read_text
from cai.constitution import Constitution, constitution_from_data


class _Dumper(yaml.SafeDumper):
    """Block-literal multi-line strings and indented lists, as a person would write the file."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    )


_Dumper.add_representer(str, _represent_str)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            out[f.name] = _plain(value)
        return out
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    return obj


def dump_constitution(constitution: Constitution) -> str:
    """The constitution as YAML text that ``load_constitution`` reads back to an equal one."""
    return yaml.dump(
        _plain(constitution), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )


# --- converters from published JSON layouts -----------------------------------------------------


def _read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-_")


def from_anthropic(
    critique_revision_json_path: str | Path, judge_json_path: str | Path | None = None
) -> Constitution:
    """Convert the JSON files of Anthropic's Constitutional AI paper repository.

    ``CritiqueRevisionInstructions.json`` maps names to
    ``{"prompt": ["<critique request>"], "edit_request": "<revision request>"}``; each becomes a
    principle whose id is the name as a slug (``harmful0``). ``RLMadisonInstructions.json`` (the
    optional ``judge_json_path``) is a list of judge questions; each becomes a judge-only
    principle ``judge0``, ``judge1``, ...: the published files do not pair questions with
    critique requests, so none is invented. The files hold no exemplars.
    """
    cr_path = Path(critique_revision_json_path)
    data = _read_json(cr_path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f'{cr_path}: expected a JSON object of {{"name": {{"prompt": ["critique request"], '
            f'"edit_request": "revision request"}}, ...}}'
        )
    principles: list[dict[str, Any]] = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"prompt", "edit_request"}:
            raise ConfigError(
                f'{cr_path}: {key}: expected {{"prompt": [...], "edit_request": ...}}'
            )
        prompt = entry["prompt"]
        if isinstance(prompt, str):
            prompt = [prompt]
        if not (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)):
            raise ConfigError(f"{cr_path}: {key}.prompt: expected a list of one critique request")
        if not isinstance(entry["edit_request"], str):
            raise ConfigError(f"{cr_path}: {key}.edit_request: expected a string")
        principles.append(
            {
                "id": _slug(key),
                "critique": prompt[0].strip(),
                "revision": entry["edit_request"].strip(),
            }
        )
    sources = cr_path.name
    if judge_json_path is not None:
        judge_path = Path(judge_json_path)
        questions = _read_json(judge_path)
        if not (isinstance(questions, list) and all(isinstance(q, str) for q in questions)):
            raise ConfigError(f"{judge_path}: expected a JSON list of judge question strings")
        principles += [{"id": f"judge{i}", "judge": q.strip()} for i, q in enumerate(questions)]
        sources += f" and {judge_path.name}"
    converted = {
        "name": "anthropic",
        "description": f"Converted from Anthropic's Constitutional AI files {sources}.",
        "version": "1",
        "principles": principles,
    }
    return constitution_from_data(converted, f"{cr_path} (converted)")


def from_huggingface(path: str | Path) -> Constitution:
    """Convert a Hugging Face constitution JSON (as used by their Constitutional AI recipes).

    Layout: ``{"constitutions": [{"critic": ..., "revision": ...}, ...], "system_chat":
    [[{"role": ..., "content": ...}, ...], ...]}``. Entry i of ``constitutions`` becomes
    principle ``principle-i``. A ``system_chat`` conversation becomes a critique exemplar when
    its turns alternate user/assistant (user first), number at least six, and end with
    user(critique request), assistant(critique), user(revision request), assistant(revision):
    the turns before those four are the exemplar's conversation. The exemplar points at the
    principle with exactly those two requests; when there is none, the pair becomes a new
    principle ``system-chat-i``. Other ``system_chat`` entries are skipped, and the description
    says how many.
    """
    path = Path(path)
    data = _read_json(path)
    if (
        not isinstance(data, dict)
        or "constitutions" not in data
        or set(data) - {"constitutions", "system_chat"}
    ):
        raise ConfigError(
            f'{path}: expected a JSON object with "constitutions" (and optionally "system_chat")'
        )
    entries = data["constitutions"]
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: constitutions: expected a list")
    principles: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        if not (
            isinstance(entry, dict)
            and set(entry) == {"critic", "revision"}
            and all(isinstance(v, str) for v in entry.values())
        ):
            raise ConfigError(
                f'{path}: constitutions[{i}]: expected {{"critic": "...", "revision": "..."}}'
            )
        principles.append(
            {
                "id": f"principle-{i}",
                "critique": entry["critic"].strip(),
                "revision": entry["revision"].strip(),
            }
        )
    chats = data.get("system_chat", [])
    if not isinstance(chats, list):
        raise ConfigError(f"{path}: system_chat: expected a list of conversations")
    examples, skipped = _chat_examples(chats, principles, path)
    description = (
        f"Converted from the Hugging Face constitution {path.name}: {len(entries)} principles, "
        f"{len(examples)} exemplars from system_chat."
    )
    if skipped:
        description += (
            f" {skipped} system_chat entries skipped: not user/assistant turns ending in critique"
            " request, critique, revision request, revision."
        )
    converted = {
        "name": _slug(path.stem) or "huggingface",
        "description": description,
        "version": "1",
        "principles": principles,
        "critique_examples": examples,
    }
    return constitution_from_data(converted, f"{path} (converted)")


def _chat_examples(
    chats: list[Any], principles: list[dict[str, Any]], path: Path
) -> tuple[list[dict[str, Any]], int]:
    """(critique exemplars, number skipped) of ``system_chat``; a request pair no principle has
    becomes a new principle, appended to ``principles``."""
    by_requests = {(p["critique"], p["revision"]): p["id"] for p in principles}
    examples: list[dict[str, Any]] = []
    skipped = 0
    for i, chat in enumerate(chats):
        turns = _json_turns(chat, f"{path}: system_chat[{i}]")
        roles = [t["role"] for t in turns]
        if len(turns) < 6 or roles != ["user", "assistant"] * (len(turns) // 2):
            skipped += 1
            continue
        requests = (turns[-4]["content"].strip(), turns[-2]["content"].strip())
        if requests not in by_requests:
            by_requests[requests] = f"system-chat-{i}"
            principles.append(
                {"id": f"system-chat-{i}", "critique": requests[0], "revision": requests[1]}
            )
        examples.append(
            {
                "principle": by_requests[requests],
                "conversation": turns[:-4],
                "critique": turns[-3]["content"].strip(),
                "revision": turns[-1]["content"].strip(),
            }
        )
    return examples, skipped


def _json_turns(chat: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(chat, list):
        raise ConfigError(f"{where}: expected a list of messages")
    for j, turn in enumerate(chat):
        if not (
            isinstance(turn, dict)
            and set(turn) == {"role", "content"}
            and all(isinstance(v, str) for v in turn.values())
        ):
            raise ConfigError(f'{where}[{j}]: expected {{"role": "...", "content": "..."}}')
    return chat


__all__ = ["dump_constitution", "from_anthropic", "from_huggingface"]
