"""The OpenAI-compatible server backend: vLLM's server, SGLang, TGI, llama.cpp, or OpenAI itself.

Start a server, then point the engine at it::

    python -m vllm.entrypoints.openai.api_server --model <folder> --served-model-name smollm2-135m
    engine = create_engine("openai", model="smollm2-135m", base_url="http://127.0.0.1:8000/v1")

``generate`` sends one chat completion per conversation, so the server renders the chat template.
A conversation with an assistant prefix goes to ``/v1/completions`` instead, as the token ids of
the locally rendered prompt plus the prefix (the chat API has no portable way to continue a
started assistant turn). ``score`` sends prompt + option as token ids to ``/v1/completions`` with
``echo`` and ``logprobs`` and sums the log-probs the server reports at the option's positions:
one request per (conversation, option), the server's prefix cache computing the shared prompt
once. Both need a local tokenizer (``tokenizer``; by default ``model`` where it is a local model)
that renders prompts exactly like the other backends do (``PromptEncoder``).

Requests run on a pool of ``max_concurrency`` threads (so ``generate`` and ``score`` work the same
from a script, from pytest or from inside a running event loop). A 429, a 5xx, a timeout or a
connection error is retried with exponential backoff and jitter, or after the server's
Retry-After; any other 4xx fails at once. A request that still fails becomes an error result
with the reason, and the rest of the batch carries on.

Token counts: ``prompt_tokens`` is the server's ``usage.prompt_tokens``. With ``n == 1`` the
sample's ``completion_tokens`` is the server's ``usage.completion_tokens``. With ``n > 1`` the API
reports only the request's total, so it is shared over the samples in proportion to their text
length (+1 each, for the end-of-turn token): ``Completion.completion_tokens`` is the server's exact
total, the per-sample counts are estimates.

Context overflow: with a local tokenizer and a context length the server lists (vLLM lists
``max_model_len`` under ``/v1/models``), prompts are checked before any request, as on the other
backends. Otherwise an over-long prompt is the server's 400, an error result.
"""

from __future__ import annotations

import email.utils
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from typing import Any

import httpx

from cai.engine.base import (
    Completion,
    Conversation,
    Engine,
    OptionScores,
    Sample,
    Sampling,
    check_chats,
    check_prefixes,
    per_request,
)
from cai.engine.encoding import PromptEncoder
from cai.models import resolve_model
from cai.progress import progress_bar

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
MAX_WAIT = 60.0
"""Longest pause between two attempts, whatever the backoff or the server's Retry-After say."""

NO_PROMPT_LOGPROBS = (
    "the server returned no log-probs for the echoed prompt; score needs a server whose "
    "/v1/completions supports echo with logprobs (vLLM does)"
)

Reply = dict[str, Any] | str
"""A response's JSON, or the reason the request failed."""


