"""A run's stage files: reading one by the crash rules, appending to one under its lock, merging
shard files. :class:`cai.store.RunStore` opens them by stage name; ``cai.layout`` names them.

Every record is a JSON object with a ``key``. A key is *done* once a record for it without an
``error`` is on disk; a record with a non-null ``error`` does not make its key done: the next run
retries it, and the later record replaces the error.

Crash safety rests on three rules:

- Records are appended as whole lines and fsync'd in batches, so a crash can only leave a *torn last
  line*. Readers ignore it; :class:`StageWriter` truncates it away before appending.
- An invalid line that is not the last one cannot come from a crash, so it raises
  :class:`RunStoreError` naming the file and line instead of being skipped.
- One process per stage file, enforced with ``fcntl.flock``; machines sharing a filesystem each
  write their own shard file, merged afterwards by :func:`merge_shard_files`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from cai.jsonl import encode_line, fsync_dir, name_file, write_atomic
from cai.keys import Shard, in_shard, shard_of
from cai.layout import shard_file, shard_glob, stage_file

log = logging.getLogger(__name__)


class RunStoreError(Exception):
    """The run directory is inconsistent with what was asked; the message says what to do."""


# ---------------------------------------------------------------------------- files


def is_error(record: dict[str, Any]) -> bool:
    return record.get("error") is not None


@dataclasses.dataclass
class StageScan:
    """What reading a stage file found."""

    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """key -> its record: the first one without an error, else the latest error (file order)."""
    done: set[str] = dataclasses.field(default_factory=set)
    torn_at: int | None = None
    """Byte offset of a torn last line, if the file ends with one."""
    duplicates: int = 0


def scan_file(path: Path, *, keep_records: bool = True) -> StageScan:
    """Read a stage file, validating every line; see the module docstring for the rules."""
    scan = StageScan()
    if not path.exists():
        return scan
    # (line number, byte offset, reason) of an unparsable line: a torn tail if nothing follows it.
    bad: tuple[int, int, str] | None = None
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if bad is not None:
                if raw.strip():
                    raise RunStoreError(
                        f"{path}:{bad[0]}: invalid record ({bad[2]}). It is not the last line, so "
                        "this is corruption, not a crash mid-write. Delete that line (its record "
                        "is regenerated on the next run), or delete the file to redo the stage."
                    )
                continue
            if not raw.endswith(b"\n"):
                scan.torn_at = start
                break
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                if b"\0" not in raw:  # a crash leaves no newline, or zeros (a lost block)
                    raise RunStoreError(
                        f"{path}:{lineno}: invalid record ({e}). The line ends with its newline, "
                        "so it was written whole: this is corruption, not a crash mid-write. "
                        "Delete that line (its record is regenerated on the next run), or delete "
                        "the file to redo the stage."
                    ) from None
                bad = (lineno, start, str(e))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                raise RunStoreError(
                    f"{path}:{lineno}: a record must be a JSON object with a string 'key'. "
                    "Delete that line (its record is regenerated on the next run)."
                )
            _add(scan, record, keep_records)
    if bad is not None:
        scan.torn_at = bad[1]
    if scan.duplicates:
        log.warning(
            "%s: %d duplicate record(s) for keys already done were ignored (the first is kept); "
            "were two processes writing this file?",
            path,
            scan.duplicates,
        )
    return scan


def _add(scan: StageScan, record: dict[str, Any], keep_records: bool) -> None:
    key = record["key"]
    if key in scan.done:
        scan.duplicates += 1
        return
    if not is_error(record):
        scan.done.add(key)
    if keep_records:
        scan.records[key] = record


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    scan = scan_file(path)
    if scan.torn_at is not None:
        log.warning(
            "%s: ignoring a torn last line at byte %d (a crash mid-write); "
            "it is truncated when the stage is next opened for writing",
            path,
            scan.torn_at,
        )
    return scan.records


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunStoreError(
            f"{path} is being written by another process. Two processes must not write the same "
            "stage file: wait for the other run to finish, or split the work with --shard k/n "
            "so that each process writes its own file."
        ) from None


def open_locked(path: Path) -> int:
    """Open ``path`` for appending under an exclusive flock, failing fast if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            _lock(fd, path)
            # A merge may have renamed a new file over ``path`` between our open and our lock;
            # appending to the old, unlinked inode would lose the records.
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    if created:
        fsync_dir(path.parent)
    return fd


# ---------------------------------------------------------------------------- writer


