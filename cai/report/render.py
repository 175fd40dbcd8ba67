"""The run report's documents: sections (paragraphs, tables, figures) rendered as Markdown and as
one self-contained HTML page (``cai.report.sections`` builds the sections). Every string is escaped.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from cai.layout import PLOTS as PLOTS_DIR


@dataclass
class Image:
    file: str
    """File name in report/."""
    caption: str
    wide: bool = False
    """Takes the page's full width (the training figures)."""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[list[list[str]]] = field(default_factory=list)
    """Each table: a header row, then rows of cell text."""
    images: list[Image] = field(default_factory=list)
    code: str | None = None
    """Preformatted text shown folded (the resolved config)."""


def render_markdown(title: str, meta: list[str], sections: list[Section], notes: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", *(f"- {m}" for m in meta), ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for p in s.paragraphs:
            lines += [p, ""]
        for table in s.tables:
            lines.append("| " + " | ".join(cell(c) for c in table[0]) + " |")
            lines.append("|" + "---|" * len(table[0]))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table[1:]]
            lines.append("")
        for image in s.images:
            lines += [f"![{image.caption}]({PLOTS_DIR}/{image.file})", ""]
        if s.code is not None:
            lines += ["Resolved config:", "", "```json", s.code, "```", ""]
    if notes:
        lines += ["## Not in this report", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; }
header { background: #24476b; color: #fff; padding: 1.2rem 2rem .9rem; }
header h1 { margin: 0 0 .3rem; font-size: 1.6rem; font-weight: 600; }
header ul { margin: 0; padding: 0; list-style: none; font-size: .85rem; opacity: .9; }
header li { display: inline; margin-right: 1.4rem; }
nav { margin-top: .7rem; font-size: .9rem; }
nav a { color: #cfe0f5; margin-right: 1rem; text-decoration: none; }
main { max-width: 1160px; margin: 0 auto; padding: 1rem 2rem 3rem; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; margin: 1.2rem 0;
          padding: .4rem 1.4rem 1rem; }
h2 { color: #24476b; font-size: 1.25rem; border-bottom: 1px solid #e3e8ee; padding-bottom: .3rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .88rem; }
th, td { border: 1px solid #d8dee4; padding: .3rem .7rem; text-align: right; white-space: nowrap; }
th { background: #eef2f7; } tr:nth-child(even) td { background: #fafbfc; }
td:first-child, th:first-child, td.text { text-align: left; }
.figures { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 1rem; }
figure { margin: 0; } figure.wide { grid-column: 1 / -1; }
figure img { width: 100%; height: auto; border: 1px solid #e3e8ee; border-radius: 4px; }
figcaption { font-size: .82rem; color: #57606a; margin-top: .2rem; }
details { margin: .6rem 0; } summary { cursor: pointer; color: #24476b; }
pre { background: #f6f8fa; border: 1px solid #e3e8ee; padding: .7rem; overflow-x: auto;
      font-size: .8rem; }
.notes li { color: #57606a; }
"""


def _anchor(title: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in title.lower())


_NUMERIC = re.compile(r"^(-|[-+]?\d)")


def _cell(text: str) -> str:
    """A table cell: numbers (and the ``-`` placeholder) right-aligned, text left-aligned."""
    css = "" if _NUMERIC.match(text) else ' class="text"'
    return f"<td{css}>{html.escape(text)}</td>"


def render_html(title: str, meta: list[str], sections: list[Section], notes: list[str]) -> str:
    e = html.escape
    if notes:
        sections = [*sections, Section("Not in this report")]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1>",
        "<ul>" + "".join(f"<li>{e(m)}</li>" for m in meta) + "</ul>",
        "<nav>" + "".join(f'<a href="#{_anchor(s.title)}">{e(s.title)}</a>' for s in sections),
        "</nav></header><main>",
    ]
    for s in sections:
        out.append(f'<section id="{_anchor(s.title)}"><h2>{e(s.title)}</h2>')
        out += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        for table in s.tables:
            out.append('<div class="scroll"><table><thead><tr>')
            out += [f"<th>{e(c)}</th>" for c in table[0]]
            out.append("</tr></thead><tbody>")
            for row in table[1:]:
                out.append("<tr>" + "".join(_cell(c) for c in row) + "</tr>")
            out.append("</tbody></table></div>")
        if s.images:
            out.append('<div class="figures">')
            for image in s.images:
                out.append(
                    f'<figure class="{"wide" if image.wide else ""}">'
                    f'<img src="{PLOTS_DIR}/{e(image.file)}" alt="{e(image.caption)}">'
                    f"<figcaption>{e(image.caption)}</figcaption></figure>"
                )
            out.append("</div>")
        if s.code is not None:
            out.append(
                f"<details><summary>Resolved config</summary><pre>{e(s.code)}</pre></details>"
            )
        if s.title == "Not in this report":
            out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out)
