"""A training-free peer for the benchmarks: ZipAR-style next-set decoding of a raster model.

Row i starts once the row above is ``window`` tokens ahead, so at step t every active row
i decodes column t - i * window: (H - 1) * window + W serial steps. Each new token attends,
in raster order, to everything decoded before it (the raster model's own causal rule over
the tokens that exist). A token (i, j > 0) is predicted from its left neighbour's state as
usual; the first token of a row has no raster predecessor yet, so it is predicted from the
newest state of the row above (the approximation that makes the method training-free).
Uses only the backend interface of a patched model; the FlashAR modules are not used.
"""
from __future__ import annotations

import torch

from flashar_adapt.decoding import _build_prefix, _embed_codes, _guide, _horizontal, _positions, check_cond, sample
from flashar_adapt.patching import context


@torch.inference_mode()
def generate_zipar(model, cond, window: int, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, generator=None, count: list | None = None) -> torch.Tensor:
    ctx = context(model)
    if window < 1:
        raise ValueError("window must be >= 1")
    if ctx.recipe.eol:
        raise ValueError("this ZipAR peer handles grids without end-of-line tokens only")
    cond, _ = check_cond(ctx, cond)
    H, W = ctx.recipe.image.grid
    B = cond.shape[0]
    pre = _build_prefix(ctx, cond, None, (H, W), cfg_scale != 1.0)
    layout = ctx.layout(pre.length, (H, W))
    Bt, P, dev = pre.embeds.shape[0], pre.length, pre.embeds.device
    cache = ctx.backend.new_cache(ctx, Bt, layout.seq_len)
    key_slots = torch.arange(P, device=dev)
    allowed = torch.ones(P, P, dtype=torch.bool, device=dev).tril()[None].expand(Bt, -1, -1)
    h = ctx.backend.run(ctx, pre.embeds, _positions(key_slots, pre.n_pad), key_slots, key_slots, allowed, cache)
    if count is not None:
        count.append(1)
    last_state = {-1: h[:, -1]}  # newest state per row; row -1 = the prefix
    codes = torch.zeros(B, H, W, dtype=torch.long, device=dev)
    steps = (H - 1) * window + W
    fed: list[tuple[int, int]] = []
    for t in range(steps):
        if fed:
            slots = torch.tensor([layout.slot(i, j) for i, j in fed], device=dev)
            key_slots = torch.cat([key_slots, slots])
            allowed = (key_slots[None, :] <= slots[:, None])[None].expand(Bt, -1, -1)
            e = _embed_codes(ctx, torch.stack([codes[:, i, j] for i, j in fed], 1))
            e = torch.cat([e, e]) if Bt != B else e
            h = ctx.backend.run(ctx, e.to(pre.embeds.dtype), _positions(slots, pre.n_pad), slots, key_slots, allowed, cache)
            if count is not None:
                count.append(1)
            for k, (i, _) in enumerate(fed):
                last_state[i] = h[:, k]
        active = [(i, t - i * window) for i in range(H) if 0 <= t - i * window < W]
        states = torch.stack([last_state[i if j > 0 else i - 1] for i, j in active], 1)
        lg = _guide(_horizontal(ctx, states).float(), B, cfg_scale)
        tok = sample(lg.reshape(-1, lg.shape[-1]), temperature, top_k, top_p, generator).view(B, -1)
        for k, (i, j) in enumerate(active):
            codes[:, i, j] = tok[:, k]
        fed = active
    return codes
