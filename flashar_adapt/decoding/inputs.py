"""What decoding and teacher forcing take in: checked conditions and codes, the prefix they
become (condition, then forced meta tokens), and the grid with the positions it needs."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..context import PatchContext, check_not_meta
from ..errors import InputError
from ..grid import Layout

MODES = ("two_way", "raster")


@dataclass
class Prefix:
    embeds: torch.Tensor  # [B, P, d]: condition then forced meta tokens
    valid: torch.Tensor  # [B, P] bool: False on left padding
    n_pad: torch.Tensor  # [B]
    guided: bool = False  # the rows are [cond; uncond]: B is twice the number of images

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def batch(self) -> int:
        """Images the prefix is for (half its rows when guided)."""
        rows = self.embeds.shape[0]
        return rows // 2 if self.guided else rows


def embed_ids(ctx: PatchContext, ids: torch.Tensor) -> torch.Tensor:
    """Embeddings of vocabulary ids (forced meta and end-of-line tokens)."""
    return ctx.embed(ids)


def embed_codes(ctx: PatchContext, codes: torch.Tensor) -> torch.Tensor:
    """Embeddings of codebook indices (through the image embedding chain, or the token
    embedding at the visual id offset)."""
    if ctx.image_embed:
        x = codes
        for mod in ctx.image_embed:
            x = mod(x)
        return x
    return ctx.embed(codes + ctx.recipe.image.visual_token_offset)


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def feature_width(ctx: PatchContext) -> int | None:
    """Channels a feature condition must have: the unconditional features' width, else the
    input width of the first linear layer of the condition embedding (None if neither)."""
    if ctx.uncond_features is not None:
        return int(ctx.uncond_features.shape[-1])
    lin = next((m for m in ctx.cond_embed.modules() if isinstance(m, torch.nn.Linear)), None)
    return None if lin is None else lin.in_features


def _check_features(ctx: PatchContext, cond: torch.Tensor) -> torch.Tensor:
    c = ctx.recipe.condition
    if not cond.is_floating_point() or cond.dim() != 3:
        raise InputError(
            f"cond must be a FloatTensor [B, T, C] of condition features, got {cond.dtype} {tuple(cond.shape)}"
        )
    if cond.shape[0] == 0:
        raise InputError("cond is empty: pass at least one condition")
    if cond.shape[1] != c.prefix_len:
        raise InputError(f"condition features must have {c.prefix_len} tokens, got {cond.shape[1]}")
    width = feature_width(ctx)
    if width is not None and cond.shape[2] != width:
        raise InputError(f"condition features must have {width} channels for this model, got {cond.shape[2]}")
    if not bool(torch.isfinite(cond).all()):
        raise InputError("condition features contain NaN or inf")
    # any float dtype is accepted: the features enter the model in its own dtype
    ref = next(ctx.cond_embed.parameters(), None)
    return cond if ref is None else cond.to(ref.dtype)


def _check_mask(c, cond: torch.Tensor, cond_mask, dev, name: str = "cond_mask") -> torch.Tensor | None:
    if cond_mask is None:
        return None
    if c.kind == "class":
        raise InputError(f"{name} is only for prompt conditions")
    cond_mask = torch.as_tensor(cond_mask)
    if cond_mask.dtype != torch.bool and not bool(((cond_mask == 0) | (cond_mask == 1)).all()):
        raise InputError(f"{name} must hold only 0/1 (or False/True)")
    cond_mask = cond_mask.to(dev).bool()
    if cond_mask.shape != cond.shape[:2]:
        raise InputError(f"{name} must have shape {tuple(cond.shape[:2])}, got {tuple(cond_mask.shape)}")
    if not bool(cond_mask.any(1).all()):
        raise InputError(
            f"every {'prompt' if name == 'cond_mask' else 'negative prompt'} needs at least one unmasked token"
        )
    # Prompts are left-padded (the image follows the last prompt token): a row must be
    # False...False True...True. Right or inner padding would put pad tokens in the prefix.
    if bool((cond_mask[:, :-1] & ~cond_mask[:, 1:]).any()):
        raise InputError(f"{name} must be left padding (False... then True...): pad prompts on the left")
    return cond_mask


def _check_prompt(ctx: PatchContext, ids: torch.Tensor, name: str, shape: str) -> torch.Tensor:
    """Prompt token ids [B, T] (a condition or a negative prompt): integers in the vocabulary,
    at most ``condition.prefix_len`` of them."""
    c = ctx.recipe.condition
    if not _is_int(ids) or ids.dim() != 2:
        raise InputError(
            f"{name} must be a LongTensor {shape} of prompt token ids for this recipe, "
            f"got {ids.dtype} {tuple(ids.shape)}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InputError(f"{name} is empty: pass at least one prompt token per row")
    if ctx.vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= ctx.vocab_size):
        raise InputError(f"{'prompt' if name == 'cond' else name} token ids must be in [0, {ctx.vocab_size})")
    if c.prefix_len is not None and ids.shape[1] > c.prefix_len:
        what = "prompt" if name == "cond" else f"{name} prompt"
        raise InputError(f"{what} has {ids.shape[1]} tokens; this recipe allows at most {c.prefix_len}")
    return ids.long()


def _check_flashar_follows(ctx: PatchContext) -> None:
    """The FlashAR modules are part of the model: moved or cast on their own (model.flashar.half())
    they fail deep inside a matrix product."""
    # the branch's first weight against that of the layer it copies: the same dtype and device
    # wherever the layer lives (a model spread over devices, modules kept in float32)
    mine = next(ctx.flashar.branch_layers.parameters(), None)
    theirs = next(ctx.layers[ctx.branch_index].parameters(), None)
    if mine is not None and theirs is not None and (mine.dtype, mine.device) != (theirs.dtype, theirs.device):
        raise InputError(
            f"the FlashAR modules are {mine.dtype} on {mine.device}, the model {theirs.dtype} on "
            f"{theirs.device}: move or cast the whole model (model.to(...)), the modules are part of it"
        )


def check_cond(
    ctx: PatchContext, cond, cond_mask=None, allow_null: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a condition batch before any compute; return (cond, mask) on the model's device.
    ``allow_null`` admits the null class (training with condition dropout, unconditional scoring)."""
    c = ctx.recipe.condition
    dev = ctx.device()
    if dev.type == "meta":
        check_not_meta(ctx.model)
    if isinstance(cond, torch.Tensor) and cond.is_meta:
        raise InputError("cond is on the meta device (a shape, no values): pass the ids themselves")
    _check_flashar_follows(ctx)
    if not isinstance(cond, torch.Tensor):
        try:
            cond = torch.as_tensor(cond)
        except (ValueError, TypeError, RuntimeError):  # strings, ragged lists: not ids
            kind = "class ids [B]" if c.kind == "class" else "token ids [B, L]" if c.kind == "tokens" else "features"
            raise InputError(f"cond must be a tensor of {kind}, got {type(cond).__name__} that is not one") from None
    if c.kind == "class":
        if not _is_int(cond) or cond.dim() != 1:
            raise InputError(
                f"cond must be a LongTensor [B] of class ids for this recipe, got {cond.dtype} {tuple(cond.shape)}"
            )
        if cond.numel() == 0:
            raise InputError("cond is empty: pass at least one class id")
        top = c.null_class + 1 if allow_null and c.null_class is not None else c.num_classes
        if int(cond.min()) < 0 or int(cond.max()) >= top:
            raise InputError(f"class ids must be in [0, {top}), got min {int(cond.min())} max {int(cond.max())}")
        cond = cond.long()
    elif c.kind == "tokens":
        cond = _check_prompt(ctx, cond, "cond", "[B, T]")
    else:
        cond = _check_features(ctx, cond)
    return cond.to(dev), _check_mask(c, cond, cond_mask, dev)


