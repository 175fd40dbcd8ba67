"""Typed YAML: load a file into dataclasses, with errors that name the file, line and field.

Every YAML file cai reads (constitutions, recipes, trainer configs) goes through here, so that
every user mistake is reported the same way::

    constitutions/mine.yaml:14: principles[2].critique: must not be empty

Rules: YAML is read with ``yaml.SafeLoader``; unknown keys raise; a field with no default is
required; values are checked against the dataclass type hints (str, int, float, bool, Literal,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses); a float
is finite (``.nan`` and ``.inf`` are refused).
Dataclasses may define ``validate(self) -> None`` that raises ``ValueError``; the message is
reported at the object's line.

Aliases (``*name``) may reuse a block, but not expand a document by more than
:data:`MAX_ALIAS_VALUES` values: nested anchors ("billion laughs") are refused before anything is
built. Errors show at most a short excerpt of a value.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from cai.keys import canonical

T = TypeVar("T")

MAX_ALIAS_VALUES = 100_000
"""Most values that aliases (``*name``) may add to a document once expanded. Reusing a block of
settings adds a few dozen; nine levels of anchors that each alias the one before nine times add
387 million, from 300 bytes of YAML, and exhaust memory in whatever walks the data next."""


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line doc; required when given neither default nor factory."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": text})


class ConfigError(ValueError):
    """A configuration file (or a value set on the command line) is invalid."""


class FieldError(ValueError):
    """What a dataclass's ``validate`` raises about one of its fields: the error then names that
    field and its line (or the ``--set`` that gave it), not just the object's."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


class LineDict(dict):
    """A mapping read from YAML that remembers the line of itself and of each key (1-based), and
    which keys a ``--set`` gave (``key_sources``: key → the ``--set key=value`` text)."""

    line: int = 0
    key_lines: dict[Any, int]
    key_sources: dict[Any, str]


class LineList(list):
    """A sequence read from YAML that remembers the line of itself and of each item (1-based)."""

    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that builds LineDict / LineList so errors can point at lines."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    own = sum(key.tag != "tag:yaml.org,2002:merge" for key, _ in node.value)
    loader.flatten_mapping(node)
    # flatten_mapping puts the pairs of merge keys (<<: *base) first: the mapping's own keys
    # override those, and only a key written twice in the mapping itself is a mistake.
    merged = len(node.value) - own
    written: set[Any] = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if index >= merged:
            if key in written:
                raise ConfigError(
                    f"{_name(loader)}:{key_node.start_mark.line + 1}: duplicate key {_short(key)}"
                )
            written.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


def _name(loader: yaml.SafeLoader) -> str:
    return getattr(loader, "name", "<yaml>")


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def read_text(path: str | Path) -> str:
    """A config file's UTF-8 text. Raises ConfigError naming the file (missing, not UTF-8)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely, keeping line numbers. Raises ConfigError naming the file."""
    return parse_yaml(read_text(path), str(path))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text safely, keeping line numbers; ``source`` names it in errors."""
    loader = _LineLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_aliases(node, source)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"{mark.line + 1}:" if mark else ""
        raise ConfigError(f"{source}:{line} invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def _check_aliases(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases would expand it by more than MAX_ALIAS_VALUES values, or
    that holds itself, before anything is built. An alias is the same node object as its anchor,
    so the expanded size of every node is counted once (linear time, nothing expanded)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    added = 0

    def size(node: yaml.Node, parent: yaml.Node) -> int:
        nonlocal added
        if id(node) in sizes:  # a second reference to a node: an alias
            added += sizes[id(node)]
            if added > MAX_ALIAS_VALUES:
                raise ConfigError(
                    f"{source}:{parent.start_mark.line + 1}: aliases (*name) here expand the "
                    f"document past {MAX_ALIAS_VALUES:,} values (nested anchors, a YAML bomb?); "
                    "write the values out, or alias a block without nesting aliases of aliases"
                )
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(
                f"{source}:{node.start_mark.line + 1}: this anchor's value refers to itself "
                "through an alias (*name), which would never end; alias only finished blocks"
            )
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, node) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, node) + size(v, node) for k, v in node.value)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root, root)


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, told that LineDict and LineList are a dict and a list (it would
    otherwise call their full repr and cut it afterwards)."""

    def repr_LineDict(self, value: dict, level: int) -> str:
        return self.repr_dict(value, level)

    def repr_LineList(self, value: list, level: int) -> str:
        return self.repr_list(value, level)


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 8, 8
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT_CHARS = 200


