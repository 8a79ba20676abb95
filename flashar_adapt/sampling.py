"""Sampling settings, validated once, and the sampler every decoder shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError

SCHEDULES = ("constant", "linear")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Sampling:
    """How to turn logits into codes. Validated on construction, so every decoder (generate,
    the step API, the benchmark peers) rejects the same bad values with the same message.

    cfg_scale: guidance scale s of ``u + s * (c - u)`` (1 = off); cfg_schedule: "constant",
    or "linear" (the scale ramps from 1 to s over the steps); temperature: 0 = greedy;
    top_k: 0 = off, 1 = greedy; top_p: nucleus mass in (0, 1]; generator: a
    ``torch.Generator`` on the model's device, or None."""

    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not (_number(self.cfg_scale) and math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise InputError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        if not (isinstance(self.cfg_schedule, str) and self.cfg_schedule in SCHEDULES):
            raise InputError(f"cfg_schedule must be one of {SCHEDULES}, got {self.cfg_schedule!r}")
        if not (_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise InputError(
                f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(42)) or None, "
                f"got {type(self.generator).__name__} {self.generator!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def check_device(self, device: torch.device) -> None:
        """The generator must live where the logits are (multinomial refuses otherwise)."""
        g = self.generator
        if g is not None and not self.greedy and g.device.type != torch.device(device).type:
            raise InputError(
                f"generator is on {g.device} but the model is on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )

    def scale_at(self, step: int, n_steps: int) -> float:
        """The guidance scale at decoding step ``step`` of ``n_steps``."""
        if self.cfg_schedule == "linear" and n_steps > 1:
            return 1.0 + (self.cfg_scale - 1.0) * step / (n_steps - 1)
        return float(self.cfg_scale)


def guide(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Guided logits ``u + s * (c - u)`` from a [cond; uncond] batch of 2 * ``batch`` rows;
    the logits unchanged when they hold ``batch`` rows (no CFG)."""
    if logits.shape[0] == batch:
        return logits
    c, u = logits[:batch], logits[batch:]
    return u + scale * (c - u)


def sample(
    logits: torch.Tensor,
    temperature: float | Sampling = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one index per row of ``logits`` [N, K]; greedy for top_k=1 or temperature=0.
    Pass a ``Sampling`` as the second argument, or the settings one by one (validated)."""
    s = (
        temperature
        if isinstance(temperature, Sampling)
        else Sampling(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    )
    if s.greedy:
        return logits.argmax(-1)
    # Shift by the row maximum and divide by at least float32's smallest normal number: any
    # positive temperature is then finite arithmetic, and a tiny one sends every non-maximal
    # logit to ~-1e30 (probability 0): the greedy limit, not a NaN.
    x = logits.float()
    x = (x - x.amax(-1, keepdim=True)) / max(s.temperature, torch.finfo(x.dtype).tiny)
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(srt, -1)
        drop = p.cumsum(-1) - p > s.top_p  # keep the smallest set whose mass reaches top_p
        srt = srt.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt)
    probs = torch.softmax(x, -1)
    return torch.multinomial(probs, 1, generator=s.generator)[:, 0]
