"""The pieces the value checks are built from: the reordering bound's sizes, the step
comparison, and the logit map read off probe forwards (families: tests/test_unseen_families.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flashar_adapt.exactness import ForcedSteps, compare_steps
from flashar_adapt.grid import Layout
from flashar_adapt.logit_maps import find_logit_map, shortest
from flashar_adapt.numerics import EPS32, reorder_tol, sum_width


def test_sum_width_counts_the_widest_sum():
    layer = nn.Sequential(nn.Linear(8, 48), nn.Conv1d(16, 16, 3, groups=16), nn.Conv1d(4, 2, 5))
    assert sum_width(layer, 11) == 48  # a matrix counts both dims (transformers' Conv1D is [in, out])
    assert sum_width(nn.Conv1d(64, 8, 5), 11) == 64 * 5  # channels x kernel
    assert sum_width(nn.Conv1d(16, 16, 3, groups=16), 11) == 16  # depthwise: 3 terms, the weight's rows 16
    assert sum_width(nn.Linear(8, 8), 300) == 300  # a query over 300 keys


def test_reorder_tol_adds_one_rounding_per_layer_in_half_precision():
    assert reorder_tol(2, 64) == pytest.approx(4 * 2 * 64 * EPS32)
    assert reorder_tol(2, 64, torch.bfloat16) == pytest.approx(4 * 2 * (64 * EPS32 + 2.0**-7))
    assert reorder_tol(2, 64, torch.float64) == reorder_tol(2, 64)


def _run(errors: list[float]) -> tuple[ForcedSteps, torch.Tensor]:
    ref = torch.zeros(1, 1, len(errors), 3)
    run = ForcedSteps([torch.tensor([t]) for t in range(len(errors))], [], Layout(1, 1, len(errors), False))
    run.logits = [torch.full((1, 1, 3), e) for e in errors]
    return run, ref


def test_a_step_beyond_the_bound_or_nan_fails():
    assert compare_steps(*_run([0.0, 1e-7, 0.0]), 1e-6, "raster").ok
    found = compare_steps(*_run([0.0, 1e-3, 0.0]), 1e-6, "raster")
    assert not found.ok and found.worst_step == 1 and "raster step 1 of 3" in found.describe()
    found = compare_steps(*_run([1e-7, float("nan"), 0.0]), 1e-6, "two_way")
    assert not found.ok and found.worst_step == 1  # a NaN is never within a bound


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids):
        return (self.proj(self.embed(input_ids)),)


class _Capped(nn.Module):
    """logits = cap * tanh(scale * head(decoder(ids)) / cap), the constants in no config."""

    def __init__(self, scale: float, cap: float | None, offset: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.decoder, self.head = _Decoder(), nn.Linear(8, 16)
        self.scale, self.cap, self.offset = scale, cap, offset

    def forward(self, input_ids, use_cache=False):
        x = self.head(self.decoder(input_ids)[0]) * self.scale + self.offset
        return (x if self.cap is None else self.cap * torch.tanh(x / self.cap),)


@pytest.mark.parametrize("scale, cap", [(0.5, 2.7), (1.0, 30.0), (0.0883883, None), (1.0, None)])
def test_a_logit_map_no_config_declares_is_fitted_to_its_shortest_decimal(scale, cap):
    model = _Capped(scale, cap)
    found = find_logit_map(model, model.decoder, model.head, torch.tensor([[3, 1, 2, 1, 3]]))
    assert (found.scale, found.softcap) == (scale, cap)
    if cap is None and scale == 1.0:
        assert found.identity and found.probes == 1  # no map: one probe is enough
    else:
        assert all(src.startswith("fitted on probe forwards") for src in found.sources.values())


def test_logits_that_are_no_scale_or_softcap_of_the_head_give_no_map():
    model = _Capped(1.0, None, offset=0.5)
    assert find_logit_map(model, model.decoder, model.head, torch.tensor([[3, 1, 2, 1, 3]])) is None


def test_shortest_decimal_within_the_tolerance():
    assert shortest(29.99999952316284, 1e-6) == 30.0
    assert shortest(float(torch.tensor(2.7)), 1e-6) == 2.7
    assert shortest(0.123456789, 1e-9) == 0.123456789
