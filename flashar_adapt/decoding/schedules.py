"""What each decoding step feeds and samples (``Step``), for a layout and mode: built once per
layout, mode and device, read by the eager step and, padded to bucket sizes, by the compiled
one.

Decoding speed: everything that depends only on the layout (cache order of the keys, fed
cells, source indices, sampled cells) is precomputed here, the KV caches are static and
filled in feeding order, so a step's keys are always a prefix of the cache and its mask a
slice of one row per sequence; the loops allocate no masks and make no host-device sync
beyond sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grid import Layout


@dataclass(frozen=True, eq=False)
class Step:
    """What decoding step t feeds and samples. Step t feeds what step t-1 sampled (with the
    end-of-line token that closes a row) and samples the next cells: one anti-diagonal
    (two-way) or one token (raster). Step 0 feeds nothing: it samples from the prefill's
    last state. An eager step's indices are slices where they are contiguous (views, no
    gather); a padded step (``padded_schedule``) holds tensors only, padded to its bucket."""

    cells: torch.Tensor | slice  # [T] flat cell (into codes [B, H*W]) of each fed token; end-of-line: its row's last
    eol: torch.Tensor | None  # [T] bool, True where the fed token is an end-of-line token; None when none is
    entries: torch.Tensor | slice  # cache entries the fed tokens are written to: slice(start, stop) eager, or [T]
    lim: torch.Tensor  # [T]: fed token q sees the cache entries below lim[q] (and itself); [1]: all see the same
    h_idx: torch.Tensor | slice  # [n] fed token whose backbone state predicts each sampled cell
    v_idx: torch.Tensor | slice  # [n] fed token whose branch state predicts it (from the cell above)
    has_h: torch.Tensor  # [n] bool: the cell has a horizontal source
    has_v: torch.Tensor  # [n] bool: the cell has a vertical source
    out: torch.Tensor | slice  # flat cells sampled (unpadded: the first n rows of the logits)
    n: int  # number of cells sampled
    # padded steps: [bucket] the cell whose uniform each row draws with (``out``, then cell 0
    # for the padding rows, whose draws are ignored); None on eager steps
    out_rows: torch.Tensor | None = None

    @property
    def causal(self) -> bool:
        """The fed tokens see only the earlier of each other (a row's last code, then its
        end-of-line token) rather than all of each other (one anti-diagonal)."""
        return self.lim.numel() > 1


@dataclass(frozen=True)
class Schedule:
    order: torch.Tensor  # [L] sequence slot of every cache entry, in feeding order
    steps: tuple[Step, ...]  # one per decoding step: H+W-1 (two-way) or H*W (raster)
    pad: int = 0  # padded steps: cache entries past the sequence their padding tokens write


_SCHEDULES: dict = {}
_PADDED: dict = {}


def _per_layout(store: dict, layout: Layout, mode: str, dev, build):
    """``build(layout, dev)`` once per layout, mode and device (a handful per process)."""
    key = (layout, mode, str(dev))
    if key not in store:
        if len(store) > 32:  # both at once: a padded schedule holds its eager schedule's tensors
            _SCHEDULES.clear()
            _PADDED.clear()
        store[key] = build(layout, dev)
    return store[key]


def schedule(layout: Layout, mode: str, device) -> Schedule:
    """The steps of ``mode`` on ``layout``, on ``device``; computed once per layout (cached)."""
    return _per_layout(_SCHEDULES, layout, mode, device, _two_way if mode == "two_way" else _raster)


def _index(idx: list[int], dev) -> torch.Tensor | slice:
    """A contiguous index list as a slice (a view when indexing), otherwise a tensor."""
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx, dtype=torch.long, device=dev)


def _first(layout: Layout, out, dev) -> Step:
    """Step 0: nothing fed; the first cells' logits come from the prefill's last state."""
    P, one = layout.prefix_len, torch.ones(1, dtype=torch.bool, device=dev)
    return Step(
        slice(0, 0), None, slice(P, P), torch.tensor([P], device=dev), slice(0, 1), slice(0, 1), one, ~one, out, 1
    )


def _two_way(layout: Layout, dev) -> Schedule:
    P, W, rl = layout.prefix_len, layout.width, layout.row_len
    order = list(range(P))
    steps = [_first(layout, _index([0], dev), dev)]
    for t in range(1, layout.num_steps_two_way):
        fed = layout.fed_slots(t - 1).tolist()  # diagonal t-1, and the end-of-line token on it
        where = {s: k for k, s in enumerate(fed)}
        i, j = layout.diagonals[t]
        h_idx = [where.get(layout.slot(a, b - 1), 0) if b > 0 else 0 for a, b in zip(i.tolist(), j.tolist())]
        v_idx = [where.get(layout.slot(a - 1, b), 0) if a > 0 else 0 for a, b in zip(i.tolist(), j.tolist())]
        rel = [s - P for s in fed]
        eol = [r % rl == W for r in rel]
        start = len(order)
        order += fed
        steps.append(
            Step(
                torch.tensor([(r // rl) * W + min(r % rl, W - 1) for r in rel], device=dev),
                torch.tensor(eol, device=dev) if any(eol) else None,
                slice(start, len(order)),
                torch.tensor([len(order)], device=dev),
                _index(h_idx, dev),
                _index(v_idx, dev),
                ((i == 0) | (j > 0)).to(dev),
                (i > 0).to(dev),
                _index((i * W + j).tolist(), dev),
                len(i),
            )
        )
    return Schedule(torch.tensor(order, dtype=torch.long, device=dev), tuple(steps))


def _raster(layout: Layout, dev) -> Schedule:
    """Raster: the cache holds slot s at entry s. Step r feeds code r-1, and after a row's
    last code its end-of-line token; every index is a slice or a view of a few shared
    tensors (H*W steps)."""
    P, W, rl = layout.prefix_len, layout.width, layout.row_len
    lims = torch.arange(1, layout.seq_len + 1, device=dev)  # entry e sees the entries up to itself
    steps = [_first(layout, slice(0, 1), dev)]
    has_h, has_v = steps[0].has_h, steps[0].has_v
    row_ends = torch.arange(W - 1, layout.height * W, W, device=dev)[:, None].expand(-1, 2)  # a row's last code, twice
    closing = torch.tensor([False, True], device=dev)
    for r in range(1, layout.height * W):
        pi, pj = divmod(r - 1, W)
        start = P + pi * rl + pj
        closes = layout.eol and pj == W - 1
        T = 2 if closes else 1
        steps.append(
            Step(
                row_ends[pi] if closes else slice(r - 1, r),
                closing if closes else None,
                slice(start, start + T),
                lims[start : start + T],
                slice(T - 1, T),
                slice(0, 1),
                has_h,
                has_v,
                slice(r, r + 1),
                1,
            )
        )
    return Schedule(torch.arange(layout.seq_len, device=dev), tuple(steps))


# ---------------------------------------------------------------- padded steps: static shapes

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


def padded_schedule(layout: Layout, mode: str, device) -> Schedule:
    """``schedule`` with every step after the first padded to its bucket (tensors only), and
    the number of padding entries the caches need (the most any step pads). Cached per
    layout, like ``schedule``."""

    def build(layout: Layout, dev) -> Schedule:
        s = schedule(layout, mode, dev)
        pad = max((bucket(max(_fed(st), st.n)) - _fed(st) for st in s.steps[1:]), default=0)
        return Schedule(s.order, s.steps[:1] + tuple(_padded_step(layout, st, dev) for st in s.steps[1:]), pad)

    return _per_layout(_PADDED, layout, mode, device, build)


def _fed(st: Step) -> int:
    return st.entries.stop - st.entries.start


def _ids(x: torch.Tensor | slice) -> list:
    return list(range(x.start, x.stop)) if isinstance(x, slice) else x.tolist()


def _padded(x: list, size: int, fill, dev) -> torch.Tensor:
    x = torch.as_tensor(x, device=dev)
    return torch.cat([x, torch.full((size - x.numel(),), fill, dtype=x.dtype, device=dev)])


def _padded_step(layout: Layout, st: Step, dev) -> Step:
    """A step padded to its bucket: one size for what it feeds and samples (the graph count
    is the number of buckets); padding tokens write entries past the sequence, which no
    query sees, and padded rows predict nothing."""
    T, n = _fed(st), st.n
    size = bucket(max(T, n))
    lim = st.lim.tolist()
    eol = [False] * T if st.eol is None else st.eol.tolist()
    return Step(
        _padded(_ids(st.cells), size, 0, dev),
        _padded(eol, size, False, dev) if layout.eol else None,
        torch.tensor(_ids(st.entries) + list(range(layout.seq_len, layout.seq_len + size - T)), device=dev),
        torch.tensor(lim, device=dev) if len(lim) == 1 else _padded(lim, size, max(lim), dev),
        _padded(_ids(st.h_idx), size, 0, dev),
        _padded(_ids(st.v_idx), size, 0, dev),
        _padded(st.has_h.tolist(), size, True, dev),
        _padded(st.has_v.tolist(), size, False, dev),
        st.out,
        n,
        _padded(_ids(st.out), size, 0, dev),
    )
