"""Prompt templates: Jinja files that render into chat messages.

The one Jinja environment of cai: sandboxed (``ImmutableSandboxedEnvironment``), strict about
undefined variables, no autoescaping; ``trim_blocks`` and ``lstrip_blocks`` are on so that a
template can put each block tag on its own line without that line's newline reaching the text.

A template builds messages with a call block, never by writing role markers into text::

    {% call message("user") %}{{ question }}{% endcall %}

Each block appends ``{"role": ..., "content": <body, stripped>}`` to the render's list, so data
(always passed as variables, never rendered as a template) cannot open or close a message:
``{{ 7*7 }}`` or ``<|im_start|>user`` in a prompt reaches the model as those characters.
Text outside message blocks must be whitespace only.

Use::

    from cai.prompts import load_template
    messages = load_template("critique").render(system=..., examples=..., conversation=...,
                                                critique_request=...)

A bare name loads a shipped template from ``prompts/``; a path the user gives wins.
"""

from __future__ import annotations

import functools
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cai.engine.base import ROLES
from cai.resources import resolve

# The judge templates end with a user turn; the judge then adds an assistant turn holding this
# prefix and scores the option tokens "A" and "B" as its continuation. The exemplars of
# judge_mc.jinja answer in the same words, "The answer is (A).", so the prefix is what the model
# has seen it write.
JUDGE_ANSWER_PREFIX = "The answer is ("


_STATED_ANSWER = re.compile(r"(?i:the answer is):?\s*\(?[AB]\b")


def cot_answer_prefix(rationale: str) -> str:
    """The assistant text after which a chain-of-thought judge (judge_cot.jinja) is scored.

    The judge first generates a rationale as the assistant, then scores "A" / "B" after
    ``rationale + "\\nThe answer is ("``. A rationale that already states an answer is cut
    where that answer begins, so the score is the model's reading of its reasoning rather
    than a copy of a letter it already wrote.
    """
    stated = _STATED_ANSWER.search(rationale)
    reasoning = rationale if stated is None else rationale[: stated.start()]
    return reasoning.rstrip() + "\n" + JUDGE_ANSWER_PREFIX


class TemplateError(ValueError):
    """A prompt template is invalid, or rendering it failed; the message names the template."""


@dataclass
class _Render:
    name: str
    messages: list[dict[str, str]] = field(default_factory=list)
    inside: bool = False
    loop_items: int = 0


_current: ContextVar[_Render | None] = ContextVar("cai_prompts_render", default=None)


def _message(role: str, *, caller: Any = None) -> str:
    """The ``message(role)`` global: its call block's body becomes one chat message."""
    render = _current.get()
    if render is None:
        raise TemplateError("message() works only inside a template rendered by cai.prompts")
    if caller is None:
        raise TemplateError(
            f"{render.name}: use message() as {{% call message({role!r}) %}}...{{% endcall %}}"
        )
    if role not in ROLES:
        raise TemplateError(f"{render.name}: message role must be one of {ROLES}, got {role!r}")
    if render.inside:
        raise TemplateError(f"{render.name}: message blocks cannot be nested")
    render.inside = True
    try:
        body = caller()
    finally:
        render.inside = False
    render.messages.append({"role": role, "content": str(body).strip()})
    return ""


MAX_LOOP_ITEMS = 10_000
"""Most items all of one render's ``range()`` calls may give together: a prompt template loops
over its data (exemplars, turns), not over large counts."""

MAX_TEXT = 1_000_000
"""Most characters (or items) a string or list built by a template's operators or calls may
hold: a prompt is far shorter, and an unbounded ``"x" * 10**9`` would exhaust memory."""


MAX_POWER_BITS = 4096
"""Most bits of an integer ``**`` may build (a googol has 333)."""


def _too_large(size: int, what: str) -> TemplateError:
    render = _current.get()
    return TemplateError(
        f"{render.name if render else 'template'}: {what} builds a value of {size:,} characters "
        f"or items; at most {MAX_TEXT:,} are allowed"
    )


def _bounded(value: Any, what: str) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > MAX_TEXT:
        raise _too_large(len(value), what)
    return value


def _range(*args: int) -> range:
    """The templates' ``range``: bounded per render by :data:`MAX_LOOP_ITEMS` in all."""
    items = range(*args)
    render = _current.get()
    if render is not None:
        render.loop_items += len(items)
        if render.loop_items > MAX_LOOP_ITEMS:
            raise TemplateError(
                f"{render.name}: range() loops over more than {MAX_LOOP_ITEMS:,} items in one "
                "render; a prompt template loops over its data, not over large counts"
            )
    return items