class StageWriter:
    """Appends records to one stage file; get it from :meth:`RunStore.writer` and use it in ``with``.

    Records are buffered and written + fsync'd every ``flush_every`` records, when ``flush_seconds``
    have passed at a write, and on :meth:`flush` / close. Call :meth:`flush` after each engine batch
    so that a kill while the next batch generates loses nothing already generated.
    """

    def __init__(
        self,
        path: Path,
        shard: Shard | None = None,
        *,
        flush_every: int = 100,
        flush_seconds: float = 5.0,
        keep_records: bool = False,
    ) -> None:
        self.path = path
        self.shard = shard
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._buffer: list[bytes] = []
        self._last_flush = time.monotonic()
        self._fd: int | None = open_locked(path)
        try:
            scan = scan_file(path, keep_records=keep_records)
            if scan.torn_at is not None:
                size = os.fstat(self._fd).st_size
                os.ftruncate(self._fd, scan.torn_at)
                os.fsync(self._fd)
                log.warning(
                    "%s: truncated a torn last line at byte %d (%d bytes, a crash mid-write)",
                    path,
                    scan.torn_at,
                    size - scan.torn_at,
                )
        except BaseException:
            self.close()
            raise
        self._done = scan.done
        self._keep = keep_records
        self.records = scan.records
        """With ``keep_records``: key → its record, by the readers' rule (the first done one,
        else the latest error), the file's and those written since, as read back."""

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is done: a record without an error is written (or buffered)."""
        return key in self._done

    def __len__(self) -> int:
        """Number of done keys."""
        return len(self._done)

    def write(self, record: dict[str, Any]) -> bool:
        """Append ``record``; return False, writing nothing, if its key is already done.

        Raises:
            ValueError: no string ``key``; a key (``input_key`` where given) outside this
                writer's shard; not plain JSON
                (NaN and infinities included, since other JSON readers reject them).
        """
        if self._fd is None:
            raise ValueError(f"{self.path}: write() after close()")
        key = record.get("key")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.path}: a record needs a non-empty string 'key', got {key!r}")
        if key in self._done:
            return False
        # A record derived from an input (a prompt) is sharded by that input's key, so every
        # stage of one input lands in the same shard; other records by their own key.
        shard_key = record.get("input_key", key)
        if self.shard is not None and not in_shard(shard_key, self.shard):
            k, n = self.shard
            raise ValueError(
                f"key {shard_key} belongs to shard {shard_of(shard_key, n)}/{n}, not to this "
                f"writer's {k}/{n}; filter the work with in_shard(key, shard)"
            )
        try:
            line = encode_line(record)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: record {key} is not plain JSON: {e}") from e
        self._buffer.append(line)
        if self._keep:
            self.records[key] = json.loads(line)  # what a reader of the file would get
        if not is_error(record):
            self._done.add(key)
        if (
            len(self._buffer) >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()
        return True

    def flush(self) -> None:
        """Write buffered records and fsync: after this returns they survive any crash."""
        if self._fd is None:
            return
        if self._buffer:
            data = memoryview(b"".join(self._buffer))
            self._buffer.clear()
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
                os.fsync(self._fd)
            except OSError as e:
                name_file(e, self.path)
                raise
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, release the lock and close the file; idempotent."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Flush on an exception too: buffered records are complete and independent of the failure.
        self.close()


# ---------------------------------------------------------------------------- store


def shard_files(stages_dir: Path, stage: str) -> dict[Shard, Path]:
    files: dict[Shard, Path] = {}
    for path in stages_dir.glob(shard_glob(stage)):
        found = shard_file(path.name)
        if found is not None and found[0] == stage:
            files[found[1]] = path
    return files


def merge_shard_files(stage: str, files: dict[Shard, Path], out: Path) -> Path:
    counts = sorted({n for _, n in files})
    if len(counts) > 1:
        raise RunStoreError(
            f"stage {stage!r} has shard files split {' and '.join(map(str, counts))} ways: "
            f"{', '.join(sorted(str(p) for p in files.values()))}. A run's shards must all use "
            "the same n; delete the files of the split you do not want."
        )
    n = counts[0]
    missing = [f"{k}/{n}" for k in range(1, n + 1) if (k, n) not in files]
    if missing:
        raise RunStoreError(
            f"cannot merge stage {stage!r}: shard(s) {', '.join(missing)} have no file "
            f"{stage_file(stage, ('<k>', n))}. Run them (--shard k/{n}) or copy their files in."
        )
    created = not out.exists()
    locks: list[int] = []
    try:
        # Hold every shard's lock (a shard still being written is not complete) and the output's.
        # O_RDWR because NFS emulates flock with POSIX locks, whose exclusive form needs it.
        for k in range(1, n + 1):
            locks.append(os.open(files[k, n], os.O_RDWR | os.O_CLOEXEC))
            _lock(locks[-1], files[k, n])
        locks.append(open_locked(out))
        owner: dict[str, int] = {}

        def write(f: IO[bytes]) -> None:
            # One shard in memory at a time; the output streams to the temp file.
            for k in range(1, n + 1):
                for key, record in read_records(files[k, n]).items():
                    if key in owner:
                        raise RunStoreError(
                            f"key {key} of stage {stage!r} is in shard {owner[key]}/{n} "
                            f"({files[owner[key], n]}) and in shard {k}/{n} ({files[k, n]}); "
                            "shards must not overlap. Were they run with different configs or "
                            "shard counts?"
                        )
                    owner[key] = k
                    f.write(encode_line(record))
            extra = scan_file(out, keep_records=False).done - owner.keys()
            if extra:
                raise RunStoreError(
                    f"{out} already holds {len(extra)} done key(s) that no shard has (e.g. "
                    f"{min(extra)}); merging would drop them. Move that file away first."
                )

        write_atomic(out, write)
    except BaseException:
        # Do not leave behind the empty file that taking the output's lock created (only if we
        # hold that lock: otherwise the file is another process's).
        if created and len(locks) == n + 1 and out.stat().st_size == 0:
            out.unlink()
        raise
    finally:
        for fd in locks:
            os.close(fd)
    log.info("merged %d shard(s), %d records, into %s", n, len(owner), out)
    return out
