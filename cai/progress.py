"""Progress bars for long batch work (tqdm on stderr; off when ``progress`` is False)."""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def progress_bar(total: int, progress: bool | str, unit: str = "it"):
    """A tqdm bar of ``total`` steps labelled ``progress`` (if a string); a no-op bar if False."""
    label = progress if isinstance(progress, str) else None
    bar = tqdm(total=total, desc=label, unit=unit, disable=not progress, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
