"""What ``patch`` asks of a decoder before accepting it, by running it on a few tokens.

FlashAR feeds the same tokens in another order than raster (the prompt, then one
anti-diagonal at a time into caches) and expects every output to depend only on which
tokens the mask lets it see and their positions. Two short probes check what a recipe's
paths cannot say:

- **order independence**: one short random sequence run whole (one pass under the two-way
  mask, as teacher forcing runs it) and in the decoder's chunks (the prompt, then each
  anti-diagonal with the runner's caches, as decoding runs it). Every module under
  ``modules.layers`` is watched; one whose inputs agree and whose outputs do not mixes tokens
  by the order they arrive (a short convolution, a recurrence, state kept on the module, a
  causal mask left closed) and is named in the refusal. By behaviour, for any runner: no
  list of classes.
- **head width**: what reaches the head on both paths (the decoder's output; the branch
  layer's output through ``modules.norm`` and ``modules.after_norm``) has the width the
  head reads.

Both run before any FlashAR module exists, in eval behaviour and without gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .context import PatchContext
from .decoding import Decoder, Prefix, backbone_forward, eval_behaviour
from .grid import Layout
from .numerics import reorder_tol, sum_width
from .recipe import RecipeError

# (prefix, grid) of the order probe, the first whose tokens fit the model's positions: 3 + 3x3
# feeds 11 tokens in 5 chunks of 3, 1, 2, 3, 2 (a prompt, single tokens, several at once)
PROBE_LAYOUTS = ((3, (3, 3)), (2, (2, 3)), (1, (2, 2)), (1, (1, 2)))


@dataclass
class ModuleDiff:
    """One module's relative difference whole vs chunked (each relative to its own magnitude)."""

    path: str  # below the layer ("" = the layer itself)
    cls: str
    rel_in: float
    rel_out: float


class _Recorder:
    """Forward hooks on every module under ``root``: (class, first tensor input, first tensor
    output) of every call, by module path."""

    def __init__(self, root: nn.Module):
        self.calls: dict[str, list] = {}
        self.handles = [m.register_forward_hook(self._hook(p), with_kwargs=True) for p, m in root.named_modules()]

    def _hook(self, path: str):
        def hook(mod, args, kwargs, out):
            x = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
            y = out[0] if isinstance(out, (tuple, list)) and out else out
            if torch.is_tensor(x) and torch.is_tensor(y):
                self.calls.setdefault(path, []).append((type(mod).__name__, x.detach().clone(), y.detach().clone()))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _token_axis(shapes: list, lengths: list[int]) -> int | None:
    """The dim whose size is each call's token count while every other dim stays the same."""
    if not shapes or len({len(s) for s in shapes}) != 1:
        return None
    for d in range(len(shapes[0])):
        rest = {tuple(s[:d]) + tuple(s[d + 1 :]) for s in shapes}
        if len(rest) == 1 and all(s[d] == n for s, n in zip(shapes, lengths)):
            return d
    return None


