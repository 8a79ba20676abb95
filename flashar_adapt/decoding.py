"""Teacher-forced logits, exact scores, and the two decoders (anti-diagonal and raster).

Both decoders and the teacher-forced pass share ``_prefix``, ``_embed_step``, ``_forward``
and ``FlashARModules.fuse``, so incremental decoding equals teacher forcing by construction
(and the tests check it does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .grid import Layout
from .heads import finish_logits
from .patching import PatchContext, context

MODES = ("two_way", "raster")


# ---------------------------------------------------------------- inputs

@dataclass
class Prefix:
    embeds: torch.Tensor  # [B, P, d]: condition then forced meta tokens
    valid: torch.Tensor  # [B, P] bool: False on left padding
    n_pad: torch.Tensor  # [B]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


def _device(ctx: PatchContext) -> torch.device:
    return next(ctx.layers.parameters()).device


def _embed_ids(ctx: PatchContext, ids: torch.Tensor) -> torch.Tensor:
    return ctx.embed(ids)


def _embed_codes(ctx: PatchContext, codes: torch.Tensor) -> torch.Tensor:
    if ctx.image_embed:
        x = codes
        for mod in ctx.image_embed:
            x = mod(x)
        return x
    return ctx.embed(codes + ctx.recipe.image.visual_token_offset)


def check_cond(ctx: PatchContext, cond, cond_mask=None, allow_null: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a condition batch before any compute; return (cond, mask) on the model's device.
    ``allow_null`` admits the null class (training with condition dropout, unconditional scoring)."""
    c = ctx.recipe.condition
    dev = _device(ctx)
    if not isinstance(cond, torch.Tensor):
        cond = torch.as_tensor(cond)
    if c.kind == "class":
        if cond.dtype not in (torch.int64, torch.int32) or cond.dim() != 1:
            raise ValueError(f"cond must be a LongTensor [B] of class ids for this recipe, got {cond.dtype} {tuple(cond.shape)}")
        if cond.numel() == 0:
            raise ValueError("cond is empty: pass at least one class id")
        top = c.null_class + 1 if allow_null and c.null_class is not None else c.num_classes
        if int(cond.min()) < 0 or int(cond.max()) >= top:
            raise ValueError(f"class ids must be in [0, {top}), got min {int(cond.min())} max {int(cond.max())}")
    elif c.kind == "tokens":
        if cond.dtype not in (torch.int64, torch.int32) or cond.dim() != 2:
            raise ValueError(f"cond must be a LongTensor [B, T] of prompt token ids for this recipe, got {cond.dtype} {tuple(cond.shape)}")
        if cond.shape[0] == 0 or cond.shape[1] == 0:
            raise ValueError("cond is empty: pass at least one prompt token per row")
        if ctx.vocab_size is not None and (int(cond.min()) < 0 or int(cond.max()) >= ctx.vocab_size):
            raise ValueError(f"prompt token ids must be in [0, {ctx.vocab_size})")
        if c.prefix_len is not None and cond.shape[1] > c.prefix_len:
            raise ValueError(f"prompt has {cond.shape[1]} tokens; this recipe allows at most {c.prefix_len}")
    else:
        if not cond.is_floating_point() or cond.dim() != 3:
            raise ValueError(f"cond must be a FloatTensor [B, T, C] of condition features, got {cond.dtype} {tuple(cond.shape)}")
        if cond.shape[1] != c.prefix_len:
            raise ValueError(f"condition features must have {c.prefix_len} tokens, got {cond.shape[1]}")
    if cond_mask is not None:
        cond_mask = torch.as_tensor(cond_mask).to(dev).bool()
        if cond_mask.shape != cond.shape[:2]:
            raise ValueError(f"cond_mask must have shape {tuple(cond.shape[:2])}, got {tuple(cond_mask.shape)}")
        if c.kind == "class":
            raise ValueError("cond_mask is only for prompt conditions")
        if not bool(cond_mask.any(1).all()):
            raise ValueError("every prompt needs at least one unmasked token")
    return cond.to(dev), cond_mask