@dataclass
class Negative:
    """A checked negative prompt: the unconditional branch's token ids for one call."""

    ids: torch.Tensor  # [B, T] on the model's device, one row per image
    valid: torch.Tensor  # [B, T] bool: False on left padding


def check_negative(ctx: PatchContext, negative, negative_mask, batch: int, guided: bool) -> Negative | None:
    """Validate a negative prompt like a prompt: ids [T] (or [1, T]) for the whole batch or
    [B, T] one per image, left-padded under ``negative_mask``; None when none is given. Only
    prompt recipes take one, and only with guidance (it is the unconditional branch)."""
    if negative is None:
        if negative_mask is not None:
            raise InputError("negative_mask was given without negative")
        return None
    c = ctx.recipe.condition
    if c.kind != "tokens":
        raise InputError(
            f"negative prompts are token ids, but recipe {ctx.recipe.name!r} is conditioned on {c.kind} "
            "(condition.kind); drop negative"
        )
    if not guided:
        raise InputError("a negative prompt acts only through classifier-free guidance: pass cfg_scale != 1")
    try:
        ids = negative if isinstance(negative, torch.Tensor) else torch.as_tensor(negative)
    except (TypeError, ValueError, RuntimeError):  # ragged rows, strings
        raise InputError(
            "negative must be token ids [T] or [B, T] (rows of one length: pad on the left under negative_mask)"
        ) from None
    if ids.dim() == 1:  # one negative prompt for the batch
        ids = ids[None]
        if negative_mask is not None:
            negative_mask = torch.as_tensor(negative_mask)[None]
    ids = _check_prompt(ctx, ids, "negative", "[T] or [B, T]")
    dev = ctx.device()
    mask = _check_mask(c, ids, negative_mask, dev, "negative_mask")
    if ids.shape[0] not in (1, batch):
        raise InputError(f"negative must have 1 or {batch} rows (one per image), got {ids.shape[0]}")
    ids = ids.to(dev).expand(batch, -1)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.expand(batch, -1)
    return Negative(ids, valid)