class OpenAIEngine(Engine):
    """Engine on an OpenAI-compatible HTTP server."""

    backend = "openai"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        served_model: str | None = None,
        tokenizer: str | None = None,
        max_concurrency: int = 32,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        overflow: str = "raise",
    ):
        """``model``: the model spec the server serves (names the records and, where it is local,
        gives the tokenizer). ``base_url``: default ``$OPENAI_BASE_URL``, else a local server on
        port 8000. ``api_key``: default ``$OPENAI_API_KEY``, else ``"EMPTY"``. ``served_model``: the
        model name sent in requests; default the only model the server lists. ``tokenizer``: a
        model spec or path whose tokenizer renders prompts for ``score`` and for prefixes.
        ``timeout`` is per attempt, in seconds; a request makes at most ``max_retries + 1``
        attempts, waiting ``backoff * 2**k`` seconds (with jitter) before retry ``k + 1``."""
        if overflow not in ("raise", "error"):
            raise ValueError(f"overflow must be 'raise' or 'error' (got {overflow!r})")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1 (got {max_concurrency!r})")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0 (got {max_retries!r})")
        if not timeout > 0 or not backoff >= 0:
            raise ValueError(f"timeout must be > 0 and backoff >= 0 (got {timeout!r}, {backoff!r})")
        self.overflow = overflow
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self._client = httpx.Client(
            base_url=self.base_url + "/",
            headers={"Authorization": f"Bearer {key}"},
            timeout=self.timeout,
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
        )
        try:
            entry = self._pick_model(served_model)
            self.served_model: str = entry["id"]
            self.max_model_len: int | None = entry.get("max_model_len")
            self.model_name = resolve_model(model).name if model is not None else self.served_model
            self.encoder = self._local_encoder(model, tokenizer)
        except Exception:
            self.close()
            raise

    def _local_encoder(self, model: str | None, tokenizer: str | None) -> PromptEncoder | None:
        """The prompt encoder of ``tokenizer``, else of ``model`` where that is a local model
        (the default never downloads; a tokenizer named outright may come from the hub)."""
        if tokenizer is not None:
            path = resolve_model(tokenizer).path
        elif model is not None and (resolved := resolve_model(model)).is_local:
            path = resolved.path
        else:
            return None
        from transformers import AutoTokenizer

        return PromptEncoder(AutoTokenizer.from_pretrained(path), self.max_model_len or sys.maxsize)

    def _pick_model(self, served_model: str | None) -> dict[str, Any]:
        reply = self._request("GET", "models", None, threading.Event())
        if isinstance(reply, str):
            raise ConnectionError(
                f"cannot list the models of the server at {self.base_url}: {reply}"
            )
        try:
            entries = {m["id"]: m for m in reply["data"]}
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"the server at {self.base_url} answered /models without a model list "
                f"({type(e).__name__}: {e})"
            ) from None
        if served_model is None:
            if len(entries) != 1:
                raise ValueError(
                    f"the server at {self.base_url} serves {sorted(entries) or 'no models'}; "
                    "pass served_model= to say which to use"
                )
            return next(iter(entries.values()))
        if served_model not in entries:
            raise ValueError(
                f"the server at {self.base_url} does not serve {served_model!r} "
                f"(it serves {sorted(entries)})"
            )
        return entries[served_model]

    def describe(self) -> dict:
        return {**super().describe(), "served_model": self.served_model, "base_url": self.base_url}

    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    # ---- requests ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None, cancel: threading.Event) -> Reply:
        """Send one request, retrying what may pass on a later attempt; never raises for HTTP."""
        attempt = 0
        while True:
            attempt += 1
            wait = None
            detail = ""
            try:
                response = self._client.request(method, path, json=body)
            except UnicodeEncodeError as e:
                # Text with no UTF-8 form (a lone surrogate): no attempt can send it, and the
                # rest of the batch must not go down with it.
                return f"the request cannot be encoded ({type(e).__name__}: {e})"
            except httpx.TimeoutException:
                reason = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as e:
                reason = f"connection error ({type(e).__name__}: {e})"
            else:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError:
                        return f"HTTP {response.status_code}: not JSON: {_excerpt(response.text)}"
                reason, detail = f"HTTP {response.status_code}", _error_text(response)
                if response.status_code != 429 and response.status_code < 500:
                    return f"{reason}: {detail}"
                wait = _retry_after(response.headers.get("retry-after"))
            if attempt > self.max_retries or cancel.is_set():
                break
            if wait is None:
                wait = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            if cancel.wait(min(wait, MAX_WAIT)):
                break
        plural = "s" if attempt > 1 else ""
        return f"{reason} after {attempt} attempt{plural}" + (f": {detail}" if detail else "")

    def _post_all(
        self, jobs: list[tuple[str, dict]], progress: bool | str, unit: str
    ) -> list[Reply]:
        """POST every (path, body), at most ``max_concurrency`` at a time; replies in order."""
        replies: list[Reply] = [""] * len(jobs)
        if not jobs:
            return replies
        cancel = threading.Event()
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(jobs)), "cai-openai")
        with progress_bar(len(jobs), progress, unit=unit) as bar:
            try:
                futures = {
                    pool.submit(self._request, "POST", path, body, cancel): i
                    for i, (path, body) in enumerate(jobs)
                }
                for future in as_completed(futures):
                    replies[futures[future]] = future.result()
                    bar.update(1)
            finally:
                # On an interrupt: queued requests are dropped and pending retries end at once.
                cancel.set()
                pool.shutdown(wait=False, cancel_futures=True)
        return replies

    # ---- generate ---------------------------------------------------------------------------

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[Completion]:
        prefixes = check_prefixes(prefixes, len(conversations))
        if self.encoder is None:
            params = per_request(sampling, len(conversations))
            check_chats(conversations)
            if any(prefixes):
                raise ValueError(
                    "generate with prefixes sends token ids rendered by a local tokenizer; "
                    "pass tokenizer= (a model spec or path) to OpenAIEngine"
                )
            prompts: list[list[int] | str | None] = [None] * len(conversations)
        else:
            params, prompts = self.encoder.prepare_generate(
                conversations, sampling, prefixes, self.overflow
            )
        results = [Completion(error=p) if isinstance(p, str) else None for p in prompts]
        todo = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        jobs = []
        for i in todo:
            body = self._sampling_body(params[i])
            if prefixes[i]:
                jobs.append(("completions", {**body, "prompt": prompts[i]}))
            else:
                jobs.append(("chat/completions", {**body, "messages": list(conversations[i])}))
        replies = self._post_all(jobs, progress, "req")
        for i, reply in zip(todo, replies, strict=True):
            known = len(prompts[i]) if prompts[i] is not None else 0
            results[i] = _completion(reply, params[i], chat=not prefixes[i], prompt_tokens=known)
        return results

    def _sampling_body(self, p: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.served_model,
            # Greedy samples are all the same, and vLLM rejects n > 1 with greedy decoding: one
            # is asked for and repeated (see _completion).
            "n": 1 if p.greedy else p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
        }
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        return body

    # ---- score ------------------------------------------------------------------------------

    def score(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[OptionScores]:
        if self.encoder is None:
            raise ValueError(
                "score sends token ids rendered by a local tokenizer; pass tokenizer= (a model "
                "spec or path) to OpenAIEngine"
            )
        job = self.encoder.prepare_score(conversations, options, prefixes, self.overflow)
        # max_tokens 0 with echo: the server returns the prompt's log-probs and generates nothing.
        jobs = [
            (
                "completions",
                {
                    "model": self.served_model,
                    "prompt": job.prompts[i] + tokens,
                    "echo": True,
                    "logprobs": 1,
                    "max_tokens": 0,
                    "temperature": 0.0,
                },
            )
            for i in job.todo
            for tokens in job.option_ids
        ]
        replies = self._post_all(jobs, progress, "req")
        k = len(job.options)
        for n, i in enumerate(job.todo):
            found = [
                _option_logprob(reply, len(job.prompts[i]), tokens)
                for reply, tokens in zip(replies[n * k : (n + 1) * k], job.option_ids, strict=True)
            ]
            error = next((f for f in found if isinstance(f, str)), None)
            if error is not None:
                job.failed(i, error)
            else:
                job.done(i, found)
        return job.results


def _completion(reply: Reply, p: Sampling, *, chat: bool, prompt_tokens: int) -> Completion:
    """A Completion from a chat or text completion response (or the reason it failed)."""
    if isinstance(reply, str):
        return Completion(prompt_tokens=prompt_tokens, error=reply)
    try:
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        texts = [(c["message"]["content"] or "") if chat else c["text"] for c in choices]
        usage = reply.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", prompt_tokens))
        counts = _share(int(usage.get("completion_tokens", 0)), texts)
        samples = [
            Sample(text, "length" if c.get("finish_reason") == "length" else "stop", count)
            for c, text, count in zip(choices, texts, counts, strict=True)
        ]
    except (KeyError, TypeError, ValueError) as e:
        return Completion(
            prompt_tokens=prompt_tokens,
            error=f"malformed response from the server ({type(e).__name__}: {e})",
        )
    asked = 1 if p.greedy else p.n
    if len(samples) != asked:
        return Completion(
            prompt_tokens=prompt_tokens,
            error=f"the server returned {len(samples)} choices for n={asked}",
        )
    if p.greedy:
        samples = [replace(samples[0]) for _ in range(p.n)]
    return Completion(samples=samples, prompt_tokens=prompt_tokens)


def _share(total: int, texts: list[str]) -> list[int]:
    """Split ``total`` tokens over samples in proportion to len(text) + 1, summing to ``total``
    (largest remainders round up)."""
    if len(texts) == 1:
        return [total]
    weights = [len(t) + 1 for t in texts]
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(texts)), key=lambda k: counts[k] - exact[k])
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def _option_logprob(reply: Reply, start: int, tokens: list[int]) -> float | str:
    """Sum of the echoed prompt's log-probs at the option's positions (or the failure)."""
    if isinstance(reply, str):
        return reply
    try:
        values = reply["choices"][0]["logprobs"]["token_logprobs"][start : start + len(tokens)]
    except (KeyError, IndexError, TypeError):
        return NO_PROMPT_LOGPROBS
    if len(values) != len(tokens) or any(not isinstance(v, int | float) for v in values):
        return NO_PROMPT_LOGPROBS
    return float(sum(values))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), None if absent."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(response: httpx.Response) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), else the
    body itself, shortened."""
    try:
        return _excerpt(str(response.json()["error"]["message"]))
    except (ValueError, KeyError, TypeError):
        return _excerpt(response.text)


def _excerpt(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."