def has_uncond(ctx: PatchContext) -> bool:
    return ctx.recipe.condition.uncond != "none"


def _prefix(ctx: PatchContext, cond: torch.Tensor, cond_mask: torch.Tensor | None, grid, uncond: bool) -> Prefix:
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
        if uncond:
            ids = _uncond_prompt(ctx, cond, valid)
            if c.uncond == "ids":
                valid = ids != -1
                ids = ids.clamp(min=0)
        emb = (ctx.cond_embed or ctx.embed)(ids)
    meta = ctx.meta_ids(grid)
    if meta:
        m = _embed_ids(ctx, torch.tensor(meta, device=dev))[None].expand(B, -1, -1).to(emb.dtype)
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
    out[:, T - len(ids):] = ids
    return out


def _pad_prefixes(a: Prefix, b: Prefix) -> Prefix:
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
    return Prefix(torch.cat([ea, eb]), valid, (~valid).sum(1))


def _build_prefix(ctx, cond, cond_mask, grid, cfg: bool) -> Prefix:
    p = _prefix(ctx, cond, cond_mask, grid, uncond=False)
    if cfg:
        p = _pad_prefixes(p, _prefix(ctx, cond, cond_mask, grid, uncond=True))
    return p


def _grid(ctx: PatchContext, grid) -> tuple[int, int]:
    im = ctx.recipe.image
    if grid is None:
        return im.grid
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be (H, W) with positive integers, got {grid!r}")
    grid = (int(grid[0]), int(grid[1]))
    if grid != im.grid and not im.variable_grid:
        raise ValueError(f"recipe {ctx.recipe.name!r} has a fixed grid {list(im.grid)}; got {list(grid)}")
    return grid


def _check_positions(ctx: PatchContext, layout: Layout) -> None:
    limit = ctx.backend.max_positions(ctx)
    if limit is not None and layout.fed_len > limit:
        raise ValueError(f"grid {layout.height}x{layout.width} with a {layout.prefix_len}-token prefix feeds "
                         f"{layout.fed_len} tokens; the model has {limit} positions")


# ---------------------------------------------------------------- one forward

def _horizontal(ctx: PatchContext, h: torch.Tensor) -> torch.Tensor:
    """The model's own head, restricted to the visual vocabulary (never the text logits)."""
    head = ctx.head
    K = ctx.recipe.image.codebook_size
    off = 0 if ctx.image_embed else ctx.recipe.image.visual_token_offset
    if isinstance(head, torch.nn.Linear) and (off or head.out_features != K):
        b = None if head.bias is None else head.bias[off:off + K]
        out = F.linear(h, head.weight[off:off + K], b)
    else:
        out = head(h)
    return finish_logits(out, ctx.recipe.logits.scale, ctx.recipe.logits.softcap)


def _forward(ctx: PatchContext, embeds, positions, slots, key_slots, allowed, cache, branch_cache, branch: bool):
    """Backbone forward; with ``branch`` also the vertical branch from the captured inputs
    of the branch layer. Returns (final normed hidden, normed branch hidden or None)."""
    if branch and cache is not None:
        fast = ctx.backend.run_with_branch(ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache)
        if fast is not None:
            return fast[0], ctx.flashar.branch_norm(fast[1])
    ctx.capturing = branch
    ctx.captured = None
    try:
        h = ctx.backend.run(ctx, embeds, positions, slots, key_slots, allowed, cache)
    finally:
        ctx.capturing = False
    if not branch:
        return h, None
    if ctx.captured is None:
        raise RuntimeError("the branch layer was not called during the backbone forward; check modules.layers / the backend")
    args, kwargs = ctx.captured
    ctx.captured = None
    x = args[0] if args else kwargs["hidden_states"]
    mods = ctx.flashar
    for layer in mods.branch_layers:
        x = ctx.backend.branch_call(layer, x, args, kwargs, branch_cache)
    return h, mods.branch_norm(x)


def _positions(slots: torch.Tensor, n_pad: torch.Tensor) -> torch.Tensor:
    return (slots[None, :] - n_pad[:, None]).clamp(min=0)


