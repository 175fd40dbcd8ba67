"""Typed YAML: load a file into dataclasses, with errors that name the file, line and field.

Every YAML file cai reads (constitutions, recipes, trainer configs) goes through here, so that
every user mistake is reported the same way::

    constitutions/mine.yaml:14: principles[2].critique: must not be empty

Rules: YAML is read with ``yaml.SafeLoader``; unknown keys raise; a field with no default is
required; values are checked against the dataclass type hints (str, int, float, bool, Literal,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses).
Dataclasses may define ``validate(self) -> None`` that raises ``ValueError``; the message is
reported at the object's line.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line doc; required when given neither default nor factory."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": text})


class ConfigError(ValueError):
    """A configuration file (or a value set on the command line) is invalid."""


class LineDict(dict):
    """A mapping read from YAML that remembers the line of itself and of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


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
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise ConfigError(
                f"{_name(loader)}:{key_node.start_mark.line + 1}: duplicate key {key!r}"
            )
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


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely, keeping line numbers. Raises ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text safely, keeping line numbers; ``source`` names it in errors."""
    loader = _LineLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
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


def from_data(cls: type[T], data: Any, source: str = "<config>", where: str = "") -> T:
    """Build dataclass ``cls`` from parsed YAML data (LineDict or plain dict)."""
    return _convert(cls, data, _Ctx(source, where, getattr(data, "line", 0)))


@dataclasses.dataclass
class _Ctx:
    source: str
    where: str
    line: int

    def child(self, name: str | int, line: int | None) -> _Ctx:
        if isinstance(name, int):
            where = f"{self.where}[{name}]"
        else:
            where = f"{self.where}.{name}" if self.where else name
        return _Ctx(self.source, where, line or self.line)

    def error(self, message: str) -> ConfigError:
        loc = f"{self.source}:{self.line}" if self.line else self.source
        field = f" {self.where}:" if self.where else ""
        return ConfigError(f"{loc}:{field} {message}")


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
        raise ctx.error(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ctx.error(f"must be one of {choices} (got {value!r})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ctx.error(f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        lines = getattr(value, "item_lines", [None] * len(value))
        items = [_convert(item_tp, v, ctx.child(i, lines[i])) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(f"expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        key_lines = getattr(value, "key_lines", {})
        out = {}
        for k, v in value.items():
            sub = ctx.child(str(k), key_lines.get(k))
            out[_convert(key_tp, k, sub)] = _convert(val_tp, v, sub)
        return out
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, ctx)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx.error(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.error(f"expected a string, got {type(value).__name__} {value!r}")
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
        raise ctx.error(
            f"expected a mapping for {cls.__name__}, got {type(value).__name__} {value!r}"
        )
    line = getattr(value, "line", 0) or ctx.line
    ctx = _Ctx(ctx.source, ctx.where, line)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    key_lines = getattr(value, "key_lines", {})
    unknown = [k for k in value if k not in fields]
    if unknown:
        k = unknown[0]
        known = ", ".join(sorted(fields))
        raise ctx.child(str(k), key_lines.get(k)).error(f"unknown key (known keys: {known})")
    kwargs = {}
    for name, field in fields.items():
        sub = ctx.child(name, key_lines.get(name))
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ctx.error(f"missing required key {sub.where!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ctx.error(str(e)) from None
    return obj


def set_dotted(data: dict, assignment: str, source: str = "--set") -> None:
    """Apply a ``key.sub=value`` override to parsed YAML data (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"{source} {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{source} {assignment!r}: empty key")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source} {assignment!r}: {part!r} is not a mapping")
        if part not in node:
            node[part] = LineDict()
            node[part].key_lines = {}
        node = node[part]
    value = parse_yaml(raw, f"{source} {key}") if raw.strip() else ""
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{source} {assignment!r}: cannot set {last!r} here")


__all__ = [
    "ConfigError",
    "LineDict",
    "LineList",
    "from_data",
    "load_yaml",
    "parse_yaml",
    "set_dotted",
]
