"""``cai serve``: the judge and/or a trained reward model as an HTTP service for RL trainers.

    cai serve --model smollm2-135m --constitution harmless [--reward-model DIR] [--port 8000]

RL trainers at scale call a reward server instead of loading a judge into every rollout worker.
The models load once; every request goes through one :class:`cai.batching.Batcher`, so requests
from many workers become the engine's large batches (``--max-batch`` items, waiting at most
``--max-wait-ms`` for more), one engine call at a time, while the server keeps accepting.

Endpoints (JSON in and out; an error is ``{"error": "<field>: <what is wrong>", "field": ...}``):

``POST /get_reward``  OpenRLHF's remote reward (``--reward.remote_url``, formerly
    ``--remote_rm_url``): ``{"query": [prompt + response], "prompts": [...], "labels": [...]}``
    → ``{"rewards": [...], "scores": [...], "extra_logs": {}}``, the values of
    ``cai.rewards.openrlhf_reward_func`` in-process (the response is what follows the prompt in
    its query; labels are the references); the server's ``--against`` decides the reward. An
    unscored pair is NaN, as in-process.
``POST /v1/reward``  ``{"prompts", "completions", "references"?, "against"?, "num_generations"?,
    "centered"?, "scorer"?}`` → ``{"rewards": [float | null]}``: the values ``JudgeReward`` (or
    ``RewardModelReward``) gives; what ``cai.rewards.RemoteReward`` calls.
``POST /v1/judge``  ``{"pairs": [{"prompt", "response_a", "response_b", "key"?}]}`` →
    ``{"preferences": [...]}``, the fields of ``Judge.label``'s ``Preference``.
``GET /health``, ``GET /metrics`` (Prometheus text: requests by endpoint and status, items and
    batch sizes, engine calls and errors, queue length, latency quantiles, disconnects).

Faults stay with their request: malformed JSON is 400; a missing or mistyped field, or lists of
different lengths, 422 naming the field; a body over ``--max-body-mb`` or more than
``--max-items`` items, 413; a full queue, 503 with Retry-After; with ``--api-key``, a request
without ``Authorization: Bearer KEY`` is 401 (``/health`` stays open). An engine exception fails
the requests of its batch (500 with the reason) and the server goes on. A client that
disconnects is dropped from the queue. SIGTERM (or Ctrl-C) stops accepting, answers the requests
in flight, then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from cai.batching import Batcher, Overloaded
from cai.judge import Judge, JudgePair
from cai.rewards import JudgeReward, RewardModelReward, Scorer, openrlhf_reward_func
from cai.serve_metrics import Metrics

ENDPOINTS = ("/get_reward", "/v1/reward", "/v1/judge", "/health", "/metrics")
Against = Literal["group", "reference", "score"]
"""How a completion is rewarded: against its group, against a reference, or the reward model's
raw score (``against=None`` in ``RewardModelReward``)."""


@dataclass
class ServeOptions:
    """The service's limits and the reward ``/get_reward`` gives (``cai serve``'s flags)."""

    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 65536
    max_items: int = 4096
    max_body_bytes: int = 16 * 2**20
    api_key: str | None = None
    against: Against | None = None
    """None: 'reference' with a judge, else 'score'."""
    num_generations: int | None = None
    centered: bool = False
    mode: str = "pairwise"


def resolved_against(options: ServeOptions, *, judge: bool) -> Against:
    """The server's reward: ``--against``, else 'reference' with a judge, else 'score'."""
    return options.against or ("reference" if judge else "score")


