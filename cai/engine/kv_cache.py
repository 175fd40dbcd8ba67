"""The HF engine's keys and values: the attention its decode loop runs on the CPU
(``GROUPED_SDPA``), cache layers with room for the tokens a batch will generate
(``ReservedLayer``), and the root prefixes kept between calls (``PrefixCache``).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cai.engine.prefix import common_start

GROUPED_SDPA = "cai_grouped_sdpa"
"""transformers' ``sdpa`` attention, except that on the CPU grouped key/value heads go to torch's
SDPA as they are (``enable_gqa``): with a padding mask transformers copies the keys and values
once per query head at every layer and step (``repeat_kv``), which costs a decoding step with a
long cache more than the model's matrix products (SmolLM2: 9 query heads over 3 key/value heads).
The numbers are the same: torch computes the same attention without the copies."""


def _grouped_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("cache") is None
    if query.device.type != "cpu" or groups == 1 or not plain or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=kwargs.get("dropout", 0.0),
        scale=kwargs.get("scaling"),
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model) -> None:
    """Switch a model on transformers' sdpa attention to ``GROUPED_SDPA`` (registered once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)


class ReservedLayer(DynamicLayer):
    """A plain cache layer whose keys and values are the front of buffers with room for more
    positions: an update writes its positions in place, where ``DynamicLayer`` copies the whole
    cache into a new tensor (``torch.cat``) at every layer of every decoding step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        """``keys``/``values``: buffers [batch, heads, capacity, dim], their first ``length``
        positions filled."""
        super().__init__()
        self.buffers = (keys, values)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._view(length)

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor, room: int) -> ReservedLayer:
        """A layer holding ``keys``/``values`` with room for ``room`` more positions."""
        n = keys.shape[-2]
        buffers = []
        for t in (keys, values):
            buffer = t.new_empty((*t.shape[:-2], n + room, t.shape[-1]))
            buffer[..., :n, :] = t
            buffers.append(buffer)
        return cls(*buffers, n)

    def _view(self, length: int) -> None:
        keys, values = self.buffers
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        n = self.keys.shape[-2]
        m = n + key_states.shape[-2]
        if m > self.buffers[0].shape[-2]:  # out of room: as much again
            self.buffers = ReservedLayer.of(self.keys, self.values, max(m, 2 * n) - n).buffers
        keys, values = self.buffers
        keys[..., n:m, :] = key_states
        values[..., n:m, :] = value_states
        self._view(m)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.keys.shape[-2]
        index = torch.as_tensor(indices, device=self.device)
        self.buffers = tuple(b.index_select(0, index) for b in self.buffers)
        self._view(n)


def reserve(cache: DynamicCache, room: int) -> DynamicCache:
    """``cache`` with room for ``room`` more positions in each plain layer (see ``ReservedLayer``)."""
    cache.layers = [
        ReservedLayer.of(layer.keys, layer.values, room) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


class PrefixCache:
    """The keys and values of the last ``size`` root prefixes computed (per layer (keys, values),
    each [1, heads, tokens, dim]; never written after they are kept): a call whose prompts start
    with one of them continues it instead of computing it again."""

    def __init__(self, size: int):
        self.size = size
        self.entries: dict[tuple[int, ...], list] = {}  # oldest first

    def longest(self, tokens: tuple[int, ...]) -> tuple[int, list | None]:
        """(n, keys and values of ``tokens[:n]``) for the longest start ``tokens`` shares with a
        kept prefix (positions before n do not depend on the tokens after them, so a longer
        kept prefix serves sliced); (0, None): none shares any."""
        best, n = None, 0
        for kept in self.entries:
            common = common_start(kept, tokens)
            if common > n:
                best, n = kept, common
        if best is None:
            return 0, None
        self.entries[best] = self.entries.pop(best)  # used last: evicted last
        return n, [(k[:, :, :n], v[:, :, :n]) for k, v in self.entries[best]]

    def put(self, tokens: tuple[int, ...], kv: list) -> None:
        if self.size:
            self.entries.pop(tokens, None)
            self.entries[tokens] = kv
            while len(self.entries) > self.size:
                del self.entries[next(iter(self.entries))]
