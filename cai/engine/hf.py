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
keys and values reused by every prompt under it (``cai.engine.prefix`` finds them). A prefix
that saves fewer than ``min_prefix_saving`` tokens of compute is not run apart (its own forward
costs more than its tokens in the batch's), and the last few root prefixes are kept between
calls, so that a stage's chunks compute their common exemplars once. The results are those of
the path without reuse up to float rounding.

The decode loop pays for little besides the model: on the CPU, grouped key/value heads go to
torch's attention without a copy per query head, and the cache has room for the tokens a batch
will generate, so a step writes in place (both in ``cai.engine.kv_cache``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

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
from cai.engine.kv_cache import PrefixCache, ReservedLayer, reserve, use_grouped_sdpa
from cai.engine.prefix import prefix_tree, shared_tokens, sharing_order
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
        min_prefix_saving: int = 64,
        prefix_cache: int = 4,
        overflow: str = "raise",
    ):
        """``prefix_reuse``: compute each token prefix that prompts of a micro-batch share once
        (see the module docstring); ``min_shared_prefix``: the fewest tokens a shared prefix
        must add to the one it extends to be computed apart; ``min_prefix_saving``: the fewest
        tokens of compute it must save (its own forward costs more than a few tokens more in
        the batch's); ``prefix_cache``: the longest shared prefixes kept between calls (0:
        none), so that a stage's calls compute their common exemplars once."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        resolved = resolve_model(model)
        self.model_name = resolved.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = pick_dtype(dtype, self.device)
        if overflow not in ("raise", "error"):
            raise ValueError(f"overflow must be 'raise' or 'error' (got {overflow!r})")
        self.overflow = overflow
        for name, value, least in (
            ("min_shared_prefix", min_shared_prefix, 1),
            ("min_prefix_saving", min_prefix_saving, 0),
            ("prefix_cache", prefix_cache, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least} (got {value!r})")
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        self.model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=self.dtype)
        self.model.to(self.device).eval()
        if self.device.type == "cpu":
            use_grouped_sdpa(self.model)
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.encoder = PromptEncoder(self.tokenizer, min(max_model_len or context, context))
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.min_shared_prefix = min_shared_prefix
        self.min_prefix_saving = min_prefix_saving
        self.prefix_cache = PrefixCache(prefix_cache)
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
        token budgets.

        A batch costs its padded rectangle: rows × (longest prompt + new tokens). With reuse, the
        tokens a row shares with a neighbour are not run for it, only kept as keys and values, so
        they count a quarter, and the rectangle is that of the tokens each row runs itself. A
        shared prefix is computed once per batch (or kept from an earlier one), so its rows stay
        together where they fit."""
        if not self.prefix_reuse:
            order = sorted(rows, key=lambda r: len(r.prompt), reverse=True)
            links = [0] * (len(order) + 1)
        else:
            prompts = [r.prompt for r in rows]
            nodes = sharing_order(prompts, self.min_shared_prefix, self.min_prefix_saving)
            order = [rows[i] for i in nodes]
            # links[i]: the tokens order[i] shares with the row before it
            links = [0, *(shared_tokens(a.prompt, b.prompt) for a, b in pairwise(order)), 0]
        batch: list = []
        longest = kept = 0

        def cost(i: int) -> tuple[int, int]:
            """Row i's shared tokens and the batch's widest own part, were it to join."""
            shared = max(links[i] if batch else 0, links[i + 1])
            return shared, max(longest, len(order[i].prompt) - shared + new_tokens(order[i]))

        for i, row in enumerate(order):
            shared, own = cost(i)
            if batch and (
                len(batch) >= self.max_batch_size
                or own * (len(batch) + 1) + (kept + shared) // 4 > self.max_batch_tokens
            ):
                yield batch
                batch, longest, kept = [], 0, 0
                shared, own = cost(i)
            batch.append(row)
            longest, kept = own, kept + shared
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

    def _prefill(self, prompts: list[list[int]], use_cache: bool = True, room: int = 0):
        """Run the prompts; return (cache, last-position logits [B, V], mask [B, T], last position [B]).
        The cache has room for ``room`` more positions (the tokens decoding will add).

        With prefix reuse, each shared prefix (a node of ``prefix_tree``) runs once, alone,
        continuing its parent's cache; each prompt then runs only its tokens after its deepest
        shared prefix, left-padded, with that prefix's keys and values as its past (zero-padded
        to the longest such past, the padding masked) and positions that continue the prefix.
        """
        nodes, deepest = ([], [None] * len(prompts))
        if self.prefix_reuse:
            nodes, deepest = prefix_tree(prompts, self.min_shared_prefix, self.min_prefix_saving)
        shared = []  # per node, per layer: (keys, values), each [1, heads, end, dim]
        for node in nodes:
            start, past = node.start, None if node.parent is None else shared[node.parent]
            if node.parent is None:  # the longest prefix of it kept from an earlier call
                tokens = tuple(prompts[node.row][: node.end])
                start, past = self.prefix_cache.longest(tokens)
            if start == node.end:
                shared.append(past)
                continue
            ids = torch.tensor([prompts[node.row][start : node.end]], device=self.device)
            out = self.model(
                input_ids=ids,
                position_ids=torch.arange(start, node.end, device=self.device)[None],
                # A new cache over the parent's tensors: the forward appends to its own.
                past_key_values=None if past is None else DynamicCache(past),
                use_cache=True,
                logits_to_keep=1,
            )
            shared.append([(k, v) for k, v, _ in out.past_key_values])
            if node.parent is None:
                self.prefix_cache.put(tokens, shared[-1])
        starts = [0 if d is None else nodes[d].end for d in deepest]
        ids, mask, positions = self._left_pad(
            [p[start:] for p, start in zip(prompts, starts, strict=True)], starts
        )
        past = None
        if any(starts):
            past, past_mask = self._shared_past(shared, starts, deepest, ids.shape[1] + room)
            mask = torch.cat([past_mask, mask], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=use_cache,
            logits_to_keep=1,  # the vocabulary head at the last position only
        )
        cache = out.past_key_values
        if past is None and room and cache is not None:
            cache = reserve(cache, room)
        return cache, out.logits[:, -1, :].float(), mask, positions[:, -1]

    def _shared_past(self, shared, ends: list[int], deepest: list[int | None], room: int):
        """Each row's deepest shared prefix as one cache (per layer [B, heads, width, dim]: the
        prefixes left-aligned, zero-padded to the longest; with room for ``room`` positions more)
        and its mask [B, width]."""
        rows_of: dict[int, list[int]] = {}
        for r, node in enumerate(deepest):
            if node is not None:
                rows_of.setdefault(node, []).append(r)
        width = max(ends)
        mask = torch.zeros((len(ends), width), dtype=torch.long)
        for r, end in enumerate(ends):
            mask[r, :end] = 1
        cache = DynamicCache()
        cache.layers = []
        for layer, (k0, v0) in enumerate(shared[0]):
            buffers = [
                t.new_empty((len(ends), t.shape[1], width + room, t.shape[3])) for t in (k0, v0)
            ]
            for node, rows in rows_of.items():
                index = slice(rows[0], rows[-1] + 1)  # rows in sharing order sit together
                if rows != list(range(rows[0], rows[-1] + 1)):
                    index = torch.tensor(rows, device=self.device)
                for buffer, t in zip(buffers, shared[node][layer], strict=True):
                    # [1, heads, end, dim], broadcast over the rows; the padding after it must
                    # hold numbers (masked, it still enters the products: NaN would spread).
                    buffer[index, :, : t.shape[2]] = t
                    buffer[index, :, t.shape[2] : width] = 0
            for r, node in enumerate(deepest):
                if node is None:
                    for buffer in buffers:
                        buffer[r, :, :width] = 0
            cache.layers.append(ReservedLayer(*buffers, width))
        return cache, mask.to(self.device)

    @torch.inference_mode()
    def _decode(self, batch: list[_Row]) -> list[Sample]:
        room = max(r.sampling.max_tokens for r in batch)
        cache, logits, mask, last = self._prefill([r.prompt for r in batch], room=room)
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
        job = self.encoder.prepare_score(conversations, options, prefixes, self.overflow)
        longest = job.longest
        rows = [_Row(i, 0, job.prompts[i], Sampling(max_tokens=longest), None) for i in job.todo]
        with progress_bar(len(rows), progress, unit="conv") as bar:
            for batch in self._micro_batches(rows, lambda r: longest * len(job.options)):
                try:
                    scores = self._score_batch([r.prompt for r in batch], job.option_ids)
                    for row, lps in zip(batch, scores, strict=True):
                        job.done(row.request, lps)
                except torch.OutOfMemoryError as e:
                    for row in batch:
                        job.failed(row.request, f"out of memory: {e}")
                bar.update(len(batch))
        return job.results

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
