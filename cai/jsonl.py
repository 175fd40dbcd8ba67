"""jsonl files and atomic writes: the one way cai writes a file readers may see mid-write.

``write_atomic`` writes beside the target and renames, so a reader (or a crash) sees the old file or
the new one; ``encode_line`` is the one JSON line format of stage records and exports;
``iter_jsonl`` reads a jsonl file, ignoring a torn last line (a crash mid-append) and raising on a
bad line anywhere else. The run store (``cai.store``) adds its own rules on top: keys, errors,
shards, locks.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class JsonlError(ValueError):
    """A jsonl file with an invalid line that is not a torn last line; names the file and line."""


def fsync_dir(path: Path) -> None:
    """Make a created or renamed directory entry durable (the file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode(mode: int) -> int:
    """``mode`` less the process's umask: the permissions ``open`` and ``mkdir`` would give.
    ``tempfile`` makes its files 0600 and folders 0700 whatever the umask; an output renamed
    from one gets these instead, as other tools' outputs do."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via a temp file in the same directory and a rename: readers see old or new.
    The file gets the permissions the umask gives a new file (not tempfile's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            name_file(e, path)
        raise
    fsync_dir(path.parent)


def name_file(e: OSError, path: Path) -> None:
    """Name ``path`` in an error that names no file (a write to a full disk does not), so that
    the line the commands print says where."""
    if e.filename is None and e.strerror is not None:
        e.filename = str(path)


def encode_line(record: dict[str, Any]) -> bytes:
    return (
        json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
    ).encode()


def iter_jsonl(path: Path) -> Iterator[dict]:
    """The records of a jsonl file, streamed. A torn last line (a crash mid-write) is ignored;
    a bad line anywhere else raises JsonlError naming the file and line."""
    bad: tuple[int, ValueError] | None = None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if bad is not None:
                raise JsonlError(f"{path}:{bad[0]}: not valid JSON ({bad[1]})")
            try:
                record = json.loads(line)
            except ValueError as e:
                bad = (number, e)
                continue
            yield record
