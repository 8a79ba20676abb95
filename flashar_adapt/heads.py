"""The modules FlashAR adds to a raster model: the vertical branch and the fusion gate."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


class ImageHead(nn.Module):
    """Projection from a hidden state to the K codebook logits.

    Built from the model's own head: a vocabulary-sized ``nn.Linear`` is sliced to the
    visual rows (so the branch never pays for the text vocabulary); any other head
    (already codebook-sized, e.g. a separate image-generation MLP) is deep-copied.
    """

    def __init__(
        self, head: nn.Module, offset: int, codebook_size: int, scale: float = 1.0, softcap: float | None = None
    ):
        super().__init__()
        self.scale, self.softcap = scale, softcap  # the model's own logit scale / soft-cap (recipe ``logits``)
        rows = visual_rows(head, offset, codebook_size)
        if rows is not None:
            w, b = (None if t is None else t.detach() for t in rows)
            self.proj = nn.Linear(head.in_features, codebook_size, bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                self.proj.weight.copy_(w)
                if b is not None:
                    self.proj.bias.copy_(b)
        else:
            self.proj = copy.deepcopy(head)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return finish_logits(self.proj(h), self.scale, self.softcap)


def visual_rows(head: nn.Module, offset: int, codebook_size: int):
    """(weight, bias) rows of a vocabulary-sized ``nn.Linear`` head that produce the visual ids
    ``offset .. offset + codebook_size - 1``; None when the head is already codebook-sized or
    is not a plain linear layer (then it is used whole)."""
    if not isinstance(head, nn.Linear) or (offset == 0 and head.out_features == codebook_size):
        return None
    b = None if head.bias is None else head.bias[offset : offset + codebook_size]
    return head.weight[offset : offset + codebook_size], b


def finish_logits(x: torch.Tensor, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """What a model applies after its head: a logit scale, then a tanh soft-cap."""
    if scale != 1.0:
        x = x * scale
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return x


class FusionGate(nn.Module):
    """g = sigmoid(MLP([h_H; h_V])); fused = g * logits_H + (1 - g) * logits_V.

    The last layer starts at zero so g = 0.5 before training: the patched model starts as
    the naive average and learns where to trust each direction.
    """

    def __init__(self, dim: int, hidden: int | None = None, device=None, dtype=None):
        super().__init__()
        hidden = hidden or max(64, dim // 8)
        self.net = nn.Sequential(
            nn.Linear(2 * dim, hidden, bias=False, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Linear(hidden, 1, device=device, dtype=dtype),
        )
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, h_h: torch.Tensor, h_v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat([h_h, h_v], dim=-1)).float())


class FlashARModules(nn.Module):
    """Everything patch() adds, under ``model.flashar``: train it, save it, ship it."""

    def __init__(
        self,
        layers: list[nn.Module],
        norm: nn.Module,
        head: ImageHead,
        gate: FusionGate,
        fixed_gate: float | None = None,
    ):
        super().__init__()
        self.branch_layers = nn.ModuleList(layers)
        self.branch_norm = norm
        self.vertical_head = head
        self.gate = gate
        # A fixed mixing weight replaces the learned gate (the NAR-style 0.5 average ablation).
        self.fixed_gate = fixed_gate
        self.ctx = None  # PatchContext, set by patch(); a plain attribute, not a submodule

    def fuse(
        self,
        h_h: torch.Tensor,
        h_v: torch.Tensor,
        has_h: torch.Tensor,
        has_v: torch.Tensor,
        horizontal_head: Callable[[torch.Tensor], torch.Tensor],
    ) -> Fused:
        """Logits for cells whose horizontal source state is ``h_h`` (final, normed backbone
        state) and vertical source state ``h_v`` (normed branch state). ``has_h``/``has_v``
        broadcast over the cell dims: row 0 is horizontal only, column 0 vertical only."""
        lh = horizontal_head(h_h).float()
        lv = self.vertical_head(h_v).float()
        if self.fixed_gate is not None:
            g = torch.full(lh.shape[:-1] + (1,), float(self.fixed_gate), device=lh.device)
        else:
            g = self.gate(h_h, h_v)
        both = g * lh + (1 - g) * lv
        has_h = has_h[..., None]
        has_v = has_v[..., None]
        fused = torch.where(has_h & has_v, both, torch.where(has_h, lh, lv))
        return Fused(fused, lh, lv, g[..., 0])


class Fused:
    __slots__ = ("fused", "horizontal", "vertical", "gate")

    def __init__(self, fused, horizontal, vertical, gate):
        self.fused, self.horizontal, self.vertical, self.gate = fused, horizontal, vertical, gate
