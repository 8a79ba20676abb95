"""Float tolerances of the tests: the reordering bound of ``flashar_adapt.numerics`` (derived
there once, used by patch's probes and the doctor too), and the training-run comparisons.

Two paths that compute the same function sum the same terms in other orders (kernels differ by
CPU, thread count and masking path); ``reorder_bound`` says how far that moves float32
results: 4 * layers * width * eps32 times the largest magnitude compared (see
flashar_adapt/numerics.py for the derivation). A fault these tests exist to catch (a wrong mask
entry, position, cache slot or weight) changes logits by a sizeable fraction of their
magnitude: orders of magnitude above the bound.
"""

from __future__ import annotations

import pytest
import torch

from flashar_adapt.numerics import EPS32, reorder_bound, reorder_tol, sum_width

__all__ = [
    "EPS32",
    "assert_same_losses",
    "assert_same_math",
    "assert_same_training",
    "reorder_bound",
    "reorder_tol",
    "sum_width",
]


def layer_width(ctx) -> int:
    """The widest sum one decoder layer makes (its largest Linear input): the ``width`` of a
    patched model for the float32 reordering bound."""
    return max([ctx.dim] + [m.in_features for m in ctx.layers.modules() if isinstance(m, torch.nn.Linear)])


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
