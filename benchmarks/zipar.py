"""A training-free peer for the benchmarks: ZipAR-style next-set decoding of a raster model.

Row i starts once the row above is ``window`` tokens ahead, so at step t every active row
i decodes column t - i * window: (H - 1) * window + W serial steps. Each new token attends,
in raster order, to everything decoded before it (the raster model's own causal rule over
the tokens that exist). A token (i, j > 0) is predicted from its left neighbour's state as
usual; the first token of a row has no raster predecessor yet, so it is predicted from the
newest state of the row above (the approximation that makes the method training-free).
Built on the public decoding seam (``Decoder`` with its own feeding order, ``Sampling``);
the FlashAR modules are not used.
"""

from __future__ import annotations

import torch

from flashar_adapt import Sampling, context, sample
from flashar_adapt.decoding import Decoder, build_prefix, check_cond, embed_codes, eval_behaviour, horizontal_logits
from flashar_adapt.sampling import guide


def _feeding(H: int, W: int, window: int) -> list[list[tuple[int, int]]]:
    """The cells sampled at each step (and fed at the next)."""
    return [[(i, t - i * window) for i in range(H) if 0 <= t - i * window < W] for t in range((H - 1) * window + W)]


def generate_zipar(
    model,
    cond,
    window: int,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator=None,
    count: list | None = None,
) -> torch.Tensor:
    ctx = context(model)
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if ctx.recipe.eol:
        raise ValueError("this ZipAR peer handles grids without end-of-line tokens only")
    s = Sampling(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    with ctx.guard, eval_behaviour(model), torch.inference_mode():
        return _decode(ctx, cond, window, s, count)


def _decode(ctx, cond, window: int, s: Sampling, count: list | None) -> torch.Tensor:
    cond, _ = check_cond(ctx, cond)
    H, W = ctx.recipe.image.grid
    B = cond.shape[0]
    pre = build_prefix(ctx, cond, None, (H, W), s.guided)
    layout = ctx.layout(pre.length, (H, W))
    Bt, P, dev = pre.embeds.shape[0], pre.length, pre.embeds.device
    steps = _feeding(H, W, window)
    order = list(range(P)) + [layout.slot(i, j) for cells in steps for i, j in cells]
    order_t = torch.tensor(order, device=dev)
    dec = Decoder(ctx, pre, layout, order_t, branch=False)
    h = dec.prefill()[0]
    if count is not None:
        count.append(1)
    last_state = {-1: h[:, -1]}  # newest state per row; row -1 = the prefix
    codes = torch.zeros(B, H, W, dtype=torch.long, device=dev)
    start = P
    for t, active in enumerate(steps):
        if t > 0:
            fed = steps[t - 1]
            stop = start + len(fed)
            # raster-causal among the tokens that exist: key slot <= query slot
            allowed = (order_t[None, :stop] <= order_t[start:stop, None])[None].expand(Bt, -1, -1)
            e = embed_codes(ctx, torch.stack([codes[:, i, j] for i, j in fed], 1))
            h = dec.feed(torch.cat([e, e]) if Bt != B else e, start, stop, allowed=allowed)[0]
            if count is not None:
                count.append(1)
            for k, (i, _) in enumerate(fed):
                last_state[i] = h[:, k]
            start = stop
        states = torch.stack([last_state[i if j > 0 else i - 1] for i, j in active], 1)
        lg = guide(horizontal_logits(ctx, states).float(), B, s.cfg_scale)
        tok = sample(lg.reshape(-1, lg.shape[-1]), s).view(B, -1)
        for k, (i, j) in enumerate(active):
            codes[:, i, j] = tok[:, k]
    return codes
