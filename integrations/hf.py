"""Backend for transformers decoder stacks (Llama-style, Emu3, Janus, Chameleon, ...).

Runs the recipe's ``modules.decoder`` (the text model, e.g. ``model.text_model``) with
``inputs_embeds``, an additive 4D float mask (a bool 4D mask is silently wrong under eager
attention) and explicit ``position_ids``. The vertical branch reuses the keyword arguments
the decoder passed its branch layer (rotary embeddings, mask) with its own cache.
"""
from __future__ import annotations

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
        mask = torch.zeros((B, T, S), dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        kwargs = {getattr(self, "cache_key", "cache"): cache}
        out = ctx.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          use_cache=cache is not None, **kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def new_cache(self, ctx, batch, max_len):
        return _dynamic_cache(getattr(ctx.decoder, "config", None))

    def new_branch_cache(self, ctx, batch, max_len):
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
