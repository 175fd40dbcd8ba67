"""The transformers backend: padded, length-sorted micro-batches and our own decode loop.

Why our own loop rather than ``model.generate``: each request carries its own seed, temperature,
top_p and stop strings. Sampling draws from a per-row ``torch.Generator``, so a request's result
does not depend on which other requests share its batch; rows that finish are dropped from the
KV cache at once, so one long completion does not make the batch pay for finished rows.

``score`` runs one prefill per conversation: the logits at the last prompt position give every
option's first token; options longer than one token continue from that prompt's KV cache,
expanded once per option, in a single extra forward.

Prefix reuse (``prefix_reuse``, on by default): prompts that share a token prefix (a stage's
few-shot exemplars, a principle's text, a pair's conversation, a request's ``n`` samples) sit
together in the micro-batches, and each shared prefix is computed once per micro-batch and its
keys and values reused by every prompt under it (``cai.engine.prefix`` finds them). The results
are those of the path without reuse up to float rounding.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cai.engine.base import (
    Completion,
    Conversation,
    Engine,
    OptionScores,
    Sample,
    Sampling,
    truncate_at_stop,
)
from cai.engine.encoding import PromptEncoder
from cai.engine.prefix import prefix_tree, sharing_order
from cai.models import resolve_model
from cai.progress import progress_bar

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU that has it, else fp16 on GPU; on the CPU bf16 only where the CPU
    computes it natively (AVX512-BF16 / AMX), since emulated bf16 is slower than float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)} (got {dtype!r})")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    capability = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if capability in ("AVX512_BF16", "AMX") else torch.float32


@dataclass
class _Row:
    """One sequence being decoded: request ``request``, sample ``sample``."""

    request: int
    sample: int
    prompt: list[int]
    sampling: Sampling
    generator: torch.Generator | None


class HFEngine(Engine):
    """Engine on a transformers causal LM."""

    backend = "hf"

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str | None = None,
        max_model_len: int | None = None,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        prefix_reuse: bool = True,
        min_shared_prefix: int = 32,
        overflow: str = "raise",
    ):
        """``prefix_reuse``: compute each token prefix that prompts of a micro-batch share once
        (see the module docstring); ``min_shared_prefix``: the fewest tokens a shared prefix
        must add to the one it extends to be computed apart."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        resolved = resolve_model(model)
        self.model_name = resolved.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = pick_dtype(dtype, self.device)
        if overflow not in ("raise", "error"):
            raise ValueError(f"overflow must be 'raise' or 'error' (got {overflow!r})")
        self.overflow = overflow
        if not isinstance(min_shared_prefix, int) or min_shared_prefix < 1:
            raise ValueError(
                f"min_shared_prefix must be an integer >= 1 (got {min_shared_prefix!r})"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        self.model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=self.dtype)
        self.model.to(self.device).eval()
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.encoder = PromptEncoder(self.tokenizer, min(max_model_len or context, context))
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.min_shared_prefix = min_shared_prefix
        # Reused keys and values are copied between caches, which a sliding-window or recurrent
        # layer's cache does not allow: such models take the path without reuse.
        layers = DynamicCache(config=self.model.config).layers
        self.prefix_reuse = prefix_reuse and all(type(layer) is DynamicLayer for layer in layers)
        if prefix_reuse and not self.prefix_reuse:
            log.info("%s has non-plain attention caches: prefix reuse is off", self.model_name)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "prefix_reuse": self.prefix_reuse,
        }

    # ---- generate ---------------------------------------------------------------------------

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
        results = [Completion(error=p) if isinstance(p, str) else None for p in prompts]
        rows = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if isinstance(prompt, str):
                continue
            base = p.seed if p.seed is not None else random.getrandbits(62)
            for k in range(p.n):
                generator = None
                if not p.greedy:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed((base * 1_000_003 + k) % (2**63))
                rows.append(_Row(i, k, prompt, p, generator))
        samples: dict[tuple[int, int], Sample] = {}
        failures: dict[int, str] = {}
        with progress_bar(len(rows), progress, unit="seq") as bar:
            for batch in self._micro_batches(rows, lambda r: r.sampling.max_tokens):
                try:
                    for row, sample in zip(batch, self._decode(batch), strict=True):
                        samples[(row.request, row.sample)] = sample
                except torch.OutOfMemoryError as e:
                    for row in batch:
                        failures[row.request] = f"out of memory: {e}"
                bar.update(len(batch))
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                continue
            if i in failures:
                results[i] = Completion(prompt_tokens=len(prompt), error=failures[i])
            else:
                found = [samples[(i, k)] for k in range(params[i].n)]
                results[i] = Completion(samples=found, prompt_tokens=len(prompt))
        return results

    def _micro_batches(self, rows, new_tokens):
        """Rows in sharing order (by length without reuse), cut into batches under the size and
        token budgets."""
        if self.prefix_reuse:
            order = [
                rows[i] for i in sharing_order([r.prompt for r in rows], self.min_shared_prefix)
            ]
        else:
            order = sorted(rows, key=lambda r: len(r.prompt), reverse=True)
        batch: list = []
        longest = 0
        for row in order:
            cost = max(longest, len(row.prompt) + new_tokens(row))
            if batch and (
                len(batch) >= self.max_batch_size or cost * (len(batch) + 1) > self.max_batch_tokens
            ):
                yield batch
                batch, cost = [], len(row.prompt) + new_tokens(row)
            batch.append(row)
            longest = cost
        if batch:
            yield batch

    def _left_pad(self, prompts: list[list[int]], offsets: list[int]):
        """Left-padded ids, attention mask and position ids (row r's positions start at
        ``offsets[r]``)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        positions = torch.tensor(offsets)[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _prefill(self, prompts: list[list[int]], use_cache: bool = True):
        """Run the prompts; return (cache, last-position logits [B, V], mask [B, T], last position [B]).

        With prefix reuse, each shared prefix (a node of ``prefix_tree``) runs once, alone,
        continuing its parent's cache; each prompt then runs only its tokens after its deepest
        shared prefix, left-padded, with that prefix's keys and values as its past (zero-padded
        to the longest such past, the padding masked) and positions that continue the prefix.
        """
        nodes, deepest = ([], [None] * len(prompts))
        if self.prefix_reuse:
            nodes, deepest = prefix_tree(prompts, self.min_shared_prefix)
        shared = []  # per node, per layer: (keys, values), each [1, heads, end, dim]
        for node in nodes:
            ids = torch.tensor([prompts[node.row][node.start : node.end]], device=self.device)
            out = self.model(
                input_ids=ids,
                position_ids=torch.arange(node.start, node.end, device=self.device)[None],
                # A new cache over the parent's tensors: the forward appends to its own.
                past_key_values=None if node.parent is None else DynamicCache(shared[node.parent]),
                use_cache=True,
                logits_to_keep=1,
            )
            shared.append([(k, v) for k, v, _ in out.past_key_values])
        starts = [0 if d is None else nodes[d].end for d in deepest]
        ids, mask, positions = self._left_pad(
            [p[start:] for p, start in zip(prompts, starts, strict=True)], starts
        )
        past = None
        if any(starts):
            past, past_mask = self._shared_past(shared, starts, deepest)
            mask = torch.cat([past_mask, mask], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=use_cache,
            logits_to_keep=1,  # the vocabulary head at the last position only
        )
        return out.past_key_values, out.logits[:, -1, :].float(), mask, positions[:, -1]

    def _shared_past(self, shared, ends: list[int], deepest: list[int | None]):
        """Each row's deepest shared prefix as one cache (per layer [B, heads, width, dim]: the
        prefixes left-aligned, zero-padded to the longest) and its mask [B, width]."""
        rows_of: dict[int, list[int]] = {}
        for r, node in enumerate(deepest):
            if node is not None:
                rows_of.setdefault(node, []).append(r)
        width = max(ends)
        mask = torch.zeros((len(ends), width), dtype=torch.long)
        for r, end in enumerate(ends):
            mask[r, :end] = 1
        layers = []
        for layer, (k0, v0) in enumerate(shared[0]):
            keys = k0.new_zeros((len(ends), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(ends), v0.shape[1], width, v0.shape[3]))
            for node, rows in rows_of.items():
                k, v = shared[node][layer]  # [1, heads, end, dim], broadcast over the rows
                index = torch.tensor(rows, device=self.device)
                keys[index, :, : k.shape[2]] = k
                values[index, :, : v.shape[2]] = v
            layers.append((keys, values))
        return DynamicCache(layers), mask.to(self.device)

    @torch.inference_mode()
    def _decode(self, batch: list[_Row]) -> list[Sample]:
        cache, logits, mask, last = self._prefill([r.prompt for r in batch])
        live = list(range(len(batch)))  # batch indices still decoding, in cache order
        next_pos = last + 1
        tokens: list[list[int]] = [[] for _ in batch]
        finish: list[str | None] = [None] * len(batch)
        texts: list[str | None] = [None] * len(batch)
        ended = [False] * len(batch)
        while True:
            chosen = self._sample(logits, [batch[i] for i in live])
            still = []
            for slot, i in enumerate(live):
                token = chosen[slot]
                row = batch[i]
                if token in self.encoder.stop_token_ids:
                    # Counted like OpenAI and vLLM do: the end-of-turn token was generated.
                    finish[i], ended[i] = "stop", True
                    continue
                tokens[i].append(token)
                if row.sampling.stop:
                    text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
                    cut, hit = truncate_at_stop(text, row.sampling.stop)
                    if hit:
                        finish[i], texts[i] = "stop", cut
                        continue
                if len(tokens[i]) >= row.sampling.max_tokens:
                    finish[i] = "length"
                    continue
                still.append(slot)
            if not still:
                break
            if len(still) < len(live):
                keep = torch.tensor(still, device=self.device)
                cache.reorder_cache(keep)
                mask, next_pos = mask[keep], next_pos[keep]
                live = [live[s] for s in still]
            step = torch.tensor([[tokens[i][-1]] for i in live], device=self.device)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            out = self.model(
                input_ids=step,
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return [
            Sample(
                text=texts[i]
                if texts[i] is not None
                else self.tokenizer.decode(tokens[i], skip_special_tokens=True),
                finish_reason=finish[i] or "length",
                completion_tokens=len(tokens[i]) + ended[i],
            )
            for i in range(len(batch))
        ]

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next token per row: argmax for greedy rows, else a draw from that row's generator."""
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for r, row in enumerate(rows):
            p = row.sampling
            if p.greedy:
                out.append(greedy[r])
                continue
            probs = torch.softmax(logits[r] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return out

    # ---- score ------------------------------------------------------------------------------

    def score(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[str],
        *,
        prefixes: Sequence[str] | str | None = None,
        progress: bool | str = False,
    ) -> list[OptionScores]:
        options, option_ids, prompts = self.encoder.prepare_score(
            conversations, options, prefixes, self.overflow
        )
        longest = max(len(t) for t in option_ids)
        results: list[OptionScores] = [
            OptionScores(options, [], [], error=p) if isinstance(p, str) else None for p in prompts
        ]
        rows = [
            _Row(i, 0, p, Sampling(max_tokens=longest), None)
            for i, p in enumerate(prompts)
            if not isinstance(p, str)
        ]
        with progress_bar(len(rows), progress, unit="conv") as bar:
            for batch in self._micro_batches(rows, lambda r: longest * len(options)):
                try:
                    scores = self._score_batch([r.prompt for r in batch], option_ids)
                    for row, lps in zip(batch, scores, strict=True):
                        results[row.request] = OptionScores(
                            options,
                            lps,
                            [len(t) for t in option_ids],
                            prompt_tokens=len(row.prompt),
                        )
                except torch.OutOfMemoryError as e:
                    for row in batch:
                        results[row.request] = OptionScores(
                            options, [], [], len(row.prompt), f"out of memory: {e}"
                        )
                bar.update(len(batch))
        return results

    @torch.inference_mode()
    def _score_batch(
        self, prompts: list[list[int]], option_ids: list[list[int]]
    ) -> list[list[float]]:
        multi = any(len(t) > 1 for t in option_ids)
        cache, last_logits, mask, last = self._prefill(prompts, use_cache=multi)
        first = torch.log_softmax(last_logits, dim=-1)  # [B, V]
        scores = [[float(first[b, t[0]]) for t in option_ids] for b in range(len(prompts))]
        if not multi:
            return scores
        # Continue every (prompt, option) pair from the prompt's cache, row b*K + k: feed the
        # option's tokens but its last (right-padded); position j then predicts token j + 1.
        k_opts, width = len(option_ids), max(len(t) for t in option_ids) - 1
        expand = torch.arange(len(prompts), device=self.device).repeat_interleave(k_opts)
        cache.reorder_cache(expand)
        feed = torch.full((len(expand), width), self.pad_id, dtype=torch.long)
        feed_mask = torch.zeros((len(expand), width), dtype=torch.long)
        for r in range(len(expand)):
            head = option_ids[r % k_opts][:-1]
            feed[r, : len(head)] = torch.tensor(head, dtype=torch.long)
            feed_mask[r, : len(head)] = 1
        feed, feed_mask = feed.to(self.device), feed_mask.to(self.device)
        out = self.model(
            input_ids=feed,
            attention_mask=torch.cat([mask[expand], feed_mask], dim=1),
            position_ids=last[expand, None] + 1 + torch.arange(width, device=self.device),
            past_key_values=cache,
        )
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B*K, width, V]
        for r in range(len(expand)):
            b, k = divmod(r, k_opts)
            for j, token in enumerate(option_ids[k][1:]):
                scores[b][k] += float(logp[r, j, token])
        return scores
