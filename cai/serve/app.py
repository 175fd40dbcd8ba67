"""``cai serve``'s HTTP side: the pure-ASGI gate (API key, body limit, metrics), the FastAPI
app over a :class:`cai.serve.service.Service`, and the uvicorn runner (SIGTERM drains)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cai.serve.batching import EngineFailure, Overloaded
from cai.serve.protocol import (
    ENDPOINTS,
    BadRequest,
    ClassifyBody,
    JudgeBody,
    OpenRLHFBody,
    RewardBody,
    _Body,
    _parse,
)
from cai.serve.service import Service

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
log = logging.getLogger("cai.serve")
DISCONNECTED = 499
"""The status a request is counted under when its client left before the answer (nginx's)."""


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
            if body is None and status == 500:  # the client left mid-body: nothing was sent
                status = DISCONNECTED
                metrics.disconnects += 1
            elif body is not None:
                await self.app(scope, _replay(body, receive), send_status)
        finally:
            metrics.in_flight -= 1
            metrics.request_done(endpoint, status, time.monotonic() - start)

    async def _body(self, scope: dict, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once a 413 or 408 is sent (or the client left)."""
        timeout = self.service.options.read_timeout_s
        try:
            with anyio.fail_after(timeout):
                return await self._read(scope, receive, send)
        except TimeoutError:
            # A client that stalls mid-body would otherwise hold its connection forever.
            await _error(
                408,
                f"the body did not arrive within {timeout:g} s (cai serve --read-timeout)",
                Connection="close",
            )(scope, receive, send)
            return None

    async def _read(self, scope: dict, receive: Receive, send: Send) -> bytes | None:
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
                return Response(status_code=DISCONNECTED)
            result = task.result()
        except BadRequest as e:
            return _error(e.status, str(e), e.field)
        except Overloaded as e:
            return _error(503, f"overloaded: {e}; retry later", **{"Retry-After": "1"})
        except CancelledError:
            return Response(status_code=DISCONNECTED)
        except ValueError as e:  # the judge's or the reward's own input checks
            return _error(422, str(e))
        except EngineFailure as e:  # the engine failed this request's batch: the server goes on
            return _error(500, f"the engine failed on this batch: {e}")
        except Exception as e:  # a bug of this server, not of the request or the engine
            log.exception("internal error on %s", request.url.path)
            return _error(500, f"internal error: {type(e).__name__}: {e}")
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

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        return await answer(request, ClassifyBody, service.classify)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **service.describe(), "queue": service.batcher.queue_length}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = service.metrics.render(service.batcher.queue_length)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return Gate(app, service)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), so that a port in use fails before
    any model loads and the banner prints only once the port is this server's. OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain: no new connections, the requests in flight
    answered, the queue finished, the service closed. Returns normally (exit 0). ``sock``: the
    socket ``bind`` gave (default: bound here; OSError if the port is in use)."""
    run_asgi(create_app(service), sock or bind(host, port))


def run_asgi(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` (from :func:`bind`) with uvicorn until SIGTERM or Ctrl-C, then
    drain and return normally. ``cai serve`` and ``cai review``'s page run on it."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        # An idle keep-alive connection is closed after this; a stalled body meets the Gate's
        # --read-timeout.
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return
    # uvicorn re-raises the signal that stopped it once it has drained; handled (ignored) here,
    # it ends the command normally instead of killing the process with that signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["bind", "create_app", "run_asgi", "serve"]
