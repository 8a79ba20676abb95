"""Property tests (hypothesis) over grid shapes, prefix lengths, batch sizes, CFG and sampling.

Decoding is checked on values: greedy codes are forced back through every step and each
step's logits compared with one teacher-forced pass under the derived float bound
(``flashar_adapt.exactness``); generate's codes are the argmax of exactly those step logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashar_adapt as fa
from flashar_adapt.exactness import steps_match_teacher
from tests import tiny

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_HF = {}


def _assert_steps_are_teacher_forcing(model, cond, codes, mode, cfg, mask=None):
    """Every step's logits, the greedy codes forced, equal one teacher-forced pass within the
    derived bound; the greedy codes are their argmax (the same arithmetic as generate's, so
    this equality is exact, not a near-tie bet)."""
    found = steps_match_teacher(model, cond, codes, mode, cond_mask=mask, cfg_scale=cfg)
    assert found.ok, found.describe()
    for cells, lg in zip(found.run.cells, found.run.logits):
        assert torch.equal(lg.argmax(-1), codes.flatten(1)[:, cells])


def _hf_model():
    if "m" not in _HF:
        _HF["m"] = tiny.hf_llama(max_pos=512)
    return _HF["m"]


@pytest.mark.numerics
@SETTINGS
@given(
    H=st.integers(1, 5),
    W=st.integers(1, 5),
    prefix=st.integers(1, 6),
    batch=st.integers(1, 3),
    eol=st.booleans(),
    meta=st.booleans(),
    cfg=st.sampled_from([1.0, 2.5]),
    mode=st.sampled_from(["two_way", "raster"]),
    seed=st.integers(0, 2**16),
)
def test_property_incremental_equals_teacher_forcing(H, W, prefix, batch, eol, meta, cfg, mode, seed):
    model = _hf_model()
    r = tiny.hf_llama_recipe(eol=99 if eol else None, before=[97, 98] if meta else [], grid=(H, W))
    fa.patch(model, r)
    try:
        tiny.randomize(model.flashar, seed)
        g = torch.Generator().manual_seed(seed)
        cond = torch.randint(1, 90, (batch, prefix), generator=g)
        lengths = torch.randint(1, prefix + 1, (batch,), generator=g)
        mask = torch.arange(prefix)[None] >= (prefix - lengths)[:, None]  # left padding
        cond = cond.masked_fill(~mask, 0)
        codes = model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg, cond_mask=mask)
        _assert_steps_are_teacher_forcing(model, cond, codes, mode, cfg, mask)
    finally:
        fa.unpatch(model)


_LG = {}


@pytest.mark.numerics
@SETTINGS
@given(
    grid=st.integers(1, 5),
    batch=st.integers(1, 4),
    cfg=st.sampled_from([1.0, 4.0]),
    mode=st.sampled_from(["two_way", "raster"]),
    depth=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_llamagen(grid, batch, cfg, mode, depth, seed):
    if grid not in _LG:
        _LG[grid] = tiny.llamagen(grid=grid)
    model = _LG[grid]
    fa.patch(model, tiny.llamagen_recipe(grid=grid), branch_depth=depth, branch_layer=-3)
    try:
        tiny.randomize(model.flashar, seed)
        cond = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed))
        codes = model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg)
        _assert_steps_are_teacher_forcing(model, cond, codes, mode, cfg)
    finally:
        fa.unpatch(model)


@SETTINGS
@given(K=st.integers(2, 30), top_k=st.integers(0, 30), top_p=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_property_sampling_support(K, top_k, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(64, K, generator=g) * 3
    tok = fa.sample(lg, temperature=1.0, top_k=top_k, top_p=top_p, generator=g)
    assert tok.shape == (64,) and (tok >= 0).all() and (tok < K).all()
    order = lg.argsort(-1, descending=True)
    rank = (order == tok[:, None]).float().argmax(-1)
    if 0 < top_k:
        assert (rank < top_k).all()
    probs = torch.softmax(lg, -1).gather(-1, order).cumsum(-1)
    mass_before = torch.cat([torch.zeros(64, 1), probs[:, :-1]], 1).gather(-1, rank[:, None])[:, 0]
    assert (mass_before <= top_p + 1e-6).all()  # a token is kept only while the mass before it is below top_p
