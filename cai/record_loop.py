"""The record loop: what every engine-driven stage does with its records.

Given work items with record keys, :func:`run_records` skips the keys the run store holds done,
sends the rest to an executor in batches, writes each batch's records (results and error records
alike) and flushes, then returns the stored record of every item. A kill loses at most the batch
in flight; a re-run asks only for what is missing or failed.

The executor is the seam for running batches elsewhere: :class:`InProcess` (the only one) calls
the stage's batch function here, one batch after another, and each batch's records are written
as soon as it returns. Ray plugs in below this seam, behind the engine (``engine.executor: ray``,
``cai.engine.ray.RayEngine``): a stage's batch function closes over the run (its store,
constitution, several dependent engine calls such as critique then revision), so it cannot be
shipped to a worker; instead each engine call inside it is spread over replicas, while keys,
seeds and the writing stay here. A killed driver still loses only the batch in flight.

    records = run_records(store, "generate", prompts, key=lambda p: keys[p.key],
                          call=lambda batch, progress: [...one record per item...],
                          batch_size=512, label="generate", tally=tally)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cai.keys import Shard
from cai.store import RunStore

T = TypeVar("T")

BatchCall = Callable[[Sequence[T], str | bool], Sequence[dict]]
"""A stage's work on one batch: (items, progress label) → one record per item, in order."""


@dataclass
class StageTally:
    """What one stage did in this invocation."""

    name: str
    records: int = 0
    done_before: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    requests: int = 0
    skipped: int = 0

    def add_usage(self, usage: dict) -> None:
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)

    @property
    def error_rate(self) -> float:
        return self.errors / self.records if self.records else 0.0


class Executor(Protocol):
    """Runs a stage's batch function over batches; yields each batch with its records."""

    def map(
        self, call: BatchCall, batches: Sequence[tuple[Sequence[T], str | bool]]
    ) -> Iterator[tuple[Sequence[T], Sequence[dict]]]: ...


class InProcess:
    """Every batch in this process, in order: the engine behind ``call`` schedules the batch."""

    def map(
        self, call: BatchCall, batches: Sequence[tuple[Sequence[T], str | bool]]
    ) -> Iterator[tuple[Sequence[T], Sequence[dict]]]:
        for batch, progress in batches:
            yield batch, call(batch, progress)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_records(
    store: RunStore,
    stage: str,
    items: Sequence[T],
    *,
    key: Callable[[T], str],
    call: BatchCall,
    tally: StageTally | None = None,
    shard: Shard | None = None,
    batch_size: int | None = None,
    label: str | bool = False,
    requests: Callable[[dict], int] = lambda record: 1,
    executor: Executor | None = None,
    stored_as: Callable[[dict[str, dict], T], str | None] | None = None,
) -> dict[str, dict]:
    """Run the items whose key is not done in ``stage``'s file; returns key → stored record (done,
    else the latest error) for every item that has one.

    Items sharing a key are asked once. ``batch_size`` None sends all the work as one batch.
    ``tally`` counts records, errors, skipped records (a truthy ``skipped``), engine requests
    (``requests(record)`` each) and ``usage`` tokens. ``stored_as(records, item)``, where given,
    names the key an item's done record is stored under (its own, or one an older cai gave it:
    the record is then taken as it is), or None where it has none.
    """
    # One scan of the stage file: the writer reads it (done keys, and the records to return) and
    # keeps what it writes.
    with store.writer(stage, shard, keep_records=True) as writer:
        alias: dict[str, str] = {}
        if stored_as is not None:
            for item in items:
                found = stored_as(writer.records, item)
                if found is not None and found != key(item) and found in writer:
                    alias[key(item)] = found
        todo = list(
            {
                key(item): item
                for item in items
                if key(item) not in writer and key(item) not in alias
            }.values()
        )
        if tally is not None:
            tally.done_before += len({key(item) for item in items}) - len(todo)
        size = batch_size or max(len(todo), 1)
        batches = []
        for n, batch in enumerate(chunks(todo, size)):
            progress = f"{label} {n * size + len(batch)}/{len(todo)}" if label else False
            batches.append((batch, progress))
        for _, records in (executor or InProcess()).map(call, batches):
            for record in records:
                writer.write(record)
                if tally is not None:
                    tally.records += 1
                    tally.requests += requests(record)
                    tally.errors += record.get("error") is not None
                    tally.skipped += bool(record.get("skipped"))
                    tally.add_usage(record.get("usage") or {})
            writer.flush()
    stored = {**writer.records, **{k: writer.records[found] for k, found in alias.items()}}
    return {key(item): stored[key(item)] for item in items if key(item) in stored}
