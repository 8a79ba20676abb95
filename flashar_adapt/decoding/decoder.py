"""The decoder: the static KV caches of one decoding run, how tokens are appended to them,
and one decoding step on them (``step_logits``, the function compiled decoding compiles)."""

from __future__ import annotations

import torch

from ..context import PatchContext
from ..errors import InputError
from ..grid import Layout
from ..sampling import Sampling, draw, guide
from .forward import backbone_forward, cell_logits, positions
from .inputs import Prefix, embed_codes, embed_ids
from .schedules import Step


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
    query ever sees.

    What a step needs besides its ``Step`` lives here: ``batch`` (images: half the rows of
    a guided prefix), ``branch`` (whether the vertical branch runs) and ``eol_embed``."""

    def __init__(
        self, ctx: PatchContext, pre: Prefix, layout: Layout, order: torch.Tensor, branch: bool, pad: int | None = None
    ):
        self.ctx, self.pre, self.layout, self.branch = ctx, pre, layout, branch
        self.batch = pre.batch
        p = next(ctx.layers.parameters())
        self.weights = (p.dtype, p.device)  # what the caches were built for: a cast or move makes them stale
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
        self.positions = positions(layout, order, pre.n_pad)  # [Bt, n] or [A, Bt, n], in cache order
        # One row per sequence: every image key is visible once cached, prefix keys unless padding.
        self.key_valid = torch.ones(Bt, 1, n, dtype=torch.bool, device=dev)
        self.key_valid[:, 0, :P] = pre.valid
        self.key_valid[:, 0, L:] = False
        self.eol_embed = None  # [1, 1, d]: the forced end-of-line token
        if layout.eol:
            self.eol_embed = embed_ids(ctx, torch.tensor([ctx.recipe.image.eol_token], device=dev)).view(1, 1, -1)

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
        return backbone_forward(
            self.ctx, pre.embeds, self.positions[..., :P], slots, slots, allowed, self.cache, self.bcache, self.branch
        )

    def feed(
        self, embeds: torch.Tensor, start: int, stop: int, causal: bool = False, allowed: torch.Tensor | None = None
    ):
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
        return backbone_forward(
            self.ctx,
            embeds.to(self.dtype),
            self.positions[..., start:stop],
            self.order[start:stop],
            self.order[:stop],
            allowed,
            self.cache,
            self.bcache,
            self.branch,
        )

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
        return backbone_forward(
            self.ctx,
            embeds.to(self.dtype),
            self.positions[..., entries],
            self.order[entries],
            None,
            allowed,
            self.cache,
            self.bcache,
            self.branch,
            entries,
        )

    def feed_step(self, codes: torch.Tensor, step: Step):
        """Feed what ``step`` feeds (codes at its cells [B, H*W], end-of-line tokens where it
        says, doubled for CFG): ``feed`` eagerly, ``feed_at`` on static caches."""
        e = embed_codes(self.ctx, codes[:, step.cells])
        if step.eol is not None:
            e = torch.where(step.eol[None, :, None], self.eol_embed.to(e.dtype), e)
        if self.pre.guided:
            e = torch.cat([e, e])
        if self.static:
            return self.feed_at(e, step.entries, step.lim)
        return self.feed(e, step.entries.start, step.entries.stop, causal=step.causal)


def step_logits(dec: Decoder, codes: torch.Tensor, step: Step, scale) -> torch.Tensor:
    """One step after the first: feed what the previous step sampled (``codes`` [B, H*W]) and
    return the guided logits of the cells ``step`` samples. On static caches (a padded
    ``step``, the per-step guidance ``scale`` a tensor) this is the function
    ``generate(compile=True)`` compiles, one graph per bucket size; its first ``step.n`` rows
    are real."""
    hh, hv = dec.feed_step(codes, step)
    lg = cell_logits(dec.ctx, hh, hv, step.h_idx, step.v_idx, step.has_h, step.has_v, dec.branch)
    return guide(lg, dec.batch, scale)


def sampled_step(dec: Decoder, codes: torch.Tensor, step: Step, scale, noise, out, s: Sampling):
    """``step_logits`` and the draw: (guided logits [B, n, K], codes [B, n]) of the cells
    ``step`` samples, each drawn with its uniform ``noise[:, out]`` (``noise`` [B, H*W], drawn
    at prefill; None when greedy). The function ``generate(compile=True)`` compiles, so
    guidance, temperature, top-k/top-p and the draw run inside the graph; eager decoding runs
    the same arithmetic. On a padded step ``out`` is padded too: rows past ``step.n`` are
    drawn and ignored."""
    lg = step_logits(dec, codes, step, scale)
    lg = lg.reshape(dec.batch, -1, lg.shape[-1])
    return lg, draw_cells(lg, noise, out, s)


def draw_cells(lg: torch.Tensor, noise, out, s: Sampling) -> torch.Tensor:
    """Codes [B, n] from guided logits [B, n, K] and the uniforms of the cells ``out``."""
    B = lg.shape[0]
    u = None if noise is None else noise[:, out].reshape(-1)
    return draw(lg.reshape(-1, lg.shape[-1]), u, s).view(B, -1)
