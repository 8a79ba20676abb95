"""Sampling settings, validated once, and the sampler every decoder shares.

Sampling is split in two so that a decoder can draw its randomness before it needs it:
``Sampling.noise`` draws the uniforms (one per image cell, from the settings' generators),
and ``draw`` turns logits and those uniforms into codes by pure arithmetic (temperature,
top-k, top-p, then the inverse of the cumulative distribution). With one generator per
image, an image's codes depend on its own generator alone, never on its batchmates.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError

SCHEDULES = ("constant", "linear")
MAX_GUIDANCE = 1e4

# A CPU torch.Generator keeps only the low 32 bits of its seed (manual_seed(2**32) is
# manual_seed(0)): per-sample seeds are built to be distinct within 32 bits.
SEED_LIMIT = 2**32
_MASK = SEED_LIMIT - 1
_GOLDEN = 0x9E3779B9  # odd: multiplying by it permutes the 32-bit integers


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _generators(g) -> torch.Generator | tuple[torch.Generator, ...] | None:
    """``g`` checked: None, one generator, or a non-empty sequence of them (as a tuple)."""
    if g is None or isinstance(g, torch.Generator):
        return g
    if isinstance(g, Sequence) and not isinstance(g, (str, bytes)):
        g = tuple(g)
        bad = next((x for x in g if not isinstance(x, torch.Generator)), None)
        if g and bad is None:
            return g
        what = "an empty sequence" if not g else f"a sequence holding {type(bad).__name__} {bad!r}"
    else:
        what = f"{type(g).__name__} {g!r}"
    raise InputError(
        "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(42)), a sequence of them "
        f"(one per image), or None; got {what}"
    )


@dataclass(frozen=True)
class Sampling:
    """How to turn logits into codes. Validated on construction, so every decoder (generate,
    the step API, the benchmark peers) rejects the same bad values with the same message.

    cfg_scale: guidance scale s of ``u + s * (c - u)`` (1 = off); cfg_schedule: "constant",
    or "linear" (the scale ramps from 1 to s over the steps); temperature: 0 = greedy;
    top_k: 0 = off, 1 = greedy; top_p: nucleus mass in (0, 1]; generator: a
    ``torch.Generator`` on the model's device, a sequence of them with one per image of the
    batch (each image's codes then depend on its own generator only), or None (torch's
    global generator)."""

    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | Sequence[torch.Generator] | None = None

    def __post_init__(self):
        # numpy scalars (np.float32(2.0), np.int64(5)) are the numbers they hold; a tensor is not
        for name in ("cfg_scale", "temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                raise InputError(f"{name} must be a Python number, got a tensor (use .item())")
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
        if isinstance(self.top_k, numbers.Integral) and not isinstance(self.top_k, bool):
            object.__setattr__(self, "top_k", int(self.top_k))
        if not (_number(self.cfg_scale) and 0 <= self.cfg_scale <= MAX_GUIDANCE):
            # larger scales overflow float32 logits: every code would silently be 0
            raise InputError(f"cfg_scale must be a number in [0, {MAX_GUIDANCE:g}], got {self.cfg_scale!r}")
        if not (isinstance(self.cfg_schedule, str) and self.cfg_schedule in SCHEDULES):
            raise InputError(f"cfg_schedule must be one of {SCHEDULES}, got {self.cfg_schedule!r}")
        if not (_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "generator", _generators(self.generator))  # a list is kept as a tuple

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def per_image(self) -> bool:
        """One generator per image (a sequence was given)."""
        return isinstance(self.generator, tuple)

    def check_device(self, device: torch.device) -> None:
        """The generators must live where the logits are (their uniforms are drawn there)."""
        gens = self.generator if self.per_image else (self.generator,)
        for g in gens:
            if g is not None and not self.greedy and g.device.type != torch.device(device).type:
                raise InputError(
                    f"generator is on {g.device} but the model is on {device}; "
                    f"create it with torch.Generator(device={str(device)!r})"
                )

    def check_batch(self, batch: int) -> None:
        """A sequence of generators must hold one per image."""
        if self.per_image and len(self.generator) != batch:
            raise InputError(
                f"generator: {len(self.generator)} generators for a batch of {batch} images; pass one per image"
            )

    def noise(self, rows: int, n: int, device) -> torch.Tensor | None:
        """Uniforms in [0, 1), [rows, n]: row r from generator r of a sequence (which must hold
        ``rows``), else all from the one generator (or torch's global one); None when greedy
        (nothing is drawn)."""
        if self.greedy:
            return None
        device = torch.device(device)
        dtype = noise_dtype(device)
        if not self.per_image:
            dev = device if self.generator is None else self.generator.device
            return torch.rand(rows, n, generator=self.generator, device=dev, dtype=dtype).to(device)
        self.check_batch(rows)
        return torch.stack([torch.rand(n, generator=g, device=g.device, dtype=dtype) for g in self.generator]).to(
            device
        )

    def scale_at(self, step: int, n_steps: int) -> float:
        """The guidance scale at decoding step ``step`` of ``n_steps``."""
        if self.cfg_schedule == "linear" and n_steps > 1:
            return 1.0 + (self.cfg_scale - 1.0) * step / (n_steps - 1)
        return float(self.cfg_scale)


def noise_dtype(device: torch.device) -> torch.dtype:
    """float64 (a code of probability p is drawn with probability p to ~1e-16), except where
    the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def guide(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Guided logits ``u + s * (c - u)`` from a [cond; uncond] batch of 2 * ``batch`` rows;
    the logits unchanged when they hold ``batch`` rows (no CFG)."""
    if logits.shape[0] == batch:
        return logits
    c, u = logits[:batch], logits[batch:]
    return u + scale * (c - u)


def filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution [N, K] (float32) each row samples from: temperature, then top-k, then top-p."""
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
    return torch.softmax(x, -1)


def draw(logits: torch.Tensor, noise: torch.Tensor | None, s: Sampling) -> torch.Tensor:
    """One index per row of ``logits`` [N, K] from the uniforms ``noise`` [N] (pure arithmetic:
    the same logits and uniforms give the same codes); the argmax when ``s`` is greedy."""
    if s.greedy:
        return logits.argmax(-1)
    p = filtered_probs(logits, s).to(noise.dtype)
    cdf = p.cumsum(-1)
    # the first index whose cumulative mass exceeds u * total: index k is hit with probability p_k
    idx = torch.searchsorted(cdf, (noise.reshape(-1, 1) * cdf[:, -1:]).contiguous(), right=True)[:, 0]
    # u * total may round up to the total: never past the last index with mass
    last = torch.where(p > 0, torch.arange(p.shape[-1], device=p.device), 0).amax(-1)
    return torch.minimum(idx, last)


def sample(
    logits: torch.Tensor,
    temperature: float | Sampling = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Sample one index per row of ``logits`` [..., K] (the result has the leading shape);
    greedy for top_k=1 or temperature=0.
    Pass a ``Sampling`` as the second argument, or the settings one by one (validated). With
    a sequence of G generators, the rows are G equal groups in order (one per image)."""
    if isinstance(temperature, Sampling):
        if (top_k, top_p, generator) != (None, None, None):
            raise InputError("give the settings in the Sampling object or one by one, not both")
        s = temperature
    else:
        s = Sampling(
            temperature=temperature,
            top_k=0 if top_k is None else top_k,
            top_p=1.0 if top_p is None else top_p,
            generator=generator,
        )
    check_logits(logits)
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    groups = len(s.generator) if s.per_image else logits.shape[0]
    if logits.shape[0] % groups:
        raise InputError(f"{logits.shape[0]} rows of logits do not split into {groups} images (one generator each)")
    noise = s.noise(groups, logits.shape[0] // groups, logits.device)
    return draw(logits, None if noise is None else noise.reshape(-1), s).reshape(shape)


def check_logits(logits, what: str = "logits", why: str = "mask entries with -inf") -> None:
    """What can be drawn from: a float tensor [..., K] with K >= 1 and rows, no NaN, no +inf
    and in every row a finite entry (a masked entry is -inf or the dtype's lowest; a NaN, an
    inf or a row masked whole drew index 0 unseen). ``what`` names them in the error, ``why``
    says what to look at."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = f"a {logits.dtype} tensor" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"{what} must be a float tensor [..., K], got {got}")
    if logits.is_meta:
        raise InputError(f"{what} are on the meta device (a shape, no values)")
    if logits.dim() < 1 or logits.shape[-1] == 0 or logits.numel() == 0:
        raise InputError(f"{what} must be a non-empty tensor [..., K], got shape {list(logits.shape)}")
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise InputError(f"{what} hold NaN or +inf; nothing can be drawn from them ({why})")
    if not bool(torch.isfinite(logits).any(-1).all()):
        raise InputError(f"{what} have a row with no finite entry (all masked): nothing can be drawn from it ({why})")


def index_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a run seeded ``seed``, in [0, 2**32): distinct
    for every index of one seed, and for every seed at one index (an odd multiple of the seed
    plus the index, then a bijective mix of the 32 bits)."""
    for name, v in (("seed", seed), ("index", index)):
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < SEED_LIMIT):
            raise InputError(f"{name} must be an integer in [0, 2**32), got {v!r}")
    h = (index + seed * _GOLDEN) & _MASK
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def index_generators(seed: int, indices, device="cpu") -> tuple[torch.Generator, ...]:
    """One generator per sample index, seeded ``index_seed(seed, i)``: sample i's randomness
    whatever batch or process it is drawn in."""
    return tuple(torch.Generator(device=device).manual_seed(index_seed(seed, int(i))) for i in indices)
