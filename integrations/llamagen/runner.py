"""The LlamaGen runner (``model.layers`` with slot-indexed 2D RoPE and static per-layer caches)
and the LlamaGen model format (official ``.pt``/``.pth``/``.safetensors`` checkpoints)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from flashar_adapt.formats import FormatError, ModelFormat, dtype_name
from flashar_adapt.patching import backbone_state_dict
from flashar_adapt.recipe import RecipeError
from flashar_adapt.runners import Runner

from .checkpoints import (
    MODEL_ARGS,
    check_model_args,
    load_state_dict_into,
    model_args_of,
    read_state_dict,
    resolve_model_args,
)
from .fused import FusedBranchBlock
from .model import GPT_models, KVCache, ModelArgs, Transformer, setup_kv_caches


class LlamaGenRunner(Runner):
    """Runs ``model.layers`` of a LlamaGen ``Transformer``. Decoding with the vertical branch
    runs its own layer loop (``run_with_branch``): the branch layers read the input of the
    backbone's branch layer directly, and plain eval-mode blocks run fused with the backbone
    block they copy (``FusedBranchBlock``)."""

    name = "llamagen"
    static_caches = True
    fused_branch = True
    reference_forward = True

    def __init__(self):
        # the fused branch block, kept from one generate() call to the next of the same shape
        # (a CUDA graph of the compiled step replays on its buffers)
        self.pair: FusedBranchBlock | None = None

    def bind(self, ctx) -> None:
        if not isinstance(getattr(ctx.model, "config", None), ModelArgs):
            raise RecipeError(
                "backend", f"'llamagen' needs a LlamaGen Transformer, got {type(ctx.model).__name__}", ctx.recipe.source
            )
        # The 2D rotary table is built for a square grid of block_size cells and read by raster
        # position: another grid would give its cells the positions of other cells, silently.
        n = ctx.model.config.block_size
        side = int(round(n**0.5))
        if list(ctx.recipe.image.grid) != [side, side]:
            H, W = ctx.recipe.image.grid
            raise RecipeError(
                "image.grid",
                f"the model's 2D rotary positions are a {side}x{side} grid (block_size {n}), the recipe's "
                f"grid is {H}x{W}: decode the model's own grid (patch(..., grid=({side}, {side})), check "
                f"--grid {side} {side}), or, if its weights are for {H}x{W}, build it with block_size={H * W} "
                f"(--set block_size={H * W})",
                ctx.recipe.source,
            )

    def max_positions(self, ctx):
        return ctx.model.freqs_cis.shape[0]

    def run(self, ctx, embeds, positions, slots, key_slots, allowed, cache, entries=None):
        h = ctx.model.tok_dropout(embeds)
        freqs, start, mask = _step_inputs(ctx, embeds, slots, key_slots, allowed, cache, entries)
        if ctx.gradient_checkpointing and torch.is_grad_enabled():
            for layer in ctx.layers:
                h = checkpoint(layer, h, freqs, start, mask, use_reentrant=False)
        else:
            for layer in ctx.layers:
                h = layer(h, freqs, start, mask)
        return ctx.norm(h)

    def new_cache(self, ctx, batch, max_len, static=False):
        return _Cache(ctx.model, _ensure_caches(ctx.layers, batch, max_len, ctx.model, static), max_len)

    def new_branch_cache(self, ctx, batch, max_len, static=False):
        branch = ctx.flashar.branch_layers
        a = ctx.layers[ctx.branch_index]
        if self.fused_branch and FusedBranchBlock.eligible(a, branch):  # else the branch layers get their own caches
            cache = _Cache(ctx.model, False, max_len)
            key = FusedBranchBlock.key_of(a, branch[0], batch, max_len)
            if self.pair is None or self.pair.key != key:
                self.pair = FusedBranchBlock(a, branch[0], batch, max_len)
            else:
                self.pair.load(a, branch[0])
            cache.pair = self.pair
            return cache
        return _Cache(ctx.model, _ensure_caches(branch, batch, max_len, ctx.model, static), max_len)

    def run_with_branch(self, ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries=None):
        h = ctx.model.tok_dropout(embeds)
        freqs, start, mask = _step_inputs(ctx, embeds, slots, key_slots, allowed, cache, entries)
        pair = branch_cache.pair if not torch.is_grad_enabled() else None
        x = None
        for i, layer in enumerate(ctx.layers):
            if i == ctx.branch_index and pair is not None:
                h, x = pair(h, freqs, start, mask)
                continue
            if i == ctx.branch_index:  # the generic path's arithmetic: the branch layers on this layer's input
                x = h
                for branch_layer in ctx.flashar.branch_layers:
                    x = branch_layer(x, freqs, start, mask)
            h = layer(h, freqs, start, mask)
        return ctx.norm(h), x

    def prepare_branch_layers(self, layers):
        for layer in layers:
            layer.attention.kv_cache = None

    def branch_call(self, layer, hidden, args, kwargs, cache):
        return layer(hidden, *args[1:], **kwargs)

    def reference_logits(self, ctx, cond, codes):
        """The model's own (naive, causal) forward: next-code logits [B, H, W, K]."""
        B, H, W = codes.shape
        logits, _ = ctx.model(codes.reshape(B, -1)[:, :-1], cond)
        return logits.view(B, H, W, -1)[..., : ctx.recipe.image.codebook_size]


