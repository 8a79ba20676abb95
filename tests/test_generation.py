"""Exact two-way decoding on every tiny family: greedy and guided generation equal teacher
forcing, sampling stays in the top-k, scores, and the H+W-1 backbone forward count."""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from tests import tiny


@pytest.fixture(scope="module", params=list(tiny.FAMILY_CASES))
def family(request):
    return (request.param, *tiny.patched_family(request.param))


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_greedy_generation_equals_teacher_forcing(family, mode):
    name, model, cond, mask = family
    codes = model.generate(cond, mode=mode, top_k=1, cond_mask=mask)
    H, W = model.flashar.ctx.recipe.image.grid
    assert codes.shape == (cond.shape[0], H, W) and codes.dtype == torch.long
    lg = fa.logits(model, cond, codes, mode=mode, cond_mask=mask)
    assert lg.shape == (cond.shape[0], H, W, model.flashar.ctx.recipe.image.codebook_size)
    # Exact, on any CPU: the cached and the full forward differ by round-off (numerics.reorder_bound,
    # ~1e-6 of the logits' scale), so an argmax flips only where the top two logits of these random
    # models lie within that of each other; such near-ties have odds of order 1e-6 per cell.
    assert torch.equal(lg.argmax(-1), codes)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_greedy_with_cfg_equals_guided_teacher_forcing(family, mode):
    name, model, cond, mask = family
    if not fa.decoding.has_uncond(model.flashar.ctx):
        with pytest.raises(ValueError, match="unconditional"):
            model.generate(cond, mode=mode, top_k=1, cfg_scale=3.0, cond_mask=mask)
        return
    for schedule in ("constant", "linear"):
        codes = model.generate(cond, mode=mode, top_k=1, cfg_scale=3.0, cfg_schedule=schedule, cond_mask=mask)
        lg = fa.logits(model, cond, codes, mode=mode, cfg_scale=3.0, cfg_schedule=schedule, cond_mask=mask)
        assert torch.equal(lg.argmax(-1), codes)


def test_sampled_codes_lie_in_top_k_of_teacher_forcing(family):
    name, model, cond, mask = family
    g = torch.Generator().manual_seed(0)
    codes = model.generate(cond, top_k=3, temperature=1.5, generator=g, cond_mask=mask)
    lg = fa.logits(model, cond, codes, cond_mask=mask)
    top3 = lg.topk(3, -1).indices
    assert (top3 == codes[..., None]).any(-1).all()
    again = model.generate(cond, top_k=3, temperature=1.5, generator=torch.Generator().manual_seed(0), cond_mask=mask)
    assert torch.equal(codes, again)


def test_score_is_sum_of_log_probs(family):
    name, model, cond, mask = family
    codes = model.generate(cond, mode="raster", top_k=0, generator=torch.Generator().manual_seed(3), cond_mask=mask)
    for mode in ("two_way", "raster"):
        s = fa.score(model, cond, codes, mode=mode, cond_mask=mask)
        lp = torch.log_softmax(fa.logits(model, cond, codes, mode=mode, cond_mask=mask), -1)
        ref = lp.gather(-1, codes[..., None]).flatten(1).sum(1)
        torch.testing.assert_close(s, ref)  # float32 defaults: the same ops, summed over H*W log-probs
        assert s.shape == (cond.shape[0],) and (s < 0).all()


@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_backbone_forward_count(family, mode):
    name, model, cond, mask = family
    ctx = model.flashar.ctx
    calls = []
    handle = ctx.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        model.generate(cond, mode=mode, top_k=1, cond_mask=mask)
    finally:
        handle.remove()
    H, W = ctx.recipe.image.grid
    assert len(calls) == (H + W - 1 if mode == "two_way" else H * W)