@dataclass
class TeacherForced:
    fused: torch.Tensor  # [B, H, W, K]
    horizontal: torch.Tensor
    vertical: torch.Tensor | None
    gate: torch.Tensor | None  # [B, H, W]
    layout: Layout


def teacher_forward(model, cond, codes: torch.Tensor, mode: str = "two_way", cond_mask=None, uncond: bool = False,
                    grid=None) -> TeacherForced:
    """One forward over the whole raster sequence (with grads if enabled).

    two_way: proximity mask, fused logits; raster: causal mask, the model's own head."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ctx = context(model)
    cond, cond_mask = check_cond(ctx, cond, cond_mask, allow_null=True)
    codes = codes.to(cond.device)
    if codes.dim() != 3 or codes.shape[0] != cond.shape[0]:
        raise ValueError(f"codes must be [B, H, W] with B = {cond.shape[0]}, got {tuple(codes.shape)}")
    grid = tuple(codes.shape[1:]) if grid is None else grid
    grid = _grid(ctx, tuple(int(g) for g in grid))
    K = ctx.recipe.image.codebook_size
    if int(codes.min()) < 0 or int(codes.max()) >= K:
        raise ValueError(f"codes must be codebook indices in [0, {K})")
    pre = _prefix(ctx, cond, cond_mask, grid, uncond=uncond)
    layout = ctx.layout(pre.length, grid)
    _check_positions(ctx, layout)
    B, H, W = codes.shape
    img = _embed_codes(ctx, codes).to(pre.embeds.dtype)  # [B, H, W, d]
    if layout.eol:
        e = _embed_ids(ctx, torch.tensor([ctx.recipe.image.eol_token], device=cond.device))
        img = torch.cat([img, e.to(img.dtype).view(1, 1, 1, -1).expand(B, H, 1, -1)], 2)
    # the last code (and a trailing end-of-line) predicts nothing: never fed, so no position
    L = layout.fed_len
    embeds = torch.cat([pre.embeds, img.reshape(B, -1, img.shape[-1])], 1)[:, :L]
    dev = embeds.device
    slots = torch.arange(L, device=dev)
    valid = torch.cat([pre.valid, torch.ones(B, L - pre.length, dtype=torch.bool, device=dev)], 1)
    allowed = layout.attention(mode)[:L, :L].to(dev)[None] & valid[:, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=dev)[None]
    positions = _positions(slots, pre.n_pad)
    two = mode == "two_way"
    hh, hv = _forward(ctx, embeds, positions, slots, slots, allowed, None, None, branch=two)
    h_src, v_src, has_h, has_v = (t.to(dev) for t in layout.sources())
    h_in = hh[:, h_src.flatten()].view(B, H, W, -1)
    if not two:
        lh = _horizontal(ctx, h_in).float()
        return TeacherForced(lh, lh, None, None, layout)
    v_in = hv[:, v_src.flatten()].view(B, H, W, -1)
    f = ctx.flashar.fuse(h_in, v_in, has_h, has_v, lambda x: _horizontal(ctx, x))
    return TeacherForced(f.fused, f.horizontal, f.vertical, f.gate, layout)


@torch.no_grad()
def logits(model, cond, codes: torch.Tensor, mode: str = "two_way", cond_mask=None, cfg_scale: float = 1.0,
           cfg_schedule: str = "constant") -> torch.Tensor:
    """Teacher-forced next-token logits [B, H, W, K] over the codebook, in one forward
    (two with CFG: the guided logits u + s * (c - u) that generate() samples from)."""
    lg = teacher_forward(model, cond, codes, mode, cond_mask).fused
    if cfg_scale == 1.0:
        return lg
    ctx = context(model)
    if not has_uncond(ctx):
        raise ValueError(f"cfg_scale={cfg_scale} needs an unconditional prefix; recipe {ctx.recipe.name!r} has none")
    u = teacher_forward(model, cond, codes, mode, cond_mask, uncond=True).fused
    H, W = codes.shape[1:]
    i = torch.arange(H, device=lg.device)[:, None]
    j = torch.arange(W, device=lg.device)[None, :]
    step, n = (i + j, H + W - 1) if mode == "two_way" else (i * W + j, H * W)
    scale = torch.tensor([[_scale_at(cfg_scale, cfg_schedule, int(t), n) for t in row] for row in step.tolist()],
                         device=lg.device)[None, :, :, None]
    return u + scale * (lg - u)


@torch.no_grad()
def score(model, cond, codes: torch.Tensor, mode: str = "two_way", cond_mask=None) -> torch.Tensor:
    """Exact log-likelihood (nats) of ``codes`` under the mode's factorisation, [B]."""
    lg = logits(model, cond, codes, mode, cond_mask)
    lp = torch.log_softmax(lg.float(), -1).gather(-1, codes.to(lg.device)[..., None])[..., 0]
    return lp.flatten(1).sum(1)


