"""How far two evaluations of the same math may drift apart: derived once, used by patch's
probes, the doctor and the tests.

Two paths that compute the same function (the patched raster path vs the model's own forward,
a step on cached keys vs one pass over the whole sequence, a fused kernel vs the generic one)
sum the same terms in other orders: kernels differ by CPU (AVX2 vs AVX512), thread count,
masking path and the number of tokens per call. A float32 sum of n terms in any order lands
within about sqrt(n) * eps32 of the exact sum, relative to the sum of the terms' magnitudes
(round-off is a random walk; n * eps32 is the never-reached worst case). A stack of ``layers``
sums, each of at most ``width`` products per output and added to a residual stream, compounds
that layer by layer, so two orders differ by about layers * sqrt(width) * eps32 times the
magnitude of what flows through; a head's dot product can cancel by up to sqrt(width) more.
The bound allows 4x ``layers * width * eps32``: the largest of many random-walk deviations
stays within ~4 sigma. Half precision keeps float32 accumulators (matmuls, softmax) but rounds
every layer's output once more to the storage type: one eps(dtype) per layer on top.

A fault these bounds exist to catch (a wrong mask entry, position, cache slot or weight, a
layer that mixes tokens in the order they are fed) changes values by a sizeable fraction of
their magnitude: orders of magnitude above the bound on the models the tests build.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps


def reorder_tol(layers: int, width: int, dtype: torch.dtype = torch.float32) -> float:
    """Largest relative difference (a fraction of the largest magnitude compared) between two
    summation orders of ``layers`` stacked sums of at most ``width`` terms, in ``dtype``."""
    extra = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0
    return 4.0 * layers * (width * EPS32 + extra)


def reorder_bound(ref: torch.Tensor, layers: int, width: int, dtype: torch.dtype = torch.float32) -> float:
    """Largest |a - b| expected between two evaluations of ``ref``'s math (see ``reorder_tol``)."""
    return reorder_tol(layers, width, dtype) * float(ref.detach().abs().max())


def sum_width(modules: nn.Module, seq_len: int) -> int:
    """The most terms any one output of ``modules`` sums: a convolution's input channels (per
    group) times its kernel, any other weight's largest dimension (both dimensions of a
    matrix count: transformers' ``Conv1D`` stores [in, out]; stacked experts [E, out, in]), or
    the keys an attention query reads (``seq_len``)."""
    widths = [seq_len]
    for mod in modules.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            widths.append(mod.in_channels // mod.groups * math.prod(mod.kernel_size))
        widths += [max(p.shape) for p in mod.parameters(recurse=False) if p.dim() >= 2]
    return max(widths)


def non_finite_weights(model: nn.Module, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) floating parameters of ``model`` holding a NaN or an
    infinity: weights that cannot be exported or sampled from (every output turns NaN).
    Buffers are not weights (a mask may hold -inf on purpose)."""
    bad = []
    for name, t in model.named_parameters():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def weights_fingerprint(model, per_tensor: int = 4096, skip: tuple[str, ...] = ()) -> str:
    """A hash of the model's weights that is exact (bytes, not float sums, so any thread count
    or process gives the same) and cheap: each parameter's name, shape, dtype and up to
    ``per_tensor`` evenly strided elements. Parameters named with a prefix in ``skip`` are left
    out (raster decoding never reads the FlashAR modules, which a fresh patch initialises at
    random)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith(skip):
            continue
        flat = p.detach().reshape(-1)
        part = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].cpu().contiguous()
        h.update(f"{name}\0{list(p.shape)}\0{p.dtype}\0".encode())
        h.update(part.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
