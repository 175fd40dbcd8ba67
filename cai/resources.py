"""Find shipped files (constitutions, prompts, recipes, data sets) or a user's own.

A user-given path always wins. A bare name (``harmless``, ``critique``) is looked up among the
shipped files: the top-level folders of a source checkout, else the copies packaged in the wheel
under ``cai/_shipped/<kind>/``.
"""

from __future__ import annotations

from pathlib import Path

KINDS = {
    "constitutions": (".yaml", ".yml"),
    "prompts": (".jinja",),
    "pipelines": (".yaml", ".yml"),
    "data": (".jsonl",),
}


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped files of ``kind`` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}; expected one of {sorted(KINDS)}")
    package = Path(__file__).resolve().parent
    checkout = package.parent / kind
    if checkout.is_dir() and (package.parent / "pyproject.toml").is_file():
        return checkout
    return package / "_shipped" / kind


def shipped_names(kind: str) -> list[str]:
    """Names (file stems) of the shipped files of ``kind``."""
    folder = shipped_dir(kind)
    return (
        sorted(p.stem for p in folder.iterdir() if p.suffix in KINDS[kind])
        if folder.is_dir()
        else []
    )


def resolve(kind: str, name_or_path: str | Path) -> Path:
    """A path to an existing file: the path itself if it exists, else the shipped file so named.

    Raises FileNotFoundError listing the shipped names when neither exists.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    folder = shipped_dir(kind)
    for suffix in ("", *KINDS[kind]):
        candidate = folder / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    names = ", ".join(shipped_names(kind)) or "none"
    raise FileNotFoundError(
        f"{name_or_path}: no such file, and no shipped {kind[:-1] if kind != 'data' else 'data set'} "
        f"of that name (shipped: {names})"
    )
