"""One forward of the backbone (and the vertical branch), and the logits it yields: what
teacher forcing, the decoder's caches and every decoding step run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..context import CAPTURE, PatchContext
from ..grid import Layout
from ..heads import finish_logits, visual_rows


def horizontal_logits(ctx: PatchContext, h: torch.Tensor) -> torch.Tensor:
    """The model's own head, restricted to the visual vocabulary (never the text logits)."""
    off = 0 if ctx.image_embed else ctx.recipe.image.visual_token_offset
    rows = visual_rows(ctx.head, off, ctx.recipe.image.codebook_size)
    out = ctx.head(h) if rows is None else F.linear(h, *rows)
    return finish_logits(out, ctx.recipe.logits.scale, ctx.recipe.logits.softcap)


def positions(layout: Layout, slots: torch.Tensor, n_pad: torch.Tensor) -> torch.Tensor:
    """Position ids of sequence ``slots`` [T] by the layout's rule, each row's left padding
    removed: [B, T], or [A, B, T] for a rule with A axes (``Layout.position_ids``). The one
    place decoding (eager and compiled) and teacher forcing get positions from."""
    return layout.position_ids(slots, n_pad)


def backbone_forward(
    ctx: PatchContext,
    embeds,
    positions,
    slots,
    key_slots,
    allowed,
    cache,
    branch_cache,
    branch: bool,
    entries: torch.Tensor | None = None,
):
    """Backbone forward; with ``branch`` also the vertical branch from the captured inputs
    of the branch layer. Returns (final normed hidden, normed branch hidden or None).
    ``entries`` (static caches only): the cache entries the new tokens are written to."""
    static = {} if entries is None else {"entries": entries}  # runners without static caches never see it
    if branch and cache is not None and ctx.runner.fused_branch:
        h, x = ctx.runner.run_with_branch(
            ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, **static
        )
        return h, ctx.flashar.branch_norm(x)
    if not branch:
        return ctx.runner.run(ctx, embeds, positions, slots, key_slots, allowed, cache, **static), None
    h, x = run_then_branch(ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries)
    return h, ctx.flashar.branch_norm(x)


def run_then_branch(
    ctx: PatchContext,
    embeds,
    positions,
    slots,
    key_slots,
    allowed,
    cache,
    branch_cache,
    entries: torch.Tensor | None = None,
):
    """The generic backbone and branch pass: the runner's ``run`` with the branch layer's
    inputs captured, then ``branch_call`` for each branch layer on them. Returns (final
    normed hidden, un-normed branch output), as ``Runner.run_with_branch`` does: a runner
    whose own fused pass does not apply to a call runs this instead."""
    static = {} if entries is None else {"entries": entries}
    CAPTURE.layer = ctx.layers[ctx.branch_index]
    CAPTURE.captured = None
    try:
        h = ctx.runner.run(ctx, embeds, positions, slots, key_slots, allowed, cache, **static)
        captured = CAPTURE.captured
    finally:
        CAPTURE.layer = CAPTURE.captured = None
    if captured is None:
        raise RuntimeError(
            "the branch layer was not called during the backbone forward; check modules.layers / the runner"
        )
    args, kwargs = captured
    x = args[0] if args else kwargs["hidden_states"]
    for layer in ctx.flashar.branch_layers:
        x = ctx.runner.branch_call(layer, x, args, kwargs, branch_cache)
    return h, x


def cell_logits(
    ctx: PatchContext,
    hh: torch.Tensor,
    hv: torch.Tensor | None,
    h_idx,
    v_idx,
    has_h: torch.Tensor,
    has_v: torch.Tensor,
    vertical: bool,
) -> torch.Tensor:
    """Logits of the cells a step samples from the fed tokens' hidden states (``h_idx`` /
    ``v_idx``: which fed token predicts each cell): the fused horizontal and vertical heads,
    or (``vertical=False``, raster) the horizontal head alone."""
    if vertical:
        return ctx.flashar.fuse(hh[:, h_idx], hv[:, v_idx], has_h, has_v, lambda x: horizontal_logits(ctx, x)).fused
    return horizontal_logits(ctx, hh[:, h_idx]).float()
