"""Teacher-forced logits, exact scores, and the two decoders (anti-diagonal and raster).

The decoders are built on one public seam, ``prefill`` (a ``DecoderState``) and ``step``
(one anti-diagonal, or one raster token); ``generate`` is that loop. Every decoder and the
teacher-forced pass share ``build_prefix``, ``embed_codes``, ``Decoder.feed`` / ``_forward``
and ``FlashARModules.fuse``, so incremental decoding equals teacher forcing by construction
(and the tests check it does).
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from .context import CAPTURE, PatchContext, context
from .errors import InputError
from .grid import Layout
from .heads import finish_logits, visual_rows
from .sampling import Sampling, guide, sample

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
    return ctx.device()


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
        raise InputError(f"cond must be a FloatTensor [B, T, C] of condition features, "
                         f"got {cond.dtype} {tuple(cond.shape)}")
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


def _check_mask(c, cond: torch.Tensor, cond_mask, dev) -> torch.Tensor | None:
    if cond_mask is None:
        return None
    if c.kind == "class":
        raise InputError("cond_mask is only for prompt conditions")
    cond_mask = torch.as_tensor(cond_mask)
    if cond_mask.dtype != torch.bool and not bool(((cond_mask == 0) | (cond_mask == 1)).all()):
        raise InputError("cond_mask must hold only 0/1 (or False/True)")
    cond_mask = cond_mask.to(dev).bool()
    if cond_mask.shape != cond.shape[:2]:
        raise InputError(f"cond_mask must have shape {tuple(cond.shape[:2])}, got {tuple(cond_mask.shape)}")
    if not bool(cond_mask.any(1).all()):
        raise InputError("every prompt needs at least one unmasked token")
    # Prompts are left-padded (the image follows the last prompt token): a row must be
    # False...False True...True. Right or inner padding would put pad tokens in the prefix.
    if bool((cond_mask[:, :-1] & ~cond_mask[:, 1:]).any()):
        raise InputError("cond_mask must be left padding (False... then True...): pad prompts on the left")
    return cond_mask


def check_cond(ctx: PatchContext, cond, cond_mask=None, allow_null: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a condition batch before any compute; return (cond, mask) on the model's device.
    ``allow_null`` admits the null class (training with condition dropout, unconditional scoring)."""
    c = ctx.recipe.condition
    dev = _device(ctx)
    if not isinstance(cond, torch.Tensor):
        cond = torch.as_tensor(cond)
    if c.kind == "class":
        if not _is_int(cond) or cond.dim() != 1:
            raise InputError(f"cond must be a LongTensor [B] of class ids for this recipe, got {cond.dtype} {tuple(cond.shape)}")
        if cond.numel() == 0:
            raise InputError("cond is empty: pass at least one class id")
        top = c.null_class + 1 if allow_null and c.null_class is not None else c.num_classes
        if int(cond.min()) < 0 or int(cond.max()) >= top:
            raise InputError(f"class ids must be in [0, {top}), got min {int(cond.min())} max {int(cond.max())}")
        cond = cond.long()
    elif c.kind == "tokens":
        if not _is_int(cond) or cond.dim() != 2:
            raise InputError(f"cond must be a LongTensor [B, T] of prompt token ids for this recipe, got {cond.dtype} {tuple(cond.shape)}")
        if cond.shape[0] == 0 or cond.shape[1] == 0:
            raise InputError("cond is empty: pass at least one prompt token per row")
        if ctx.vocab_size is not None and (int(cond.min()) < 0 or int(cond.max()) >= ctx.vocab_size):
            raise InputError(f"prompt token ids must be in [0, {ctx.vocab_size})")
        if c.prefix_len is not None and cond.shape[1] > c.prefix_len:
            raise InputError(f"prompt has {cond.shape[1]} tokens; this recipe allows at most {c.prefix_len}")
        cond = cond.long()
    else:
        cond = _check_features(ctx, cond)
    return cond.to(dev), _check_mask(c, cond, cond_mask, dev)


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
        raise InputError(f"codes must be codebook indices in [0, {K}), got min {int(codes.min())} max {int(codes.max())}")
    return codes.to(_device(ctx), torch.long)


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


def build_prefix(ctx: PatchContext, cond: torch.Tensor, cond_mask, grid, cfg: bool) -> Prefix:
    """The prefix embeddings of a checked condition batch; with ``cfg`` the unconditional
    prefixes stacked below ([cond; uncond], left-padded to one length)."""
    p = _prefix(ctx, cond, cond_mask, grid, uncond=False)
    if cfg:
        p = _pad_prefixes(p, _prefix(ctx, cond, cond_mask, grid, uncond=True))
    return p


def _grid(ctx: PatchContext, grid) -> tuple[int, int]:
    im = ctx.recipe.image
    if grid is None:
        return im.grid
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        raise InputError(f"grid must be (H, W) with positive integers, got {grid!r}")
    grid = (int(grid[0]), int(grid[1]))
    if grid != im.grid and not im.variable_grid:
        raise InputError(f"recipe {ctx.recipe.name!r} has a fixed grid {list(im.grid)}; got {list(grid)}")
    return grid


