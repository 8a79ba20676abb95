"""Grid geometry: where each image cell sits in the raster sequence, which anti-diagonal it
belongs to, the proximity mask, the teacher-forcing sources and the slots each two-way step
feeds (what a decoder makes of them: ``decoding.schedules``).

The raster sequence is ``prefix`` (condition + forced meta tokens, ``P`` slots) followed by
``H`` rows of ``W`` codes, each row optionally closed by a forced end-of-line token. An
end-of-line token of row ``i`` is treated as cell ``(i, W)``: it lives on anti-diagonal
``i + W``, so it enters the cache together with that diagonal.

With ``eol_last=False`` the last row has no end-of-line token: the sequence ends with the
last code (models such as Emu3.5 follow it with an end-of-image token instead, which no code
ever attends to, so it is not a slot of the layout).

Positions follow a rule (``recipe.POSITION_RULES``), not the slot count: ``sequence`` gives slot s
position s (one axis); ``grid`` gives three axes (t, h, w): prompt slot s -> (s, s, s), cell
(r, c) of a grid starting at P -> (P, P + r, P + c), and the next grid starts at
P + max(h, w) (multi-axis rotary positions, M-RoPE). ``before_grids``: grids already decoded that
end the prefix (a preview grid), in order; their cells are prefix slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Layout:
    prefix_len: int  # P: condition + meta tokens (+ the cells of before_grids), all before the first code
    height: int
    width: int
    eol: bool
    eol_last: bool = True  # with eol: whether the last row is closed by an end-of-line token too
    positions: str = "sequence"  # the position rule: "sequence" or "grid"
    before_grids: tuple[tuple[int, int], ...] = ()  # (h, w) of each grid at the end of the prefix, in order

    @property
    def row_len(self) -> int:
        return self.width + int(self.eol)

    @property
    def n_eol(self) -> int:
        """Number of end-of-line tokens in the sequence."""
        return (self.height - int(not self.eol_last)) if self.eol else 0

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.height * self.width + self.n_eol

    @property
    def fed_len(self) -> int:
        """Tokens ever fed to the decoder: everything before the last code. The last code
        (and a trailing end-of-line token) is predicted, never fed, so it needs no position."""
        return self.slot(self.height - 1, self.width - 1)

    @property
    def num_steps_two_way(self) -> int:
        return self.height + self.width - 1

    @property
    def num_steps_raster(self) -> int:
        return self.height * self.width

    @property
    def position_axes(self) -> int:
        """Axes of the position ids: 1 (``sequence``, ids [B, T]) or 3 (``grid``, ids [3, B, T])."""
        return 1 if self.positions == "sequence" else 3

    @cached_property
    def position_table(self) -> torch.Tensor:
        """[A, L]: the position of every slot on each axis, before left padding is removed."""
        if self.positions == "sequence":
            return torch.arange(self.seq_len)[None]
        text = self.prefix_len - sum(h * w for h, w in self.before_grids)
        parts, start = [torch.arange(text).expand(3, -1)], text
        for h, w in (*self.before_grids, (self.height, self.width)):
            r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
            parts.append(torch.stack([torch.full_like(r, start), start + r, start + c]))
            start += max(h, w)
        return torch.cat(parts, 1)

    def position_ids(self, slots: torch.Tensor, n_pad: torch.Tensor) -> torch.Tensor:
        """Position ids of sequence ``slots`` [T] with each row's left padding removed: [B, T]
        under the ``sequence`` rule, [3, B, T] under ``grid`` (what the runner hands the model)."""
        t = self.position_table.to(slots.device)[:, slots]  # [A, T]
        out = (t[:, None, :] - n_pad[None, :, None]).clamp(min=0)
        return out[0] if self.position_axes == 1 else out

    def slot(self, i: int, j: int) -> int:
        return self.prefix_len + i * self.row_len + j

    @cached_property
    def cell_slots(self) -> torch.Tensor:
        """[H, W] slot of every code."""
        i = torch.arange(self.height)[:, None]
        j = torch.arange(self.width)[None, :]
        return self.prefix_len + i * self.row_len + j

    @cached_property
    def eol_slots(self) -> torch.Tensor:
        """[n_eol] slot of every end-of-line token (H, H - 1 without the last row's, or none)."""
        return self.prefix_len + torch.arange(self.n_eol) * self.row_len + self.width

    @cached_property
    def slot_diagonal(self) -> torch.Tensor:
        """[L] anti-diagonal of every slot; -1 for prefix slots."""
        d = torch.full((self.seq_len,), -1, dtype=torch.long)
        r = torch.arange(self.seq_len - self.prefix_len)
        d[self.prefix_len :] = r // self.row_len + r % self.row_len
        return d

    def attention(self, mode: str) -> torch.Tensor:
        """[L, L] bool, True where query (row) may attend key (column).

        raster: causal. two_way: the proximity mask; the prefix stays causal, an image
        token on diagonal t sees the whole prefix and every image token on diagonals <= t.
        """
        L = self.seq_len
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        if mode == "raster":
            return causal
        d = self.slot_diagonal
        img = d >= 0
        prox = (d[None, :] <= d[:, None]) & img[None, :] & img[:, None]
        return torch.where(img[:, None], prox | ~img[None, :], causal)

    # --------------------------------------------------------- teacher-forcing sources
    def sources(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every cell: slot whose backbone state predicts it horizontally, slot whose
        branch state predicts it vertically, and whether each is used. All [H, W]."""
        cs = self.cell_slots
        h_src = cs - 1  # raster predecessor (left cell, end-of-line, or last prefix slot)
        v_src = cs - self.row_len  # upper cell
        has_h = torch.zeros(self.height, self.width, dtype=torch.bool)
        has_h[0, :] = True
        has_h[:, 1:] = True
        has_v = torch.zeros_like(has_h)
        has_v[1:, :] = True
        return h_src, v_src.clamp(min=0), has_h, has_v

    # --------------------------------------------------------- two-way steps
    @cached_property
    def diagonals(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cells (rows i, cols j) of each anti-diagonal 0..H+W-2, ordered by row."""
        out = []
        for t in range(self.height + self.width - 1):
            i = torch.arange(max(0, t - self.width + 1), min(self.height - 1, t) + 1)
            out.append((i, t - i))
        return out

    def fed_slots(self, t: int) -> torch.Tensor:
        """Slots of anti-diagonal t: its codes and the end-of-line token on it (what two-way
        decoding feeds at step t + 1)."""
        i, j = self.diagonals[t]
        slots = self.prefix_len + i * self.row_len + j
        if self.eol:
            r = t - self.width
            if 0 <= r < self.n_eol:
                slots = torch.cat([slots, torch.tensor([self.prefix_len + r * self.row_len + self.width])])
        return slots