def _aligned(whole: list, chunked: list, lengths: list[int], perm: torch.Tensor):
    """(whole in, chunked in, whole out, chunked out) with the token axis at dim 1 and the
    chunked calls put back in raster order; None for a module without one call per chunk or
    without a token axis."""
    if len(whole) != 1 or len(chunked) != len(lengths):
        return None
    out = []
    for k in (1, 2):
        ax = _token_axis([c[k].shape for c in chunked], lengths)
        if ax is None:
            return None
        w = whole[0][k].movedim(ax, 1)
        c = torch.cat([call[k].movedim(ax, 1) for call in chunked], 1)
        if w.shape != c.shape:
            return None
        out += [w, c[:, perm.to(c.device)]]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = float(a.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


def _probe_embeds(ctx: PatchContext, n: int) -> torch.Tensor:
    """Embeddings of random token ids (the model's own scale), or unit noise without a table."""
    p = next(ctx.layers.parameters())
    g = torch.Generator().manual_seed(0)
    if isinstance(ctx.embed, nn.Embedding):
        ids = torch.randint(0, ctx.embed.num_embeddings, (1, n), generator=g).to(p.device)
        return ctx.embed(ids).to(p.dtype)
    return torch.randn(1, n, ctx.dim, generator=g).to(p)


def _whole_and_chunked(ctx: PatchContext, lay: Layout, x: torch.Tensor):
    """(recorded calls whole, recorded calls chunked, chunk lengths, chunked -> raster permutation)."""
    L, P, dev = lay.fed_len, lay.prefix_len, x.device
    chunks = [torch.arange(P)] + [lay.fed_slots(t) for t in range(lay.num_steps_two_way - 1)]
    order = torch.cat(chunks).to(dev)
    slots = torch.arange(L, device=dev)
    allowed = (lay.attention("two_way")[:L, :L] | torch.eye(L, dtype=torch.bool)).to(dev)[None]
    whole = _Recorder(ctx.layers)
    try:
        backbone_forward(ctx, x, slots[None], slots, slots, allowed, None, None, False)
    finally:
        whole.remove()
    ones = torch.ones(1, P, dtype=torch.bool, device=dev)
    pre = Prefix(x[:, :P], ones, torch.zeros(1, dtype=torch.long, device=dev))
    chunked = _Recorder(ctx.layers)
    try:
        dec = Decoder(ctx, pre, lay, order, branch=False)  # what prefill / step build, without the branch
        dec.prefill()
        stop = P
        for c in chunks[1:]:
            start, stop = stop, stop + c.numel()
            dec.feed(x[:, c.to(dev)], start, stop)
    finally:
        chunked.remove()
    return whole.calls, chunked.calls, [c.numel() for c in chunks], torch.argsort(order)


def order_dependence(ctx: PatchContext, limit: int | None = None) -> tuple[int, ModuleDiff | None, float, float] | None:
    """None when every decoder layer gives the same outputs whole and chunked (or the model has
    too few positions to probe); else (layer, the deepest module whose inputs agree and outputs
    do not (or None), its relative difference, the bound it exceeds). ``limit``: the model's
    positions."""
    fits = [Layout(p, *g, eol=False) for p, g in PROBE_LAYOUTS]
    fits = [lay for lay in fits if limit is None or lay.fed_len <= limit]
    if not fits:
        return None
    lay = fits[0]
    x = _probe_embeds(ctx, lay.fed_len)
    with torch.no_grad(), eval_behaviour(ctx.model):
        whole, chunked, lengths, perm = _whole_and_chunked(ctx, lay, x)
    width = sum_width(ctx.layers, lay.fed_len)
    for i in range(len(ctx.layers)):
        # each module relative to its own magnitude (scale-free: a convolution whose share of
        # the residual stream is 1e-4 still differs from itself by O(1)); the bound grows with depth
        tol = reorder_tol(i + 1, width, x.dtype)
        mixing, layer_rel = [], 0.0
        for path, calls in whole.items():
            if path != str(i) and not path.startswith(f"{i}."):
                continue
            got = _aligned(calls, chunked.get(path, []), lengths, perm)
            if got is None:
                continue
            d = ModuleDiff(path.partition(".")[2], calls[0][0], _rel(got[0], got[1]), _rel(got[2], got[3]))
            if d.path == "":
                layer_rel = d.rel_out
            # inputs that agree, outputs that do not, by more than the module's own sums can
            # amplify its input's difference (cancellation over at most `width` random-signed
            # terms: sqrt(width)); mixing by feeding order moves a module's output by O(1)
            if d.rel_in <= tol and d.rel_out > max(tol, math.sqrt(width) * d.rel_in):
                mixing.append(d)
        if mixing or layer_rel > tol:
            # the deepest: a parent that only passes a child's difference on is not the cause
            culprit = max(mixing, key=lambda d: (d.path != "") + d.path.count("."), default=None)
            return i, culprit, culprit.rel_out if culprit else layer_rel, tol
    return None


def check_order_independence(ctx: PatchContext, limit: int | None = None) -> None:
    """RecipeError (``modules.decoder``) naming the layer and module that mix tokens by the
    order they are fed; a model that cannot even be run that way: RecipeError (``backend``).
    ``limit``: the model's positions (the probe stays within them)."""
    try:
        found = order_dependence(ctx, limit)
    except RecipeError:
        raise
    except Exception as e:  # noqa: BLE001 - a decoder the runner cannot feed in chunks is refused, not crashed on
        raise RecipeError(
            "backend",
            f"runner {ctx.runner.name!r} cannot decode {type(ctx.decoder).__name__} in chunks with its caches "
            f"({type(e).__name__}: {e})",
            ctx.recipe.source,
        ) from e
    if found is None:
        return
    i, culprit, rel, tol = found
    layers = ctx.recipe.modules.layers
    where = f"layer {i} ({type(ctx.layers[i]).__name__})"
    if culprit is not None and culprit.path:
        where += f", in {culprit.cls} at {layers}.{i}.{culprit.path},"
    raise RecipeError(
        "modules.decoder",
        f"{type(ctx.decoder).__name__} mixes tokens outside its attention mask: {where} gives other outputs "
        f"when the same tokens arrive in the decoder's anti-diagonal chunks than in one raster-order pass "
        f"(relative difference {rel:.2g}, float bound {tol:.2g}); FlashAR feeds tokens in another order than "
        "raster, so it needs layers that mix tokens only through masked attention (short convolutions, "
        "recurrences and state kept on modules mix them in the order they arrive)",
        ctx.recipe.source,
    )


def _head_reads(head: nn.Module, x: torch.Tensor) -> str | None:
    """None when ``head`` takes ``x``, else the error, on one line."""
    try:
        with torch.no_grad():
            head(x)
    except RuntimeError as e:
        return " ".join(str(e).split())
    return None


def check_head_width(ctx: PatchContext) -> None:
    """The head reads the decoder's output (horizontal) and the branch's output after
    ``modules.norm`` and ``modules.after_norm`` (vertical): both must fit it. One 2-token
    forward shows the widths: the decoder's output, and the branch layer's input (which is
    its output's width)."""
    src, m = ctx.recipe.source, ctx.recipe.modules
    x = _probe_embeds(ctx, 2)
    dev = x.device
    slots = torch.arange(2, device=dev)
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    hook = ctx.layers[ctx.branch_index].register_forward_pre_hook(grab, with_kwargs=True)
    causal = torch.ones(1, 2, 2, dtype=torch.bool, device=dev).tril()
    try:
        with torch.no_grad(), eval_behaviour(ctx.model):
            out = backbone_forward(ctx, x, slots[None], slots, slots, causal, None, None, False)[0][:, :1]
            vertical = seen["x"][:, :1]
            for mod in [ctx.norm, *ctx.after_norm]:
                vertical = mod(vertical)
    finally:
        hook.remove()
    err = _head_reads(ctx.head, out)
    if err:
        raise RecipeError(
            "modules.head",
            f"the head {m.head!r} cannot read the decoder's output ({out.shape[-1]} features): {err}",
            src,
        )
    want, got = out.shape[-1], vertical.shape[-1]
    if got == want and _head_reads(ctx.head, vertical) is None:
        return
    inside = {id(mod) for mod in ctx.decoder.modules()} - {id(mod) for mod in ctx.layers.modules()}
    fits = [
        p
        for p, mod in ctx.model.named_modules()
        if id(mod) in inside and isinstance(mod, nn.Linear) and (mod.in_features, mod.out_features) == (got, want)
    ]
    hint = f"; the decoder has {', '.join(repr(p) for p in fits)} ({got} -> {want}): add it" if fits else ""
    chain = "modules.norm" + (" and modules.after_norm" if ctx.after_norm else "")
    raise RecipeError(
        "modules.after_norm",
        f"the vertical branch ends with {chain}, which give {got} features, but the head {m.head!r} reads what "
        f"the decoder outputs ({want} features): the decoder applies a projection after its final norm that "
        f"the recipe does not list{hint}",
        src,
    )