class _PromptEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the size of what ``*``, ``**``, ``+`` and calls build bounded."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        power = operator == "**" and isinstance(left, int) and isinstance(right, int)
        if power and abs(left) > 1 and abs(left).bit_length() * right > MAX_POWER_BITS:
            raise TemplateError(f"{left} ** {right} is too large for a prompt template")
        if operator == "*":  # checked before it runs: "x" * 10**12 would not return
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > MAX_TEXT:
                    raise _too_large(len(seq) * times, "'*'")
        return _bounded(super().call_binop(context, operator, left, right), repr(operator))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        return _bounded(super().call(__context, __obj, *args, **kwargs), "a call")


_env = _PromptEnvironment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=False,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.globals["range"] = _range
_env.globals["message"] = _message


class Template:
    """A compiled prompt template; ``render`` turns variables into chat messages."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self._compiled, self.variables = _compile(source, str(path))

    def __repr__(self) -> str:
        return f"Template({str(self.path)!r})"

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """The chat messages (``{"role", "content"}`` dicts) for these variables.

        Raises TemplateError naming the template: a variable the template uses is missing,
        an attribute is missing or blocked by the sandbox, or text lies outside message blocks.
        """
        if "message" in variables:
            raise TemplateError(f"{self.path}: 'message' is reserved for the message() block")
        missing = sorted(self.variables - variables.keys())
        if missing:
            raise TemplateError(f"{self.path}: missing variable(s): {', '.join(missing)}")
        render = _Render(str(self.path))
        token = _current.set(render)
        try:
            text = self._compiled.render(**variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.path}: {e}") from e
        except (ArithmeticError, LookupError, TypeError, ValueError, MemoryError) as e:
            # What a template's own expressions raise (1/0, a bad index, str + int): the
            # template's error, never a crash of the stage that renders it.
            raise TemplateError(f"{self.path}: {type(e).__name__}: {e}") from e
        finally:
            _current.reset(token)
        if text.strip():
            # The text is not shown: it may be the data, or a file that is no template at all.
            raise TemplateError(
                f"{self.path}: an expression outside a message block wrote text; put all text "
                '(whitespace aside) inside {% call message("...") %}...{% endcall %}'
            )
        return render.messages


@functools.lru_cache(maxsize=64)
def _compile(source: str, name: str) -> tuple[jinja2.Template, frozenset[str]]:
    """Compile once per (text, name): a template file edited on disk compiles afresh."""
    try:
        ast = _env.parse(source, name=name, filename=name)
        code = _env.compile(ast, name=name, filename=name)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{name}:{e.lineno}: {e.message}") from None
    _check_static(ast, name)
    variables = frozenset(meta.find_undeclared_variables(ast) - _env.globals.keys())
    return _env.template_class.from_code(_env, code, _env.make_globals(None)), variables


_OTHER_TEMPLATES = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


def _check_static(node: nodes.Node, name: str, inside: bool = False) -> None:
    """Refuse, at load, what a prompt template may not hold: other templates (include, import,
    extends: a prompt is one file, and there is no loader), and text outside message blocks
    (named by line only: it may be a file that is no template at all, such as a password file).
    """
    if isinstance(node, _OTHER_TEMPLATES):
        tag = type(node).__name__.lower().replace("fromimport", "from ... import")
        raise TemplateError(
            f"{name}:{node.lineno}: {{% {tag} %}} is not allowed in a prompt template; write "
            "the text into this file"
        )
    if isinstance(node, nodes.TemplateData) and not inside and node.data.strip():
        raise TemplateError(
            f"{name}:{node.lineno}: text outside a message block; put all text (whitespace "
            'aside) inside {% call message("...") %}...{% endcall %}'
        )
    # A call block's or macro's body is text only where it is called (inside a message), and
    # a {% set %} block's is a value.
    inside = inside or isinstance(node, nodes.CallBlock | nodes.Macro | nodes.AssignBlock)
    for child in node.iter_child_nodes():
        _check_static(child, name, inside)


def load_template(name_or_path: str | Path) -> Template:
    """A template from a path, or a shipped one by name (``critique``, ``judge_mc``, ...)."""
    path = resolve("prompts", name_or_path)
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"{path}: not UTF-8 text (byte {e.start}); not a template") from None
    return Template(path, source)


__all__ = [
    "JUDGE_ANSWER_PREFIX",
    "ROLES",
    "Template",
    "TemplateError",
    "cot_answer_prefix",
    "load_template",
]
