"""``cai review``'s HTTP side: one annotator's review session as a FastAPI app, served by the
runner ``cai serve`` uses (``cai.serve.app.bind`` and ``run_asgi``).

    cai review runs/rlaif-tiny --annotator ana --port 8765

| endpoint | answer |
|---|---|
| ``GET /`` | the page (``cai.review.page``) |
| ``GET /api/state`` | progress and the current item: key, prompt, ``left`` and ``right`` in the order fixed for (item, annotator); never the judge's label, probability or margin |
| ``POST /api/answer`` | ``{"key", "choice": "left" | "right" | "tie" | "skip"}`` → the next state |
| ``POST /api/undo`` | take back the annotator's latest answer → the state |
| ``GET /api/reveal/{key}`` | the judge's label in shown terms, only once the annotator has answered ``key`` (else 409) |

A malformed request gets a 4xx JSON ``{"error"}``. With an API key every request needs
``Authorization: Bearer KEY`` but the page itself, which takes ``?key=KEY`` and sends the header.
"""

from __future__ import annotations

import json
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from cai.review.items import Item
from cai.review.labels import LabelLog, side_shown, to_original, to_shown
from cai.review.page import PAGE
from cai.serve.app import bind, run_asgi

CHOICES = ("left", "right", "tie", "skip")


class BadRequest(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ReviewSession:
    """The items in review order, the labels file and who is labelling."""

    items: list[Item]
    log: LabelLog
    annotator: str
    api_key: str | None = None
    by_key: dict[str, Item] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {i.key: i for i in self.items}

    @property
    def keys(self) -> list[str]:
        return [i.key for i in self.items]

    def state(self) -> dict[str, Any]:
        """Progress and the current item, blind: text and the shown order only."""
        index = self.log.next_index(self.annotator, self.keys)
        item = self.items[index] if index < len(self.items) else None
        shown = None
        if item is not None:
            side = side_shown(item.key, self.annotator)
            left, right = (item.response_a, item.response_b)[:: 1 if side == "AB" else -1]
            shown = {"key": item.key, "prompt": item.prompt, "left": left, "right": right}
        return {
            "annotator": self.annotator,
            "total": len(self.items),
            "done": sum((self.annotator, k) in self.log.live() for k in self.keys),
            "can_undo": any(who == self.annotator for who, _ in self.log.live()),
            "item": shown,
        }

    def answer(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object {key, choice}")
        key, choice = body.get("key"), body.get("choice")
        if not isinstance(key, str) or key not in self.by_key:
            raise BadRequest(422, f"key: not an item of this review: {key!r}")
        if choice not in CHOICES:
            raise BadRequest(422, f"choice: must be one of {', '.join(CHOICES)}, got {choice!r}")
        side = side_shown(key, self.annotator)
        self.log.answer(self.annotator, key, side, to_original(choice, side))
        return self.state()

    def reveal(self, key: str) -> dict[str, Any]:
        """The judge's label of ``key`` as shown to this annotator, once they have answered."""
        item = self.by_key.get(key)
        if item is None:
            raise BadRequest(404, f"no item {key!r}")
        if (self.annotator, key) not in self.log.live():
            raise BadRequest(409, "answer the pair before its judge label is shown")
        side = side_shown(key, self.annotator)
        winner = None if item.winner is None else to_shown(item.winner, side)
        return {"key": key, "judge": winner, "margin": item.margin}


def _error(e: BadRequest) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


def create_review_app(session: ReviewSession) -> FastAPI:
    app = FastAPI(title="cai review", docs_url=None, redoc_url=None, openapi_url=None)
    expected = None if session.api_key is None else f"Bearer {session.api_key}"

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if expected is not None:
            given = request.headers.get("authorization", "")
            if request.url.path == "/":
                given = f"Bearer {request.query_params.get('key', '')}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                return JSONResponse({"error": "missing or wrong API key"}, status_code=401)
        return await call_next(request)

    @app.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP})

    @app.get("/api/state")
    def state() -> dict:
        return session.state()

    @app.post("/api/answer")
    async def answer(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return _error(BadRequest(400, f"the body is not JSON: {e}"))
        try:
            return JSONResponse(session.answer(body))
        except BadRequest as e:
            return _error(e)

    @app.post("/api/undo")
    def undo() -> dict:
        session.log.undo(session.annotator)
        return session.state()

    @app.get("/api/reveal/{key}")
    def reveal(key: str) -> JSONResponse:
        try:
            return JSONResponse(session.reveal(key))
        except BadRequest as e:
            return _error(e)

    return app


CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)
"""The page runs only its own inline script and talks only to this server: an injected
``<script>`` or ``<img>`` in a response could not load or send anything even if it were parsed
(it is not: every text goes in with textContent)."""


def bind_or_fail(host: str, port: int) -> socket.socket:
    """The page's socket; a port in use is a ValueError (one line, exit 2)."""
    try:
        return bind(host, port)
    except OSError as e:
        raise ValueError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def run_page(session: ReviewSession, sock: socket.socket) -> None:
    """Serve the page until Ctrl-C or SIGTERM. Each answer is on disk before it is answered."""
    run_asgi(create_review_app(session), sock)
