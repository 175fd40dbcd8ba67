"""Engine replicas on Ray: one engine per Ray actor, each engine call spread over the replicas.

``RayEngine`` is an :class:`~cai.engine.Engine` like the others, so every stage runs on it
unchanged: the stage's logic, its record keys and seeds stay in the driver process, and the
driver alone writes the run store. Only the engine's work moves: a ``generate`` or ``score``
call is cut into contiguous pieces (about two per replica, so a replica that finishes early
takes another), each piece goes to a free replica, and the results come back in request order.

Each replica is a long-lived Ray actor holding an engine built by ``create_engine`` in the
actor: the model loads once per replica and stays loaded across chunks and stages. (Ray Data's
``map_batches`` with an actor pool was the other way; its actors live for one dataset execution,
so every engine call, several per chunk, would load the model again.) Actors restart when their
process dies (``max_restarts``) and a piece in flight is retried on the restarted replica
(``max_task_retries``): a killed replica loses nothing, and since the driver writes only after
the call returns, nothing is written twice. A replica that is gone for good (restarts spent)
leaves its pieces to the others; with none left, the call raises.

Security: whoever reaches a Ray cluster's ports can run code on it (work travels as pickled
Python objects); keep it on a private network, and across machines set ``RAY_AUTH_MODE=token``
with one ``RAY_AUTH_TOKEN`` on every node and the driver (a local Ray has a token already).

On one machine the replicas share its cores: 2 one-CPU replicas on 2 cores do about the work
of one in-process engine with 2 torch threads (``bench/pipeline.py --executor ray``), plus
Ray's start-up (~4 s, and ~7 s until two replicas of the default model are loaded). While
another process keeps a core busy, the in-process engine's two threads wait on each other and
one-thread replicas come out far ahead. Ray pays off with more machines or GPUs.

    from cai.engine.ray import replicated, start

    start()  # a local Ray, or start("head-node:6379") for a running cluster
    with replicated("hf", "smollm2-135m", replicas=2, num_cpus=1, dtype="float32") as engine:
        done = engine.generate(conversations, sampling)   # same results as one engine
"""

from __future__ import annotations

import functools
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.engine import create_engine
from cai.engine.base import (
    Completion,
    Conversation,
    Engine,
    OptionScores,
    Sampling,
    check_chats,
    check_options,
    check_prefixes,
    per_request,
)
from cai.progress import progress_bar

INSTALL = "pip install 'cai[ray]'"
PIECES_PER_REPLICA = 2
"""Pieces per replica and call: a replica done early takes another piece (balance), while few
pieces keep each piece a real batch for the engine's own scheduling."""

_ADDRESS = re.compile(r"^(ray://)?(?P<host>[^\s:/]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def import_ray() -> Any:
    """The ``ray`` module; ModuleNotFoundError saying how to install it where it is missing."""
    try:
        import ray
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the ray executor needs the ray package: {INSTALL} (or set engine.executor: local)"
        ) from e
    return ray


def check_address(address: str | None) -> None:
    """Raise ValueError unless ``address`` is None, ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT`` (Ray Client)."""
    if address is None or address == "auto":
        return
    match = _ADDRESS.match(address) if isinstance(address, str) else None
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(
            f"must be HOST:PORT of a Ray head node (such as 10.0.0.5:6379), ray://HOST:PORT, "
            f"auto or null (got {address!r})"
        )


def replica_gpus(backend: str, options: dict[str, Any], num_gpus: float | None) -> float | None:
    """GPUs per replica, given once: a vLLM replica with ``tensor_parallel_size`` needs one GPU
    per rank, so that is the default and any other explicit value is an error naming both
    fields. None: decided when the replicas start (one GPU each where the cluster has GPUs and
    the backend is vllm or auto, else none)."""
    tensor_parallel = options.get("tensor_parallel_size")
    if tensor_parallel is None or backend not in ("vllm", "auto"):
        return num_gpus
    if num_gpus is not None and num_gpus != tensor_parallel:
        raise ValueError(
            f"engine.ray.num_gpus ({num_gpus:g}) conflicts with engine.options."
            f"tensor_parallel_size ({tensor_parallel}): a replica takes one GPU per "
            "tensor-parallel rank; remove engine.ray.num_gpus"
        )
    return tensor_parallel


