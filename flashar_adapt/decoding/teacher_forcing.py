"""Teacher forcing: one forward over a whole known image, its next-token logits (guided
with CFG) and the exact log-likelihood of the codes under a mode's factorisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import PatchContext, context
from ..errors import InputError
from ..grid import Layout
from ..sampling import Sampling
from .forward import backbone_forward, horizontal_logits, positions
from .inputs import (
    Prefix,
    check_codes,
    check_cond,
    check_grid,
    check_mode,
    check_negative,
    check_positions,
    check_preview,
    condition_prefix,
    embed_codes,
    embed_ids,
    eval_behaviour,
    has_uncond,
    with_grid,
)


@dataclass
class TeacherForced:
    fused: torch.Tensor  # [B, H, W, K]
    horizontal: torch.Tensor
    vertical: torch.Tensor | None
    gate: torch.Tensor | None  # [B, H, W]
    layout: Layout


def teacher_forward(
    model,
    cond,
    codes: torch.Tensor,
    mode: str = "two_way",
    cond_mask=None,
    uncond: bool = False,
    grid=None,
    negative=None,
    negative_mask=None,
    preview=None,
) -> TeacherForced:
    """One forward over the whole raster sequence (with grads if enabled), in the model's
    current train/eval mode (training wants its dropout).

    two_way: proximity mask, fused logits; raster: causal mask, the model's own head.
    ``uncond``: the unconditional prefix, from the ``negative`` prompt where one is given.
    ``preview`` [B, h, w]: the preview grid's codes, for a recipe that decodes one before the
    main grid (they end the prefix; their own logits are not returned)."""
    ctx = context(model)
    if not isinstance(uncond, bool):
        raise InputError(f"uncond must be True or False, got {uncond!r}")
    if negative is not None and not uncond:
        raise InputError("negative is the unconditional prefix: pass uncond=True with it")
    inputs = _teacher_inputs(
        ctx, cond, codes, mode, cond_mask, uncond, grid, preview=preview, negative=negative, negative_mask=negative_mask
    )
    with ctx.guard:
        return _teacher_forward(ctx, *inputs, mode)


def _teacher_inputs(
    ctx: PatchContext,
    cond,
    codes,
    mode: str,
    cond_mask,
    uncond: bool,
    grid,
    preview=None,
    negative=None,
    negative_mask=None,
):
    """Checked (prefix, layout, codes) for a teacher-forced forward."""
    check_mode(mode)
    cond, cond_mask = check_cond(ctx, cond, cond_mask, allow_null=True)
    neg = check_negative(ctx, negative, negative_mask, cond.shape[0], guided=True)
    codes = check_codes(ctx, codes, cond.shape[0])
    grid = tuple(codes.shape[1:]) if grid is None else grid
    grid = check_grid(ctx, tuple(int(g) for g in grid))
    preview = check_preview(ctx, preview, cond.shape[0], grid)
    pre = condition_prefix(ctx, cond, cond_mask, grid, uncond=uncond, negative=neg)
    before = ()
    if preview is not None:
        pre, before = with_grid(ctx, pre, preview), (tuple(preview.shape[1:]),)
    layout = ctx.layout(pre.length, grid, before)
    check_positions(ctx, layout)
    return pre, layout, codes


def sequence_embeds(ctx: PatchContext, pre: Prefix, layout: Layout, codes: torch.Tensor) -> torch.Tensor:
    """[B, fed_len, d]: the prefix, then the codes row by row with their end-of-line tokens, up
    to the last token ever fed (the last code, and a trailing end-of-line, predict nothing)."""
    B, H, W = codes.shape
    img = embed_codes(ctx, codes).to(pre.embeds.dtype)  # [B, H, W, d]
    if layout.eol:
        e = embed_ids(ctx, torch.tensor([ctx.recipe.image.eol_token], device=img.device))
        img = torch.cat([img, e.to(img.dtype).view(1, 1, 1, -1).expand(B, H, 1, -1)], 2)
    return torch.cat([pre.embeds, img.reshape(B, -1, img.shape[-1])], 1)[:, : layout.fed_len]


def _teacher_forward(ctx: PatchContext, pre: Prefix, layout: Layout, codes: torch.Tensor, mode: str) -> TeacherForced:
    B, H, W = codes.shape
    embeds = sequence_embeds(ctx, pre, layout, codes)
    dev = embeds.device
    L = layout.fed_len
    slots = torch.arange(L, device=dev)
    valid = torch.cat([pre.valid, torch.ones(B, L - pre.length, dtype=torch.bool, device=dev)], 1)
    allowed = layout.attention(mode)[:L, :L].to(dev)[None] & valid[:, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=dev)[None]
    two = mode == "two_way"
    hh, hv = backbone_forward(
        ctx, embeds, positions(layout, slots, pre.n_pad), slots, slots, allowed, None, None, branch=two
    )
    h_src, v_src, has_h, has_v = (t.to(dev) for t in layout.sources())
    h_in = hh[:, h_src.flatten()].view(B, H, W, -1)
    if not two:
        lh = horizontal_logits(ctx, h_in).float()
        return TeacherForced(lh, lh, None, None, layout)
    v_in = hv[:, v_src.flatten()].view(B, H, W, -1)
    f = ctx.flashar.fuse(h_in, v_in, has_h, has_v, lambda x: horizontal_logits(ctx, x))
    return TeacherForced(f.fused, f.horizontal, f.vertical, f.gate, layout)


@torch.no_grad()
def logits(
    model,
    cond,
    codes: torch.Tensor,
    mode: str = "two_way",
    cond_mask=None,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    negative=None,
    negative_mask=None,
    preview=None,
) -> torch.Tensor:
    """Teacher-forced next-token logits [B, H, W, K] over the codebook, in one forward
    (two with CFG: the guided logits u + s * (c - u) that generate() samples from, the
    unconditional branch from ``negative`` where given, as in generate()).
    Runs the model in eval behaviour, like generate(). ``preview``: as in ``teacher_forward``."""
    s = Sampling(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)
    ctx = context(model)
    if not s.guided:
        check_negative(ctx, negative, negative_mask, 1, guided=False)  # refuses a negative without guidance
    if s.guided and not has_uncond(ctx) and negative is None:
        raise InputError(f"cfg_scale={cfg_scale} needs an unconditional prefix; recipe {ctx.recipe.name!r} has none")
    cond_in = _teacher_inputs(ctx, cond, codes, mode, cond_mask, False, None, preview)
    uncond_in = (
        _teacher_inputs(ctx, cond, codes, mode, cond_mask, True, None, preview, negative, negative_mask)
        if s.guided
        else None
    )
    # the lock first, then eval: a call waiting on another thread's generate() must not run
    # with the train flags that call restores when it ends
    with ctx.guard, eval_behaviour(model):
        lg = _teacher_forward(ctx, *cond_in, mode).fused
        if not s.guided:
            return lg
        u = _teacher_forward(ctx, *uncond_in, mode).fused
    H, W = lg.shape[1:3]
    i = torch.arange(H, device=lg.device)[:, None]
    j = torch.arange(W, device=lg.device)[None, :]
    step, n = (i + j, H + W - 1) if mode == "two_way" else (i * W + j, H * W)
    scale = torch.tensor([[s.scale_at(int(t), n) for t in row] for row in step.tolist()], device=lg.device)[
        None, :, :, None
    ]
    return u + scale * (lg - u)


@torch.no_grad()
def score(model, cond, codes: torch.Tensor, mode: str = "two_way", cond_mask=None, preview=None) -> torch.Tensor:
    """Exact log-likelihood (nats) of ``codes`` under the mode's factorisation, [B] (given the
    ``preview`` codes, for a recipe with a preview grid)."""
    lg = logits(model, cond, codes, mode, cond_mask, preview=preview)
    idx = torch.as_tensor(codes).to(lg.device, torch.long)[..., None]
    lp = torch.log_softmax(lg.float(), -1).gather(-1, idx)[..., 0]
    return lp.flatten(1).sum(1)
