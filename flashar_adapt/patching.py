"""patch() and unpatch(): attach FlashAR to a loaded model in place, and take it off again."""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapters import lora_layers, remove_lora
from .context import PatchContext, capture_hook, check_not_meta, context
from .decoding import generate
from .errors import InputError
from .heads import FlashARModules, FusionGate, ImageHead
from .matching import match_recipe
from .probes import check_head_width, check_order_independence
from .recipe import Recipe, RecipeError, load_recipe
from .runners import get_runner
from .validate import did_you_mean

__all__ = ["PatchContext", "backbone_only", "backbone_state_dict", "context", "patch", "resolve", "unpatch"]

# The attribute patch() adds; everything under it is FlashAR's, everything else the model's own.
FLASHAR_ATTR = "flashar"


@contextmanager
def backbone_only(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` without its FlashAR modules for the duration of the block (taken off, then put
    back exactly, even on error): what saving the backbone in its family's layout or wrapping
    the backbone with LoRA must see. An unpatched model is yielded as it is."""
    mods = model._modules.pop(FLASHAR_ATTR, None)
    try:
        yield model
    finally:
        if mods is not None:
            model._modules[FLASHAR_ATTR] = mods


def backbone_state_dict(model: nn.Module) -> dict:
    """The model's own state dict: every entry but the FlashAR modules'."""
    with backbone_only(model):
        return model.state_dict()


def resolve(root: nn.Module, path: str, key: str, source: str | None) -> Any:
    """Follow a dotted attribute path ("model.layers", "layers.3") from ``root``."""
    if path == "":
        return root
    obj = root
    walked = []
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
            idx = int(part)
            if idx >= len(obj):
                raise RecipeError(
                    key,
                    f"path {path!r}: index {idx} is out of range at {'.'.join(walked) or '<model>'} "
                    f"({len(obj)} entries)",
                    source,
                )
            obj = obj[idx]
        else:
            if not hasattr(obj, part):
                names = (
                    list(getattr(obj, "_modules", {}))
                    + list(getattr(obj, "_parameters", {}))
                    + list(getattr(obj, "_buffers", {}))
                )
                raise RecipeError(
                    key,
                    f"path {path!r}: {'.'.join(walked) or '<model>'} ({type(obj).__name__}) "
                    f"has no attribute {part!r}{did_you_mean(part, names)}",
                    source,
                )
            obj = getattr(obj, part)
        walked.append(part)
    return obj


def _module(root, path, key, src, kinds=(nn.Module,), called: bool = True):
    obj = resolve(root, path, key, src)
    if not isinstance(obj, kinds):
        raise RecipeError(
            key, f"path {path!r} is a {type(obj).__name__}, expected {' or '.join(k.__name__ for k in kinds)}", src
        )
    if called and type(obj).forward is nn.Module.forward:  # a container (ModuleList, ModuleDict): nothing to call
        raise RecipeError(key, f"path {path!r} is a {type(obj).__name__}, a container that cannot be called", src)
    return obj


def _check_embed(embed: nn.Module, key: str, path: str, src) -> None:
    """The token embedding maps ids to vectors (an ``nn.Embedding`` does by its type; any
    other module is asked on one id: a Linear or a norm there fails only at decoding)."""
    if isinstance(embed, nn.Embedding):
        return
    p = next(embed.parameters(), None)
    ids = torch.zeros(1, 1, dtype=torch.long, device=None if p is None else p.device)
    try:
        with torch.no_grad():
            out = embed(ids)
        ok = isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 3
    except Exception:  # noqa: BLE001 - whatever a module that takes no ids raises
        ok = False
    if not ok:
        raise RecipeError(key, f"path {path!r} ({type(embed).__name__}) does not map token ids to vectors", src)


def _check_ids(ids, key, vocab, src):
    if vocab is None:
        return
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            name = key if len(ids) == 1 else f"{key}[{i}]"
            raise RecipeError(name, f"token id {t} is outside the vocabulary ({vocab} entries)", src)


def _build_context(model: nn.Module, recipe: Recipe) -> PatchContext:
    src = recipe.source
    m = recipe.modules
    runner = get_runner(recipe.backend)()  # one runner per patched model
    layers = _module(model, m.layers, "modules.layers", src, (nn.ModuleList, nn.Sequential), called=False)
    norm = _module(model, m.norm, "modules.norm", src)
    head = _module(model, m.head, "modules.head", src)
    embed = _module(model, m.embed, "modules.embed", src)
    _check_embed(embed, "modules.embed", m.embed, src)
    if any(norm is mod for mod in layers.modules()):  # a layer's own norm, not the final one after them
        raise RecipeError(
            "modules.norm", f"path {m.norm!r} is inside modules.layers; the final norm comes after the layers", src
        )
    decoder = _module(model, m.decoder, "modules.decoder", src)
    image_embed = [_module(model, p, f"modules.image_embed[{i}]", src) for i, p in enumerate(m.image_embed)]
    after_norm = [_module(model, p, f"modules.after_norm[{i}]", src) for i, p in enumerate(m.after_norm)]
    vocab = embed.num_embeddings if isinstance(embed, nn.Embedding) else None
    dim = embed.embedding_dim if isinstance(embed, nn.Embedding) else None
    if dim is None:
        dim = next(p for p in norm.parameters()).shape[-1]

    _check_image_ids(recipe, head, vocab, bool(image_embed))
    cond_embed, uncond_features = _condition_modules(model, recipe, vocab)
    b = _branch_index(recipe, len(layers))

    ctx = PatchContext(
        recipe=recipe,
        runner=runner,
        model=model,
        decoder=decoder,
        layers=layers,
        norm=norm,
        head=head,
        embed=embed,
        image_embed=image_embed,
        cond_embed=cond_embed,
        uncond_features=uncond_features,
        branch_index=b,
        dim=dim,
        vocab_size=vocab,
        after_norm=after_norm,
    )
    runner.bind(ctx)
    limit = runner.max_positions(ctx)
    if limit is not None:
        _check_fits(ctx, limit, src)
    # what the paths cannot say, asked of the model itself on a few tokens (flashar_adapt.probes)
    check_head_width(ctx)
    check_order_independence(ctx, limit)
    return ctx


def _check_image_ids(recipe: Recipe, head: nn.Module, vocab: int | None, own_image_embed: bool) -> None:
    """The image token ids fit the vocabulary and the head; special ids are inside the vocabulary."""
    src = recipe.source
    im = recipe.image
    K = im.codebook_size
    id_key = "image.codebook_size" if im.visual_token_offset == 0 else "image.visual_token_offset"
    if not own_image_embed and vocab is not None and im.visual_token_offset + K > vocab:
        raise RecipeError(
            id_key,
            f"visual ids {im.visual_token_offset}..{im.visual_token_offset + K - 1} are outside the "
            f"vocabulary of {recipe.modules.embed!r} ({vocab} entries)",
            src,
        )
    if isinstance(head, nn.Linear):
        if head.out_features != K and im.visual_token_offset + K > head.out_features:
            raise RecipeError(
                id_key,
                f"visual ids {im.visual_token_offset}..{im.visual_token_offset + K - 1} do not fit the "
                f"head {recipe.modules.head!r} ({head.out_features} outputs)",
                src,
            )
    _check_ids([x for x in im.before if isinstance(x, int)], "image.before", vocab, src)
    _check_ids(list(im.digit_ids), "image.digit_ids", vocab, src)
    if im.eol_token is not None:
        _check_ids([im.eol_token], "image.eol_token", vocab, src)
    if im.last_row_end is not None:
        _check_ids([im.last_row_end], "image.last_row_end", vocab, src)
    if im.size_token_offset is not None:
        for g in im.grid:
            _check_ids([im.size_token_offset + g // im.size_token_divisor], "image.size_token_offset", vocab, src)


def _condition_modules(
    model: nn.Module, recipe: Recipe, vocab: int | None
) -> tuple[nn.Module | None, torch.Tensor | None]:
    """(conditioning embedding or None, unconditional features or None), checked against the
    recipe's condition section."""
    src = recipe.source
    c = recipe.condition
    cond_embed = None
    uncond_features = None
    if c.kind == "class":
        cond_embed = _module(model, c.embedding, "condition.embedding", src)
        rows = getattr(cond_embed, "num_embeddings", None)
        if rows is not None:
            if c.num_classes > rows:
                raise RecipeError(
                    "condition.num_classes", f"{c.num_classes} classes but {c.embedding!r} has {rows} rows", src
                )
            if c.null_class is not None and c.null_class >= rows:
                raise RecipeError(
                    "condition.null_class", f"class {c.null_class} is outside {c.embedding!r} ({rows} rows)", src
                )
    elif c.kind == "features":
        cond_embed = _module(model, c.embedding, "condition.embedding", src)
        if c.uncond == "param":
            uncond_features = resolve(model, c.uncond_features, "condition.uncond_features", src)
            if not isinstance(uncond_features, torch.Tensor):
                raise RecipeError("condition.uncond_features", f"path {c.uncond_features!r} is not a tensor", src)
    else:
        if c.embedding:
            cond_embed = _module(model, c.embedding, "condition.embedding", src)
        if c.pad_id is not None:
            _check_ids([c.pad_id], "condition.pad_id", vocab, src)
        _check_ids(list(c.uncond_ids), "condition.uncond_ids", vocab, src)

    return cond_embed, uncond_features


def _branch_index(recipe: Recipe, n: int) -> int:
    """The first branch layer's index among ``n`` decoder layers (a negative index counts from the end)."""
    src = recipe.source
    b = recipe.flashar.branch_layer
    b = n + b if b < 0 else b
    k = recipe.flashar.branch_depth
    if not 0 <= b < n:
        raise RecipeError(
            "flashar.branch_layer",
            f"{recipe.flashar.branch_layer} is out of range for {n} decoder layers (use -{n}..{n - 1})",
            src,
        )
    if b + k > n:
        raise RecipeError("flashar.branch_depth", f"{k} layers from layer {b} run past the last of {n} layers", src)

    return b


def _check_fits(ctx: PatchContext, limit: int, src) -> None:
    """Positions count the tokens actually fed (the last code is predicted, never fed); blame
    the key that is too big: the grid when it does not fit even beside a 1-token prompt or
    feeds more tokens than the prompt, else the prompt length."""
    im, c = ctx.recipe.image, ctx.recipe.condition
    small = im.preview(im.grid)
    meta = len(ctx.meta_ids(im.grid)) + (0 if small is None else small[0] * small[1])  # a preview grid is fed too
    need = ctx.layout(meta + (c.prefix_len or 1), im.grid).fed_len
    if need <= limit:
        return
    image_only = ctx.layout(meta + 1, im.grid).fed_len - 1  # fed tokens after the prompt
    if image_only + 1 > limit or c.kind == "class" or image_only >= c.prefix_len:
        raise RecipeError(
            "image.grid",
            f"{list(im.grid)} feeds {need} tokens (prompt and forced tokens included) but "
            f"the model has {limit} positions",
            src,
        )
    raise RecipeError(
        "condition.prefix_len",
        f"{c.prefix_len} prompt tokens do not fit beside grid {list(im.grid)}: "
        f"{need} tokens fed, the model has {limit} positions; at most "
        f"{limit - image_only} prompt tokens fit",
        src,
    )


def patch(
    model: nn.Module, recipe: Recipe | str | None = None, *, fixed_gate: float | None = None, **overrides
) -> nn.Module:
    """Turn ``model`` into a FlashAR two-way generator, in place; returns ``model``.

    ``overrides`` replace recipe keys (``branch_layer=-4``, ``branch_depth=2``,
    ``"image.grid"=(24, 24)``, ...). ``fixed_gate`` replaces the learned gate by a constant
    mixing weight (0.5 = the NAR-style average, for ablations)."""
    if getattr(model, "flashar", None) is not None and isinstance(model.flashar, FlashARModules):
        raise RuntimeError("model is already patched with FlashAR; call flashar_adapt.unpatch(model) first")
    if fixed_gate is not None and not (
        isinstance(fixed_gate, (int, float)) and not isinstance(fixed_gate, bool) and 0.0 <= fixed_gate <= 1.0
    ):
        raise InputError(f"fixed_gate must be a number in [0, 1] (the horizontal head's weight), got {fixed_gate!r}")
    if not isinstance(model, nn.Module):
        raise InputError(f"patch takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper: calls go to a graph
        raise InputError(
            f"patch the model itself, not the {type(model).__name__} torch.compile wrapped it in: "
            "fa.patch(compiled._orig_mod) (decode with generate(compile=True) to compile the steps)"
        )
    check_not_meta(model)
    if recipe is None:
        recipe = match_recipe(model)  # the registry entry whose ``match:`` fits, or a RecipeError "<recipe>"
    if not isinstance(recipe, (Recipe, str, os.PathLike)):
        raise InputError(
            f"recipe must be a Recipe, a recipe name or a YAML path, got {type(recipe).__name__} "
            "(a parsed mapping: fa.recipe_from_dict(data))"
        )
    recipe = load_recipe(recipe)
    if overrides:
        recipe = recipe.replace(**overrides)
    ctx = _build_context(model, recipe)

    b, k = ctx.branch_index, recipe.flashar.branch_depth
    branch = [copy.deepcopy(ctx.layers[i]) for i in range(b, b + k)]
    ctx.runner.prepare_branch_layers(branch)
    ref = next(ctx.norm.parameters(), None)
    if ref is None:
        ref = next(ctx.head.parameters())
    # the gate reads what the head reads: the decoder's output, after any projection it ends with
    width = ctx.after_norm[-1].out_features if ctx.after_norm and isinstance(ctx.after_norm[-1], nn.Linear) else ctx.dim
    gate = FusionGate(width, recipe.flashar.gate_hidden, device=ref.device, dtype=ref.dtype)
    head = ImageHead(
        ctx.head,
        0 if ctx.image_embed else recipe.image.visual_token_offset,
        recipe.image.codebook_size,
        recipe.logits.scale,
        recipe.logits.softcap,
    )
    norm = copy.deepcopy(ctx.norm)
    if ctx.after_norm:  # the branch ends like the decoder: its norm, then the same projection(s)
        norm = nn.Sequential(norm, *(copy.deepcopy(mod) for mod in ctx.after_norm))
    mods = FlashARModules(branch, norm, head, gate, fixed_gate=fixed_gate)
    for p in mods.parameters():
        p.requires_grad_(True)

    ctx.hook_id = ctx.layers[b].register_forward_pre_hook(capture_hook, with_kwargs=True).id
    mods.ctx = ctx
    model.add_module("flashar", mods)
    ctx.had_generate = "generate" in model.__dict__
    ctx.old_generate = model.__dict__.get("generate")
    model.generate = types.MethodType(generate, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove everything patch() added, the LoRA adapters FlashAR added included
    (``load_adapted`` of an export with adapters kept, ``add_lora``): the model is the
    original again, bit for bit. Takes the model's guard: a generate running in another
    thread finishes first, one waiting behind it raises; called from inside a FlashAR call
    on this model it raises. Refused, with the model untouched, when those adapters were
    merged into the base weights (``export_merged``, peft's ``merge``): the original
    weights are gone."""
    mods = getattr(model, "flashar", None)
    if not isinstance(mods, FlashARModules) or mods.ctx is None:
        raise RuntimeError("model is not patched with FlashAR")
    ctx = mods.ctx
    with ctx.guard:
        ours = set(ctx.adapter_layers)
        merged = len([n for n, m in lora_layers(model) if n in ours and m.merged]) + ctx.merged_adapters
        if merged:
            raise InputError(
                f"cannot unpatch: the LoRA adapters FlashAR added are merged into {merged} layer(s) of this "
                "model (by an export, or peft's merge), so the original weights are gone; load the original "
                "model again instead"
            )
        remove_lora(model, ours)
        ctx.runner.unbind(ctx)
        # By id on the layer itself (not a stored handle): a deep copy's handle would point at
        # the original layer's hook table.
        layer = ctx.layers[ctx.branch_index]
        layer._forward_pre_hooks.pop(ctx.hook_id, None)
        layer._forward_pre_hooks_with_kwargs.pop(ctx.hook_id, None)
        del model._modules["flashar"]
        if ctx.had_generate:
            model.generate = ctx.old_generate
        else:
            model.__dict__.pop("generate", None)
        mods.ctx = None
        ctx.guard.closed = True
    return model