# ---------------------------------------------------------------- sampling

def check_sampling(cfg_scale, temperature, top_k, top_p, cfg_schedule) -> None:
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if cfg_schedule not in ("constant", "linear"):
        raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {cfg_schedule!r}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one index per row of ``logits`` [N, K]; greedy for top_k=1 or temperature=0."""
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > top_p  # keep the smallest set whose mass reaches top_p
        srt = srt.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt)
    probs = torch.softmax(x, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _guide(lg: torch.Tensor, B: int, scale: float) -> torch.Tensor:
    if lg.shape[0] == B:
        return lg
    c, u = lg[:B], lg[B:]
    return u + scale * (c - u)


def _scale_at(cfg_scale: float, schedule: str, step: int, n_steps: int) -> float:
    if schedule == "linear" and n_steps > 1:
        return 1.0 + (cfg_scale - 1.0) * step / (n_steps - 1)
    return cfg_scale


# ---------------------------------------------------------------- generation

# Decoding speed: everything that depends only on the layout (cache order of the keys, fed
# slots, source indices, sampled cells) is precomputed once per layout and device, the KV
# caches are static and filled in feeding order, so a step's keys are always a prefix of
# the cache and its mask a slice of one row per sequence; the loops allocate no masks and
# make no host-device sync beyond sampling.

def _index(idx: list[int], dev) -> torch.Tensor | slice:
    """A contiguous index list as a slice (a view when indexing), otherwise a tensor."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx, dtype=torch.long, device=dev)


@dataclass(frozen=True)
class _TwoWayStep:
    start: int  # cache length before feeding (keys order[:start] are cached)
    stop: int  # cache length after feeding
    cells: torch.Tensor  # [T] flat cell index (into codes [B, H*W]) of each fed token; eol -> 0
    eol: torch.Tensor | None  # [T] bool where the fed token is an end-of-line token, None if none is
    h_idx: torch.Tensor | slice  # where in the fed tokens the horizontal source of each new cell is
    v_idx: torch.Tensor | slice
    has_h: torch.Tensor
    has_v: torch.Tensor
    out: torch.Tensor | slice  # flat index of the cells sampled at this step


@dataclass(frozen=True)
class _Schedule:
    order: torch.Tensor  # [L] slot of every cache entry, in feeding order
    steps: tuple


_SCHEDULES: dict = {}


def _schedule(layout: Layout, mode: str, dev) -> _Schedule:
    """Per-layout precomputation, cached (a handful of layouts per process)."""
    key = (layout, mode, str(dev))
    s = _SCHEDULES.get(key)
    if s is None:
        if len(_SCHEDULES) > 32:
            _SCHEDULES.clear()
        s = _SCHEDULES[key] = (_two_way_schedule if mode == "two_way" else _raster_schedule)(layout, dev)
    return s


