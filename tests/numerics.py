"""How far two float32 evaluations of the same math may drift apart, derived once, used everywhere.

Two paths that compute the same function (the patched raster path vs the model's own forward,
a fused kernel vs the generic one, an export reloaded) sum the same terms in other orders:
kernels differ by CPU (AVX2 vs AVX512), thread count and masking path. A float32 sum of n terms
in any order lands within about sqrt(n) * eps32 of the exact sum, relative to the sum of the
terms' magnitudes (round-off is a random walk; n * eps32 is the never-reached worst case). A
forward of `layers` blocks, each summing at most `width` products per output and adding its
result to a residual stream, compounds that layer by layer, so two orders differ by about
layers * sqrt(width) * eps32 times the magnitude of what flows through; the logits' largest
magnitude stands for it, and a head's dot product can cancel by up to sqrt(width) more. The
bound below allows 4x that (the largest of many random-walk deviations stays within ~4 sigma).

A fault these tests exist to catch (a wrong mask entry, position, cache slot or weight)
changes logits by a sizeable fraction of their magnitude: orders of magnitude above the bound.
"""

from __future__ import annotations

import pytest
import torch

EPS32 = torch.finfo(torch.float32).eps


def reorder_bound(ref: torch.Tensor, layers: int, width: int) -> float:
    """Largest |a - b| expected between two float32 evaluations of ``ref``'s math."""
    return 4.0 * layers * width * EPS32 * float(ref.detach().abs().max())


def assert_same_math(got: torch.Tensor, ref: torch.Tensor, layers: int, width: int) -> None:
    """``got`` equals ``ref`` up to float32 summation order (see the module docstring)."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    bound = reorder_bound(ref, layers, width)
    err = float((got.detach().double() - ref.detach().double()).abs().max())
    assert err <= bound, f"max |diff| {err:.3g} exceeds the float32 reordering bound {bound:.3g}"


def assert_same_training(got: dict, want: dict, init: dict) -> None:
    """Two training runs of the same math (other summation order) ended at the same weights.

    Adam's update g / sqrt(v) is scale-free: an element whose gradient lies within round-off of
    zero may take a step of another size or sign, up to lr per step, so no element-wise bound
    follows from float32 round-off. The size of a tensor's difference does: such elements are a
    tiny fraction of any tensor, so the runs stay far below 1% of how far training moved the
    tensor, while a real fault (another batch, a missing gradient term, unaveraged gradients)
    changes every update: O(100%) of that movement.
    """
    assert got.keys() == want.keys()
    for k in want:
        moved = float((want[k].detach().double() - init[k].detach().double()).norm())
        apart = float((got[k].detach().double() - want[k].detach().double()).norm())
        assert apart <= 1e-2 * moved, f"{k}: runs {apart:.3g} apart, training moved it {moved:.3g}"


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    """Two runs' logged losses (metrics.jsonl records) follow one trajectory.

    Step 1 starts from identical weights: its loss is the same mean of ~1e3 float32 terms in
    another order, within sqrt(n) * eps32 < 1e-5 relative (plus the 1e-6 the log rounds to).
    Later steps start from weights already apart by round-off that Adam amplified (see
    assert_same_training); the loss is smooth in the weights, so it moves by far less than
    1e-3 relative, while a real fault changes what a step fits, and these runs' losses fall
    by ~1e-2 relative a step.
    """
    assert len(got) == len(want)
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5, abs=1e-6)
    for a, b in zip(got[1:], want[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