def _short(value: Any) -> str:
    """The repr of ``value`` for an error message: at most about 200 characters, built without
    formatting the whole of a large value."""
    return _cut(_SHORT.repr(value))


def _cut(text: str) -> str:
    return text if len(text) <= _SHORT_CHARS else text[: _SHORT_CHARS - 3] + "..."


def from_data(cls: type[T], data: Any, source: str = "<config>", where: str = "") -> T:
    """Build dataclass ``cls`` from parsed YAML data (LineDict or plain dict)."""
    return _convert(cls, data, _Ctx(source, where, getattr(data, "line", 0)))


@dataclasses.dataclass
class _Ctx:
    source: str
    where: str
    line: int
    origin: str | None = None
    """The ``--set`` that gave this value; errors name it instead of a line of the file."""

    def child(self, name: str | int, line: int | None, origin: str | None = None) -> _Ctx:
        if isinstance(name, int):
            where = f"{self.where}[{name}]"
        else:
            where = f"{self.where}.{name}" if self.where else name
        return _Ctx(self.source, where, line or self.line, origin or self.origin)

    def error(self, message: str) -> ConfigError:
        if self.origin:
            loc = f"{self.source} ({self.origin})"
        else:
            loc = f"{self.source}:{self.line}" if self.line else self.source
        field = f" {self.where}:" if self.where else ""
        return ConfigError(f"{loc}:{field} {message}")