def _two_way_schedule(layout: Layout, dev) -> _Schedule:
    P, W, rl = layout.prefix_len, layout.width, layout.row_len
    order = list(range(P))
    steps = []
    n = layout.num_steps_two_way
    for t in range(n):
        i, j = layout.diagonals[t]
        out = _index((i * W + j).tolist(), dev)
        if t == 0:
            one = torch.ones(1, dtype=torch.bool, device=dev)
            steps.append(_TwoWayStep(P, P, None, None, slice(0, 1), slice(0, 1), one, ~one, out))
            continue
        fed = layout.fed_slots(t - 1).tolist()
        rel = [s - P for s in fed]
        eol = [r % rl == W for r in rel]
        cells = [(r // rl) * W + min(r % rl, W - 1) for r in rel]
        plan = layout.step_plan[t - 1]
        start = len(order)
        order += fed
        steps.append(_TwoWayStep(
            start, len(order), torch.tensor(cells, device=dev),
            torch.tensor(eol, device=dev) if any(eol) else None,
            _index(plan.h_idx.tolist(), dev), _index(plan.v_idx.tolist(), dev),
            plan.has_h.to(dev), plan.has_v.to(dev), out))
    return _Schedule(torch.tensor(order, dtype=torch.long, device=dev), tuple(steps))


def _raster_schedule(layout: Layout, dev) -> _Schedule:
    # Raster feeding order is the sequence order: the cache holds slot s at entry s.
    return _Schedule(torch.arange(layout.seq_len, device=dev), ())


class _Decoder:
    """State of one generate() call: static caches (allocated once, here), the cache order of
    the keys, the per-sequence key validity row and the position ids of every slot."""

    def __init__(self, ctx: PatchContext, pre: Prefix, layout: Layout, branch: bool, order: torch.Tensor):
        self.ctx, self.layout, self.branch = ctx, layout, branch
        Bt = pre.embeds.shape[0]
        dev = pre.embeds.device
        self.dtype = pre.embeds.dtype
        L, P = layout.seq_len, pre.length
        self.cache = ctx.backend.new_cache(ctx, Bt, L)
        self.bcache = ctx.backend.new_branch_cache(ctx, Bt, L) if branch else None
        self.order = order  # key_slots of a step = order[:stop]
        self.positions = _positions(order, pre.n_pad)  # [Bt, L], in cache order
        # One row per sequence: every image key is visible once cached, prefix keys unless padding.
        self.key_valid = torch.ones(Bt, 1, L, dtype=torch.bool, device=dev)
        self.key_valid[:, 0, :P] = pre.valid
        slots = order[:P]
        allowed = torch.ones(P, P, dtype=torch.bool, device=dev).tril()[None] & pre.valid[:, None, :]
        allowed = allowed | torch.eye(P, dtype=torch.bool, device=dev)[None]
        self.last = _forward(ctx, pre.embeds, self.positions[:, :P], slots, slots, allowed, self.cache, self.bcache,
                             branch)

    def feed(self, embeds: torch.Tensor, start: int, stop: int, causal: bool = False):
        """Append the tokens at cache entries [start, stop); they see every cached key and
        each other (one anti-diagonal), or, with ``causal``, only the earlier of each other."""
        allowed = self.key_valid[:, :, :stop]  # [Bt, 1, S]: the same row for every query
        if causal and stop - start > 1:
            T = stop - start
            allowed = allowed.expand(-1, T, -1).clone()
            allowed[:, :, start:] &= torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()
        return _forward(self.ctx, embeds.to(self.dtype), self.positions[:, start:stop], self.order[start:stop],
                        self.order[:stop], allowed, self.cache, self.bcache, self.branch)


def _eol_embed(ctx: PatchContext, layout: Layout, dev) -> torch.Tensor | None:
    if not layout.eol:
        return None
    return _embed_ids(ctx, torch.tensor([ctx.recipe.image.eol_token], device=dev)).view(1, 1, -1)


def _embed_fed(ctx: PatchContext, codes: torch.Tensor, cells, eol: torch.Tensor | None, eol_emb, Bt: int):
    """Embeddings of fed tokens: codes at flat ``cells`` of ``codes`` [B, H*W], or the forced
    end-of-line token where ``eol``; doubled for CFG."""
    e = _embed_codes(ctx, codes[:, cells])
    if eol is not None:
        e = torch.where(eol[None, :, None], eol_emb.to(e.dtype), e)
    if Bt != e.shape[0]:
        e = torch.cat([e, e])
    return e


def generate(model, cond, *, mode: str = "two_way", grid=None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             cond_mask=None) -> torch.Tensor:
    """Generate images as codebook indices [B, H, W].

    two_way: H+W-1 backbone forwards (prefill, then one per anti-diagonal); raster: the
    model's own next-token decoding, H*W forwards. CFG runs [cond; uncond] in one batch."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ctx = context(model)
    check_sampling(cfg_scale, temperature, top_k, top_p, cfg_schedule)
    cond, cond_mask = check_cond(ctx, cond, cond_mask)
    grid = _grid(ctx, grid)
    use_cfg = cfg_scale != 1.0
    if use_cfg and not has_uncond(ctx):
        raise ValueError(f"cfg_scale={cfg_scale} needs an unconditional prefix, but recipe {ctx.recipe.name!r} "
                         f"defines none (condition.uncond)")
    with torch.inference_mode():
        pre = _build_prefix(ctx, cond, cond_mask, grid, use_cfg)
        layout = ctx.layout(pre.length, grid)
        _check_positions(ctx, layout)
        if mode == "two_way":
            return _generate_two_way(ctx, cond.shape[0], pre, layout, cfg_scale, cfg_schedule, temperature, top_k, top_p, generator)
        return _generate_raster(ctx, cond.shape[0], pre, layout, cfg_scale, cfg_schedule, temperature, top_k, top_p, generator)


def _generate_two_way(ctx, B, pre, layout, cfg_scale, schedule, temperature, top_k, top_p, generator):
    H, W = layout.height, layout.width
    dev = pre.embeds.device
    Bt = pre.embeds.shape[0]
    sched = _schedule(layout, "two_way", dev)
    codes = torch.zeros(B, H * W, dtype=torch.long, device=dev)
    dec = _Decoder(ctx, pre, layout, True, sched.order)
    eol_emb = _eol_embed(ctx, layout, dev)
    hh, hv = dec.last
    hh, hv = hh[:, -1:], hv[:, -1:]
    n = layout.num_steps_two_way
    fuse = ctx.flashar.fuse
    head = lambda x: _horizontal(ctx, x)  # noqa: E731
    for t, st in enumerate(sched.steps):
        if t > 0:
            hh, hv = dec.feed(_embed_fed(ctx, codes, st.cells, st.eol, eol_emb, Bt), st.start, st.stop)
        lg = fuse(hh[:, st.h_idx], hv[:, st.v_idx], st.has_h, st.has_v, head).fused
        lg = _guide(lg, B, _scale_at(cfg_scale, schedule, t, n))
        tok = sample(lg.reshape(-1, lg.shape[-1]), temperature, top_k, top_p, generator)
        codes[:, st.out] = tok.view(B, -1)
    return codes.view(B, H, W)


def _generate_raster(ctx, B, pre, layout, cfg_scale, schedule, temperature, top_k, top_p, generator):
    H, W = layout.height, layout.width
    dev = pre.embeds.device
    Bt = pre.embeds.shape[0]
    P, rl = layout.prefix_len, layout.row_len
    sched = _schedule(layout, "raster", dev)
    codes = torch.zeros(B, H * W, dtype=torch.long, device=dev)
    dec = _Decoder(ctx, pre, layout, False, sched.order)
    eol_emb = _eol_embed(ctx, layout, dev)
    h = dec.last[0][:, -1:]
    n = H * W
    for r in range(n):
        if r > 0:
            pi, pj = divmod(r - 1, W)
            start = P + pi * rl + pj
            e = _embed_codes(ctx, codes[:, r - 1:r])
            if layout.eol and pj == W - 1:  # the row's end-of-line token enters with its last code
                e = torch.cat([e, eol_emb.to(e.dtype).expand(e.shape[0], 1, -1)], 1)
            if Bt != B:
                e = torch.cat([e, e])
            h = dec.feed(e, start, start + e.shape[1], causal=True)[0][:, -1:]
        lg = _guide(_horizontal(ctx, h).float(), B, _scale_at(cfg_scale, schedule, r, n))
        codes[:, r] = sample(lg[:, 0], temperature, top_k, top_p, generator)
    return codes.view(B, H, W)