def _check_positions(ctx: PatchContext, layout: Layout) -> None:
    limit = ctx.runner.max_positions(ctx)
    if limit is not None and layout.fed_len > limit:
        raise InputError(f"grid {layout.height}x{layout.width} with a {layout.prefix_len}-token prefix feeds "
                         f"{layout.fed_len} tokens; the model has {limit} positions")


# ---------------------------------------------------------------- one forward

def horizontal_logits(ctx: PatchContext, h: torch.Tensor) -> torch.Tensor:
    """The model's own head, restricted to the visual vocabulary (never the text logits)."""
    off = 0 if ctx.image_embed else ctx.recipe.image.visual_token_offset
    rows = visual_rows(ctx.head, off, ctx.recipe.image.codebook_size)
    out = ctx.head(h) if rows is None else F.linear(h, *rows)
    return finish_logits(out, ctx.recipe.logits.scale, ctx.recipe.logits.softcap)


def _forward(ctx: PatchContext, embeds, positions, slots, key_slots, allowed, cache, branch_cache, branch: bool,
             entries: torch.Tensor | None = None):
    """Backbone forward; with ``branch`` also the vertical branch from the captured inputs
    of the branch layer. Returns (final normed hidden, normed branch hidden or None).
    ``entries`` (static caches only): the cache entries the new tokens are written to."""
    static = {} if entries is None else {"entries": entries}  # runners without static caches never see it
    if branch and cache is not None and ctx.runner.fused_branch:
        h, x = ctx.runner.run_with_branch(ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache,
                                          **static)
        return h, ctx.flashar.branch_norm(x)
    CAPTURE.layer = ctx.layers[ctx.branch_index] if branch else None
    CAPTURE.captured = None
    try:
        h = ctx.runner.run(ctx, embeds, positions, slots, key_slots, allowed, cache, **static)
        captured = CAPTURE.captured
    finally:
        CAPTURE.layer = CAPTURE.captured = None
    if not branch:
        return h, None
    if captured is None:
        raise RuntimeError("the branch layer was not called during the backbone forward; check modules.layers / the runner")
    args, kwargs = captured
    x = args[0] if args else kwargs["hidden_states"]
    mods = ctx.flashar
    for layer in mods.branch_layers:
        x = ctx.runner.branch_call(layer, x, args, kwargs, branch_cache)
    return h, mods.branch_norm(x)