def _key_source(value: Any, key: Any) -> str | None:
    return getattr(value, "key_sources", {}).get(key)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, ctx: _Ctx) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ctx.error("is required (got null)")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, ctx)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ctx.error(f"expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ctx.error(f"must be one of {choices} (got {_short(value)})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ctx.error(f"expected a list, got {type(value).__name__} {_short(value)}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        lines = getattr(value, "item_lines", [None] * len(value))
        items = [_convert(item_tp, v, ctx.child(i, lines[i])) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(f"expected a mapping, got {type(value).__name__} {_short(value)}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        key_lines = getattr(value, "key_lines", {})
        out = {}
        for k, v in value.items():
            sub = ctx.child(str(k), key_lines.get(k), _key_source(value, k))
            out[_convert(key_tp, k, sub)] = _convert(val_tp, v, sub)
        return out
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, ctx)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(f"expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(f"expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx.error(f"expected a number, got {_short(value)}")
        if not math.isfinite(value):
            # NaN compares false with everything: a bound or threshold set to it never applies.
            raise ctx.error(f"must be a finite number (got {value})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.error(f"expected a string, got {type(value).__name__} {_short(value)}")
        return value
    raise TypeError(f"cai.config cannot convert to {tp!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _convert_dataclass(cls: Any, value: Any, ctx: _Ctx) -> Any:
    if not isinstance(value, dict):
        if not ctx.where:
            # The whole file is no mapping: perhaps no config at all (a system file given by
            # mistake), so its content is not shown.
            raise ctx.error(
                f"expected a YAML mapping of keys for {cls.__name__}; the file holds a "
                f"{type(value).__name__}"
            )
        raise ctx.error(
            f"expected a mapping for {cls.__name__}, got {type(value).__name__} {_short(value)}"
        )
    line = getattr(value, "line", 0) or ctx.line
    ctx = _Ctx(ctx.source, ctx.where, line, ctx.origin)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    key_lines = getattr(value, "key_lines", {})
    unknown = [k for k in value if k not in fields]
    if unknown:
        k = unknown[0]
        known = ", ".join(sorted(fields))
        sub = ctx.child(str(k), key_lines.get(k), _key_source(value, k))
        raise sub.error(f"unknown key (known keys: {known})")
    kwargs = {}
    for name, field in fields.items():
        sub = ctx.child(name, key_lines.get(name), _key_source(value, name))
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ctx.error(f"missing required key {sub.where!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except FieldError as e:
            where = ctx.child(e.field, key_lines.get(e.field), _key_source(value, e.field))
            raise where.error(e.message) from None
        except ValueError as e:
            raise ctx.error(str(e)) from None
    return obj


def set_dotted(data: dict, assignment: str, source: str = "--set") -> None:
    """Apply a ``key.sub=value`` override to parsed YAML data (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"{source} {_short(assignment)}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{source} {_short(assignment)}: empty key")
    origin = _cut(f"{source} {assignment.strip()}")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source} {_short(assignment)}: {part!r} is not a mapping")
        if part not in node:
            node[part] = LineDict()
            node[part].key_lines = {}
            _set_by(node, part, origin)
        node = node[part]
    value = parse_yaml(raw, f"{source} {key}") if raw.strip() else ""
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
        _set_by(node, last, origin)
    else:
        raise ConfigError(f"{source} {_short(assignment)}: cannot set {last!r} here")


def _set_by(node: dict, key: str, origin: str) -> None:
    """Remember that ``origin`` (a ``--set``) gave ``node[key]``, so errors name it, not a line."""
    if isinstance(node, LineDict):
        node.key_sources = {**getattr(node, "key_sources", {}), key: origin}


def changed_fields(old: Any, new: Any) -> list[tuple[str, str, str]]:
    """``(field path, old value, new value)`` of each leaf where two configs (plain data, as
    ``asdict`` gives) differ: ``stages.judge.ensemble``, ``sources[1].limit``. Values are shown as
    canonical JSON (``(absent)`` for a side that lacks the field), each cut to 80 characters
    around where the two first differ."""
    return [(field, _show(a, b), _show(b, a)) for field, a, b in _changes(old, new)]


_ABSENT = object()


def _changes(old: Any, new: Any, field: str = "") -> list[tuple[str, Any, Any]]:
    """``(field path, old value, new value)`` of each leaf where two configs differ, with
    ``_ABSENT`` for a side that lacks it (``stages.judge.ensemble``, ``sources[1].limit``)."""
    if isinstance(old, list) and isinstance(new, list):
        old, new = dict(enumerate(old)), dict(enumerate(new))  # compared item by item
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            change
            for key in sorted(old.keys() | new.keys())
            for change in _changes(
                old.get(key, _ABSENT),
                new.get(key, _ABSENT),
                f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}".lstrip("."),
            )
        ]
    same = old is not _ABSENT and new is not _ABSENT and canonical(old) == canonical(new)
    return [] if same else [(field, old, new)]


def _show(value: Any, other: Any, width: int = 80) -> str:
    """``value`` as canonical JSON, cut to ``width`` around where it first differs from
    ``other``, so that two long values never show as the same text."""
    if value is _ABSENT:
        return "(absent)"
    text = canonical(value).decode()
    if len(text) <= width:
        return text
    theirs = "" if other is _ABSENT else canonical(other).decode()
    differs = next(
        (i for i, (a, b) in enumerate(zip(text, theirs, strict=False)) if a != b), len(theirs)
    )
    room = width - 6  # for an ellipsis on each side
    start = max(0, min(differs - width // 4, len(text) - room))
    end = min(len(text), start + room)
    return ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")


__all__ = [
    "MAX_ALIAS_VALUES",
    "ConfigError",
    "FieldError",
    "LineDict",
    "LineList",
    "changed_fields",
    "from_data",
    "load_yaml",
    "parse_yaml",
    "set_dotted",
]
