"""``cai serve``'s HTTP side: the pure-ASGI gate (API key, body limit, metrics), the FastAPI
app over a :class:`cai.serve.service.Service`, and the uvicorn runner (SIGTERM drains)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cai.serve.batching import Overloaded
from cai.serve.protocol import (
    ENDPOINTS,
    BadRequest,
    JudgeBody,
    OpenRLHFBody,
    RewardBody,
    _Body,
    _parse,
)
from cai.serve.service import Service

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


__all__ = ["create_app", "serve"]