def start(address: str | None = None, *, connect_timeout: float = 5.0) -> float:
    """Connect to the Ray cluster at ``address`` (``HOST:PORT``, ``ray://HOST:PORT``, ``auto``),
    or with None to ``RAY_ADDRESS`` where it is set, else start a local Ray on this machine.
    Nothing happens where Ray is already initialised in this process. Returns the seconds taken.

    Raises ModuleNotFoundError (no ray package), ValueError (a malformed address),
    ConnectionError (nothing answers at the address within ``connect_timeout`` seconds, or
    what answers is no Ray) or RuntimeError (a local Ray that cannot start). ``ray.init``
    itself retries an unreachable address for minutes, so the address is first checked with a
    plain TCP connection.
    """
    ray = import_ray()
    if ray.is_initialized():
        return 0.0
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        try:
            check_address(address)
        except ValueError as e:
            raise ValueError(f"the environment's RAY_ADDRESS {e}") from None
    check_address(address)
    began = time.perf_counter()
    if address is not None and address != "auto":
        match = _ADDRESS.match(address)
        assert match is not None
        host, port = match["host"].strip("[]"), int(match["port"])
        try:
            socket.create_connection((host, port), timeout=connect_timeout).close()
        except OSError as e:
            raise ConnectionError(
                f"no Ray cluster answers at {address} ({e.strerror or e}; a head node starts "
                "with `ray start --head`, or give another --ray-address)"
            ) from None
    try:
        ray.init(address=address, log_to_driver=True, include_dashboard=False)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        if address is not None:
            raise ConnectionError(f"could not connect to Ray at {address} ({reason})") from None
        raise RuntimeError(
            f"could not start a local Ray ({reason}); its logs are in "
            "/tmp/ray/session_latest/logs, or give --ray-address of a running cluster"
        ) from None
    return time.perf_counter() - began


def stop() -> None:
    """Disconnect from Ray (a local Ray started by :func:`start` shuts down)."""
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()


class Replica:
    """A Ray actor's state: one engine, built in the actor. A build error is kept and raised by
    ``describe`` (the driver's first call), so it reaches the driver as itself."""

    def __init__(self, factory: Callable[[], Engine], threads: int):
        self.engine: Engine | None = None
        self.error: Exception | None = None
        import torch

        torch.set_num_threads(threads)
        try:
            self.engine = factory()
        except (ValueError, OSError, RuntimeError, ImportError) as e:
            self.error = e

    def _engine(self) -> Engine:
        if self.engine is None:
            raise self.error or RuntimeError("the replica has no engine")
        return self.engine

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict[str, Any]:
        return self._engine().describe()

    def generate(self, conversations, sampling, prefixes) -> list[Completion]:
        return self._engine().generate(conversations, sampling, prefixes=prefixes)

    def score(self, conversations, options, prefixes) -> list[OptionScores]:
        return self._engine().score(conversations, options, prefixes=prefixes)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def pieces(count: int, parts: int) -> list[slice]:
    """``count`` requests in ``parts`` contiguous slices of near-equal size (none empty)."""
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(slice(start, end))
        start = end
    return out