class LlamaGenFormat(ModelFormat):
    """A LlamaGen checkpoint: a ``.pt``/``.pth`` (``{"model": ...}`` or a raw state dict) or
    ``.safetensors`` file. Spec: ``{checkpoint: the file, model_args: a JSON file of ModelArgs |
    config: {ModelArgs fields} | gpt_model: "GPT-B" (+ config), dtype}``; without any of them
    the sizes come from a ``model_args.json`` beside the checkpoint, else from the weights and
    the official sizes (``checkpoints.resolve_model_args``: never guessed). ``overrides`` are
    ModelArgs fields (``--set n_head=16``) and win over every other source."""

    name = "llamagen"
    runner = "llamagen"
    spec_keys = ("checkpoint", "model_args", "config", "gpt_model", "dtype")
    priority = 0

    @classmethod
    def owns(cls, model):
        return isinstance(model, Transformer)

    @classmethod
    def sniff(cls, path):
        path = Path(path)
        if not (path.is_file() and path.suffix in (".pt", ".pth", ".safetensors")):
            return None
        try:
            sd = read_state_dict(path)
        except Exception:  # noqa: BLE001 - not a LlamaGen file
            return None
        if "tok_embeddings.weight" not in sd or "layers.0.attention.wqkv.weight" not in sd:
            return None
        return {"checkpoint": str(path.resolve())}

    @classmethod
    def load(cls, spec, root=None, overrides=None):
        root = Path(root or ".")
        ckpt = spec.get("checkpoint")
        given = dict(spec.get("config") or {})
        source = "the model spec's config"
        if spec.get("model_args"):
            f = root / spec["model_args"]
            given, source = {**json.loads(f.read_text()), **given}, str(f)
        overrides = dict(overrides or {})
        if spec.get("gpt_model"):
            name = spec["gpt_model"]
            if name not in GPT_models:
                raise FormatError(f"gpt_model: {name!r} is not an official size ({', '.join(GPT_models)})")
            model_args_of({**given, **overrides}, source)  # unknown keys named before building
            model = GPT_models[name](**{**given, **overrides})
            if ckpt is not None:
                sd = read_state_dict(root / ckpt)
                check_model_args(model.config, sd, f"gpt_model {name}")
                load_state_dict_into(model, sd, root / ckpt)
        elif ckpt is not None:
            sd = read_state_dict(root / ckpt)
            args = resolve_model_args(root / ckpt, sd, given, source, overrides, beside=not spec.get("model_args"))
            model = Transformer(args)
            load_state_dict_into(model, sd, root / ckpt)
        elif given or overrides:
            model = Transformer(model_args_of({**given, **overrides}, source))
        else:
            raise ValueError("model spec needs 'checkpoint' or a 'config'/'gpt_model' to build from")
        if spec.get("dtype"):
            model = model.to(getattr(torch, spec["dtype"]))
        return model.eval()

    @classmethod
    def save(cls, model, out_dir):
        torch.save({"model": backbone_state_dict(model)}, out_dir / "llamagen.pt")  # the official {"model": ...} layout
        args = {f.name: getattr(model.config, f.name) for f in fields(ModelArgs)}
        (out_dir / MODEL_ARGS).write_text(json.dumps(args, indent=1))
        dtype = dtype_name(model.tok_embeddings.weight.dtype)
        return {"checkpoint": "llamagen.pt", "model_args": MODEL_ARGS, "dtype": dtype}


def _step_inputs(ctx, embeds, slots, key_slots, allowed, cache, entries=None):
    """Rotary rows, cache entries to fill and the attention mask of one runner call.

    With a cache, entries are filled in feeding order (key_slots order): the new tokens go
    to entries [S - T, S) and attend entries [0, S), so the mask is ``allowed`` itself (a
    view) and attention never reads past the filled part of the cache. Static caches get
    the entries as a tensor and attend the whole cache (``KVCache.update``'s index path)."""
    if cache is None:
        return ctx.model.freqs_cis.to(embeds.device)[slots], None, allowed[:, None]
    if entries is not None:
        return cache.freqs(embeds.device)[slots], entries, allowed[:, None]
    S, T = key_slots.shape[0], embeds.shape[1]
    if S > cache.max_len:
        raise ValueError(f"{S} keys do not fit the cache ({cache.max_len} entries)")
    return cache.freqs(embeds.device)[slots], slice(S - T, S), allowed[:, None]


class _Cache:
    """What new_cache returns: the static per-layer caches live on the attention modules;
    this records their length and keeps the rotary table on the decoding device."""

    def __init__(self, model, allocated: bool, max_len: int):
        self.model, self.allocated, self.max_len = model, allocated, max_len
        self._freqs = None
        self.pair: FusedBranchBlock | None = None  # branch caches only: the fused branch block

    def freqs(self, device):
        f = self._freqs
        if f is None or f.device != device:
            f = self._freqs = self.model.freqs_cis.to(device)
        return f


def _ensure_caches(layers, batch: int, max_len: int, model, exact: bool = False) -> bool:
    """Static caches of at least [batch, max_len] on every layer (``exact``: exactly max_len
    entries, which static decoding attends whole); reuses the ones already there when they
    fit (nothing past the filled entries is ever read, or it is masked). Returns whether
    new buffers were allocated."""
    dtype = model.tok_embeddings.weight.dtype
    for layer in layers:
        c = layer.attention.kv_cache
        w = layer.attention.wqkv.weight
        if not (
            isinstance(c, KVCache)
            and c.k_cache.dtype == dtype
            and c.k_cache.device == w.device
            and c.k_cache.shape[0] >= batch
            and c.k_cache.shape[2] >= max_len
            and (not exact or c.k_cache.shape[2] == max_len)
            # buffers made under inference_mode (by a generate) cannot be written outside it
            # (patch's probe, a user's own no_grad decoding): those are made again
            and (torch.is_inference_mode_enabled() or not c.k_cache.is_inference())
        ):
            break
    else:
        return False
    setup_kv_caches(layers, batch, max_len, model.config, dtype)
    return True
