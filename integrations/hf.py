"""Backend for transformers decoder stacks (Llama-style, Emu3, Janus, Chameleon, ...).

Runs the recipe's ``modules.decoder`` (the text model, e.g. ``model.text_model``) with
``inputs_embeds``, an additive 4D float mask (a bool 4D mask is silently wrong under eager
attention) and explicit ``position_ids``. The vertical branch reuses the keyword arguments
the decoder passed its branch layer (rotary embeddings, mask) with its own cache.

Decoding uses ``FeedOrderCache``: static per-layer buffers allocated once per generate()
call and filled in feeding order, so a step attends exactly the filled entries (views, no
``torch.cat`` growth, no attention over unused entries) and its additive mask is a view of
one preallocated row. transformers' own ``StaticCache`` would make every step attend all
``max_cache_len`` entries behind a mask, which costs more than it saves at these sizes.
"""
from __future__ import annotations

import functools
import inspect

import torch

from flashar_adapt.backends import Backend, register_backend
from flashar_adapt.recipe import RecipeError

# transformers 5.x renames past_key_values -> cache; accept both so one backend covers both.
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


def _cache_kwarg(fn) -> str:
    params = inspect.signature(fn).parameters
    for k in _CACHE_KEYS:
        if k in params:
            return k
    return "past_key_values"


def _dynamic_cache(config=None):
    from transformers import DynamicCache

    return DynamicCache(config=config) if config is not None else DynamicCache()


def _full_attention_only(config) -> bool:
    """Whether every layer is plain full attention (no sliding window, chunks, shared KV or
    linear attention): the layouts FeedOrderCache can hold; anything else keeps DynamicCache."""
    if config is None:
        return True
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 - an unusual config: stay on the generic cache
        return False
    return all(t == "full_attention" for t in types)


@functools.cache
def _feed_order_cache_class():
    """FeedOrderCache, defined on first use so that importing this module does not import
    transformers."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class FeedOrderLayer(CacheLayerMixin):
        """One layer's static K/V buffers [B, heads, max_len, head_dim], allocated at the
        first update (the prefill) and filled in feeding order; update returns views of the
        filled entries."""

        is_compileable = False
        is_sliding = False

        def __init__(self, max_len: int):
            super().__init__()
            self.max_len, self.length = max_len, 0

        def lazy_initialization(self, key_states, value_states):
            B, h, _, dk = key_states.shape
            self.keys = key_states.new_empty((B, h, self.max_len, dk))
            self.values = value_states.new_empty((B, value_states.shape[1], self.max_len, value_states.shape[-1]))
            self.device = key_states.device
            self.is_initialized = True

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
            return self.length + query_length, 0

        def get_seq_length(self):
            return self.length

        def get_max_length(self):
            return self.max_len

        def reset(self):
            self.length = 0

    class FeedOrderCache(Cache):
        """Static caches for one generate() call, filled in the decoder's feeding order."""

        feed_order = True

        def __init__(self, n_layers: int, max_len: int):
            super().__init__(layers=[FeedOrderLayer(max_len) for _ in range(n_layers)])
            self.max_len = max_len
            self.key_row = None  # (additive row, entries converted, source storage): see _mask_row

    return FeedOrderCache


def _feed_order_cache(n_layers: int, max_len: int):
    return _feed_order_cache_class()(n_layers, max_len)


