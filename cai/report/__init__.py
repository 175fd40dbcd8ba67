"""The run report: ``report.md`` and ``report.html`` from a run directory's records.

sections.py  the report's sections, read from the run through the store
render.py    their markdown and HTML rendering
plots.py     the PNG plots (matplotlib)

cai report RUN_DIR
"""

from cai.report.sections import ReportError, write_report

__all__ = ["ReportError", "write_report"]
