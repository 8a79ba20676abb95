"""How the transformers runner reaches a decoder's layers, whatever the family calls things:
the cache argument (found by type inside the stack), the mask put where a layer takes it,
built-in causal masks found and opened, and the attention window read from the config."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

# The decoder's own forward names its cache argument (transformers 5.x renames past_key_values
# -> cache); its layers may use any name (layer_past, cache, ...) or take it positionally, so
# inside the stack caches are found by type (transformers ``Cache``), never by name.
DECODER_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


def cache_kwarg(fn) -> str:
    params = inspect.signature(fn).parameters
    for k in DECODER_CACHE_KEYS:
        if k in params:
            return k
    return "past_key_values"


def is_cache(x) -> bool:
    return isinstance(x, Cache)


@functools.cache
def param_names(cls) -> tuple[str, ...]:
    """Names of ``cls.forward``'s parameters after ``self`` (the order positional args bind)."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def replace_mask(module, args: tuple, kwargs: dict, mask) -> tuple[tuple, dict]:
    """Put ``mask`` where ``module.forward`` takes ``attention_mask`` (positionally or by name)."""
    names = param_names(type(module))
    i = names.index("attention_mask")
    if i < len(args):
        return args[:i] + (mask,) + args[i + 1 :], kwargs
    return args, {**kwargs, "attention_mask": mask}


def causal_window(buf) -> int | None:
    """The window of a built-in causal mask: a square bool buffer [..., n, n], the same in
    every leading slice, whose row r is True exactly on columns (r - w, r]. Returns w (n for
    a full lower triangle, less for a banded one: a local attention window, GPT-Neo's local
    layers); None for any other buffer."""
    if not torch.is_tensor(buf) or buf.dtype != torch.bool or buf.dim() < 2:
        return None
    n = buf.shape[-1]
    if n < 2 or buf.shape[-2] != n:
        return None
    flat = buf.reshape(-1, n, n)
    first = flat[0]
    w = int(first[-1].sum())
    if w < 1 or not bool((flat == first).all()):
        return None
    ones = torch.ones(n, n, dtype=torch.bool, device=buf.device)
    return w if bool(first.eq(ones.tril() & ~ones.tril(-w)).all()) else None


def causal_buffers(module) -> list[tuple]:
    """(module, buffer name, window) of every built-in causal mask inside ``module``: masks
    some attention implementations apply on top of the one they are given."""
    out = []
    for mod in module.modules():
        for name, buf in mod.named_buffers(recurse=False):
            w = causal_window(buf)
            if w is not None:
                out.append((mod, name, w))
    return out


@contextlib.contextmanager
def causal_buffers_open(found: list[tuple]):
    """Temporarily let built-in causal masks allow everything: the additive mask FlashAR
    passes then decides alone (the proximity mask lets a token see later raster slots)."""
    saved = [(mod, name, mod._buffers[name]) for mod, name, _ in found]
    for mod, name, buf in saved:
        mod._buffers[name] = torch.ones_like(buf)
    try:
        yield
    finally:
        for mod, name, buf in saved:
            mod._buffers[name] = buf


def sliding_window(config) -> int | None:
    """The shortest attention window any layer uses, or None when every layer attends all keys."""
    if config is None:
        return None
    try:
        text = config.get_text_config(decoder=True)
        types, _ = get_layer_types_and_kwargs(text)
    except Exception:  # noqa: BLE001 - an unusual config: no window we can read
        return None
    window = getattr(text, "sliding_window", None)
    if any("sliding" in t or "chunk" in t for t in types) and isinstance(window, int) and window > 0:
        return window
    return None