def check_codes(ctx: PatchContext, codes, batch: int) -> torch.Tensor:
    """Codebook indices [B, H, W] of any integer dtype (ShardWriter stores int16), as int64
    on the model's device."""
    if not isinstance(codes, torch.Tensor):
        codes = torch.as_tensor(codes)
    if not _is_int(codes):
        raise InputError(f"codes must be an integer tensor of codebook indices, got {codes.dtype}")
    if codes.dim() != 3 or codes.shape[0] != batch:
        raise InputError(f"codes must be [B, H, W] with B = {batch}, got {tuple(codes.shape)}")
    K = ctx.recipe.image.codebook_size
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
        raise InputError(
            f"codes must be codebook indices in [0, {K}), got min {int(codes.min())} max {int(codes.max())}"
        )
    return codes.to(ctx.device(), torch.long)


def check_preview(ctx: PatchContext, preview, batch: int, grid: tuple[int, int]) -> torch.Tensor | None:
    """The preview codes [B, h, w] a recipe with a preview grid conditions ``grid`` on, checked;
    None when the recipe has no preview (then ``preview`` must be None too)."""
    want = ctx.preview_grid(grid)
    if want is None:
        if preview is not None:
            raise InputError(f"recipe {ctx.recipe.name!r} decodes no preview grid: pass no preview codes")
        return None
    if preview is None:
        raise InputError(
            f"recipe {ctx.recipe.name!r} conditions the {grid[0]}x{grid[1]} grid on a {want[0]}x{want[1]} "
            "preview grid: pass its codes as preview= [B, h, w]"
        )
    preview = check_codes(ctx, preview, batch)
    if tuple(preview.shape[1:]) != want:
        raise InputError(f"preview codes must be [B, {want[0]}, {want[1]}] for a {grid[0]}x{grid[1]} grid")
    return preview


def with_grid(ctx: PatchContext, pre: Prefix, codes: torch.Tensor) -> Prefix:
    """``pre`` followed by the cells of a decoded grid ``codes`` [B, h, w] (a preview the next
    grid is conditioned on), in raster order: the prefix of the next grid."""
    e = embed_codes(ctx, codes.flatten(1)).to(pre.embeds.dtype)
    if pre.guided:
        e = torch.cat([e, e])
    valid = torch.cat([pre.valid, pre.valid.new_ones(e.shape[:2])], 1)
    return Prefix(torch.cat([pre.embeds, e], 1), valid, pre.n_pad, pre.guided)


def check_step_codes(ctx: PatchContext, codes, t: int, shape: tuple[int, int], device) -> torch.Tensor:
    """Codes a caller forces at step ``t`` instead of sampling: integers [B, n] in the codebook."""
    codes = torch.as_tensor(codes)
    K = ctx.recipe.image.codebook_size
    if not _is_int(codes) or tuple(codes.shape) != shape:
        raise InputError(
            f"codes for step {t} must be an integer tensor [{shape[0]}, {shape[1]}], "
            f"got {codes.dtype} {tuple(codes.shape)}"
        )
    if int(codes.min()) < 0 or int(codes.max()) >= K:
        raise InputError(f"codes must be codebook indices in [0, {K})")
    return codes.to(device, torch.long)


def check_mode(mode) -> None:
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")


def grid_shape(grid) -> tuple[int, int]:
    """``grid`` as (H, W), two positive integers, or an ``InputError``."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        raise InputError(f"grid must be two positive integers (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


def check_grid(ctx: PatchContext, grid) -> tuple[int, int]:
    """The grid to decode: the recipe's (None), or (H, W) where the recipe allows other sizes."""
    im = ctx.recipe.image
    if grid is None:
        return im.grid
    grid = grid_shape(grid)
    if grid != im.grid and not im.variable_grid:
        raise InputError(f"recipe {ctx.recipe.name!r} has a fixed grid {list(im.grid)}; got {list(grid)}")
    return grid


def check_positions(ctx: PatchContext, layout: Layout) -> None:
    """Refuse a layout that feeds more tokens than the model has positions."""
    limit = ctx.runner.max_positions(ctx)
    if limit is not None and layout.fed_len > limit:
        raise InputError(
            f"grid {layout.height}x{layout.width} with a {layout.prefix_len}-token prefix feeds "
            f"{layout.fed_len} tokens; the model has {limit} positions"
        )


