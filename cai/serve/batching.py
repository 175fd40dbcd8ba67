"""Coalescing batcher: many callers' small requests become the engine's large batches.

``cai serve`` answers many clients at once, but its judge (or reward model) should see a few
large batches, not one small call per HTTP request. Each request ``submit``s its items (judge
pairs, or conversations for a reward model) and waits on a future; one worker thread takes the
oldest waiting submission, waits up to ``max_wait_ms`` after its arrival for more submissions of
the same kind, up to ``max_batch`` items, makes ONE engine call for all of them and hands each
submission exactly its own slice of the results. While the engine works, new submissions queue:
they form the next batch as soon as the engine is free.

- A submission is never split: one larger than ``max_batch`` is a batch of its own.
- An exception from the batch function fails every submission of that batch with an
  ``EngineFailure`` wrapping it, and the worker goes on with the next batch. A ``ValueError`` (bad input) is first retried one
  submission at a time, so one malformed request cannot fail the others coalesced with it.
- A submission whose ``cancelled`` event is set (its client went away) before its batch starts
  is dropped without an engine call.
- ``submit`` refuses (``Overloaded``) items that would take the queue past ``max_queue``.

    batcher = Batcher({"judge": judge.label}, max_batch=64, max_wait_ms=5)
    prefs = batcher.call("judge", pairs)      # from any thread; blocks until its batch is done
    batcher.close()                           # finishes what is queued, then stops the worker
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Protocol

BatchFunction = Callable[[list], Sequence]
"""items -> one result per item, in order (``Judge.label``, ``RewardModel.score``)."""


class Overloaded(RuntimeError):
    """The queue is full: the client should retry later (HTTP 503)."""


class EngineFailure(RuntimeError):
    """The batch function raised (the engine failed on this batch): the original is the cause.
    Wrapped so that a caller tells an engine failure from a bug in its own code."""

    def __init__(self, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.__cause__ = error


class BatchObserver(Protocol):
    """Told about every engine call the worker makes (``cai.serve.service``'s metrics)."""

    def batch_done(self, kind: str, items: int, seconds: float, error: Exception | None): ...


@dataclass
class _Submission:
    kind: str
    items: list
    arrived: float
    future: Future = field(default_factory=Future)
    cancelled: threading.Event | None = None


class Batcher:
    """One worker thread making one batch call at a time over everything submitted (see the
    module docstring)."""

    def __init__(
        self,
        calls: Mapping[str, BatchFunction],
        *,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 65536,
        observer: BatchObserver | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.calls = dict(calls)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.observer = observer
        self._pending: deque[_Submission] = deque()
        self._queued = 0  # items in self._pending
        self._closing = False
        self._lock = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="cai-batcher", daemon=True)
        self._worker.start()

    @property
    def queue_length(self) -> int:
        """Items waiting for a batch (not counting the batch the engine is working on)."""
        return self._queued

    def submit(
        self, kind: str, items: Sequence, cancelled: threading.Event | None = None
    ) -> Future:
        """Queue ``items`` for a ``kind`` batch; the future gets their results, in order."""
        if kind not in self.calls:
            raise ValueError(
                f"no batch function for {kind!r}; this batcher has {sorted(self.calls)}"
            )
        submission = _Submission(kind, list(items), time.monotonic(), cancelled=cancelled)
        if not submission.items:
            submission.future.set_result([])
            return submission.future
        with self._lock:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if self._queued + len(submission.items) > self.max_queue:
                raise Overloaded(
                    f"{self._queued} items are queued; {len(submission.items)} more would pass "
                    f"the limit of {self.max_queue}"
                )
            self._pending.append(submission)
            self._queued += len(submission.items)
            self._lock.notify_all()
        return submission.future

    def call(self, kind: str, items: Sequence, cancelled: threading.Event | None = None) -> list:
        """``submit`` and wait for the results (raises what the batch function raised)."""
        return list(self.submit(kind, items, cancelled).result())

    def close(self, timeout: float | None = None) -> None:
        """Refuse new submissions, finish the queued ones, stop the worker."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._worker.join(timeout)

    # ---- the worker --------------------------------------------------------------------------

    def _take(self) -> list[_Submission] | None:
        """The next batch: whole submissions of the oldest one's kind, in arrival order, once
        ``max_batch`` items wait or ``max_wait`` has passed since the oldest arrived."""
        with self._lock:
            while not self._pending:
                if self._closing:
                    return None
                self._lock.wait()
            kind = self._pending[0].kind
            deadline = self._pending[0].arrived + self.max_wait
            while not self._closing:
                waiting = sum(len(s.items) for s in self._pending if s.kind == kind)
                left = deadline - time.monotonic()
                if waiting >= self.max_batch or left <= 0:
                    break
                self._lock.wait(left)
            batch: list[_Submission] = []
            size = 0
            for s in list(self._pending):
                if s.kind != kind:
                    continue
                if batch and size + len(s.items) > self.max_batch:
                    break
                self._pending.remove(s)
                self._queued -= len(s.items)
                if s.cancelled is not None and s.cancelled.is_set():
                    s.future.set_exception(CancelledError("the client went away"))
                    continue
                batch.append(s)
                size += len(s.items)
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Submission]) -> None:
        kind = batch[0].kind
        try:
            results = self._timed(kind, [x for s in batch for x in s.items])
        except ValueError as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:  # find the submission the bad input came from: one call each
                for s in batch:
                    self._settle(s)
            return
        except Exception as e:
            for s in batch:
                s.future.set_exception(EngineFailure(e))
            return
        start = 0
        for s in batch:
            s.future.set_result(list(results[start : start + len(s.items)]))
            start += len(s.items)

    def _settle(self, submission: _Submission) -> None:
        try:
            submission.future.set_result(list(self._timed(submission.kind, submission.items)))
        except ValueError as e:
            submission.future.set_exception(e)
        except Exception as e:
            submission.future.set_exception(EngineFailure(e))

    def _timed(self, kind: str, items: list) -> Sequence:
        """The batch function on ``items``, checked to give one result each, reported to the
        observer."""
        start = time.monotonic()
        error: Exception | None = None
        try:
            results = self.calls[kind](items)
            if len(results) != len(items):
                raise RuntimeError(f"{kind}: {len(items)} items gave {len(results)} results")
            return results
        except Exception as e:
            error = e
            raise
        finally:
            if self.observer is not None:
                self.observer.batch_done(kind, len(items), time.monotonic() - start, error)


__all__ = ["BatchFunction", "BatchObserver", "Batcher", "EngineFailure", "Overloaded"]
