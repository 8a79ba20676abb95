"""The transformers runner's decoding caches: static per-layer buffers filled in feeding
order (``FeedOrderCache``), and the additive key row a step attends (``mask_row``)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class FeedOrderLayer(CacheLayerMixin):
    """One layer's static K/V buffers [B, heads, max_len, head_dim], allocated at the first
    update (the prefill) and filled in feeding order; update returns views of the filled entries."""

    is_compileable = False
    is_sliding = False

    def __init__(self, max_len: int, static: bool = False):
        super().__init__()
        self.max_len, self.length, self.static = max_len, 0, static

    def lazy_initialization(self, key_states, value_states):
        B, h, _, dk = key_states.shape
        # static caches are attended whole under a mask: unwritten entries must be finite
        new = key_states.new_zeros if self.static else key_states.new_empty
        self.keys = new((B, h, self.max_len, dk))
        self.values = new((B, value_states.shape[1], self.max_len, value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True
        if self.static and key_states.device.type == "cuda":
            from torch import _dynamo  # heavy to import, and only CUDA graphs need it

            _dynamo.mark_static_address(self.keys)  # CUDA graphs replay on fixed addresses
            _dynamo.mark_static_address(self.values)

    def write_at(self, key_states, value_states, entries):
        """Static caches: write at cache ``entries`` (a tensor) and return the whole cache."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, entries, key_states)
        self.values.index_copy_(2, entries, value_states)
        return self.keys, self.values

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.length, self.length + key_states.shape[-2]
        if stop > self.max_len:
            raise ValueError(f"{stop} keys do not fit the cache ({self.max_len} entries)")
        self.keys[:, :, start:stop] = key_states
        self.values[:, :, start:stop] = value_states
        self.length = stop
        return self.keys[:, :, :stop], self.values[:, :, :stop]

    def get_mask_sizes(self, query_length):
        if self.static:  # a Python int that changed per step would recompile a compiled step
            return self.max_len, 0
        return self.length + query_length, 0

    def get_seq_length(self):
        return self.length

    def get_max_length(self):
        return self.max_len

    def reset(self):
        self.length = 0


class FeedOrderCache(Cache):
    """Static caches for one generate() call, filled in the decoder's feeding order, or
    (``static``, compiled decoding) at the tensor ``entries`` the runner sets per call."""

    feed_order = True

    def __init__(self, n_layers: int, max_len: int, static: bool = False):
        super().__init__(layers=[FeedOrderLayer(max_len, static) for _ in range(n_layers)])
        self.max_len, self.static = max_len, static
        self.entries = None
        self.key_row = None  # (additive row, entries converted, source storage): see mask_row

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.static:
            return self.layers[layer_idx].write_at(key_states, value_states, self.entries)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def mask_row(cache, allowed: torch.Tensor, dtype) -> torch.Tensor:
    """The additive [B, 1, 1, max_len] key row of a FeedOrderCache, converted from the bool
    rows the decoder passes as keys arrive. The decoder's rows are slices of one key-validity
    row per generate() call, so while they come from the same storage each step converts only
    the entries it has not seen yet; a row from anywhere else is converted whole."""
    row, done, src = cache.key_row or (None, 0, None)
    S = allowed.shape[-1]
    if row is None:  # batch and dtype are fixed for the cache's one generate() call
        row = torch.empty((allowed.shape[0], 1, 1, cache.max_len), dtype=dtype, device=allowed.device)
    # src (kept alive here) pins the storage, so an equal address is the same, unchanged row
    if src is None or allowed.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
        done = 0
    if S > done:
        new = allowed[:, :, done:S]
        row[:, 0, :, done:S] = torch.zeros_like(new, dtype=dtype).masked_fill_(~new, torch.finfo(dtype).min)
        done = S
    cache.key_row = (row, done, allowed)
    return row