@contextmanager
def eval_behaviour(model: torch.nn.Module):
    """Run ``model`` as in eval mode (no dropout, no drop-path), then restore every module's
    own train/eval flag exactly (a model may be partly in train mode)."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def has_uncond(ctx: PatchContext, negative: Negative | None = None) -> bool:
    """Whether CFG has an unconditional branch: the recipe's (condition.uncond), or the
    negative prompt given for the call."""
    return negative is not None or ctx.recipe.condition.uncond != "none"


# ---------------------------------------------------------------- the prefix


def condition_prefix(
    ctx: PatchContext,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None,
    grid,
    uncond: bool,
    negative: Negative | None = None,
) -> Prefix:
    """The prefix of a checked condition batch: its conditional rows, or with ``uncond`` the
    unconditional ones (null class, unconditional features or prompt; the ``negative``
    prompt where one is given). The forced ``image.before`` tokens follow the unconditional
    rows only where ``condition.uncond_before`` says so."""
    c = ctx.recipe.condition
    B = cond.shape[0]
    dev = cond.device
    if c.kind == "class":
        ids = torch.full_like(cond, c.null_class) if uncond else cond
        emb = ctx.cond_embed(ids)
        if emb.dim() == 2:
            emb = emb[:, None]
        emb = emb[:, : c.prefix_len]
        valid = torch.ones(B, emb.shape[1], dtype=torch.bool, device=dev)
    elif c.kind == "features":
        feats = cond
        if uncond:
            feats = ctx.uncond_features.to(cond.dtype)[None].expand(B, -1, -1)
        emb = ctx.cond_embed(feats)
        valid = cond_mask if cond_mask is not None else torch.ones(B, emb.shape[1], dtype=torch.bool, device=dev)
    else:
        valid = cond_mask if cond_mask is not None else torch.ones_like(cond, dtype=torch.bool)
        ids = cond
        if uncond and negative is not None:
            ids, valid = negative.ids, negative.valid
        elif uncond:
            ids = _uncond_prompt(ctx, cond, valid)
            if c.uncond == "ids":
                valid = ids != -1
                ids = ids.clamp(min=0)
        emb = (ctx.cond_embed or ctx.embed)(ids)
    meta = ctx.meta_ids(grid) if c.uncond_before or not uncond else []
    if meta:
        m = embed_ids(ctx, torch.tensor(meta, device=dev))[None].expand(B, -1, -1).to(emb.dtype)
        emb = torch.cat([emb, m], 1)
        valid = torch.cat([valid, torch.ones(B, len(meta), dtype=torch.bool, device=dev)], 1)
    n_pad = (~valid).sum(1)
    return Prefix(emb, valid, n_pad)


def _uncond_prompt(ctx: PatchContext, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    c = ctx.recipe.condition
    if c.uncond == "pad_inner":
        # Keep the first and last real token (BOS, and the image-start marker), pad the rest.
        out = cond.clone()
        first = (~valid).sum(1)
        T = cond.shape[1]
        pos = torch.arange(T, device=cond.device)[None]
        inner = (pos > first[:, None]) & (pos < T - 1)
        return out.masked_fill(inner, c.pad_id)
    # "ids": a fixed unconditional prompt, left-padded to the prompt width (-1 marks padding)
    ids = torch.tensor(c.uncond_ids, device=cond.device)
    T = max(cond.shape[1], len(ids))
    out = torch.full((cond.shape[0], T), -1, dtype=cond.dtype, device=cond.device)
    out[:, T - len(ids) :] = ids
    return out


def _stack_guided(a: Prefix, b: Prefix) -> Prefix:
    """Stack [cond; uncond] prefixes, left-padding the shorter one."""
    P = max(a.length, b.length)

    def pad(p: Prefix):
        extra = P - p.length
        if extra == 0:
            return p.embeds, p.valid
        e = torch.cat([p.embeds.new_zeros(p.embeds.shape[0], extra, p.embeds.shape[2]), p.embeds], 1)
        v = torch.cat([p.valid.new_zeros(p.valid.shape[0], extra), p.valid], 1)
        return e, v

    ea, va = pad(a)
    eb, vb = pad(b)
    valid = torch.cat([va, vb])
    return Prefix(torch.cat([ea, eb]), valid, (~valid).sum(1), guided=True)


def build_prefix(
    ctx: PatchContext, cond: torch.Tensor, cond_mask, grid, guided: bool, negative: Negative | None = None
) -> Prefix:
    """The prefix embeddings of a checked condition batch; ``guided`` (classifier-free
    guidance) stacks the unconditional prefixes below ([cond; uncond], left-padded to one
    length), built from the checked ``negative`` prompt where one is given."""
    p = condition_prefix(ctx, cond, cond_mask, grid, uncond=False)
    if guided:
        p = _stack_guided(p, condition_prefix(ctx, cond, cond_mask, grid, uncond=True, negative=negative))
    return p
