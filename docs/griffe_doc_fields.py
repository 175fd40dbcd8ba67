"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``): dataclass fields declared with
``cai.config.doc("one-line doc", default)``, or ``field(..., metadata={"doc": ...})``, render
in the API reference with that doc as their docstring and their real default: the signature
shows ``batch_size: int = 8``, not the ``doc(...)`` call."""

from __future__ import annotations

import ast
from typing import Any

import griffe


def _call_name(node: ast.expr | None) -> str:
    if isinstance(node, ast.Call):
        func = node.func
        return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    return ""


def _doc_text(call: ast.Call) -> str | None:
    """The doc of a ``doc(...)`` call, or of ``field(metadata={"doc": ...})``."""
    if _call_name(call) == "doc":
        text = call.args[0] if call.args else None
        for kw in call.keywords:
            if kw.arg == "text":
                text = kw.value
        return text.value if isinstance(text, ast.Constant) else None
    for kw in call.keywords:
        if kw.arg == "metadata" and isinstance(kw.value, ast.Dict):
            for key, value in zip(kw.value.keys, kw.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "doc":
                    return value.value if isinstance(value, ast.Constant) else None
    return None


def _default(call: ast.Call) -> ast.expr | None:
    """What ``doc(text, default, factory)`` gives a field: the default, ``factory()``, or
    None (required)."""
    given = dict(zip(("text", "default", "factory"), call.args, strict=False))
    given.update({kw.arg: kw.value for kw in call.keywords if kw.arg})
    if "default" in given:
        return given["default"]
    if "factory" in given:
        return ast.Call(func=given["factory"], args=[], keywords=[])
    return None


class DocFields(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        value = getattr(node, "value", None)
        if not isinstance(node, ast.AnnAssign) or _call_name(value) not in ("doc", "field"):
            return
        text = _doc_text(value)
        if text is None:
            return
        if attr.docstring is None:
            attr.docstring = griffe.Docstring(text, parent=attr)
        if _call_name(value) == "doc":
            default = _default(value)
            attr.value = (
                None if default is None else griffe.safe_get_expression(default, parent=attr.parent)
            )