@register_backend("transformers")
class TransformersBackend(Backend):
    def validate(self, ctx) -> None:
        if not hasattr(ctx.decoder, "forward") or "inputs_embeds" not in inspect.signature(ctx.decoder.forward).parameters:
            raise RecipeError("modules.decoder", f"{type(ctx.decoder).__name__}.forward takes no inputs_embeds; point "
                                                 "modules.decoder at the text decoder (e.g. 'model' or 'model.text_model')",
                              ctx.recipe.source)
        self.cache_key = _cache_kwarg(ctx.decoder.forward)

    def max_positions(self, ctx):
        cfg = getattr(ctx.decoder, "config", None)
        return getattr(cfg, "max_position_embeddings", None)

    def run(self, ctx, embeds, positions, slots, key_slots, allowed, cache):
        # allowed is [B, T, S] or [B, 1, S] (one row for every query); the model gets a full
        # additive [B, 1, T, S] mask (a bool 4D mask is silently wrong under eager attention).
        B, T, S = allowed.shape[0], embeds.shape[1], allowed.shape[-1]
        if allowed.shape[1] == 1 and getattr(cache, "feed_order", False):
            mask = _mask_row(cache, allowed, embeds.dtype)[:, :, :, :S].expand(-1, -1, T, -1)
        else:
            mask = torch.zeros((B, T, S), dtype=embeds.dtype, device=embeds.device)
            mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        kwargs = {getattr(self, "cache_key", "cache"): cache}
        out = ctx.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          use_cache=cache is not None, **kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def new_cache(self, ctx, batch, max_len):
        config = getattr(ctx.decoder, "config", None)
        if _full_attention_only(config):
            return _feed_order_cache(len(ctx.layers), max_len)
        return _dynamic_cache(config)

    def new_branch_cache(self, ctx, batch, max_len):
        if _full_attention_only(getattr(ctx.decoder, "config", None)):
            return _feed_order_cache(len(ctx.flashar.branch_layers), max_len)
        return _dynamic_cache()

    def prepare_branch_layers(self, layers):
        # Branch layers index their own cache from 0.
        for new_idx, layer in enumerate(layers):
            for mod in layer.modules():
                if isinstance(getattr(mod, "layer_idx", None), int):
                    mod.layer_idx = new_idx

    def branch_call(self, layer, hidden, args, kwargs, cache):
        kw = dict(kwargs)
        for k in _CACHE_KEYS:
            if k in kw:
                kw[k] = cache
        rest = list(args[1:])
        if rest:
            # some decoders (GPT-2) pass the cache positionally: swap it by parameter name too
            names = [n for n in inspect.signature(layer.forward).parameters][1:1 + len(rest)]
            rest = [cache if n in _CACHE_KEYS else a for n, a in zip(names, rest)] + rest[len(names):]
        if args:
            out = layer(hidden, *rest, **kw)
        else:
            kw["hidden_states"] = hidden
            out = layer(**kw)
        return out[0] if isinstance(out, tuple) else out

    def save_model(self, model, out_dir):
        mods = model._modules.pop("flashar", None)  # the backbone alone, in save_pretrained layout
        try:
            model.save_pretrained(str(out_dir), safe_serialization=True)
        finally:
            if mods is not None:
                model._modules["flashar"] = mods
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return {"path": ".", "class": type(model).__name__, "dtype": dtype}

    def load_model(self, spec, root=None):
        """spec: {path: save_pretrained directory, class: optional class name (defaults to the
        config's architectures[0]), dtype}. Local files only."""
        import transformers
        from pathlib import Path

        path = Path(root or ".") / spec["path"]
        cls_name = spec.get("class")
        if not cls_name:
            cfg = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            cls_name = (cfg.architectures or ["AutoModelForCausalLM"])[0]
        cls = getattr(transformers, cls_name)
        kw = {"dtype": getattr(torch, spec["dtype"])} if spec.get("dtype") else {}
        return cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **kw).eval()


def _mask_row(cache, allowed: torch.Tensor, dtype) -> torch.Tensor:
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


# ---------------------------------------------------------------- discovery (inspect / check)

def _sniff(path) -> dict | None:
    """A save_pretrained folder (config.json + weights) -> a load spec."""
    from pathlib import Path

    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    return {"path": str(path.resolve())}


def _load_sniffed(spec: dict, overrides: dict | None = None):
    """Local files only: the config's architectures class if transformers has it, else
    AutoModelForCausalLM, else AutoModel."""
    import json
    from pathlib import Path

    import transformers

    path = Path(spec["path"])
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    names = [a for a in archs if hasattr(transformers, a)] + ["AutoModelForCausalLM", "AutoModel"]
    err = None
    for name in names:
        try:
            model = getattr(transformers, name).from_pretrained(str(path), local_files_only=True, **(overrides or {}))
            return model.eval()
        except (ValueError, KeyError, OSError) as e:  # this Auto class does not know the config
            err = e
    raise ValueError(f"{path}: transformers could not load this folder ({err})")


TransformersBackend.sniff = staticmethod(_sniff)
TransformersBackend.load_sniffed = staticmethod(_load_sniffed)
TransformersBackend.sniff_priority = 10  # generic: family-specific backends get the first look