def positions(slots: torch.Tensor, n_pad: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of sequence ``slots`` [T] with each row's left padding removed."""
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
    """One forward over the whole raster sequence (with grads if enabled), in the model's
    current train/eval mode (training wants its dropout).

    two_way: proximity mask, fused logits; raster: causal mask, the model's own head."""
    ctx = context(model)
    inputs = _teacher_inputs(ctx, cond, codes, mode, cond_mask, uncond, grid)
    with ctx.guard:
        return _teacher_forward(ctx, *inputs, mode)


def _teacher_inputs(ctx: PatchContext, cond, codes, mode: str, cond_mask, uncond: bool, grid):
    """Checked (prefix, layout, codes) for a teacher-forced forward."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    cond, cond_mask = check_cond(ctx, cond, cond_mask, allow_null=True)
    codes = check_codes(ctx, codes, cond.shape[0])
    grid = tuple(codes.shape[1:]) if grid is None else grid
    grid = _grid(ctx, tuple(int(g) for g in grid))
    pre = _prefix(ctx, cond, cond_mask, grid, uncond=uncond)
    layout = ctx.layout(pre.length, grid)
    _check_positions(ctx, layout)
    return pre, layout, codes


def sequence_embeds(ctx: PatchContext, pre: Prefix, layout: Layout, codes: torch.Tensor) -> torch.Tensor:
    """[B, fed_len, d]: the prefix, then the codes row by row with their end-of-line tokens, up
    to the last token ever fed (the last code, and a trailing end-of-line, predict nothing)."""
    B, H, W = codes.shape
    img = embed_codes(ctx, codes).to(pre.embeds.dtype)  # [B, H, W, d]
    if layout.eol:
        e = embed_ids(ctx, torch.tensor([ctx.recipe.image.eol_token], device=img.device))
        img = torch.cat([img, e.to(img.dtype).view(1, 1, 1, -1).expand(B, H, 1, -1)], 2)
    return torch.cat([pre.embeds, img.reshape(B, -1, img.shape[-1])], 1)[:, :layout.fed_len]


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
    hh, hv = _forward(ctx, embeds, positions(slots, pre.n_pad), slots, slots, allowed, None, None, branch=two)
    h_src, v_src, has_h, has_v = (t.to(dev) for t in layout.sources())
    h_in = hh[:, h_src.flatten()].view(B, H, W, -1)
    if not two:
        lh = horizontal_logits(ctx, h_in).float()
        return TeacherForced(lh, lh, None, None, layout)
    v_in = hv[:, v_src.flatten()].view(B, H, W, -1)
    f = ctx.flashar.fuse(h_in, v_in, has_h, has_v, lambda x: horizontal_logits(ctx, x))
    return TeacherForced(f.fused, f.horizontal, f.vertical, f.gate, layout)


@torch.no_grad()
def logits(model, cond, codes: torch.Tensor, mode: str = "two_way", cond_mask=None, cfg_scale: float = 1.0,
           cfg_schedule: str = "constant") -> torch.Tensor:
    """Teacher-forced next-token logits [B, H, W, K] over the codebook, in one forward
    (two with CFG: the guided logits u + s * (c - u) that generate() samples from).
    Runs the model in eval behaviour, like generate()."""
    s = Sampling(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)
    ctx = context(model)
    if s.guided and not has_uncond(ctx):
        raise InputError(f"cfg_scale={cfg_scale} needs an unconditional prefix; recipe {ctx.recipe.name!r} has none")
    cond_in = _teacher_inputs(ctx, cond, codes, mode, cond_mask, False, None)
    uncond_in = _teacher_inputs(ctx, cond, codes, mode, cond_mask, True, None) if s.guided else None
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
    scale = torch.tensor([[s.scale_at(int(t), n) for t in row] for row in step.tolist()],
                         device=lg.device)[None, :, :, None]
    return u + scale * (lg - u)


@torch.no_grad()
def score(model, cond, codes: torch.Tensor, mode: str = "two_way", cond_mask=None) -> torch.Tensor:
    """Exact log-likelihood (nats) of ``codes`` under the mode's factorisation, [B]."""
    lg = logits(model, cond, codes, mode, cond_mask)
    idx = torch.as_tensor(codes).to(lg.device, torch.long)[..., None]
    lp = torch.log_softmax(lg.float(), -1).gather(-1, idx)[..., 0]
    return lp.flatten(1).sum(1)


# ---------------------------------------------------------------- decoding schedules

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


def _per_layout(store: dict, layout: Layout, mode: str, dev, build):
    """``build(layout, dev)`` once per layout, mode and device (a handful per process)."""
    key = (layout, mode, str(dev))
    if key not in store:
        if len(store) > 32:
            store.clear()
        store[key] = build(layout, dev)
    return store[key]


def _schedule(layout: Layout, mode: str, dev) -> _Schedule:
    """Per-layout precomputation, cached."""
    return _per_layout(_SCHEDULES, layout, mode, dev, _two_way_schedule if mode == "two_way" else _raster_schedule)


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


# ---------------------------------------------------------------- compiled steps: static shapes

# torch.compile specialises a graph on every shape and on every Python int it reads, so
# the compiled step takes no per-step ints: where it writes and what it sees are tensors
# (Decoder.feed_at over the whole padded cache), and what it feeds and samples is padded to
# one bucket size, from 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and their
# midpoints: at most a third of a step is padding). Graphs per mode and batch size are the
# buckets the steps reach: about 2 * log2(min(H, W)) for two-way, 2 for raster (one token,
# or a token and its row's end-of-line), whatever the grid. One graph per length (no
# padding) would compile min(H, W) + 1 graphs: minutes of compile time on a CPU, past
# dynamo's default recompile limit for any grid over 7x7, and a CUDA graph each.

def bucket(n: int) -> int:
    """Padded length of a compiled step that feeds or samples up to ``n`` tokens: the
    smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that holds ``n``."""
    p = 1 << max(n - 1, 0).bit_length()  # the next power of two
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p


@dataclass(frozen=True)
class _StaticStep:
    cells: torch.Tensor  # [Tb] flat cell index of each fed token (pads: 0)
    eol: torch.Tensor | None  # [Tb] bool, None when the layout has no end-of-line tokens
    entries: torch.Tensor  # [Tb] cache entries written; pads write entries past the sequence
    lim: torch.Tensor  # [Tb]: token q sees the entries below lim[q]; [1]: every token sees the same
    h_idx: torch.Tensor  # [nb] fed token whose hidden state predicts each sampled cell
    v_idx: torch.Tensor
    has_h: torch.Tensor
    has_v: torch.Tensor
    n: int  # real cells sampled: the first n of nb rows


_STATIC: dict = {}


def _padded(x, size: int, fill, dev) -> torch.Tensor:
    x = torch.as_tensor(x, device=dev)
    return torch.cat([x, torch.full((size - x.numel(),), fill, dtype=x.dtype, device=dev)])


def _static_steps(layout: Layout, mode: str, dev) -> tuple[tuple, int]:
    """Every step after the first padded to its buckets, and the number of padding entries
    the caches need (the most any step pads). Cached per layout, like ``_schedule``."""

    def build(layout: Layout, dev):
        raw = (_two_way_static if mode == "two_way" else _raster_static)(layout, dev)
        pad = max((bucket(max(len(r[0]), len(r[4]))) - len(r[0]) for r in raw if r is not None), default=0)
        return tuple(None if r is None else _pad_step(layout, r, dev) for r in raw), pad

    return _per_layout(_STATIC, layout, mode, dev, build)


def _pad_step(layout: Layout, raw: tuple, dev) -> _StaticStep:
    cells, eol, entries, lim, h_idx, v_idx, has_h, has_v = raw
    T, n = len(cells), len(h_idx)
    Tb = nb = bucket(max(T, n))  # one size for both: the graph count is the number of buckets
    trash = torch.arange(layout.seq_len, layout.seq_len + Tb - T)
    return _StaticStep(
        _padded(cells, Tb, 0, dev), _padded(eol, Tb, False, dev) if layout.eol else None,
        torch.cat([torch.as_tensor(entries), trash]).to(dev),
        torch.tensor(lim, device=dev) if len(lim) == 1 else _padded(lim, Tb, max(lim), dev),
        _padded(h_idx, nb, 0, dev), _padded(v_idx, nb, 0, dev), _padded(has_h, nb, True, dev),
        _padded(has_v, nb, False, dev), n)


def _two_way_static(layout: Layout, dev) -> list:
    out = [None]  # step 0 (the corner) samples from the prefill: nothing to compile
    for st in _schedule(layout, "two_way", dev).steps[1:]:
        fed = list(range(st.stop - st.start))
        h_idx, v_idx = (fed[i] if isinstance(i, slice) else i.tolist() for i in (st.h_idx, st.v_idx))
        eol = st.eol.tolist() if st.eol is not None else [False] * len(fed)
        out.append((st.cells.tolist(), eol, list(range(st.start, st.stop)), [st.stop], h_idx, v_idx,
                    st.has_h.tolist(), st.has_v.tolist()))
    return out


def _raster_static(layout: Layout, dev) -> list:
    out = [None]
    W = layout.width
    for r in range(1, layout.height * W):
        pi, pj = divmod(r - 1, W)
        start = layout.prefix_len + pi * layout.row_len + pj
        T = 2 if layout.eol and pj == W - 1 else 1  # the row's last code, then its end-of-line token
        entries = list(range(start, start + T))
        out.append(([r - 1, 0][:T], [False, True][:T], entries, [e + 1 for e in entries], [T - 1], [0],
                    [True], [False]))
    return out


# ---------------------------------------------------------------- the decoder (caches + feed)

class Decoder:
    """Static KV caches of one decoding run and how to append tokens to them.

    ``order`` [L] is the sequence slot of every cache entry in feeding order (the prefix
    first); cache entry e holds slot ``order[e]`` at position ``positions[:, e]``. Building
    allocates the caches; ``prefill()`` runs the prefix; ``feed()`` appends tokens. A
    low-level seam (benchmarks, peers with their own feeding order): most code wants
    ``prefill``/``step``. Not locked: call it inside one thread.

    ``pad`` (compiled decoding): the caches get ``pad`` entries more than the sequence and
    every call attends all of them under a mask (``feed_at``), so a step's shapes depend
    only on how many tokens it feeds. Padded tokens write those last entries, which no
    query ever sees."""

    def __init__(self, ctx: PatchContext, pre: Prefix, layout: Layout, order: torch.Tensor, branch: bool,
                 pad: int | None = None):
        self.ctx, self.pre, self.layout, self.branch = ctx, pre, layout, branch
        Bt = pre.embeds.shape[0]
        dev = pre.embeds.device
        self.dtype = pre.embeds.dtype
        L, P = layout.seq_len, pre.length
        self.static = pad is not None
        if self.static:
            if not ctx.runner.static_caches:
                raise InputError(f"compile=True needs static caches, which runner {ctx.runner.name!r} does not have")
            n = L + pad
            order = torch.cat([order, order.new_zeros(n - order.numel())])  # entries never fed: slot 0
            self.entry_ids = torch.arange(n, device=dev)
        else:
            n = L
        self.cache = ctx.runner.new_cache(ctx, Bt, n, **self._static_kw)
        self.bcache = ctx.runner.new_branch_cache(ctx, Bt, n, **self._static_kw) if branch else None
        self.order = order  # key_slots of a step = order[:stop]
        self.positions = positions(order, pre.n_pad)  # [Bt, n], in cache order
        # One row per sequence: every image key is visible once cached, prefix keys unless padding.
        self.key_valid = torch.ones(Bt, 1, n, dtype=torch.bool, device=dev)
        self.key_valid[:, 0, :P] = pre.valid
        self.key_valid[:, 0, L:] = False

    @property
    def _static_kw(self) -> dict:
        return {"static": True} if self.static else {}

    def prefill(self):
        """Run the prefix (causal, padding masked); returns (hidden [Bt, P, d], branch
        hidden or None). Marks every earlier decoder state of this model stale (the caches
        may be the same buffers)."""
        P, pre = self.pre.length, self.pre
        dev = pre.embeds.device
        self.ctx.guard.epoch += 1
        self.epoch = self.ctx.guard.epoch
        if self.static:
            e = torch.arange(P, device=dev)
            return self.feed_at(pre.embeds, e, e + 1)
        slots = self.order[:P]
        allowed = torch.ones(P, P, dtype=torch.bool, device=dev).tril()[None] & pre.valid[:, None, :]
        allowed = allowed | torch.eye(P, dtype=torch.bool, device=dev)[None]
        return _forward(self.ctx, pre.embeds, self.positions[:, :P], slots, slots, allowed, self.cache, self.bcache,
                        self.branch)

    def feed(self, embeds: torch.Tensor, start: int, stop: int, causal: bool = False,
             allowed: torch.Tensor | None = None):
        """Append the tokens at cache entries [start, stop); they see every cached key and
        each other (one anti-diagonal), or, with ``causal``, only the earlier of each other,
        or exactly ``allowed`` [Bt, stop - start, stop] (keys in cache order; padding keys
        of the prefix are masked in any case). Returns (hidden, branch hidden or None)."""
        if self.static:
            raise RuntimeError("a decoder with static (padded) caches takes feed_at, not feed")
        if allowed is not None:
            allowed = allowed & self.key_valid[:, :, :stop]
        else:
            allowed = self.key_valid[:, :, :stop]  # [Bt, 1, S]: the same row for every query
            if causal and stop - start > 1:
                T = stop - start
                allowed = allowed.expand(-1, T, -1).clone()
                allowed[:, :, start:] &= torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()
        return _forward(self.ctx, embeds.to(self.dtype), self.positions[:, start:stop], self.order[start:stop],
                        self.order[:stop], allowed, self.cache, self.bcache, self.branch)

    def feed_at(self, embeds: torch.Tensor, entries: torch.Tensor, lim: torch.Tensor):
        """Static caches: write the tokens at cache ``entries`` [T] (a tensor: no shape or
        guard depends on where a step writes); token q sees the entries below ``lim[q]``
        and itself, or, with ``lim`` of one element, every token the entries below it;
        prefix padding masked. Returns (hidden, branch hidden or None)."""
        if not self.static:
            raise RuntimeError("feed_at needs a decoder built with pad= (static caches)")
        ids = self.entry_ids
        if lim.numel() == 1:  # one anti-diagonal: one key row for every token (the padded ones see the prefix)
            allowed = self.key_valid & (ids < lim)  # [Bt, 1, n]
        else:
            allowed = (self.key_valid & (ids < lim[:, None])) | (ids == entries[:, None])  # [Bt, T, n]
        return _forward(self.ctx, embeds.to(self.dtype), self.positions[:, entries], self.order[entries], None,
                        allowed, self.cache, self.bcache, self.branch, entries)


def _eol_embed(ctx: PatchContext, layout: Layout, dev) -> torch.Tensor | None:
    if not layout.eol:
        return None
    return embed_ids(ctx, torch.tensor([ctx.recipe.image.eol_token], device=dev)).view(1, 1, -1)


def _embed_fed(ctx: PatchContext, codes: torch.Tensor, cells, eol: torch.Tensor | None, eol_emb, Bt: int):
    """Embeddings of fed tokens: codes at flat ``cells`` of ``codes`` [B, H*W], or the forced
    end-of-line token where ``eol``; doubled for CFG."""
    e = embed_codes(ctx, codes[:, cells])
    if eol is not None:
        e = torch.where(eol[None, :, None], eol_emb.to(e.dtype), e)
    if Bt != e.shape[0]:
        e = torch.cat([e, e])
    return e


# ---------------------------------------------------------------- the public step API

@dataclass(eq=False)
class DecoderState:
    """One decoding run between ``prefill`` and the last ``step``.

    ``codes`` [B, H*W] fills as steps run (``image()`` is the [B, H, W] view); ``t`` is the
    next step; ``logits`` the guided logits [B, n, K] the last step sampled from. A later
    ``prefill``/``generate`` on the same model makes this state stale (its caches may be
    reused): stepping it then raises."""

    model: torch.nn.Module = field(repr=False)
    mode: str
    layout: Layout
    sampling: Sampling
    batch: int
    vertical: bool
    codes: torch.Tensor = field(repr=False)
    decoder: Decoder = field(repr=False)
    t: int = 0
    logits: torch.Tensor | None = field(default=None, repr=False)
    _sched: _Schedule = field(default=None, repr=False)
    _hidden: tuple = field(default=None, repr=False)
    _eol: torch.Tensor | None = field(default=None, repr=False)
    compiled: bool = False
    _static: tuple = field(default=None, repr=False)
    _scales: list = field(default=None, repr=False)

    @property
    def num_steps(self) -> int:
        L = self.layout
        return L.num_steps_two_way if self.mode == "two_way" else L.num_steps_raster

    @property
    def done(self) -> bool:
        return self.t >= self.num_steps

    def cells(self, t: int | None = None) -> torch.Tensor:
        """Flat cell indices (into ``codes`` [B, H*W]) that step ``t`` (default: the next) samples."""
        t = self.t if t is None else t
        if not 0 <= t < self.num_steps:
            raise IndexError(f"step {t} is outside 0..{self.num_steps - 1}")
        out = self._cell_index(t)
        if isinstance(out, slice):
            return torch.arange(out.start, out.stop, device=self.codes.device)
        return out

    def _cell_index(self, t: int):
        """What ``codes[:, ...]`` takes for step t's cells, as the schedule holds it (a slice
        where the cells are contiguous): no tensor made per step on the decoding path."""
        return slice(t, t + 1) if self.mode == "raster" else self._sched.steps[t].out

    def image(self) -> torch.Tensor:
        return self.codes.view(self.batch, self.layout.height, self.layout.width)


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")


def _sampling(sampling: Sampling | None, kwargs: dict) -> Sampling:
    if sampling is None:
        return Sampling(**kwargs)
    if not isinstance(sampling, Sampling):
        raise InputError(f"sampling must be a flashar_adapt.Sampling, got {type(sampling).__name__}")
    if kwargs:
        raise InputError(f"pass sampling settings either as sampling=Sampling(...) or as keywords, not both: "
                         f"{sorted(kwargs)}")
    return sampling


def _prefill(model, ctx: PatchContext, cond, mode: str, grid, sampling: Sampling, cond_mask,
             vertical: bool, compile: bool = False) -> DecoderState:
    cond, cond_mask = check_cond(ctx, cond, cond_mask)
    grid = _grid(ctx, grid)
    sampling.check_device(cond.device)
    if sampling.guided and not has_uncond(ctx):
        raise InputError(f"cfg_scale={sampling.cfg_scale} needs an unconditional prefix, but recipe "
                         f"{ctx.recipe.name!r} defines none (condition.uncond)")
    pre = build_prefix(ctx, cond, cond_mask, grid, sampling.guided)
    layout = ctx.layout(pre.length, grid)
    _check_positions(ctx, layout)
    dev = pre.embeds.device
    sched = _schedule(layout, mode, dev)
    branch = mode == "two_way" and vertical
    static, pad = _static_steps(layout, mode, dev) if compile else (None, None)
    dec = Decoder(ctx, pre, layout, sched.order, branch, pad)
    hh, hv = dec.prefill()
    B = cond.shape[0]
    codes = torch.zeros(B, layout.height * layout.width, dtype=torch.long, device=dev)
    n = layout.num_steps_two_way if mode == "two_way" else layout.num_steps_raster
    # per-step guidance scales as tensors: a compiled step would specialise on a float
    scales = [torch.tensor(sampling.scale_at(t, n), device=dev) for t in range(n)] if compile else None
    return DecoderState(model, mode, layout, sampling, B, branch, codes, dec,
                        _sched=sched, _hidden=(hh[:, -1:], None if hv is None else hv[:, -1:]),
                        _eol=_eol_embed(ctx, layout, dev), compiled=compile, _static=static, _scales=scales)


def _check_compile(compile) -> None:
    if not isinstance(compile, bool):
        raise InputError(f"compile must be True or False, got {compile!r}")


@contextmanager
def _recompile_room(compile: bool):
    """Room for the bucketed graphs: dynamo counts graphs per function, across every model
    and grid a process decodes, and falls back to eager past its limit (8 by default)."""
    if not compile:
        yield
        return
    import torch._dynamo  # not at module level: importing dynamo costs a second, eager decoding never needs it

    limit = max(torch._dynamo.config.recompile_limit, 256)
    with torch._dynamo.config.patch(recompile_limit=limit,
                                    accumulated_recompile_limit=max(torch._dynamo.config.accumulated_recompile_limit,
                                                                    4 * limit)):
        yield


def prefill(model, cond, *, mode: str = "two_way", grid=None, sampling: Sampling | None = None, cond_mask=None,
            vertical: bool = True, compile: bool = False, **sampling_kwargs) -> DecoderState:
    """Check the inputs, build the prefix and run it into fresh static caches; returns the
    state that ``step`` advances. Sampling settings as ``sampling=Sampling(...)`` or as its
    keywords (``cfg_scale=``, ``temperature=``, ...). ``vertical=False`` (two-way only)
    skips the vertical branch and takes the horizontal head everywhere: the backbone work
    of two-way decoding alone, a speed ablation, not a generator. ``compile=True``: every
    ``step`` after the first runs compiled (see ``generate``)."""
    _check_mode(mode)
    _check_compile(compile)
    ctx = context(model)
    s = _sampling(sampling, sampling_kwargs)
    with ctx.guard, eval_behaviour(model), torch.inference_mode():
        return _prefill(model, ctx, cond, mode, grid, s, cond_mask, vertical, compile)


def _check_forced(state: DecoderState, forced, n: int) -> torch.Tensor:
    forced = torch.as_tensor(forced)
    K = state.decoder.ctx.recipe.image.codebook_size
    if not _is_int(forced) or tuple(forced.shape) != (state.batch, n):
        raise InputError(f"codes for step {state.t} must be an integer tensor [{state.batch}, {n}], "
                         f"got {forced.dtype} {tuple(forced.shape)}")
    if int(forced.min()) < 0 or int(forced.max()) >= K:
        raise InputError(f"codes must be codebook indices in [0, {K})")
    return forced.to(state.codes.device, torch.long)


def _cell_logits(ctx: PatchContext, hh, hv, h_idx, v_idx, has_h, has_v, vertical: bool) -> torch.Tensor:
    """Logits of the cells a step samples, from the fed tokens' hidden states: fused
    horizontal and vertical heads, or (``vertical=False``, raster) the horizontal head alone."""
    if vertical:
        return ctx.flashar.fuse(hh[:, h_idx], hv[:, v_idx], has_h, has_v, lambda x: horizontal_logits(ctx, x)).fused
    return horizontal_logits(ctx, hh[:, h_idx]).float()


def _diagonal_logits(ctx: PatchContext, dec: Decoder, codes, eol_emb, cells, eol, h_idx, v_idx, has_h, has_v,
                     start: int, stop: int, batch: int, scale: float, vertical: bool) -> torch.Tensor:
    """One two-way step after the first: feed the previous anti-diagonal, return the guided
    logits of this one."""
    hh, hv = dec.feed(_embed_fed(ctx, codes, cells, eol, eol_emb, dec.pre.embeds.shape[0]), start, stop)
    return guide(_cell_logits(ctx, hh, hv, h_idx, v_idx, has_h, has_v, vertical), batch, scale)


def static_logits(ctx: PatchContext, dec: Decoder, codes, eol_emb, cells, eol, entries, lim, h_idx, v_idx, has_h,
                  has_v, scale: torch.Tensor, batch: int, vertical: bool) -> torch.Tensor:
    """One step after the first on static caches (a two-way anti-diagonal or a raster
    token), every input padded to its bucket and every per-step value a tensor: the
    function ``generate(compile=True)`` compiles, one graph per bucket size. Returns the
    guided logits of all padded rows; the first ``_StaticStep.n`` are real."""
    hh, hv = dec.feed_at(_embed_fed(ctx, codes, cells, eol, eol_emb, dec.pre.embeds.shape[0]), entries, lim)
    return guide(_cell_logits(ctx, hh, hv, h_idx, v_idx, has_h, has_v, vertical), batch, scale)


_COMPILED: dict = {}


def _compiled_step(device_type: str, size: int):
    """``static_logits`` under torch.compile for one device type and bucket size: static
    shapes, CUDA graphs on CUDA ("reduce-overhead"). Each bucket gets its own copy of the
    function's code: dynamo keeps a code object's graphs in one list and checks their guards
    (hundreds: every module and parameter the step touches) in turn on every call, so with
    one list a late bucket would pay for the guards of all the earlier ones."""
    key = (device_type, size)
    fn = _COMPILED.get(key)
    if fn is None:
        code = static_logits.__code__.replace(co_name=f"static_logits_{size}")
        copy = types.FunctionType(code, static_logits.__globals__, code.co_name, static_logits.__defaults__)
        mode = "reduce-overhead" if device_type == "cuda" else None
        fn = _COMPILED[key] = torch.compile(copy, dynamic=False, mode=mode)
    return fn


def _static_step_logits(ctx: PatchContext, state: "DecoderState") -> torch.Tensor:
    st = state._static[state.t]
    dev = state.codes.device
    if dev.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    step = _compiled_step(dev.type, st.entries.numel())
    lg = step(ctx, state.decoder, state.codes, state._eol, st.cells, st.eol, st.entries, st.lim, st.h_idx, st.v_idx,
              st.has_h, st.has_v, state._scales[state.t], state.batch, state.vertical)
    # a CUDA graph's output is overwritten by its next replay: state.logits must outlive the step
    return lg[:, :st.n].clone() if dev.type == "cuda" else lg[:, :st.n]


def _token_logits(ctx: PatchContext, dec: Decoder, codes, eol_emb, r: int, start: int, with_eol: bool, batch: int,
                  scale: torch.Tensor) -> torch.Tensor:
    """One raster step after the first: feed code r-1 (and its row's end-of-line token when
    it closes the row), return the guided logits of code r."""
    e = embed_codes(ctx, codes[:, r - 1:r])
    if with_eol:
        e = torch.cat([e, eol_emb.to(e.dtype).expand(e.shape[0], 1, -1)], 1)
    if dec.pre.embeds.shape[0] != batch:
        e = torch.cat([e, e])
    h = dec.feed(e, start, start + e.shape[1], causal=True)[0][:, -1:]
    return guide(horizontal_logits(ctx, h).float(), batch, scale)


def _two_way_logits(ctx: PatchContext, state: DecoderState) -> torch.Tensor:
    """Feed the previous anti-diagonal (none at step 0) and return the guided logits of this one."""
    t, st = state.t, state._sched.steps[state.t]
    scale = state.sampling.scale_at(t, state.num_steps)
    if t == 0:  # the corner, from the prefill's last state: nothing to feed
        hh, hv = state._hidden
        return guide(_cell_logits(ctx, hh, hv, slice(0, 1), slice(0, 1), st.has_h, st.has_v, state.vertical),
                     state.batch, scale)
    if state.compiled:
        return _static_step_logits(ctx, state)
    return _diagonal_logits(ctx, state.decoder, state.codes, state._eol, st.cells, st.eol, st.h_idx, st.v_idx,
                            st.has_h, st.has_v, st.start, st.stop, state.batch, scale, state.vertical)


def _raster_logits(ctx: PatchContext, state: DecoderState) -> torch.Tensor:
    """Feed the previous code (and the row's end-of-line token after its last code) and
    return the guided logits of the next one."""
    r, layout = state.t, state.layout
    scale = state.sampling.scale_at(r, state.num_steps)
    if r == 0:
        return guide(horizontal_logits(ctx, state._hidden[0]).float(), state.batch, scale)
    if state.compiled:
        return _static_step_logits(ctx, state)
    pi, pj = divmod(r - 1, layout.width)
    start = layout.prefix_len + pi * layout.row_len + pj
    return _token_logits(ctx, state.decoder, state.codes, state._eol, r, start, layout.eol and pj == layout.width - 1,
                         state.batch, scale)


def _step(state: DecoderState, forced=None) -> torch.Tensor:
    ctx = state.decoder.ctx
    if state.done:
        raise RuntimeError(f"all {state.num_steps} steps of this decoder state have run")
    if state.decoder.epoch != ctx.guard.epoch:
        raise RuntimeError("this decoder state is stale: a later prefill or generate on the same model reused its "
                           "caches; prefill again (or decode on a copy.deepcopy of the model)")
    lg = (_two_way_logits if state.mode == "two_way" else _raster_logits)(ctx, state)
    lg = lg.reshape(state.batch, -1, lg.shape[-1])
    out = state._cell_index(state.t)
    if forced is None:
        tok = sample(lg.reshape(-1, lg.shape[-1]), state.sampling).view(state.batch, -1)
    else:
        tok = _check_forced(state, forced, lg.shape[1])
    state.codes[:, out] = tok
    state.logits = lg
    state.t += 1
    return tok


def step(state: DecoderState, codes=None) -> torch.Tensor:
    """Feed what the last step sampled and sample the next anti-diagonal (two-way) or the
    next token (raster): returns its codes [B, n] (cells: ``state.cells(state.t - 1)``).
    ``codes`` [B, n] forces those codes instead of sampling (teacher forcing, continuing
    known codes); ``state.logits`` still holds what the model predicted."""
    if not isinstance(state, DecoderState):
        raise InputError(f"step needs the DecoderState that prefill returned, got {type(state).__name__}")
    ctx = state.decoder.ctx
    with ctx.guard, eval_behaviour(state.model), torch.inference_mode(), _recompile_room(state.compiled):
        return _step(state, codes)


_GENERATE_DEFAULTS = {f.name: f.default for f in fields(Sampling)}  # generate()'s keywords are Sampling's fields


def generate(model, cond, *, mode: str = "two_way", grid=None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             cond_mask=None, sampling: Sampling | None = None, compile: bool = False) -> torch.Tensor:
    """Generate images as codebook indices [B, H, W].

    two_way: H+W-1 backbone forwards (prefill, then one per anti-diagonal); raster: the
    model's own next-token decoding, H*W forwards. CFG runs [cond; uncond] in one batch.
    ``prefill`` + ``step`` until done, under the model's lock and in eval behaviour (the
    caller's train/eval flags are restored).

    ``compile=True`` runs every step after the first through ``torch.compile`` (CUDA graphs
    on CUDA): static caches attended whole under a mask, steps padded to power-of-two
    buckets, so a process compiles a few graphs per mode and grid, once. The first call
    pays the compile time; the codes are the eager ones (same math, other kernels)."""
    _check_mode(mode)
    _check_compile(compile)
    ctx = context(model)
    if sampling is None:
        sampling = Sampling(cfg_scale, cfg_schedule, temperature, top_k, top_p, generator)
    else:
        given = dict(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k,
                     top_p=top_p, generator=generator)
        sampling = _sampling(sampling, {k: v for k, v in given.items() if v != _GENERATE_DEFAULTS[k]})
    with ctx.guard, eval_behaviour(model), torch.inference_mode(), _recompile_room(compile):
        state = _prefill(model, ctx, cond, mode, grid, sampling, cond_mask, True, compile)
        while not state.done:
            _step(state)
        return state.image()