class RayEngine(Engine):
    """``replicas`` Ray actors, each holding the engine ``factory`` builds, behind the two verbs.

    ``num_cpus`` / ``num_gpus`` are each replica's Ray resources; a replica's torch uses
    ``num_cpus`` threads. Ray must be initialised (:func:`start`). The constructor waits until
    every replica has built its engine, and raises what a replica's build raised."""

    def __init__(
        self,
        factory: Callable[[], Engine],
        *,
        replicas: int = 1,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_restarts: int = 3,
        model_name: str | None = None,
    ):
        ray = import_ray()
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1 (got {replicas})")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call cai.engine.ray.start() first")
        self._ray = ray
        check_resources(replicas, num_cpus, num_gpus)
        began = time.perf_counter()
        actor = ray.remote(Replica).options(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=max_restarts,
            max_task_retries=-1,  # a piece is retried for as long as its replica restarts
        )
        threads = max(1, int(num_cpus))
        self.actors = [actor.remote(factory, threads) for _ in range(replicas)]
        try:
            described = ray.get([a.describe.remote() for a in self.actors])
        except ray.exceptions.RayTaskError as e:
            self.close()
            raise e.cause from None
        except ray.exceptions.RayError:
            self.close()
            raise
        # The name the driver knows the model by, where the replicas got another (an absolute
        # path): records and the manifest say what an in-process engine would.
        self.inner = {**described[0], "model": model_name or described[0]["model"]}
        self.backend, self.model_name = self.inner["backend"], self.inner["model"]
        self.start_seconds = time.perf_counter() - began
        """Seconds until every replica had its engine (the model loaded)."""
        self.num_cpus, self.num_gpus = num_cpus, num_gpus

    def pids(self) -> list[int]:
        """The process id of each replica (tests kill one to see the run survive)."""
        return self._ray.get([a.pid.remote() for a in self.actors])

    def describe(self) -> dict[str, Any]:
        return {**self.inner, "executor": "ray", "replicas": len(self.actors)}

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[Completion]:
        count = self._check(conversations, prefixes)
        if isinstance(sampling, Sampling):
            sampling.validate()
            params: Sampling | list[Sampling] = sampling
        else:
            params = per_request(sampling, count)
        return self._map("generate", conversations, params, prefixes, progress)

    def score(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[OptionScores]:
        self._check(conversations, prefixes)
        return self._map("score", conversations, check_options(options), prefixes, progress)

    @staticmethod
    def _check(conversations: Sequence[Conversation], prefixes: Any) -> int:
        """The engine's argument checks, here: a bad argument raises before any work."""
        check_chats(conversations)
        check_prefixes(prefixes, len(conversations))
        return len(conversations)

    def _map(
        self,
        method: str,
        conversations: Sequence[Conversation],
        argument: Any,
        prefixes: Any,
        progress: bool | str,
    ) -> list:
        """``method`` over ``conversations`` in pieces on free replicas; results in order.
        ``argument`` (sampling, or score options) and ``prefixes`` are one value for every
        request, or a list (sampling, prefixes) with one per request."""
        if not conversations:
            return []
        ray = self._ray
        conversations = list(conversations)
        per_request_argument = method == "generate" and isinstance(argument, list)
        if not isinstance(prefixes, str | None):
            prefixes = list(prefixes)
        parts = pieces(len(conversations), PIECES_PER_REPLICA * len(self.actors))
        todo = deque(range(len(parts)))
        results: list[list] = [[] for _ in parts]
        free = list(self.actors)
        running: dict[Any, tuple[int, Any]] = {}
        with progress_bar(len(conversations), progress, unit="req") as bar:
            while todo or running:
                while todo and free:
                    i, replica = todo.popleft(), free.pop()
                    part = parts[i]
                    call = getattr(replica, method).remote(
                        conversations[part],
                        argument[part] if per_request_argument else argument,
                        prefixes if isinstance(prefixes, str | None) else prefixes[part],
                    )
                    running[call] = (i, replica)
                [ready], _ = ray.wait(list(running), num_returns=1)
                i, replica = running.pop(ready)
                try:
                    results[i] = ray.get(ready)
                except ray.exceptions.RayTaskError as e:
                    raise e.cause from None
                except ray.exceptions.ActorDiedError:
                    # Restarts spent: the replica is gone for good; the others take its piece.
                    self.actors.remove(replica)
                    todo.appendleft(i)
                    if not self.actors:
                        raise RuntimeError(
                            "every Ray replica died (restarts spent); run the same command "
                            "again once the cluster is healthy: the run resumes"
                        ) from None
                    continue
                free.append(replica)
                bar.update(parts[i].stop - parts[i].start)
        return [result for piece in results for result in piece]

    def close(self) -> None:
        """Close every replica's engine, then end the actors."""
        ray = self._ray
        if not ray.is_initialized():
            return
        closing = [a.close.remote() for a in self.actors]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def resolve_gpus(backend: str, options: dict[str, Any], num_gpus: float | None) -> float:
    """GPUs per replica (Ray initialised): :func:`replica_gpus`, and where that leaves it open,
    1 where the cluster has GPUs and the backend is vllm or auto, else 0."""
    gpus = replica_gpus(backend, options, num_gpus)
    if gpus is None:
        has_gpus = import_ray().cluster_resources().get("GPU", 0) > 0
        gpus = 1 if has_gpus and backend in ("vllm", "auto") else 0
    return gpus


def check_resources(replicas: int, num_cpus: float, num_gpus: float) -> None:
    """Raise ValueError when the replicas cannot all be placed on the Ray cluster at once: they
    would wait for resources forever, or work one after another. Names what the cluster has."""
    have = import_ray().cluster_resources()
    for name, each, key in (("num_cpus", num_cpus, "CPU"), ("num_gpus", num_gpus, "GPU")):
        total = have.get(key, 0)
        if each * replicas > total:
            raise ValueError(
                f"engine.ray: {replicas} replica(s) × {name}={each:g} need {each * replicas:g} "
                f"{key}s, and the Ray cluster has {total:g}; lower engine.ray.replicas or "
                f"engine.ray.{name}, or add machines"
            )


def replicated(
    backend: str,
    model: str,
    *,
    replicas: int = 1,
    num_cpus: float = 1,
    num_gpus: float | None = None,
    **engine_options: Any,
) -> RayEngine:
    """A :class:`RayEngine` of ``replicas`` engines, each ``create_engine(backend, model=model,
    **engine_options)`` in its actor; ``num_gpus`` None as :func:`resolve_gpus` decides."""
    gpus = resolve_gpus(backend, engine_options, num_gpus)
    path = Path(model).expanduser()
    # A relative folder (runs/<name>/models/sft) means the driver's working directory, which a
    # replica on another node does not share: replicas get the absolute path.
    where = str(path.resolve()) if path.exists() and not path.is_absolute() else model
    factory = functools.partial(create_engine, backend, model=where, **engine_options)
    return RayEngine(factory, replicas=replicas, num_cpus=num_cpus, num_gpus=gpus, model_name=model)