def check_options(options: ServeOptions, *, judge: bool, reward_model: bool) -> None:
    """ValueError naming the ``cai serve`` flag at fault, before any model loads."""
    for name in ("max_batch", "max_queue", "max_items", "max_body_bytes"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if options.max_wait_ms < 0:
        raise ValueError("--max-wait-ms must be >= 0")
    against = resolved_against(options, judge=judge)
    if against == "score" and not reward_model:
        raise ValueError("--against score is a reward model's raw score: give --reward-model")
    g = options.num_generations
    if against == "group" and (g is None or g < 2):
        raise ValueError(
            "--against group needs --num-generations G, the trainer's completions per prompt (>= 2)"
        )
    if against != "group" and g is not None:
        raise ValueError("--num-generations applies only to --against group")


class BadRequest(Exception):
    """A request the service refuses: its HTTP status, the field at fault and why."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


# ---- request bodies ------------------------------------------------------------------------------


def _text_or_messages(value: Any) -> Any:
    """A string, or chat messages: a list of {"role", "content"} objects with string values."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return value
    raise ValueError(
        "expected a string or chat messages (a list of {role, content} objects), "
        f"got {json.dumps(value)[:80]}"
    )


Text = Annotated[Any, AfterValidator(_text_or_messages)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RewardBody(_Body):
    prompts: list[Text]
    completions: list[Text]
    references: list[Text] | None = None
    against: Against | None = None
    num_generations: int | None = None
    centered: bool | None = None
    scorer: Literal["judge", "reward_model"] | None = None


class OpenRLHFBody(_Body):
    # OpenRLHF versions and forks add fields (metas, ...): ignored, not refused.
    model_config = ConfigDict(strict=True, extra="ignore")
    query: list[str]
    prompts: list[str]
    labels: list[Any] | None = None


class PairBody(_Body):
    prompt: Text
    response_a: str
    response_b: str
    key: str | None = None


class JudgeBody(_Body):
    pairs: list[PairBody]


def _parse(model: type[_Body], raw: bytes) -> Any:
    """The validated body; BadRequest 400 (not JSON) or 422 (the first field at fault)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        field = "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" if i else str(p)
            for i, p in enumerate(first["loc"])
        )
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = first["msg"].removeprefix("Value error, ")
        raise BadRequest(422, f"{field}: {message}{more}", field) from None


def _same_length(name: str, values: list, other: str, expected: int) -> None:
    if len(values) != expected:
        raise BadRequest(
            422, f"{name}: {len(values)} items, but {other} has {expected} (one each)", name
        )


# ---- the service ---------------------------------------------------------------------------------


class _CoalescedJudge:
    """Stands in for the judge inside one request's reward: its labels go through the batcher."""

    def __init__(self, batcher: Batcher, cancelled: threading.Event):
        self.batcher, self.cancelled = batcher, cancelled

    def label(self, pairs, *, progress: bool | str = False):
        return self.batcher.call("judge", pairs, self.cancelled)


class _CoalescedScorer:
    """Stands in for the reward model inside one request's reward, like ``_CoalescedJudge``."""

    def __init__(self, batcher: Batcher, cancelled: threading.Event):
        self.batcher, self.cancelled = batcher, cancelled

    def score(self, conversations):
        return self.batcher.call("reward_model", conversations, self.cancelled)


class Service:
    """The loaded judge and/or reward model behind one batcher; what the endpoints call."""

    def __init__(
        self,
        judge: Judge | None = None,
        reward_model: Scorer | None = None,
        options: ServeOptions | None = None,
        *,
        reward_model_name: str | None = None,
    ):
        if judge is None and reward_model is None:
            raise ValueError("a service needs a judge, a reward model or both")
        self.judge, self.reward_model = judge, reward_model
        self.reward_model_name = reward_model_name
        self.options = options or ServeOptions()
        self.metrics = Metrics()
        calls: dict[str, Callable] = {}
        if judge is not None:
            calls["judge"] = judge.label
        if reward_model is not None:
            calls["reward_model"] = reward_model.score
        self.batcher = Batcher(
            calls,
            max_batch=self.options.max_batch,
            max_wait_ms=self.options.max_wait_ms,
            max_queue=self.options.max_queue,
            observer=self.metrics,
        )
        # /get_reward's adapter returns torch tensors: import torch now, not on the first request.
        importlib.import_module("torch")
        # Request threads mostly wait on the batcher; enough of them that every concurrent
        # request can be queued for the same batch (anyio's default is 40).
        self.threads = anyio.CapacityLimiter(max(256, 4 * self.options.max_batch))

    def close(self) -> None:
        """Finish the queued work, then close the judge (its engine, if it built it)."""
        self.batcher.close()
        if self.judge is not None:
            self.judge.close()
        close = getattr(self.reward_model, "close", None)
        if close is not None:
            close()

    def describe(self) -> dict[str, Any]:
        judge = self.judge
        return {
            "judge": None if judge is None else judge.engine.model_name,
            "constitution": None if judge is None else judge.constitution.name,
            "mode": self.options.mode,
            "reward_model": self.reward_model_name,
            "against": self.default_against,
        }

    @property
    def default_against(self) -> Against:
        return resolved_against(self.options, judge=self.judge is not None)

    def reward_function(
        self,
        cancelled: threading.Event,
        *,
        scorer: str | None = None,
        against: Against | None = None,
        num_generations: int | None = None,
        centered: bool | None = None,
    ) -> JudgeReward | RewardModelReward:
        """The reward a request asks for (unset fields: the server's flags), its judge or reward
        model calls coalesced with every other request's. The one place a reward is built."""
        scorer = scorer or ("judge" if self.judge is not None else "reward_model")
        against = against or self.default_against
        if num_generations is None and against == "group":
            num_generations = self.options.num_generations
        centered = self.options.centered if centered is None else centered
        if scorer == "judge":
            if self.judge is None:
                raise BadRequest(
                    422, "scorer: this server has no judge (start it with --model)", "scorer"
                )
            if against == "score":
                raise BadRequest(
                    422,
                    "against: 'score' is a reward model's raw score; the judge compares",
                    "against",
                )
            coalesced: Any = _CoalescedJudge(self.batcher, cancelled)
            return JudgeReward(
                coalesced, against=against, num_generations=num_generations, centered=centered
            )
        if self.reward_model is None:
            raise BadRequest(
                422,
                "scorer: this server has no reward model (start it with --reward-model)",
                "scorer",
            )
        return RewardModelReward(
            _CoalescedScorer(self.batcher, cancelled),
            against=None if against == "score" else against,
            num_generations=num_generations,
            centered=centered,
        )

    def check_items(self, name: str, count: int) -> None:
        if count > self.options.max_items:
            raise BadRequest(
                413,
                f"{name}: {count} items; at most {self.options.max_items} per request "
                "(cai serve --max-items): split the batch",
                name,
            )

    # The endpoints' work, run in a worker thread (it blocks on the batcher).

    def reward(self, body: RewardBody, cancelled: threading.Event) -> list[float | None]:
        self.check_items("completions", len(body.completions))
        _same_length("completions", body.completions, "prompts", len(body.prompts))
        if body.references is not None:
            _same_length("references", body.references, "completions", len(body.completions))
        reward = self.reward_function(
            cancelled,
            scorer=body.scorer,
            against=body.against,
            num_generations=body.num_generations,
            centered=body.centered,
        )
        extra = {} if body.references is None else {reward.reference_key: body.references}
        return reward(body.prompts, body.completions, **extra)

    def openrlhf(self, body: OpenRLHFBody, cancelled: threading.Event) -> dict[str, Any]:
        self.check_items("query", len(body.query))
        _same_length("prompts", body.prompts, "query", len(body.query))
        labels = body.labels if body.labels is not None else [None] * len(body.query)
        _same_length("labels", labels, "query", len(body.query))
        if self.default_against == "reference":
            for i, label in enumerate(labels):
                if not isinstance(label, str) or not label.strip():
                    raise BadRequest(
                        422,
                        f"labels[{i}]: the reference response (OpenRLHF's --label_key column) "
                        f"must be a non-empty string, got {json.dumps(label)[:80]}",
                        "labels",
                    )
        out = openrlhf_reward_func(self.reward_function(cancelled))(
            body.query, body.prompts, labels
        )
        return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}

    def label(self, body: JudgeBody, cancelled: threading.Event) -> list[dict]:
        if self.judge is None:
            raise BadRequest(422, "pairs: this server has no judge (start it with --model)")
        self.check_items("pairs", len(body.pairs))
        pairs = [JudgePair(p.prompt, p.response_a, p.response_b, p.key) for p in body.pairs]
        return [pref.to_dict() for pref in self.batcher.call("judge", pairs, cancelled)]


# ---- HTTP ----------------------------------------------------------------------------------------

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def _error(status: int, message: str, field: str | None = None, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


class Gate:
    """Pure-ASGI front of the app: the API key, the body limit (the body is read here and
    replayed, so no handler sees more than the limit) and the per-request metrics."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service
        key = service.options.api_key
        self.expected = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.service.metrics
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        start = time.monotonic()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight += 1
        try:
            if self.expected is not None and scope["path"] != "/health":
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, self.expected):
                    await _error(
                        401,
                        "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                        **{"WWW-Authenticate": "Bearer"},
                    )(scope, receive, send_status)
                    return
            body = await self._body(scope, receive, send_status)
            if body is not None:
                await self.app(scope, _replay(body, receive), send_status)
        finally:
            metrics.in_flight -= 1
            metrics.request_done(endpoint, status, time.monotonic() - start)

    async def _body(self, scope: dict, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once a 413 is sent (or the client left)."""
        limit = self.service.options.max_body_bytes
        refusal = _error(
            413, f"the body is over {limit} bytes (cai serve --max-body-mb): split the batch"
        )
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            await refusal(scope, receive, send)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await refusal(scope, receive, send)
                return None
            if not message.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body once, then the connection's own messages (disconnect)."""
    given = False

    async def replay() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service) -> Any:
    """The ASGI app: the endpoints behind the Gate. The service is closed at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await anyio.to_thread.run_sync(service.close)

    app = FastAPI(title="cai serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def answer(
        request: Request, model: type[_Body], work: Callable[[Any, threading.Event], Any]
    ) -> Response:
        """Parse the body, run ``work`` in a thread (it waits on the batcher) and answer; if
        the client goes away first, its items leave the queue."""
        cancelled = threading.Event()
        try:
            body = _parse(model, await request.body())
            task = asyncio.ensure_future(
                anyio.to_thread.run_sync(work, body, cancelled, limiter=service.threads)
            )
            gone = asyncio.ensure_future(_until_disconnect(request))
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not task.done():
                cancelled.set()
                service.metrics.disconnects += 1
                task.add_done_callback(lambda t: t.exception())  # ends quietly, unanswered
                return Response(status_code=499)
            result = task.result()
        except BadRequest as e:
            return _error(e.status, str(e), e.field)
        except Overloaded as e:
            return _error(503, f"overloaded: {e}; retry later", **{"Retry-After": "1"})
        except CancelledError:
            return Response(status_code=499)
        except ValueError as e:  # the judge's or the reward's own input checks
            return _error(422, str(e))
        except Exception as e:  # the engine failed this request's batch: the server goes on
            return _error(500, f"the engine failed on this batch: {type(e).__name__}: {e}")
        # allow_nan: an unscored pair is NaN in OpenRLHF's tensors, as in-process.
        return Response(json.dumps(result, allow_nan=True), media_type="application/json")

    @app.post("/get_reward")
    async def get_reward(request: Request) -> Response:
        return await answer(request, OpenRLHFBody, service.openrlhf)

    @app.post("/v1/reward")
    async def reward(request: Request) -> Response:
        return await answer(request, RewardBody, lambda b, c: {"rewards": service.reward(b, c)})

    @app.post("/v1/judge")
    async def judge(request: Request) -> Response:
        return await answer(request, JudgeBody, lambda b, c: {"preferences": service.label(b, c)})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **service.describe(), "queue": service.batcher.queue_length}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = service.metrics.render(service.batcher.queue_length)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return Gate(app, service)


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain: no new connections, the requests in flight
    answered, the queue finished, the service closed. Returns normally (exit 0)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(service), host=host, port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn re-raises the signal that stopped it once it has drained; handled (ignored) here,
    # it ends the command normally instead of killing the process with that signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = [
    "BadRequest",
    "Metrics",
    "ServeOptions",
    "Service",
    "check_options",
    "create_app",
    "serve",
]
